"""``segnet tile``'s plan and run lifecycle, shared by the local and the Ray engine.

``plan_tile`` decides everything before the model loads: the source's layout, the grid, the
outputs, the memory and time estimates (``budget``). ``run_planned`` is what every engine
does around its pixel work: claim the output, skip it when up to date, stop cleanly on a
signal, report.
"""

from __future__ import annotations

import json
import math
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path

import numpy as np

import segnet_cli.gigapixel.budget as budget
from segnet_cli import geo
from segnet_cli.config import TTA, Report, Status, TileConfig, TilingConfig
from segnet_cli.errors import (
    ImageReadError,
    Interrupted,
    LockedError,
    OutputError,
    UsageError,
)
from segnet_cli.geo.aoi import Aoi
from segnet_cli.gigapixel.budget import MemoryEstimate, MiB, estimate, fit_tiling
from segnet_cli.io.files import (
    check_writable,
    file_digest,
    remove_dead_temporaries,
    same_file,
    tmp_label,
)
from segnet_cli.io.gdal import PIXELS, Georef, read_georef
from segnet_cli.io.images import TIFF_SUFFIXES, match_channels
from segnet_cli.io.sources import inspect_source
from segnet_cli.io.tiff import SourceInfo, needs_bigtiff, read_description
from segnet_cli.jobs import (
    Claim,
    Outcome,
    Provenance,
    Run,
    SignalGuard,
    foreign_image,
    settings_key,
)
from segnet_cli.model.modelfile import ModelInfo, model_fingerprint, read_info, resolve_model_path
from segnet_cli.model.network import Architecture
from segnet_cli.tiling import TileGrid


@dataclass(frozen=True)
class TilePlan:
    """Everything decided before the model runs: grid, outputs, memory and time estimates."""

    source: SourceInfo
    model_path: Path
    model: ModelInfo
    output: Path
    prob_output: Path | None
    tiling: TilingConfig
    grid: TileGrid
    memory: MemoryEstimate
    seconds: float
    seconds_basis: str
    mask_bytes: int
    prob_bytes: int
    bigtiff: bool
    prob_bigtiff: bool
    prob_bands: int
    prob_dtype: str | None
    notes: tuple[str, ...] = field(default_factory=tuple)
    config: TileConfig | None = None
    georef: Georef = PIXELS
    cog: bool = False
    vector: Path | None = None
    aoi: Aoi | None = None

    @property
    def computed_pixels(self) -> int:
        return self.grid.computed_pixels()

    @property
    def rasters(self) -> list[Path]:
        """The rasters the run writes: the mask, then the probability raster if asked for."""
        return [self.output] + ([self.prob_output] if self.prob_output is not None else [])

    @property
    def report_output(self) -> Path:
        return report_path(self.output)

    @property
    def pam_output(self) -> Path:
        return pam_path(self.output)

    @property
    def outputs(self) -> list[Path]:
        """Every file the run writes, the mask last (it is renamed into place last)."""
        extra = [self.report_output, self.pam_output]
        if self.vector is not None:
            extra.append(self.vector)
        return extra + self.rasters[::-1]

    @property
    def declares_nodata(self) -> bool:
        """The mask has nodata pixels: the input declares nodata, or an area of interest
        leaves pixels out."""
        return (self.source.nodata is not None and not self.source.palette) or self.aoi is not None

    def as_dict(self) -> dict:
        """The plan as JSON-ready data."""
        s, g = self.source, self.grid
        return {
            "input": str(s.path),
            "width": s.width,
            "height": s.height,
            "channels": s.channels,
            "dtype": s.dtype.name,
            "layout": s.layout,
            "compression": s.compression,
            "bigtiff_input": s.bigtiff,
            "model": str(self.model_path),
            "classes": list(self.model.class_names),
            "tiling": {k: (str(v) if isinstance(v, Enum) else v) for k, v in asdict(self.tiling).items()},
            "grid": {
                "tiles": len(g),
                "rows": len(g.rows),
                "cols": len(g.cols),
                "tile": g.tile,
                "halo": g.halo,
                "stride": g.stride,
                "overhead": round(g.overhead(), 4),
                "computed_pixels": self.computed_pixels,
                "band_rows": g.band_rows(),
                "shapes": {f"{h}x{w}": n for (h, w), n in g.shapes().items()},
            },
            "output": str(self.output),
            "prob_output": None if self.prob_output is None else str(self.prob_output),
            "bigtiff": self.bigtiff,
            "mask_bytes": self.mask_bytes,
            "prob_bytes": self.prob_bytes,
            "memory_bytes": self.memory.as_dict(),
            "seconds_estimate": round(self.seconds, 1),
            "seconds_basis": self.seconds_basis,
            "nodata": s.nodata_text,
            "bands": None if s.bands is None else list(s.bands),
            "crs": self.georef.crs_wkt is not None,
            "cog": self.cog,
            "vector": None if self.vector is None else str(self.vector),
            "report": str(self.report_output),
            "aoi_pixels": None if self.aoi is None else self.aoi.pixels,
            "notes": list(self.notes),
        }


def default_output(path: Path) -> Path:
    """``<stem>.mask.tif`` beside the input."""
    return path.with_name(f"{path.stem}.mask.tif")


def sibling(mask: Path, suffix: str) -> Path:
    """A file beside a mask: ``x.mask.tif`` -> ``x<suffix>``, ``out.tif`` -> ``out<suffix>``."""
    name = mask.name
    for ending in (".mask.tif", ".mask.tiff"):
        if name.lower().endswith(ending):
            return mask.with_name(name[: -len(ending)] + suffix)
    return mask.with_name(f"{mask.stem}{suffix}")


def report_path(mask: Path) -> Path:
    """The class-area report beside a mask (``x.mask.tif`` -> ``x.areas.json``)."""
    return sibling(mask, ".areas.json")


def pam_path(mask: Path) -> Path:
    """GDAL's sidecar of a mask (class names, attribute table)."""
    return mask.with_name(mask.name + ".aux.xml")


def prob_output_path(mask: Path) -> Path:
    """The probability raster beside a mask: ``x.mask.tif`` -> ``x.prob.tif``."""
    name = mask.name
    for suffix in (".mask.tif", ".mask.tiff"):
        if name.lower().endswith(suffix):
            return sibling(mask, ".prob.tif")
    return mask.with_name(f"{mask.stem}.prob{mask.suffix or '.tif'}")


def _foreign_raster(path: Path) -> bool:
    """Whether ``path`` is a raster segnet did not write: someone's file, not ours to replace.

    segnet's rasters record their provenance in the first page's ImageDescription, which is
    read from the header alone, so a mask cut short by a crash is still recognised as ours
    (and redone). A file that is not a TIFF is judged as `foreign_image` judges it.
    """
    if not path.is_file():
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            tag = tif.pages[0].tags.get(270)
            description = None if tag is None else str(tag.value)
    except Exception:
        return foreign_image(path)
    return Provenance.from_json(description) is None


def _foreign_report(path: Path) -> bool:
    """Whether ``path``, where the class-area report goes, is a file segnet did not write.

    segnet's reports are JSON objects that carry the run's provenance.
    """
    if not (path.exists() or path.is_symlink()):
        return False
    try:
        report = json.loads(path.read_text())
        return Provenance.from_json(json.dumps(report["provenance"])) is None
    except (OSError, ValueError, TypeError, KeyError):
        return True


def _written_with(path: Path, report: Path) -> bool:
    """Whether the class-area report of a mask lists ``path`` as written with it.

    Polygon files carry no provenance of their own; the report beside the mask records
    every other file a run wrote, so a re-run may replace the polygons it made earlier.
    """
    try:
        return path.name in json.loads(report.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return False


def _validate(config: TileConfig, info: ModelInfo) -> None:
    """What the config alone cannot check: values that depend on the model."""
    if not info.num_classes <= config.nodata_class <= 255:
        raise UsageError(
            f"--nodata-class must be between {info.num_classes} (past the model's classes) and 255"
        )


def plan_tile(config: TileConfig) -> TilePlan:
    """Decide the grid, outputs and estimates for ``config`` without loading the model.

    Raises:
        ImageReadError, TiffLayoutError: the input cannot be read (window by window).
        ModelFileError: the model file is missing or not a segnet model.
        UsageError: bad options, or ``--max-memory`` cannot be met.
    """
    if Path(config.input).is_dir():
        raise UsageError("is a folder; tile takes one image (segnet predict takes folders)",
                         Path(config.input))
    # An image decoded whole is checked against the pixel and byte limits here, so
    # ``--plan`` refuses what the run would refuse.
    source = inspect_source(config.input, config.inference.max_pixels, config.bands)
    model_path = resolve_model_path(config.inference.model)
    info = read_info(model_path)
    _validate(config, info)
    # Fail now, not after loading the model, if the bands cannot become the model's input.
    try:
        match_channels(
            np.zeros((1, 1, source.band_channels), np.uint8), info.in_channels, source.path,
            alpha=source.alpha,
        )
    except ImageReadError as exc:
        if config.bands is None:
            raise  # the image itself does not fit the model: a failed input
        # The bands asked for do not fit: an option to change, as a band it lacks is.
        raise UsageError(f"--bands {','.join(map(str, config.bands))}: {exc.message}",
                         source.path) from None
    output = Path(config.out) if config.out is not None else default_output(source.path)
    if output.exists() and output.is_dir():
        raise UsageError(f"--out {output} is a folder; give a file name")
    if output.suffix.lower() not in TIFF_SUFFIXES:
        # The mask is a GeoTIFF whatever its name: x.png would be a TIFF no viewer expects.
        raise UsageError(f"--out {output} is not a .tif or .tiff name; the mask is a GeoTIFF")
    prob_out = prob_output_path(output) if config.probabilities else None
    for out in (output, prob_out):
        if out is not None and same_file(out, source.path):
            raise UsageError(f"the output {out} would overwrite the input; give another --out")
    if prob_out is not None and same_file(prob_out, output):
        raise UsageError("the mask and the probability raster would be the same file")
    if not config.overwrite:
        for out in (output, prob_out):
            if out is not None and _foreign_raster(out):
                raise UsageError(
                    f"{out} exists and segnet did not write it; nothing was written: give "
                    "another --out, or pass --overwrite to replace it"
                )
        report = report_path(output)
        if _foreign_report(report):
            raise UsageError(
                f"{report} (the mask's class-area report) exists and segnet did not write "
                "it; nothing was written: give another --out, or pass --overwrite to replace it"
            )
    notes: list[str] = []
    cog, vector, georef, aoi = _gis(config, source, output, prob_out, notes)
    arch = Architecture.from_info(info)
    model_bytes = model_path.stat().st_size

    def peak(t: TilingConfig) -> int:
        return estimate(source, info, arch, config, t, model_bytes, cog)[1].total

    tiling = config.inference.tiling
    if config.max_memory_mb is not None and math.isinf(config.max_memory_mb):
        pass  # no limit: the batch and tile were chosen explicitly
    elif config.memory_limited:
        tiling, note = fit_tiling(tiling, int(config.max_memory_mb * MiB), peak, info.stride)
        if note:
            notes.append(note)
    else:
        # A soft default: lower the batch (free on a CPU), then stop reading ahead (a band of
        # input rows less; reading a TIFF band is quick next to the model), never the tile
        # (that costs speed: an explicit --max-memory asks for it) and never refuse.
        soft = int(budget.DEFAULT_MEMORY_BUDGET_MB * MiB)
        if peak(tiling) > soft and tiling.batch_size > 1:
            tiling = replace(tiling, batch_size=1)
            notes.append(
                f"batch size {config.inference.tiling.batch_size} -> 1 to stay under the default "
                f"memory budget of {budget.DEFAULT_MEMORY_BUDGET_MB:,.0f} MiB (on a CPU the batch "
                "size barely changes speed; --max-memory sets another limit)"
            )
        if peak(tiling) > soft and tiling.read_ahead:
            tiling = replace(tiling, read_ahead=0)
            notes.append(
                f"{budget.NO_READ_AHEAD}, to stay under the default memory budget of "
                f"{budget.DEFAULT_MEMORY_BUDGET_MB:,.0f} MiB"
            )
        if peak(tiling) > soft:
            notes.append(
                f"the estimated peak is over the default budget of "
                f"{budget.DEFAULT_MEMORY_BUDGET_MB:,.0f} MiB; --max-memory MB makes it a hard "
                "limit (smaller tiles)"
            )
    grid, mem = estimate(source, info, arch, config, tiling, model_bytes, cog)
    if grid.tile != tiling.tile or grid.halo != tiling.halo:
        notes.append(
            f"tile {tiling.tile} / halo {tiling.halo} aligned to the model's stride "
            f"{info.stride}: {grid.tile} / {grid.halo}"
        )
    if source.layout == "whole":
        notes.append(
            f"{source.fmt} cannot be read window by window: it is decoded whole "
            f"({source.pixels * source.band_channels * source.band_itemsize / MiB:,.0f} MiB)"
        )
    seconds, basis = budget.seconds_estimate(
        grid, arch, config.inference.precision, config.inference.tta
    )
    mask_bytes = source.pixels
    bands = budget.probability_bands(config.probabilities, info.num_classes)
    prob_dtype = config.probability_dtype if prob_out is not None else None
    prob_bytes = source.pixels * bands * (np.dtype(str(prob_dtype)).itemsize if prob_dtype else 0)
    return TilePlan(
        source=source,
        model_path=model_path,
        model=info,
        output=output,
        prob_output=prob_out,
        tiling=tiling,
        grid=grid,
        memory=mem,
        seconds=seconds,
        seconds_basis=basis,
        mask_bytes=mask_bytes,
        prob_bytes=prob_bytes,
        bigtiff=needs_bigtiff(mask_bytes),
        prob_bigtiff=needs_bigtiff(prob_bytes),
        prob_bands=bands,
        prob_dtype=prob_dtype,
        notes=tuple(notes),
        config=config,
        georef=georef,
        cog=cog,
        vector=vector,
        aoi=aoi,
    )


def _gis(config: TileConfig, source: SourceInfo, output: Path, prob_out: Path | None, notes):
    """The GIS side of the plan: COG or not, the vector output, georeferencing, the AOI."""
    cog = geo.available() if config.cog is None else config.cog
    if cog:
        geo.require("a Cloud-Optimized GeoTIFF (--cog)")
        from segnet_cli.geo.cog import check_compression

        check_compression(config.compression)
    elif config.cog is None:
        notes.append(
            "writing a tiled GeoTIFF without overviews: a Cloud-Optimized GeoTIFF needs "
            f"GDAL ({geo.GEO_INSTALL})"
        )
    vector = None
    if config.vector is not None:
        geo.require("--vector")
        from segnet_cli.geo.vector import check_vector_path

        vector = Path(config.vector)
        check_vector_path(vector)
        aoi_path = None if config.aoi is None else Path(config.aoi)
        for other in (source.path, output, prob_out, aoi_path, report_path(output), pam_path(output)):
            if other is not None and same_file(vector, other):
                raise UsageError(f"--vector {vector} would overwrite {other}")
        if not config.overwrite and (vector.exists() or vector.is_symlink()):
            if not _written_with(vector, report_path(output)):
                raise UsageError(
                    f"--vector {vector} exists and segnet did not write it with this mask; "
                    "nothing was written: give another name, or pass --overwrite to replace it"
                )
    georef = read_georef(source.path)
    aoi = None
    if config.aoi is not None:
        geo.require("--aoi")
        from segnet_cli.geo.aoi import load_aoi

        aoi = load_aoi(Path(config.aoi), georef, source.height, source.width)
        share = aoi.pixels / max(1, source.pixels)
        notes.append(f"area of interest: {share:.1%} of the image; tiles outside it are not run")
    return cog, vector, georef, aoi


def provenance_settings(plan: TilePlan, config: TileConfig) -> str:
    """The settings that change the outputs (batch size and memory limit do not)."""
    g = plan.grid
    extra = {"tta": config.inference.tta} if config.inference.tta is not TTA.NONE else {}
    return settings_key(
        command="tile",
        tile=g.tile,
        halo=g.halo,
        blend=plan.tiling.blend,
        precision=config.inference.precision,
        probabilities=config.probabilities,
        probability_dtype=plan.prob_dtype,
        nodata_class=config.nodata_class,
        out_tile=config.out_tile,
        compression=config.compression,
        version=1,
        **extra,
        **_gis_settings(plan, config),
    )


def _gis_settings(plan: TilePlan, config: TileConfig) -> dict:
    """What the GIS options change in the outputs (absent when unused: old outputs stay
    up to date)."""
    out: dict = {}
    if plan.source.bands is not None:
        out["bands"] = ",".join(map(str, plan.source.bands))
    if plan.cog:
        out["cog"] = True
    if plan.vector is not None:
        out["vector"] = plan.vector.suffix.lower()
        out["min_area"] = config.min_area
        out["simplify"] = config.simplify
    if plan.aoi is not None:
        out["aoi"] = file_digest(Path(config.aoi))
    return out


def up_to_date(plan: TilePlan, prov: Provenance) -> bool:
    """The outputs exist, are complete and record the same provenance.

    The rasters record it in their ImageDescription; the report records it too, with the
    size of every other file it was written with (the sidecar, the polygons).
    """
    if not all(Provenance.from_json(read_description(p)) == prov for p in plan.rasters):
        return False
    try:
        report = json.loads(plan.report_output.read_text())
        if Provenance.from_json(json.dumps(report.get("provenance"))) != prov:
            return False
        sizes = report.get("files", {})
        extra = [plan.pam_output] + ([plan.vector] if plan.vector is not None else [])
        return all(p.stat().st_size == sizes.get(p.name) for p in extra)
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def remove_dead_temporaries_of(final: Path) -> int:
    """Remove temporaries of ``final`` left by dead runs (only this output's, not the folder's).

    Predict cleans its whole output folder; the folder a gigapixel input sits in may hold
    other things, so only this output's names are touched.
    """
    return remove_dead_temporaries(final.parent, f"*-{tmp_label(final.name)}.*", recursive=False)


def run_planned(
    config: TileConfig,
    stream: Callable | None,
    progress=None,
    log=None,
    interrupted_note: str = "",
) -> Report:
    """What every engine does around its run: plan, claim, skip if up to date, stop on signals.

    Args:
        config: the options.
        stream: ``(plan, config, provenance, guard, progress, log) -> stats`` computes and
            writes the outputs (atomically) and returns timing figures for the report; it
            raises ``Interrupted`` (``guard.check()``) to stop.
        progress: optional ``ui.Progress``-like object.
        log: optional callable for one-line human messages.
        interrupted_note: logged when a signal stopped the run.

    Returns:
        The report (see ``run_tile``).
    """
    run = Run(log=log)
    plan = plan_tile(config)
    details: dict = {"plan": plan.as_dict(), "output": str(plan.output)}
    if config.plan_only:
        return run.report(**details)
    out = plan.output
    for folder in {p.parent for p in plan.outputs}:
        check_writable(folder)  # an unusable folder is a usage error: nothing ran
    removed = sum(remove_dead_temporaries_of(p) for p in plan.outputs)
    if removed and log:
        log(f"removed {removed} temporary file(s) left by an interrupted run")
    claim = Claim(out.parent, out)
    try:
        got = claim.acquire()
    except OSError as exc:
        raise OutputError(f"cannot write to the output folder: {exc.strerror or exc}", out.parent) from None
    if not got:
        raise LockedError("another segnet run is writing this output", out)
    try:
        with SignalGuard() as guard:
            prov = Provenance(
                file_digest(plan.source.path),
                model_fingerprint(plan.model_path),
                provenance_settings(plan, config),
            )
            if not config.overwrite and up_to_date(plan, prov):
                details["reason"] = "up to date"
                run.skip(plan.source.path, out, "up to date", advance=False)
                return run.report(**details)
            guard.check()
            stats = stream(plan, config, prov, guard, progress, log)
    except Interrupted as exc:
        if interrupted_note:
            run.log(interrupted_note)
        run.interrupted = exc.signum
        return run.report(**details)
    finally:
        claim.release()
    details.update(stats)
    details["peak_rss_bytes"] = peak_rss()
    if "model_process_peak_rss_bytes" in stats:
        # The model ran in a child process (``tile --vector``): its peak plus this process's
        # peak until then (an upper bound of the two at once), or this process's own peak
        # afterwards (the polygons), whichever is larger.
        together = stats["stream_peak_rss_bytes"] + stats["model_process_peak_rss_bytes"]
        details["peak_rss_bytes"] = max(details["peak_rss_bytes"], together)
    run.emit(Outcome(str(plan.source.path), str(out), Status.DONE, run.timer()), advance=False)
    return run.report(**details)


def peak_rss() -> int:
    """This process's peak resident set size (bytes; Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


__all__ = [
    "TilePlan",
    "plan_tile",
    "run_planned",
    "default_output",
    "prob_output_path",
    "sibling",
    "provenance_settings",
    "up_to_date",
    "peak_rss",
]
