"""The ``segnet`` command line: thin commands over the library.

Each command parses its options, builds a config (``segnet_cli.config``), calls one library
function, prints the report and exits with ``report.return_code``. TensorFlow is imported
only inside the commands that run a model, so ``segnet --help`` and ``--version`` are instant.

Exit codes (the same for every command):
  0  all done, or nothing to do
  1  some inputs failed (the others were processed)
  2  usage error: bad option, no input matched, model file missing or invalid
  130/143  interrupted by SIGINT/SIGTERM (nothing partial is left)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from segnet_cli import __version__
from segnet_cli.config import Loss, TilingConfig, TrainConfig
from segnet_cli.errors import EXIT_USAGE, SegnetError

EXIT_CODES_HELP = (
    "Exit codes: 0 all done (or nothing to do); 1 some inputs failed; 2 usage error or no "
    "input matched; 130/143 interrupted (SIGINT/SIGTERM)."
)

app = typer.Typer(
    name="segnet",
    help="Segment images of any size with a Keras SegNet.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from segnet_cli.config import default_model_path
        from segnet_cli.modelfile import read_info

        line = f"segnet {__version__}"
        try:
            info = read_info(default_model_path())
            val = info.validation() or {}
            if val:
                line += (
                    f" (bundled model: {default_model_path().name}, CamVid val mIoU "
                    f"{val.get('mean_iou', 0) * 100:.1f})"
                )
        except SegnetError:
            line += " (no bundled model)"
        typer.echo(line)
        raise typer.Exit(0)


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Segment images of any size with a Keras SegNet."""


def _quiet_tf() -> None:
    """Import TensorFlow now, with its C++ start-up chatter kept off stderr."""
    from segnet_cli.tfload import import_tf

    import_tf()


def _fail(exc: SegnetError) -> typer.Exit:
    from segnet_cli import ui

    ui.error(str(exc))
    for p in getattr(exc, "problems", [])[:200]:
        ui.error(p)
    return typer.Exit(exc.exit_code)


def _parse_pair(text: str, name: str, cast=int) -> tuple:
    parts = text.lower().replace("x", ",").split(",")
    try:
        vals = tuple(cast(p) for p in parts if p.strip())
    except ValueError:
        raise typer.BadParameter(f"{name} must look like 224 or 224x320", param_hint=name) from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2:
        raise typer.BadParameter(f"{name} must look like 224 or 224x320", param_hint=name)
    return vals


# --------------------------------------------------------------------------- train / verify


@app.command()
def verify(
    images: Annotated[Path, typer.Argument(help="Images folder, or a list file of 'image mask' lines.")],
    masks: Annotated[Optional[Path], typer.Option("--masks", help="Masks folder (default: <images>annot).")] = None,
    classes: Annotated[str, typer.Option(help="'camvid', a number of classes, or a JSON/CSV classes file.")] = "camvid",
    void: Annotated[Optional[int], typer.Option(help="Void (ignored) mask value; overrides the classes file.")] = None,
    rgb_masks: Annotated[bool, typer.Option("--rgb-masks", help="Masks are colour images; map them with the class colours.")] = False,
    weight_power: Annotated[float, typer.Option(help="Tempering exponent of the median-frequency weights.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Check every image/mask pair and report every problem; print class histogram and weights.

    Exits 1 when anything is wrong. `segnet train` runs the same checks first.
    """
    from segnet_cli import ui
    from segnet_cli.classes import load_classes
    from segnet_cli.dataset import find_pairs
    from segnet_cli.dataset import verify as run_verify

    try:
        table = load_classes(classes, void)
        pairs, problems = find_pairs(images, masks)
        with ui.Progress("pairs", len(pairs)) as bar:
            report = run_verify(pairs, table, problems, rgb_masks, weight_power, lambda d, t: bar.advance())
    except SegnetError as exc:
        raise _fail(exc) from None
    total = int(report.pixel_counts.sum()) or 1
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "pairs": report.pairs,
                    "ok": report.ok,
                    "problems": report.problems,
                    "classes": [
                        {"class": n, "pixels": int(c), "share": c / total, "weight": float(w)}
                        for n, c, w in zip(table.names, report.pixel_counts, report.weights)
                    ],
                    "void_pixels": report.void_pixels,
                }
            )
        )
    else:
        from rich.table import Table

        t = Table(title=f"{report.pairs} pairs")
        for col in ("index", "class", "pixels", "share", "median-freq weight"):
            t.add_column(col, justify="right" if col != "class" else "left")
        for i, (n, c, w) in enumerate(zip(table.names, report.pixel_counts, report.weights)):
            t.add_row(str(i), n, f"{int(c):,}", f"{c / total:.3f}", f"{w:.4f}")
        ui.console().print(t)
        if report.void_pixels:
            ui.info(f"void pixels (ignored): {report.void_pixels:,}")
        for p in report.problems:
            ui.error(p)
        ui.info("OK: no problems found" if report.ok else f"{len(report.problems)} problem(s) found")
    raise typer.Exit(report.return_code)


@app.command()
def train(
    images: Annotated[Optional[Path], typer.Argument(help="Training images folder (or list file); optional with --resume.")] = None,
    masks: Annotated[Optional[Path], typer.Option("--masks", help="Training masks folder (default: <images>annot).")] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation images folder; the best model is chosen on it.")] = None,
    val_masks: Annotated[Optional[Path], typer.Option("--val-masks", help="Validation masks (default: <val>annot).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder for checkpoints, history and the model.")] = None,
    classes: Annotated[Optional[str], typer.Option(help="'camvid', a number of classes, or a JSON/CSV classes file.")] = None,
    void: Annotated[Optional[int], typer.Option(help="Void (ignored) mask value.")] = None,
    rgb_masks: Annotated[bool, typer.Option("--rgb-masks", help="Masks are colour images mapped with the class colours.")] = False,
    width: Annotated[Optional[float], typer.Option(help="Width multiplier (1.0 = VGG16's 64..512 channels); with --init, the model's.")] = None,
    stages: Annotated[Optional[int], typer.Option(help="Encoder/decoder stages (1-5); with --init, the model's.")] = None,
    crop: Annotated[Optional[str], typer.Option(help="Random crop size, e.g. 224 or 257x321.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Crops per step.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (with --resume: the new total).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (AdamW, cosine decay).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay.")] = None,
    class_weights: Annotated[Optional[str], typer.Option(help="'auto' (median frequency), 'none', or a file of weights.")] = None,
    weight_power: Annotated[Optional[float], typer.Option(help="Temper median-frequency weights: w**power (1 = paper).")] = None,
    scale: Annotated[Optional[str], typer.Option(help="Random scale range, e.g. 0.75,1.25.")] = None,
    jitter: Annotated[Optional[float], typer.Option(help="Colour jitter strength (0 = off).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="float32, bfloat16 (mixed) or float16 (mixed, GPU).")] = None,
    loss: Annotated[Optional[Loss], typer.Option("--loss", help=f"ce: class-weighted cross-entropy (the paper's); ce+lovasz: plus the Lovász-softmax loss (per-image IoU); lovasz: that alone. Default {TrainConfig.loss}.")] = None,
    val_every: Annotated[Optional[int], typer.Option(help="Validate every N epochs.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped.")] = False,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start a new run from this segnet model's weights (fresh optimizer and schedule); width, stages and input scaling are the model's. A classifier for another number of classes starts afresh.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop after the epoch that passes this wall time.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Decoding threads (default: tf.data's choice).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and the summary.")] = False,
) -> None:
    """Train SegNet on image/mask folders (verifies the data first; resumable)."""
    from segnet_cli import ui

    ui.configure(quiet)
    given = {
        "masks": masks,
        "val_images": val,
        "val_masks": val_masks,
        "out": out,
        "classes": classes,
        "void": void,
        "width": width,
        "stages": stages,
        "batch_size": batch_size,
        "epochs": epochs,
        "learning_rate": lr,
        "weight_decay": weight_decay,
        "class_weights": class_weights,
        "weight_power": weight_power,
        "jitter": jitter,
        "precision": precision,
        "loss": loss,
        "val_every": val_every,
        "max_minutes": max_minutes,
        "seed": seed,
        "workers": workers,
        "init": init,
        "crop": _parse_pair(crop, "--crop") if crop else None,
        "scale": _parse_pair(scale, "--scale", float) if scale else None,
    }
    given = {k: v for k, v in given.items() if v is not None}
    # What the user typed, so that --resume can refuse an option that contradicts the run
    # even when its value is the default.
    typed = set(given) | {k for k, v in (("images", images), ("rgb_masks", rgb_masks)) if v}
    if val is not None and val_masks is None:
        guess = val.parent / f"{val.name}annot"
        if guess.is_dir():
            given["val_masks"] = guess
    try:
        # Every value is checked here, before any data is read.
        cfg = TrainConfig(
            images=images, rgb_masks=rgb_masks, resume=resume, given=frozenset(typed), **given
        )
    except SegnetError as exc:
        raise _fail(exc) from None
    _quiet_tf()
    from segnet_cli.train import run_train

    try:
        with ui.Progress("steps", 0, every=30.0) as bar:
            report = run_train(cfg, progress=bar, log=ui.info)
    except SegnetError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:  # before the run's own signal handling is in place
        ui.error("interrupted before training started")
        raise typer.Exit(130) from None
    d = report.details
    if d.get("interrupted"):
        import signal

        ui.summary(
            f"interrupted by {signal.Signals(d['interrupted']).name}: nothing half-written; "
            f"{d['out']}/checkpoint.keras holds epoch {d['epochs']}; continue with --resume"
            if d["epochs"]
            else f"interrupted by {signal.Signals(d['interrupted']).name} before the first "
            "epoch ended: nothing written"
        )
        raise typer.Exit(report.return_code)
    best = d.get("best_val_miou")
    ui.info(
        f"model: {d['model']}  (epochs {d['epochs']}"
        + (f", best val mIoU {best * 100:.1f}" if best is not None else "")
        + f", {report.seconds / 60:.1f} min)"
    )
    raise typer.Exit(report.return_code)


# --------------------------------------------------------------------------- predict


def _tiling(base, tile, halo, batch_size, blend):
    from dataclasses import replace

    given = {"tile": tile, "halo": halo, "batch_size": batch_size, "blend": blend}
    return replace(base, **{k: v for k, v in given.items() if v is not None})


_T = TilingConfig()
TileOpt = Annotated[Optional[int], typer.Option("--tile", help=f"Tile size in pixels (multiple of the model's stride; default {_T.tile}).")]
HaloOpt = Annotated[Optional[int], typer.Option("--halo", help=f"Context around each tile's core, in pixels (default {_T.halo}).")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", help=f"Tiles per model batch and device (default {_T.batch_size}; raise it on a GPU for small tiles).")]
BlendOpt = Annotated[Optional[str], typer.Option("--blend", help="'center' (overlap-tile, exact) or 'gaussian'.")]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="Model file (default: the bundled CamVid model).")]
PrecisionOpt = Annotated[Optional[str], typer.Option("--precision", help="float32, bfloat16 or float16 (GPU).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, gpu or gpu:N (default: TensorFlow's choice).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and the summary.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per input and a summary on stdout.")]
LogOpt = Annotated[Optional[Path], typer.Option("--log-file", help="Append human messages to this file too.")]


@app.command(epilog=EXIT_CODES_HELP)
def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or glob patterns.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder; masks mirror the inputs' relative paths as <stem>.png.")],
    model: ModelOpt = None,
    tile: TileOpt = None,
    halo: HaloOpt = None,
    batch_size: BatchOpt = None,
    blend: BlendOpt = None,
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write <stem>.overlay.jpg: the mask over the photo.")] = False,
    max_pixels: Annotated[Optional[int], typer.Option("--max-pixels", help="Raise the decompression-bomb limit (pixels).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo masks that are already up to date.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be done; run nothing.")] = False,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    queue_depth: Annotated[Optional[int], typer.Option("--queue-depth", help="Images decoded ahead of the model.")] = None,
    engine: Annotated[Optional[str], typer.Option("--engine", help="local (this machine) or ray (a Ray cluster; pip install 'segnet-cli[ray]').")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster for --engine ray (host:port or ray://host:port); default RAY_ADDRESS, else a local cluster.")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogOpt = None,
) -> None:
    """Segment images into 8-bit palette PNG masks (class indices + class colours).

    Images larger than the tile size are tiled and stitched exactly. Re-running skips masks
    that are up to date; outputs are written atomically; one bad input never stops the batch.
    """
    from segnet_cli import ui
    from segnet_cli.config import PredictConfig, TilingConfig

    try:
        ui.configure(quiet, log_file)
    except SegnetError as exc:
        raise _fail(exc) from None
    if address and engine != "ray":
        ui.error("--address needs --engine ray")
        raise typer.Exit(EXIT_USAGE)
    given = {
        "precision": precision,
        "device": device,
        "queue_depth": queue_depth,
        "engine": engine,
        "address": address,
    }
    cfg = PredictConfig(
        inputs=tuple(inputs),
        out=out,
        model=model,
        tiling=_tiling(TilingConfig(), tile, halo, batch_size, blend),
        overlay=overlay,
        max_pixels=max_pixels,
        overwrite=overwrite,
        dry_run=dry_run,
        json=as_json,
        **{k: v for k, v in given.items() if v is not None},
    )
    _quiet_tf()
    from segnet_cli.predict import run_predict, summary_line

    def on_event(o):
        if as_json:
            typer.echo(o.to_json())
        if o.status == "failed":
            ui.error(f"{o.path}: {o.error}")
        elif o.status == "planned":
            ui.info(f"would segment {o.path} -> {o.output}")
        elif o.status == "skipped" and o.extra.get("reason", "").startswith("another"):
            ui.warn(f"{o.path}: {o.extra['reason']}; skipped")

    try:
        bar = ui.Progress("images", 0)
        report = run_predict(cfg, on_event=on_event, progress=bar, log=ui.info)
        bar.stop()
    except SegnetError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps({"summary": {
            "done": report.done, "skipped": report.skipped, "failed": report.failed,
            "seconds": round(report.seconds, 3), "return_code": report.return_code,
            "interrupted": bool(report.details.get("interrupted")),
        }}))
    ui.summary(summary_line(report))
    raise typer.Exit(report.return_code)


# --------------------------------------------------------------------------- info


@app.command()
def info(
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Model file (default: the bundled model).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the model's metadata as JSON.")] = False,
) -> None:
    """Describe a model file: classes, colours, input, architecture and validation figures."""
    from segnet_cli.config import default_model_path
    from segnet_cli.modelfile import read_info

    path = model or default_model_path()
    try:
        meta = read_info(path)
    except SegnetError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(meta.to_json())
        raise typer.Exit(0)
    from rich.console import Console

    c = Console(highlight=False)  # the description is the command's output: stdout
    c.print(f"model: {path}", markup=False)
    arch = meta.architecture
    c.print(
        f"SegNet, width {arch.get('width')}, {arch.get('stages')} stages, "
        f"{arch.get('params', 0):,} parameters; {meta.in_channels} input channels; "
        f"stride {meta.stride}, receptive field {meta.receptive_field} px",
        markup=False,
    )
    c.print(f"input scaling: {meta.scaling.mode}, mean {meta.scaling.mean}, std {meta.scaling.std}", markup=False)
    val = meta.validation() or {}
    for i, (n, rgb) in enumerate(zip(meta.class_names, meta.palette)):
        iou = (val.get("per_class_iou") or [None] * len(meta.class_names))[i]
        extra = f"  val IoU {iou * 100:.1f}" if iou is not None else ""
        c.print(f"  {i:3d}  [rgb({rgb[0]},{rgb[1]},{rgb[2]})]■[/]  {n}{extra}")
    if val:
        c.print(
            f"validation: mIoU {val['mean_iou'] * 100:.1f}, G {val['global_accuracy'] * 100:.1f}, "
            f"C {val['class_accuracy'] * 100:.1f}"
            + (f" (epoch {val['epoch']})" if val.get("epoch") else ""),
            markup=False,
        )
    raise typer.Exit(0)


def _register_optional_commands() -> None:
    """Commands defined in their own modules (each keeps TensorFlow imports lazy)."""
    import importlib

    for module, name in (("segnet_cli.tile_cli", "tile"), ("segnet_cli.eval_cli", "eval")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        app.command(name, epilog=EXIT_CODES_HELP)(getattr(mod, f"{name}_command"))


_register_optional_commands()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
