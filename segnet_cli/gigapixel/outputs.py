"""The output rasters of ``segnet tile``: tiled, compressed TIFFs written row by row.

``open_outputs`` opens the mask (and the probability raster) as temporaries and renames
them into place only when complete; both engines write through it, so both give the same
bytes, tags, colour map, nodata and provenance.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import numpy as np

from segnet_cli import __version__
from segnet_cli.config import ProbabilityMode, TileConfig
from segnet_cli.gigapixel.plan import TilePlan
from segnet_cli.io.files import atomic_path
from segnet_cli.io.tiff import RowBlocks, TiledTiffWriter, colormap, output_extratags
from segnet_cli.jobs import Provenance


class OutputRows:
    """The rows of the output rasters, written in order (see ``open_outputs``)."""

    def __init__(self, mask_rows: RowBlocks, prob_rows: RowBlocks | None) -> None:
        self._mask = mask_rows
        self._prob = prob_rows
        self._finished = False

    def add(self, mask: np.ndarray, prob: np.ndarray | None = None) -> None:
        """The next rows: class indices, and their probabilities when a raster is written."""
        self._mask.add(mask)
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
def open_outputs(plan: TilePlan, config: TileConfig, prov: Provenance, palette, nodata: bool):
    """Open the output TIFF(s) as temporaries; rename them into place when the body succeeds.

    The mask is uint8 with the model's colour map, the probability raster (if asked for)
    float16 or uint8; both tiled and compressed as configured, with the input's resolution
    and georeferencing, ``Software`` and the provenance in ``ImageDescription``.

    Args:
        plan: the plan (output paths, sizes, BigTIFF decisions).
        config: the options.
        prov: recorded in each file's ImageDescription.
        palette: the model's class colours.
        nodata: the input declares nodata: the mask then declares ``nodata_class`` as its own.

    Yields:
        An ``OutputRows`` to feed rows to; it is finished on leaving the block. On an
        exception the writers are stopped and the temporaries deleted.
    """
    source, k = plan.source, plan.model.num_classes
    prob = config.probabilities
    common = {"software": f"segnet {__version__}", "description": prov.to_json()}
    if source.resolution is not None:
        common["resolution"] = source.resolution
        common["resolutionunit"] = source.resolution_unit or 1
    nodata_out = str(config.nodata_class) if nodata else None
    with ExitStack() as stack:
        tmp_mask = stack.enter_context(atomic_path(plan.output))
        tmp_prob = stack.enter_context(atomic_path(plan.prob_output)) if plan.prob_output else None
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
            rows = OutputRows(RowBlocks(mask_writer, config.out_tile), prob_rows)
            yield rows
            rows.finish()
        except BaseException:
            for w in writers:
                w.abort()
            raise


__all__ = ["open_outputs", "OutputRows"]
