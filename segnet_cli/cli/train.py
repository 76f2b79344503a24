"""``segnet train`` and ``segnet verify``: the commands over ``segnet_cli.train`` and
``segnet_cli.dataset``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from segnet_cli.cli.common import fail, parse_pair, quiet_tf
from segnet_cli.config import DEFAULT_EPOCHS, Loss, Mix, TrainConfig
from segnet_cli.errors import SegnetError


def verify_command(
    images: Annotated[Path, typer.Argument(help="Images folder, or a list file of 'image mask' lines.")],
    masks: Annotated[Optional[Path], typer.Option("--masks", help="Masks folder (default: <images>annot).")] = None,
    classes: Annotated[str, typer.Option(help="'camvid', a number of classes, or a JSON/CSV classes file.")] = "camvid",
    void: Annotated[Optional[int], typer.Option(help="Void (ignored) mask value; overrides the classes file.")] = None,
    rgb_masks: Annotated[bool, typer.Option("--rgb-masks", help="Masks are colour images; map them with the class colours.")] = False,
    weight_power: Annotated[float, typer.Option(help="Tempering exponent of the median-frequency weights, as segnet train's.")] = TrainConfig.weight_power,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Check every image/mask pair and report every problem; print class histogram and weights.

    Exits 1 when anything is wrong, 2 when there is no pair to check (a usage error, as for
    eval and predict). `segnet train` runs the same checks first.
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
        raise fail(exc) from None
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


def train_command(
    images: Annotated[Optional[Path], typer.Argument(help="Training images folder (or list file); optional with --resume.")] = None,
    masks: Annotated[Optional[Path], typer.Option("--masks", help="Training masks folder (default: <images>annot).")] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation images folder; the best model is chosen on it.")] = None,
    val_masks: Annotated[Optional[Path], typer.Option("--val-masks", help="Validation masks (default: <val>annot).")] = None,
    hold_out: Annotated[Optional[list[str]], typer.Option("--hold-out", metavar="<glob>", help="Validate on the training images whose file name, or path under IMAGES (a list file: its folder; '/' between folders), matches this glob, e.g. '0006R0_*' for a whole drive, site or slide; never train on them, and choose the best model on them. Repeatable; instead of --val.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=f"Run folder for checkpoints, history and the model (default {TrainConfig.out}).")] = None,
    classes: Annotated[Optional[str], typer.Option(help=f"'camvid', a number of classes, or a JSON/CSV classes file (default {TrainConfig.classes}).")] = None,
    void: Annotated[Optional[int], typer.Option(help="Void (ignored) mask value.")] = None,
    rgb_masks: Annotated[bool, typer.Option("--rgb-masks", help="Masks are colour images mapped with the class colours.")] = False,
    width: Annotated[Optional[float], typer.Option(help=f"Width multiplier (1.0 = VGG16's 64..512 channels; default {TrainConfig.width}); with --init, the model's.")] = None,
    stages: Annotated[Optional[int], typer.Option(help=f"Encoder/decoder stages (1-5; default {TrainConfig.stages}); with --init, the model's.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout rate after the central encoder and decoder stages in training, as Bayesian SegNet places it (default 0 = none); with --init, the model's unless given.")] = None,
    crop: Annotated[Optional[str], typer.Option(help="Random crop size, HEIGHTxWIDTH or one number for a square, e.g. 224 or 257x321 (default 224x288).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help=f"Crops per step (default {TrainConfig.batch_size}).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help=f"Epochs (default {DEFAULT_EPOCHS}; with --resume: the new total).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=f"Peak learning rate (AdamW, cosine decay; default {TrainConfig.learning_rate:g}).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=f"AdamW weight decay (default {TrainConfig.weight_decay:g}).")] = None,
    class_weights: Annotated[Optional[str], typer.Option(help="'auto' (median frequency; the default), 'none', or a file of one weight per class (numbers separated by spaces, commas or lines; a .json file: a JSON list).")] = None,
    weight_power: Annotated[Optional[float], typer.Option(help="Temper median-frequency weights: w**power (1 = paper; default 0.5, chosen on a held-out drive).")] = None,
    scale: Annotated[Optional[str], typer.Option(help=f"Random scale range LOW,HIGH (default {','.join(map(str, TrainConfig.scale))}).")] = None,
    jitter: Annotated[Optional[float], typer.Option(help=f"Colour jitter strength J: a gain and a saturation of 1-2J to 1+2J and an offset of -J to J on [0, 1] values (0 = off; default {TrainConfig.jitter}).")] = None,
    mix: Annotated[Optional[Mix], typer.Option("--mix", help=f"Paste part of the next crop of the batch into each crop: cutmix (a rectangle) or classmix (about half of its classes, each object keeping its shape); default {TrainConfig.mix}.")] = None,
    mix_prob: Annotated[Optional[float], typer.Option("--mix-prob", help=f"Chance that a crop is mixed, with --mix (default {TrainConfig.mix_prob}).")] = None,
    precision: Annotated[Optional[str], typer.Option(help=f"float32, bfloat16 (mixed) or float16 (mixed, GPU); default {TrainConfig.precision}.")] = None,
    loss: Annotated[Optional[Loss], typer.Option("--loss", help=f"ce: class-weighted cross-entropy (the paper's); ce+lovasz: plus the Lovász-softmax loss (per-image IoU); lovasz: that alone. Default {TrainConfig.loss}.")] = None,
    teacher: Annotated[Optional[list[Path]], typer.Option("--teacher", metavar="<model>", help="Distil from this segnet model: its class probabilities on each training image (mirrored view averaged in; several teachers averaged) become soft targets beside the masks, computed once before training. Repeatable; the teachers must segment the run's classes. With --loss ce.")] = None,
    distill: Annotated[Optional[float], typer.Option("--distill", help=f"With --teacher: the share of the loss that follows the teachers (KL divergence), the rest the masks' cross-entropy (default {TrainConfig.distill}).")] = None,
    val_every: Annotated[Optional[int], typer.Option(help=f"Validate every N epochs (default {TrainConfig.val_every}).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped.")] = False,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start a new run from this segnet model's weights (fresh optimizer and schedule); width, stages and input scaling are the model's. A classifier for another number of classes starts afresh.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop after the epoch that passes this wall time.")] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Random seed (default {TrainConfig.seed}).")] = None,
    cache_mb: Annotated[Optional[float], typer.Option("--cache-mb", help=f"Memory for the decoded training images and the --teacher targets, in MB (default {TrainConfig.cache_mb:g}): images that do not fit are decoded again every epoch; targets must fit.")] = None,
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
        "hold_out": tuple(hold_out) if hold_out else None,
        "out": out,
        "classes": classes,
        "void": void,
        "width": width,
        "stages": stages,
        "dropout": dropout,
        "batch_size": batch_size,
        "epochs": epochs,
        "learning_rate": lr,
        "weight_decay": weight_decay,
        "class_weights": class_weights,
        "weight_power": weight_power,
        "jitter": jitter,
        "mix": mix,
        "mix_prob": mix_prob,
        "precision": precision,
        "loss": loss,
        "teachers": tuple(teacher) if teacher else None,
        "distill": distill,
        "val_every": val_every,
        "max_minutes": max_minutes,
        "seed": seed,
        "workers": workers,
        "cache_mb": cache_mb,
        "init": init,
        "crop": parse_pair(crop, "--crop") if crop else None,
        "scale": parse_pair(scale, "--scale", float, "0.75,1.25") if scale else None,
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
        raise fail(exc) from None
    quiet_tf()
    from segnet_cli.train import run_train

    try:
        with ui.Progress("steps", 0, every=30.0) as bar:
            report = run_train(cfg, progress=bar, log=ui.info)
    except SegnetError as exc:
        raise fail(exc) from None
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
    ui.summary(
        f"model: {d['model']}  (epochs {d['epochs']}"
        + (f", best val mIoU {best * 100:.1f}" if best is not None else "")
        + f", {report.seconds / 60:.1f} min)"
    )
    raise typer.Exit(report.return_code)
