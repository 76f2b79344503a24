"""``segnet export``: the command over ``segnet_cli.export``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from segnet_cli.cli.common import QuietOpt, fail, quiet_tf
from segnet_cli.config import ExportFormat
from segnet_cli.errors import SegnetError

FORMAT_HELP = (
    f"{', '.join(ExportFormat.values())}: an .onnx file (ONNX Runtime; pip install "
    "'segnet-cli[onnx]'), a SavedModel folder (TF Serving), or a .tflite file (LiteRT; "
    "pip install 'segnet-cli[litert]')."
)


def export_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: NAME.onnx, a SavedModel folder, or NAME.tflite.", show_default=False)],
    format: Annotated[str, typer.Option("--format", "-f", help=FORMAT_HELP, show_default=False)],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="The .keras model to export (default: the bundled CamVid model).")] = None,
    classes_output: Annotated[bool, typer.Option("--classes-output", help="Output class indices (N,H,W) uint8 instead of probabilities (N,H,W,K) float32.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report (output, size, parity figures) as one JSON object on stdout.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a model to ONNX, a TensorFlow SavedModel or LiteRT, class table inside.

    The exported model takes NHWC float32 pixels in [0, 1] of any height and width: divide
    8-bit pixels by 255 (16-bit by 65535), as segnet does; the model's mean/std scaling is
    inside the graph. Float rather than uint8 so one graph serves 8- and 16-bit images and
    `segnet predict --model x.onnx` runs it on exactly the tiles the .keras model gets. It
    returns float32 class probabilities (N,H,W,K), or uint8 class indices (N,H,W) with
    --classes-output. Class names, colours, input scaling, stride, receptive field and the
    source model's sha256 travel inside the file (ONNX metadata_props, SavedModel
    assets.extra/segnet.json, LiteRT metadata). The written file is run once on small
    synthetic images and compared with the .keras model; one that disagrees is removed.
    """
    from segnet_cli import ui
    from segnet_cli.config import ExportConfig

    try:
        ui.configure(quiet)
        cfg = ExportConfig(out=out, format=format, model=model, classes_output=classes_output,
                           overwrite=overwrite)
    except SegnetError as exc:
        raise fail(exc) from None
    quiet_tf()
    from segnet_cli.export import export_model

    try:
        report = export_model(cfg, log=ui.info)
    except SegnetError as exc:
        raise fail(exc) from None
    d = report.details
    parity = d["parity"]
    if as_json:
        typer.echo(json.dumps({k: v for k, v in d.items() if k != "metadata"}))
    shapes = " and ".join(f"{n}x{h}x{w}" for n, h, w in parity["shapes"])
    ui.info(
        f"parity check on {shapes} noise: {parity['agreement']:.4%} of {parity['pixels']} "
        f"pixels agree with the .keras model"
        + (f", largest probability gap {parity['max_probability_gap']:.1e}"
           if d["output"] == "probabilities" else "")
    )
    meta = d["metadata"]
    ui.summary(
        f"exported {meta['export']['source_model']} -> {d['out']} ({d['format']}, "
        f"{d['bytes'] / 1e6:.1f} MB, output {d['output']}, {len(meta['class_names'])} classes) "
        f"in {report.seconds:.1f}s"
    )
    raise typer.Exit(report.return_code)
