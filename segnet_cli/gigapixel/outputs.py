"""The outputs of ``segnet tile``: rasters written row by row, then finished for GIS use.

``open_outputs`` opens every output as a temporary and renames them into place only when
all are complete, the mask last (its provenance is what a re-run checks first); both
engines write through it, so both give the same bytes, tags, colour map, nodata and
provenance. Rows stream into tiled, compressed TIFFs (tifffile, bounded memory). When the
block ends, the run is finished for GIS use:

* with the ``geo`` extra, each raster is re-laid out by GDAL as a Cloud-Optimized GeoTIFF
  with internal overviews (``geo.cog``); the streamed TIFF was a hidden scratch file;
* inputs read through GDAL get their CRS and transform written by GDAL (TIFF inputs carry
  their GeoTIFF tags through the stream);
* the mask's rows are read back in strips and turned into polygons (``--vector``,
  ``geo.vector``), never the whole mask at once;
* the class names and attribute table go to GDAL's ``.aux.xml`` sidecar, and the class-area
  report (``geo.areas``, counted as rows streamed past) to ``<stem>.areas.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from segnet_cli import __version__
from segnet_cli.config import ProbabilityMode, TileConfig
from segnet_cli.errors import OutputError
from segnet_cli.geo.areas import ClassAreas, pam_xml
from segnet_cli.geo.cog import Overviews
from segnet_cli.gigapixel.plan import TilePlan
from segnet_cli.io.files import atomic_path, scratch_path
from segnet_cli.io.tiff import RowBlocks, TiledTiffWriter, colormap, output_extratags
from segnet_cli.jobs import Provenance

#: Rows of the mask read back at once to make polygons: GDAL holds every polygon of a strip
#: at once, so a fragmented 20000-px-wide mask needs short strips (256 rows: ~5 M pixels).
VECTOR_STRIP_ROWS = 256


class OutputRows:
    """The rows of the output rasters, written in order (see ``open_outputs``)."""

    def __init__(
        self, mask_rows: RowBlocks, prob_rows: RowBlocks | None, areas: ClassAreas
    ) -> None:
        self._mask = mask_rows
        self._prob = prob_rows
        self.areas = areas
        self.report: dict | None = None  # the class-area report, once the outputs are finished
        self.timings: dict[str, float] = {}  # seconds spent finishing (COG, polygons)
        self._finished = False

    def add(self, mask: np.ndarray, prob: np.ndarray | None = None) -> None:
        """The next rows: class indices, and their probabilities when a raster is written."""
        self._mask.add(mask)
        self.areas.add(mask)
        if self._prob is not None:
            self._prob.add(prob)

    def finish(self) -> None:
        """Flush the last partial row of tiles and close the files (idempotent)."""
        if not self._finished:
            self._finished = True
            self._mask.finish()
            if self._prob is not None:
                self._prob.finish()


@contextmanager
def open_outputs(
    plan: TilePlan,
    config: TileConfig,
    prov: Provenance,
    palette,
    nodata: bool,
    check: Callable[[], None] | None = None,
):
    """Open the outputs as temporaries; finish them and rename them into place on success.

    The mask is uint8 with the model's colour map, the probability raster (if asked for)
    float16 or uint8; both tiled and compressed as configured, with the input's resolution
    and georeferencing, ``Software`` and the provenance in ``ImageDescription``.

    Args:
        plan: the plan (output paths, sizes, BigTIFF decisions, COG, polygons).
        config: the options.
        prov: recorded in each raster's ImageDescription and in the report.
        palette: the model's class colours.
        nodata: the mask has nodata pixels (``plan.declares_nodata``): it declares
            ``nodata_class`` as its nodata value.
        check: called between steps of the finishing (each strip of polygons); it raises
            to stop (``SignalGuard.check``), and every temporary is then removed.

    Yields:
        An ``OutputRows`` to feed rows to; it is finished on leaving the block. On an
        exception the writers are stopped and every temporary deleted.
    """
    source, k = plan.source, plan.model.num_classes
    prob = config.probabilities
    common = {"software": f"segnet {__version__}", "description": prov.to_json()}
    if source.resolution is not None:
        common["resolution"] = source.resolution
        common["resolutionunit"] = source.resolution_unit or 1
    nodata_out = str(config.nodata_class) if nodata else None
    areas = ClassAreas(k, plan.georef, config.nodata_class if nodata else None)
    with ExitStack() as stack:
        # Entered first, renamed last: the mask, then the probabilities, then the rest.
        final_mask = stack.enter_context(atomic_path(plan.output))
        final_prob = stack.enter_context(atomic_path(plan.prob_output)) if plan.prob_output else None
        tmp_pam = stack.enter_context(atomic_path(plan.pam_output))
        tmp_report = stack.enter_context(atomic_path(plan.report_output))
        # With a COG, rows stream into scratch files that GDAL then copies.
        tmp_mask = stack.enter_context(scratch_path(plan.output)) if plan.cog else final_mask
        tmp_prob = final_prob
        if plan.cog and final_prob is not None:
            tmp_prob = stack.enter_context(scratch_path(plan.prob_output))
        writers: list[TiledTiffWriter] = []
        try:
            mask_writer = TiledTiffWriter(
                tmp_mask,
                (source.height, source.width),
                np.uint8,
                config.out_tile,
                str(config.compression),
                plan.bigtiff,
                name=plan.output,
                photometric="palette",
                colormap=colormap(palette),
                **{**common, "extratags": output_extratags(source, nodata_out)},
            )
            writers.append(mask_writer)
            prob_rows = None
            if tmp_prob is not None:
                per_class = prob is ProbabilityMode.CLASSES
                shape = (source.height, source.width) + ((k,) if per_class else ())
                prob_writer = TiledTiffWriter(
                    tmp_prob,
                    shape,
                    np.dtype(str(config.probability_dtype)),
                    config.out_tile,
                    str(config.compression),
                    plan.prob_bigtiff,
                    name=plan.prob_output,
                    photometric="minisblack",
                    planarconfig="contig" if per_class else None,
                    **{**common, "extratags": output_extratags(source, None)},
                )
                writers.append(prob_writer)
                prob_rows = RowBlocks(prob_writer, config.out_tile)
            rows = OutputRows(RowBlocks(mask_writer, config.out_tile), prob_rows, areas)
            yield rows
            rows.finish()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        t0 = time.perf_counter()
        _finish_rasters(
            plan,
            config,
            [
                (tmp_mask, final_mask, Overviews.MODE, plan.output),  # never average classes
                (tmp_prob, final_prob, Overviews.AVERAGE, plan.prob_output),
            ],
        )
        rows.timings["finish_rasters_seconds"] = round(time.perf_counter() - t0, 3)
        files = {}
        vector = None
        t0 = time.perf_counter()
        if plan.vector is not None:
            # Written (atomically, through its own temporary) before the report and the
            # mask are renamed into place: a re-run finds all three or redoes them.
            vector = _polygons(plan, config, tmp_mask, check)
            files[plan.vector.name] = plan.vector.stat().st_size
            rows.timings["vector_seconds"] = round(time.perf_counter() - t0, 3)
        tmp_pam.write_text(pam_xml(plan.model.class_names, palette, areas.pixels))
        files[plan.pam_output.name] = tmp_pam.stat().st_size
        report = {
            "input": str(source.path),
            "mask": str(plan.output),
            **areas.as_dict(plan.model.class_names),
            "files": files,
            "provenance": json.loads(prov.to_json()),
        }
        if vector is not None:
            report["vector"] = vector
        tmp_report.write_text(json.dumps(report, indent=2) + "\n")
        # The caller's report and summary print these.
        rows.report = report


def _finish_rasters(plan: TilePlan, config: TileConfig, rasters) -> None:
    """Georeference (inputs read through GDAL) and lay out as COG (with the ``geo`` extra).

    Args:
        rasters: ``(streamed file, final temporary, overview resampling, output name)``.
    """
    from segnet_cli.geo.cog import georeference, to_cog

    for tmp, final, overviews, name in rasters:
        if tmp is None:
            continue
        if plan.source.layout == "gdal":
            georeference(tmp, plan.georef)
        if plan.cog:
            to_cog(
                tmp,
                final,
                compression=config.compression,
                blocksize=config.out_tile,
                overviews=overviews,
                name=name,
            )


def _polygons(plan: TilePlan, config: TileConfig, mask_file: Path, check=None) -> dict:
    """Polygons per class from the finished mask, read back strip by strip."""
    from segnet_cli.geo.vector import polygonize_strips, write_vector
    from segnet_cli.io.sources import open_reader
    from segnet_cli.io.tiff import inspect_tiff

    # The class indices themselves, not the colours the palette maps them to.
    info = replace(inspect_tiff(mask_file), palette=False)
    reader = open_reader(info)
    try:
        polygons = polygonize_strips(
            _strips(reader, info.height, VECTOR_STRIP_ROWS, check),
            info.width,
            skip=config.nodata_class,
        )
        stats = write_vector(
            plan.vector,
            polygons,
            transform=plan.georef.transform,
            crs_wkt=plan.georef.crs_wkt,
            class_names=plan.model.class_names,
            min_area=config.min_area,
            simplify=config.simplify,
        )
    except OutputError as exc:
        if "rtree" not in exc.message:
            raise
        raise OutputError(
            f"{exc.message}: TensorFlow was loaded before GDAL in this process; call "
            "segnet_cli.geo.load_before_tensorflow() before importing TensorFlow, or write "
            ".fgb or .geojson",
            exc.path,
        ) from None
    finally:
        reader.close()
    return {
        "path": str(stats.path),
        "driver": stats.driver,
        "polygons": stats.features,
        "dropped": stats.dropped,
        "max_open": stats.max_open,
        # Regions too large to hold open, cut along a strip edge (geo.vector.MAX_OPEN_VERTICES).
        "cuts": polygons.cuts,
        "per_class": {str(k): v for k, v in stats.polygons.items()},
    }


def _strips(reader, height: int, rows: int, check=None) -> Iterator[tuple[int, np.ndarray]]:
    for y in range(0, height, rows):
        if check is not None:
            check()  # a signal stops the polygons between strips
        band = reader.read_rows(y, min(height, y + rows))
        yield y, band[..., 0] if band.ndim == 3 else band
        del band


__all__ = ["open_outputs", "OutputRows"]
