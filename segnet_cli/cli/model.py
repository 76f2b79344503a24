"""``segnet info``: what a model file holds, read without TensorFlow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from segnet_cli.cli.common import fail
from segnet_cli.errors import SegnetError


def info_command(
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Model file, .keras or an exported .onnx (default: the bundled model).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the model's metadata as JSON.")] = False,
) -> None:
    """Describe a model file: classes, colours, input, architecture and validation figures."""
    from segnet_cli.config import default_model_path
    from segnet_cli.model.modelfile import read_info

    path = model or default_model_path()
    try:
        meta = read_info(path)
    except SegnetError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(meta.to_json())
        raise typer.Exit(0)
    from rich.console import Console
    from rich.markup import escape

    from segnet_cli import ui

    # The description is the command's output: stdout, never wrapped (a piped line stays a
    # line, a sha256 stays whole).
    c = Console(highlight=False, soft_wrap=True)
    c.print(f"model: {ui.safe(path)}", markup=False)
    arch = meta.architecture
    dropout = f", trained with dropout {arch['dropout']}" if arch.get("dropout") else ""
    c.print(
        f"SegNet, width {arch.get('width')}, {arch.get('stages')} stages, "
        f"{arch.get('params', 0):,} parameters{dropout}; {meta.in_channels} input channels; "
        f"stride {meta.stride}, receptive field {meta.receptive_field} px",
        markup=False,
    )
    c.print(f"input scaling: {meta.scaling.mode}, mean {meta.scaling.mean}, std {meta.scaling.std}", markup=False)
    teachers = meta.training.get("teachers") or []
    if teachers:
        names = ", ".join(
            f"{Path(t['path']).name} (sha256 {t['sha256'][:12]})" for t in teachers
        )
        share = (meta.training.get("config") or {}).get("distill")
        c.print(
            f"distilled from {len(teachers)} teacher(s): {ui.safe(names)}"
            + (f"; distillation share {share}" if share is not None else ""),
            markup=False,
        )
    from segnet_cli.model.modelfile import is_onnx

    if is_onnx(path):
        from segnet_cli.model.modelfile import read_metadata

        export = read_metadata(path).get("export") or {}
        c.print(
            f"exported by segnet {export.get('segnet_version')} from {export.get('source_model')} "
            f"(sha256 {export.get('source_sha256')}); input '{export.get('input', {}).get('name')}' "
            f"NHWC float32 in [0, 1], output '{export.get('output', {}).get('name')}'",
            markup=False,
        )
    val = meta.validation() or {}
    held = meta.training.get("held_out") or {}
    # The per-class column names its figures: a model whose final fit saw its validation
    # split records only held-out ones.
    kind, per_class = meta.headline() or ("val", {})
    column = f"{kind} IoU"
    for i, (n, rgb) in enumerate(zip(meta.class_names, meta.palette)):
        iou = (per_class.get("per_class_iou") or [None] * len(meta.class_names))[i]
        extra = f"  {column} {iou * 100:.1f}" if iou is not None else ""
        # The swatch shows on a colour terminal; the numbers survive a pipe and NO_COLOR.
        c.print(f"  {i:3d}  [rgb({rgb[0]},{rgb[1]},{rgb[2]})]■[/] {rgb[0]:3d},{rgb[1]:3d},{rgb[2]:3d}"
                f"  {escape(ui.safe(n))}{extra}")
    # Figures a model card records (``training["val"]``, ``training["held_out"]``) name
    # their split; a run's own history only has its epoch.
    for label, rec in (("validation", val), ("held out", held)):
        if not rec:
            continue
        split = f" on {rec['split']}" if rec.get("split") else ""
        c.print(
            f"{label}{split}: mIoU {rec['mean_iou'] * 100:.1f}, "
            f"G {rec['global_accuracy'] * 100:.1f}, C {rec['class_accuracy'] * 100:.1f}"
            + (f" (epoch {rec['epoch']})" if rec.get("epoch") else ""),
            markup=False,
            soft_wrap=True,
        )
    raise typer.Exit(0)
