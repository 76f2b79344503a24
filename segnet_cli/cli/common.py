"""What every command shares: option types, the error-to-exit-code edge, small parsers.

Help texts read their defaults from ``segnet_cli.config``, so a number is written once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from segnet_cli.config import TTA, Blend, InferenceConfig, Precision, TilingConfig
from segnet_cli.errors import SegnetError, UsageError

EXIT_CODES_HELP = (
    "Exit codes: 0 all done (or nothing to do); 1 some inputs failed; 2 usage error or no "
    "input matched; 130/143 interrupted (SIGINT/SIGTERM); 141 output pipe closed."
)

_T = TilingConfig()
TileOpt = Annotated[Optional[int], typer.Option("--tile", help=f"Tile size in pixels, rounded down to a multiple of the model's stride (32 for 5 stages); default {_T.tile}.")]
HaloOpt = Annotated[Optional[int], typer.Option("--halo", help=f"Context around each tile's core, in pixels, rounded up to a multiple of the stride; default {_T.halo}. Tiling is exact (masks equal a whole-image run) when the halo is at least half the model's receptive field (`segnet info`); smaller halos trade a few border pixels for speed.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", help=f"Tiles per model batch and device (default {_T.batch_size}; raise it on a GPU for small tiles).")]
BlendOpt = Annotated[Optional[str], typer.Option("--blend", help=f"{' or '.join(repr(v) for v in Blend.values())}: overlap-tile (exact when the halo covers the model's reach; see --halo) or Gaussian-weighted probabilities (default {_T.blend}).")]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="Model file: .keras, or .onnx from `segnet export` (run with ONNX Runtime; pip install 'segnet-cli[onnx]'). Default: the bundled CamVid model.")]
PrecisionOpt = Annotated[Optional[str], typer.Option("--precision", help=f"{', '.join(Precision.values())} (mixed; float16 is for GPUs). Default {Precision.FLOAT32}.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, gpu or gpu:N (default: TensorFlow's choice).")]
TTAOpt = Annotated[Optional[str], typer.Option("--tta", help=f"Test-time augmentation: {TTA.NONE} (default) or {TTA.FLIP} (mean of the image's and its mirror's probabilities; twice the compute; exact under tiling).")]
MaxPixelsOpt = Annotated[Optional[int], typer.Option("--max-pixels", help="Raise the decompression-bomb limit (pixels; the decoded-bytes limit follows it).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and the summary.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per input and a summary on stdout.")]
LogOpt = Annotated[Optional[Path], typer.Option("--log-file", help="Append human messages to this file too.")]
EngineOpt = Annotated[Optional[str], typer.Option("--engine", help="local (this machine; the default) or ray (a Ray cluster; pip install 'segnet-cli[ray]').")]
AddressOpt = Annotated[Optional[str], typer.Option("--address", help="Ray cluster for --engine ray (host:port or ray://host:port); default RAY_ADDRESS, else a cluster started with `ray start` on this machine, else a new local one.")]


def fail(exc: SegnetError) -> typer.Exit:
    """The one place a library error becomes a message and an exit code."""
    from segnet_cli import ui

    ui.error(str(exc))
    for p in getattr(exc, "problems", [])[:200]:
        ui.error(p)
    return typer.Exit(exc.exit_code)


def refuse_log_onto(log_file: Path | None, named: list[tuple[str, Path | None]]) -> None:
    """Refuse a ``--log-file`` that names one of the command's inputs or outputs.

    Checked before the log is opened, so nothing is created: log lines appended to an input
    would change it, and an output written over the log would lose it. (``predict`` checks
    the masks it writes inside ``--out`` once its inputs are known: ``predict.plan``.)

    Args:
        log_file: the ``--log-file`` path, or None.
        named: ``(option, path)``: each input or output and the option that names it
            (path None: not used).

    Raises:
        UsageError: ``log_file`` is one of them.
    """
    from segnet_cli.io.files import same_file

    if log_file is None:
        return
    for option, path in named:
        if path is not None and same_file(path, log_file):
            raise UsageError(f"--log-file is also {option}: give the log a file of its own", log_file)


def quiet_tf() -> None:
    """Import TensorFlow now, with its C++ start-up chatter kept off stderr."""
    from segnet_cli.model.tfload import import_tf

    import_tf()


def parse_pair(text: str, name: str, cast=int, example: str = "224 or 224x320") -> tuple:
    """``224`` or ``224x320`` (or ``0.5,1.5``) as a pair; a bad value is a usage error.

    One value stands for both. Every part must be there: ``7x``, ``x7`` and ``7xx8`` are
    refused, not read as ``7``, since a typo should not silently train on 7x7 crops.
    """
    parts = text.strip().lower().replace("x", ",").split(",")
    try:
        if len(parts) > 2 or any(not p.strip() for p in parts):
            raise ValueError(text)
        vals = tuple(cast(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(
            f"{name} must look like {example}, not {text!r}", param_hint=name
        ) from None
    return vals * 2 if len(vals) == 1 else vals


def inference_config(
    *,
    model: Path | None,
    tile: int | None,
    halo: int | None,
    batch_size: int | None,
    blend: str | None,
    precision: str | None,
    device: str | None,
    max_pixels: int | None,
    tta: str | None = None,
) -> InferenceConfig:
    """The shared inference config from the options the user gave (None: the default).

    Raises:
        SegnetError: a bad value (a ``UsageError`` naming the option).
    """
    given = {"tile": tile, "halo": halo, "batch_size": batch_size, "blend": blend}
    tiling = replace(TilingConfig(), **{k: v for k, v in given.items() if v is not None})
    return InferenceConfig(
        model=model,
        tiling=tiling,
        device=device,
        max_pixels=max_pixels,
        **({"precision": precision} if precision is not None else {}),
        **({"tta": tta} if tta is not None else {}),
    )


__all__ = [
    "EXIT_CODES_HELP",
    "fail",
    "quiet_tf",
    "parse_pair",
    "inference_config",
]
