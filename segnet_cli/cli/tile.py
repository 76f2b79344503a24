"""``segnet tile``: the command over ``segnet_cli.gigapixel``, and all of its display text.

TensorFlow is imported only when a run needs the model, so ``segnet --help`` stays instant
and ``segnet tile --plan`` never loads it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from segnet_cli.cli.common import (
    AddressOpt,
    BatchOpt,
    BlendOpt,
    DeviceOpt,
    HaloOpt,
    LogOpt,
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
from segnet_cli.config import (
    MEMORY_BUDGET_MB,
    Compression,
    Engine,
    ProbabilityDtype,
    ProbabilityMode,
    Report,
    TileConfig,
)
from segnet_cli.errors import SegnetError

MiB = 1024 * 1024


def tile_command(
    image: Annotated[Path, typer.Argument(help="The image to segment: a TIFF of any size (tiled, striped, BigTIFF), any raster GDAL reads (VRT, JPEG 2000, ...; with the geo extra), or any image Pillow reads.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Mask TIFF to write (default: <stem>.mask.tif beside the input).")] = None,
    model: ModelOpt = None,
    tile: TileOpt = None,
    halo: HaloOpt = None,
    batch_size: BatchOpt = None,
    blend: BlendOpt = None,
    tta: TTAOpt = None,
    plan: Annotated[bool, typer.Option("--plan", help="Print the grid, output size, estimated peak memory and run time; run nothing.")] = False,
    max_memory: Annotated[Optional[float], typer.Option("--max-memory", help="Peak-memory limit in MiB, kept by the plan's estimate (measured peaks come within a few percent of it): lowers the batch, then stops reading input ahead of the model, then lowers the tile size, to fit, or refuses. Without it (and without --batch-size) the batch and the reading ahead give way to stay under " f"{MEMORY_BUDGET_MB:.0f} MiB; the tile never does.")] = None,
    probabilities: Annotated[Optional[str], typer.Option("--probabilities", help=f"Also write <stem>.prob.tif: {ProbabilityMode.CONFIDENCE!s} (winning class's probability) or {ProbabilityMode.CLASSES!s} (one band per class).")] = None,
    prob_dtype: Annotated[Optional[str], typer.Option("--prob-dtype", help=f"Probability raster type: {' or '.join(ProbabilityDtype.values())} (probability x 255); default {TileConfig.probability_dtype}.")] = None,
    compression: Annotated[Optional[str], typer.Option("--compression", help=f"Output compression: {', '.join(Compression.values())} (default {TileConfig.compression}).")] = None,
    out_tile: Annotated[Optional[int], typer.Option("--out-tile", help=f"Output TIFF tile size (multiple of 16; default {TileConfig.out_tile}).")] = None,
    nodata_class: Annotated[Optional[int], typer.Option("--nodata-class", help=f"Mask value for input pixels equal to the input's nodata, and outside --aoi (default {TileConfig.nodata_class}).")] = None,
    max_pixels: Annotated[Optional[int], typer.Option("--max-pixels", help="Pixel limit for formats decoded whole (not TIFFs read window by window).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo the mask even if it is up to date, and replace a file at --out that segnet did not write (refused otherwise).")] = False,
    bands: Annotated[Optional[str], typer.Option("--bands", help="Bands of the input to use, in order, counting from 1 (e.g. 4,3,2 for a multispectral scene's RGB).", rich_help_panel="GIS")] = None,
    cog: Annotated[Optional[bool], typer.Option("--cog/--no-cog", help="Write Cloud-Optimized GeoTIFFs with internal overviews (default: yes when the geo extra is installed: pip install 'segnet-cli[geo]').", show_default=False, rich_help_panel="GIS")] = None,
    vector: Annotated[Optional[Path], typer.Option("--vector", help="Also write polygons per class (class, name, pixels, area) to this file: .gpkg, .geojson, .fgb or .geojsonl, in the input's CRS (pixel coordinates without one).", rich_help_panel="GIS")] = None,
    min_area: Annotated[Optional[float], typer.Option("--min-area", help="Leave out polygons smaller than this, in map units squared (m² for a metric CRS; pixels without a CRS).", rich_help_panel="GIS")] = None,
    simplify: Annotated[Optional[float], typer.Option("--simplify", help="Simplify polygons with this tolerance in map units (each polygon keeps its validity; neighbours' shared edges may then differ).", rich_help_panel="GIS")] = None,
    aoi: Annotated[Optional[Path], typer.Option("--aoi", help="Area of interest (GeoJSON, GeoPackage, ... polygons): only tiles touching it run; pixels outside it become --nodata-class.", rich_help_panel="GIS")] = None,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    engine: Annotated[Optional[str], typer.Option("--engine", help="local (this machine) or ray (spread the tile rows over a Ray cluster's actors; pip install 'segnet-cli[ray]').")] = None,
    address: AddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan or the run's report as JSON on stdout.")] = False,
    quiet: QuietOpt = False,
    log_file: LogOpt = None,
) -> None:
    """Segment one huge image (gigapixel TIFF, any GDAL raster) into a georeferenced mask.

    The image is streamed: read band by band, tiled and stitched exactly as `segnet predict`
    does (same masks), and the mask written tile by tile, so memory depends on the image's
    width and the tile size, not on its height. Resolution and georeferencing are kept; input
    nodata pixels get --nodata-class, and tiles that are all nodata are not run.

    With the geo extra (pip install 'segnet-cli[geo]') the mask is a Cloud-Optimized GeoTIFF
    with overviews; --vector adds polygons, --aoi limits the run to an area of interest.
    Every run writes <stem>.areas.json (pixels, share and area per class) and the class
    names for GDAL and QGIS (<mask>.aux.xml).

    The outputs appear only when complete; a re-run skips up-to-date outputs; Ctrl-C stops
    cleanly. --engine ray spreads the rows of tiles over a Ray cluster (same mask); an
    interrupted ray run resumes from its finished rows.
    """
    from segnet_cli import ui
    from segnet_cli.config import TileConfig
    from segnet_cli.gigapixel.plan import (
        default_output,
        pam_path,
        prob_output_path,
        report_path,
    )
    from segnet_cli.io.gdal import parse_bands

    try:
        mask = out or default_output(image)
        refuse_log_onto(log_file, [
            ("--out", mask), ("the mask's area report", report_path(mask)),
            ("the mask's class names (.aux.xml)", pam_path(mask)), ("--vector", vector),
            ("--probabilities", prob_output_path(mask) if probabilities else None),
            ("IMAGE", image), ("--aoi", aoi), ("--model", model),
        ])  # fmt: skip
        ui.configure(quiet, log_file)
        given = {
            "probability_dtype": prob_dtype,
            "compression": compression,
            "out_tile": out_tile,
            "nodata_class": nodata_class,
            "engine": engine,
            "min_area": min_area,
            "simplify": simplify,
        }
        cfg = TileConfig(
            input=image,
            out=out,
            inference=inference_config(
                model=model, tile=tile, halo=halo, batch_size=batch_size, blend=blend,
                precision=precision, device=device, max_pixels=max_pixels, tta=tta,
            ),
            probabilities=probabilities,
            # An explicit --batch-size is the user's choice: the default memory budget (which
            # lowers the batch) then stands aside; an explicit --max-memory still applies.
            max_memory_mb=max_memory if max_memory is not None else (math.inf if batch_size else None),
            plan_only=plan,
            overwrite=overwrite,
            address=address,
            bands=parse_bands(bands),
            cog=cog,
            vector=vector,
            aoi=aoi,
            **{k: v for k, v in given.items() if v is not None},
        )
    except SegnetError as exc:
        raise fail(exc) from None
    if plan:
        _print_plan(cfg, as_json)
        raise typer.Exit(0)

    from segnet_cli.gigapixel.isolated import runs_model_apart

    if (cfg.vector is not None or cfg.aoi is not None) and not runs_model_apart(cfg):
        from segnet_cli.geo import load_before_tensorflow

        load_before_tensorflow()  # GeoPackages need GDAL's own SQLite, not TensorFlow's
    if not runs_model_apart(cfg):
        # Otherwise (--vector) the model runs in a child process, which keeps its own
        # chatter quiet, and this process never loads TensorFlow.
        quiet_tf()
    from segnet_cli.gigapixel import run_tile

    bar = ui.Progress("tiles", 0)
    try:
        report = run_tile(cfg, progress=bar, log=ui.info)
    except SegnetError as exc:
        raise fail(exc) from None
    finally:
        bar.stop()
    if as_json:
        typer.echo(json.dumps({
            "return_code": report.return_code, "done": report.done, "skipped": report.skipped,
            "seconds": round(report.seconds, 3), **report.details,
        }, default=str))
    for line in summary_lines(report):
        ui.summary(line)
    raise typer.Exit(report.return_code)


def _print_plan(cfg, as_json: bool) -> None:
    from segnet_cli.gigapixel import plan_tile

    try:
        the_plan = plan_tile(cfg)
    except SegnetError as exc:
        raise fail(exc) from None
    data, lines = the_plan.as_dict(), plan_lines(the_plan)
    if cfg.engine is Engine.RAY:
        from segnet_cli.gigapixel.ray import plan_dict

        data["ray"] = plan_dict(the_plan)
        lines += ray_plan_lines(data["ray"], len(the_plan.grid))
    if as_json:
        typer.echo(json.dumps(data, default=str))
    else:
        from segnet_cli import ui

        for line in lines:
            ui.echo(line)


def duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def plan_lines(plan) -> list[str]:
    """A ``gigapixel.plan.TilePlan`` as human-readable lines."""
    s, g, t = plan.source, plan.grid, plan.tiling
    rows, cols = len(g.rows), len(g.cols)
    core = g.tile - 2 * g.halo
    shapes = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(g.shapes().items(), reverse=True))
    out = [
        f"input:   {s.path}",
        f"         {s.describe()}",
        f"model:   {plan.model_path} ({plan.model.num_classes} classes, stride "
        f"{plan.model.stride}, receptive field {plan.model.receptive_field} px)",
        f"grid:    {len(g):,} tiles = {rows} rows x {cols} cols; tile {g.tile}, halo {g.halo} "
        f"(core {core}), batch {t.batch_size}, blend {t.blend}"
        + (" (the image fits in one tile)" if g.single else ""),
        f"         overlap overhead {g.overhead():.2f}x ({plan.computed_pixels / 1e6:,.1f} Mpx "
        f"computed for {s.pixels / 1e6:,.1f} Mpx); window shapes: {shapes}",
        f"output:  {plan.output}",
        f"         {s.width} x {s.height} uint8 class indices with colour map, "
        + ("Cloud-Optimized GeoTIFF with overviews (mode), " if plan.cog else "")
        + f"tiled {plan.config.out_tile}, {plan.config.compression}, "
        f"{'BigTIFF' if plan.bigtiff else 'classic TIFF'}, {plan.mask_bytes / MiB:,.0f} MiB "
        "uncompressed",
        f"         class names: {plan.pam_output.name}; class areas: {plan.report_output}"
        + ("" if plan.georef.crs_wkt else " (no CRS: pixels only)"),
    ]
    if plan.vector is not None:
        out.append(
            f"         polygons: {plan.vector}"
            + (" (pixel coordinates: the input has no CRS)" if plan.georef.crs_wkt is None else "")
        )
    if plan.prob_output is not None:
        out.append(
            f"         {plan.prob_output}: {plan.prob_bands} band(s) {plan.prob_dtype}, "
            f"{'BigTIFF' if plan.prob_bigtiff else 'classic TIFF'}, "
            f"{plan.prob_bytes / MiB:,.0f} MiB uncompressed"
        )
    if plan.declares_nodata:
        why = []
        if s.nodata is not None and not s.palette:
            why.append(f"input nodata {s.nodata_text!r}")
        if plan.aoi is not None:
            why.append(f"outside the area of interest ({plan.config.aoi})")
        out.append(
            f"         {' and '.join(why)} -> class {plan.config.nodata_class} (declared nodata); "
            "tiles that are all nodata are not run"
        )
    out.append(f"memory:  estimated peak {plan.memory.line()}")
    out.append(
        f"         grows with image width and tile size, not height (band of "
        f"{g.band_rows()} input rows)"
    )
    out.append(f"time:    ~{duration(plan.seconds)} ({plan.seconds_basis})")
    out.extend(f"note:    {n}" for n in plan.notes)
    return out


def ray_plan_lines(ray: dict, tiles: int) -> list[str]:
    """What ``--engine ray`` adds to the plan (``gigapixel.ray.plan_dict``)."""
    computed = ray["computed_tiles"]
    extra = (
        f"{computed:,} tiles computed for {tiles:,} (each unit recomputes the blended rows "
        "above it)"
        if computed > tiles
        else "no tile computed twice"
    )
    lines = [
        f"ray:     {ray['units']} work unit(s) of {ray['unit_rows']} grid row(s), one actor per "
        f"node (per GPU with GPUs); {extra}",
        f"         parts beside the output until the TIFF is written: "
        f"{ray['parts_bytes'] / MiB:,.0f} MiB; each actor needs about the memory above, the "
        "driver little",
    ]
    if not ray.get("ray_installed", True):
        lines.append("note:    Ray is not installed: pip install 'segnet-cli[ray]'")
    return lines


def summary_lines(report: Report) -> list[str]:
    """Human lines for a finished run."""
    d = report.details or {}
    if d.get("interrupted"):
        return [f"interrupted after {report.seconds:.1f}s: nothing written"]
    if report.skipped:
        return [f"{d.get('output')}: up to date, skipped (use --overwrite to redo)"]
    plan = d.get("plan", {})
    lines = [
        f"wrote {d.get('output')} ({plan.get('width')} x {plan.get('height')}, "
        f"{d.get('tiles')} tiles) in {report.seconds:.1f}s: {d.get('mpx_per_s', 0):.2f} Mpx/s"
    ]
    if d.get("prob_output"):
        lines.append(f"wrote {d['prob_output']}")
    if d.get("skipped_tiles"):
        lines.append(f"{d['skipped_tiles']} tiles all nodata or outside the area of interest: not run")
    lines += area_lines(d.get("areas"))
    if d.get("engine") == "ray":
        reused = f", {d['units_reused']} reused" if d.get("units_reused") else ""
        on = f" on {d['actors']}" if d.get("actors") else ""
        lines.append(
            f"ray: {d.get('units')} work unit(s){reused}{on}; actors busy "
            f"{d.get('unit_seconds', 0):.1f}s, TIFF written from the parts in "
            f"{d.get('assemble_seconds', 0):.1f}s"
        )
        return lines
    est = plan.get("memory_bytes", {}).get("total")
    if d.get("peak_rss_bytes"):
        lines.append(
            f"peak memory (RSS) {d['peak_rss_bytes'] / MiB:,.0f} MiB"
            + (f" (estimated {est / MiB:,.0f} MiB)" if est else "")
            + f"; model {d.get('model_seconds', 0):.1f}s, waiting for input "
            f"{d.get('read_wait_seconds', 0):.1f}s, output {d.get('write_wait_seconds', 0):.1f}s"
        )
    return lines


def area_lines(areas: dict | None) -> list[str]:
    """The class-area report as a small table (``geo.areas.ClassAreas.as_dict``)."""
    if not areas:
        return []
    lines = []
    vector = areas.get("vector")
    if vector:
        lines.append(f"wrote {vector.get('path', 'polygons')}: {vector.get('polygons', 0):,} polygons")
    has_area = any("area_m2" in c for c in areas["classes"])
    lines.append(
        f"classes ({areas['area_basis']}"
        + (f", {areas['nodata_pixels']:,} nodata pixels" if areas.get("nodata_pixels") else "")
        + "):"
    )
    for c in areas["classes"]:
        if not c["pixels"]:
            continue
        area = f"  {c['area_m2']:>14,.1f} m²  {c['area_ha']:>10,.2f} ha" if has_area else ""
        lines.append(f"  {c['name']:<16} {c['pixels']:>14,} px  {c['share']:>6.1%}{area}")
    return lines
