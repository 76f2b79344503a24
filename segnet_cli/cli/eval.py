"""``segnet eval``: the command line over ``segnet_cli.evaluate``.

Human output (progress, the per-class table, the headline figures, failures) goes to stderr;
``--json`` puts one JSON object with every figure on stdout for scripts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from segnet_cli.cli.common import (
    BatchOpt,
    BlendOpt,
    DeviceOpt,
    HaloOpt,
    MaxPixelsOpt,
    ModelOpt,
    PrecisionOpt,
    QuietOpt,
    TileOpt,
    TTAOpt,
    fail,
    inference_config,
    quiet_tf,
)
from segnet_cli.errors import SegnetError


def eval_command(
    images: Annotated[Optional[Path], typer.Argument(help="Images folder or list file of 'image mask' lines (optional with --pred).", show_default=False)] = None,
    masks: Annotated[Optional[Path], typer.Option("--masks", help="Ground-truth masks folder (default: <images>annot).")] = None,
    model: ModelOpt = None,
    pred: Annotated[Optional[Path], typer.Option("--pred", help="Score this folder of predicted index masks (any tool) instead of running a model.")] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="'camvid', a number of classes, or a JSON/CSV classes file (default: the model's; camvid with --pred).")] = None,
    void: Annotated[Optional[int], typer.Option("--void", help="Void (ignored) mask value (default: the model's or the classes').")] = None,
    rgb_masks: Annotated[bool, typer.Option("--rgb-masks", help="Masks are colour images; map them with the class colours.")] = False,
    tile: TileOpt = None,
    halo: HaloOpt = None,
    batch_size: BatchOpt = None,
    blend: BlendOpt = None,
    tta: TTAOpt = None,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    save_masks: Annotated[Optional[Path], typer.Option("--save-masks", help="Also write the predicted masks here as palette PNGs.")] = None,
    max_pixels: MaxPixelsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every figure as one JSON object on stdout.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the row-normalised confusion matrix as a PNG.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Let --save-masks and --plot replace files that segnet did not write (refused otherwise).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Score a model (or saved masks) against ground truth: G, C, per-class IoU, mIoU.

    Figures come from one confusion matrix over every labelled pixel of the dataset, void
    ignored, as in the SegNet paper. With a model, each image is segmented at full
    resolution with the same tiling as `segnet predict`. With --pred DIR, masks from any tool
    are matched to the ground truth by relative path and stem, and no model is loaded.
    Exits 1 when any file could not be scored (the others are).
    """
    from segnet_cli import ui
    from segnet_cli.config import EvalConfig

    ui.configure(quiet)
    try:
        cfg = EvalConfig(
            images=images,
            masks=masks,
            inference=inference_config(
                model=model, tile=tile, halo=halo, batch_size=batch_size, blend=blend,
                precision=precision, device=device, max_pixels=max_pixels, tta=tta,
            ),
            pred=pred,
            classes=classes,
            void=void,
            rgb_masks=rgb_masks,
            plot=plot,
            save_masks=save_masks,
            overwrite=overwrite,
        )
    except SegnetError as exc:
        raise fail(exc) from None
    if pred is None:
        quiet_tf()  # only model mode needs TensorFlow
    from segnet_cli.evaluate import run_eval

    # Not a ``with`` block: run_eval starts the bar itself once it knows the total, and a
    # second start inside an active rich display would raise.
    bar = ui.Progress("images", 0)
    try:
        report = run_eval(cfg, progress=bar, log=ui.info)
    except SegnetError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        ui.error("interrupted: nothing was scored")
        raise typer.Exit(130) from None
    finally:
        bar.stop()
    d = report.details
    for f in d["failures"]:
        ui.error(f"{f['path']}: {f['error']}" if f["path"] else f["error"])
    if not quiet:
        ui.console().print(_table(d))
    ui.summary(_summary(d, report.seconds))
    if as_json:
        typer.echo(json.dumps(_json_safe({**d, "return_code": report.return_code,
                                          "seconds": round(report.seconds, 3)})))
    raise typer.Exit(report.return_code)


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 100:.1f}"


def _table(d: dict):
    from rich.table import Table

    total = sum(r["truth_pixels"] for r in d["per_class"]) or 1
    t = Table(title=f"{d['images']} image(s), {d['pixels']:,} labelled pixels")
    for col in ("index", "class", "IoU %", "accuracy %", "share of truth %", "predicted %"):
        t.add_column(col, justify="left" if col == "class" else "right")
    pred_total = sum(r["predicted_pixels"] for r in d["per_class"]) or 1
    for r in d["per_class"]:
        t.add_row(
            str(r["index"]),
            r["class"],
            _pct(r["iou"]),
            _pct(r["accuracy"]),
            f"{r['truth_pixels'] / total * 100:.1f}",
            f"{r['predicted_pixels'] / pred_total * 100:.1f}",
        )
    return t


def _summary(d: dict, seconds: float) -> str:
    void = f", void {d['void']} ignored" if d.get("void") is not None else ""
    failed = f", {d['failed']} failed" if d["failed"] else ""
    return (
        f"G {_pct(d['global_accuracy'])}  C {_pct(d['class_accuracy'])}  "
        f"mIoU {_pct(d['mean_iou'])}  fwIoU {_pct(d['fw_iou'])}  "
        f"({d['images']} image(s){failed}{void}; {seconds:.1f} s)"
    )


def _json_safe(obj):
    """NaN and infinities become null: JSON has no NaN and strict parsers reject it."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


__all__ = ["eval_command"]
