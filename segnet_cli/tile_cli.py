"""``segnet tile``: the command over ``segnet_cli.tile`` (registered by ``segnet_cli.cli``).

TensorFlow is imported only when a run needs the model, so ``segnet --help`` stays instant
and ``segnet tile --plan`` never loads it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from segnet_cli.cli import (
    BatchOpt,
    BlendOpt,
    DeviceOpt,
    HaloOpt,
    LogOpt,
    ModelOpt,
    PrecisionOpt,
    QuietOpt,
    TileOpt,
    _fail,
    _quiet_tf,
    _tiling,
)
from segnet_cli.config import MEMORY_BUDGET_MB
from segnet_cli.errors import EXIT_USAGE, SegnetError


def tile_command(
    image: Annotated[Path, typer.Argument(help="The image to segment: a TIFF of any size (tiled, striped, BigTIFF), or any image Pillow reads.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Mask TIFF to write (default: <stem>.mask.tif beside the input).")] = None,
    model: ModelOpt = None,
    tile: TileOpt = None,
    halo: HaloOpt = None,
    batch_size: BatchOpt = None,
    blend: BlendOpt = None,
    plan: Annotated[bool, typer.Option("--plan", help="Print the grid, output size, estimated peak memory and run time; run nothing.")] = False,
    max_memory: Annotated[Optional[float], typer.Option("--max-memory", help="Hard peak-memory limit in MiB: lowers the batch, then the tile size, to fit, or refuses. Without it (and without --batch-size) the batch is lowered to stay under " f"{MEMORY_BUDGET_MB:.0f} MiB.")] = None,
    probabilities: Annotated[Optional[str], typer.Option("--probabilities", help="Also write <stem>.prob.tif: 'confidence' (winning class's probability) or 'classes' (one band per class).")] = None,
    prob_dtype: Annotated[Optional[str], typer.Option("--prob-dtype", help="Probability raster type: float16 or uint8 (probability x 255).")] = None,
    compression: Annotated[Optional[str], typer.Option("--compression", help="Output compression: zlib, zstd, lzw, packbits, lzma or none.")] = None,
    out_tile: Annotated[Optional[int], typer.Option("--out-tile", help="Output TIFF tile size (multiple of 16).")] = None,
    nodata_class: Annotated[Optional[int], typer.Option("--nodata-class", help="Mask value for input pixels equal to the input's GDAL nodata.")] = None,
    max_pixels: Annotated[Optional[int], typer.Option("--max-pixels", help="Pixel limit for formats decoded whole (not TIFFs read window by window).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo the mask even if it is up to date.")] = False,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    engine: Annotated[Optional[str], typer.Option("--engine", help="local (this machine) or ray (spread the tile rows over a Ray cluster's actors; pip install 'segnet-cli[ray]').")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster for --engine ray (host:port or ray://host:port); default RAY_ADDRESS, else a local cluster.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan or the run's report as JSON on stdout.")] = False,
    quiet: QuietOpt = False,
    log_file: LogOpt = None,
) -> None:
    """Segment one huge image (gigapixel TIFF) into a tiled, georeferenced mask TIFF.

    The image is streamed: read band by band, tiled and stitched exactly as `segnet predict`
    does (same masks), and the mask written tile by tile, so memory depends on the image's
    width and the tile size, not on its height. Resolution and GeoTIFF tags are copied; input
    nodata pixels get --nodata-class. The output appears only when complete; a re-run skips
    an up-to-date mask; Ctrl-C stops cleanly. --engine ray spreads the rows of tiles over a
    Ray cluster (same mask); an interrupted ray run resumes from its finished rows.
    """
    from segnet_cli import ui
    from segnet_cli.config import TileConfig, TilingConfig

    try:
        ui.configure(quiet, log_file)
    except SegnetError as exc:
        raise _fail(exc) from None
    if address and engine != "ray":
        ui.error("--address needs --engine ray")
        raise typer.Exit(EXIT_USAGE)
    if engine not in (None, "local", "ray"):
        ui.error(f"--engine must be 'local' or 'ray', not {engine!r}")
        raise typer.Exit(EXIT_USAGE)
    given = {
        "probability_dtype": prob_dtype,
        "compression": compression,
        "out_tile": out_tile,
        "nodata_class": nodata_class,
        "precision": precision,
        "engine": engine,
        "address": address,
    }
    cfg = TileConfig(
        input=image,
        out=out,
        model=model,
        tiling=_tiling(TilingConfig(), tile, halo, batch_size, blend),
        probabilities=probabilities,
        # An explicit --batch-size is the user's choice: the default memory budget (which
        # lowers the batch) then stands aside; an explicit --max-memory still applies.
        max_memory_mb=max_memory if max_memory is not None else (math.inf if batch_size else None),
        plan_only=plan,
        overwrite=overwrite,
        device=device,
        max_pixels=max_pixels,
        **{k: v for k, v in given.items() if v is not None},
    )
    if plan:
        from segnet_cli.tile import plan_tile

        try:
            the_plan = plan_tile(cfg)
        except SegnetError as exc:
            raise _fail(exc) from None
        data, lines = the_plan.as_dict(), the_plan.lines()
        if cfg.engine == "ray":
            from segnet_cli.ray_tile import plan_dict, plan_lines

            data["ray"] = plan_dict(the_plan)
            lines += plan_lines(the_plan)
        if as_json:
            typer.echo(json.dumps(data))
        else:
            for line in lines:
                typer.echo(line)
        raise typer.Exit(0)

    _quiet_tf()
    from segnet_cli.tile import run_tile, summary_lines

    try:
        bar = ui.Progress("tiles", 0)
        try:
            report = run_tile(cfg, progress=bar, log=ui.info)
        finally:
            bar.stop()
    except SegnetError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps({
            "return_code": report.return_code, "done": report.done, "skipped": report.skipped,
            "seconds": round(report.seconds, 3), **report.details,
        }, default=str))
    for line in summary_lines(report):
        ui.summary(line)
    raise typer.Exit(report.return_code)
