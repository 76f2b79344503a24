"""``segnet predict``: the command over ``segnet_cli.predict``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from segnet_cli.cli.common import (
    AddressOpt,
    BatchOpt,
    BlendOpt,
    DeviceOpt,
    EngineOpt,
    HaloOpt,
    JsonOpt,
    LogOpt,
    MaxPixelsOpt,
    ModelOpt,
    PrecisionOpt,
    QuietOpt,
    TileOpt,
    TTAOpt,
    fail,
    inference_config,
    quiet_tf,
    refuse_log_onto,
)
from segnet_cli.config import Report, Status
from segnet_cli.errors import SegnetError


def predict_command(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or glob patterns.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder; masks mirror the inputs' relative paths as <stem>.png.")],
    model: ModelOpt = None,
    tile: TileOpt = None,
    halo: HaloOpt = None,
    batch_size: BatchOpt = None,
    blend: BlendOpt = None,
    tta: TTAOpt = None,
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write <stem>.overlay.jpg: the mask over the photo.")] = False,
    max_pixels: MaxPixelsOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo masks that are already up to date, and replace files in --out that segnet did not write (refused otherwise).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be done; run nothing.")] = False,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    queue_depth: Annotated[Optional[int], typer.Option("--queue-depth", help="Images decoded ahead of the model (default 4).")] = None,
    engine: EngineOpt = None,
    address: AddressOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogOpt = None,
) -> None:
    """Segment images into 8-bit palette PNG masks (class indices + class colours).

    Images larger than the tile size are tiled and stitched (exactly when the halo covers the
    model's reach: see --halo). Re-running skips masks
    that are up to date; outputs are written atomically; one bad input never stops the batch.
    An output that would land on an input is refused before anything runs.
    """
    from segnet_cli import ui
    from segnet_cli.config import PredictConfig

    try:
        named = [("--out", out), ("--model", model), *(("an input", p) for p in inputs)]
        refuse_log_onto(log_file, named)
        ui.configure(quiet, log_file)
        given = {"queue_depth": queue_depth, "engine": engine}
        cfg = PredictConfig(
            inputs=tuple(inputs),
            out=out,
            inference=inference_config(
                model=model, tile=tile, halo=halo, batch_size=batch_size, blend=blend,
                precision=precision, device=device, max_pixels=max_pixels, tta=tta,
            ),
            overlay=overlay,
            overwrite=overwrite,
            dry_run=dry_run,
            address=address,
            log_file=log_file,
            **{k: v for k, v in given.items() if v is not None},
        )
    except SegnetError as exc:
        raise fail(exc) from None
    quiet_tf()
    from segnet_cli.predict import run_predict

    def on_event(o):
        if o.status is Status.FAILED:
            ui.error(f"{o.path}: {o.error}")
        elif o.status is Status.PLANNED:
            ui.info(f"would segment {o.path} -> {o.output}")
        elif o.status is Status.SKIPPED and o.extra.get("reason", "").startswith("another"):
            ui.warn(f"{o.path}: {o.extra['reason']}; skipped")
        if as_json:  # last: a closed stdout stops the run, after the message is out
            typer.echo(o.to_json())

    bar = ui.Progress("images", 0)
    try:
        report = run_predict(cfg, on_event=on_event, progress=bar, log=ui.info)
    except SegnetError as exc:
        raise fail(exc) from None
    finally:
        bar.stop()
    if as_json:
        summary = {
            "done": report.done, "skipped": report.skipped, "failed": report.failed,
            "seconds": round(report.seconds, 3), "return_code": report.return_code,
            "interrupted": bool(report.details.get("interrupted")),
        }
        if report.details.get("dry_run"):
            summary["planned"] = report.details.get("planned", 0)
        try:
            typer.echo(json.dumps({"summary": summary}))
        except BrokenPipeError:
            pass  # the reader went away, which already stopped the run (exit 141)
    ui.summary(summary_line(report))
    raise typer.Exit(report.return_code)


def summary_line(report: Report) -> str:
    """The closing line of a predict run."""
    parts = [f"{report.done} done", f"{report.skipped} skipped", f"{report.failed} failed"]
    d = report.details or {}
    if d.get("dry_run"):
        parts.insert(0, f"{d.get('planned', 0)} to do (dry run)")
    s = ", ".join(parts) + f" in {report.seconds:.1f}s"
    if d.get("nothing_to_do"):
        s += " (nothing to do)"
    if report.done and report.seconds > 0:
        s += f" ({report.done / report.seconds:.2f} images/s)"
    if d.get("interrupted"):
        s += " - interrupted"
    return s
