"""The pixel core of ``segnet tile``: grid rows of a huge image in, finished mask rows out.

``stitch_rows`` is the one place where ``segnet tile`` turns pixels into mask rows, whichever
engine runs it (``gigapixel.ray`` runs it on a slice of the grid), so both give the same
bytes: each grid row is one work of the pipeline (``pipeline.run_works`` with
``max_open=0``: a row's batches never mix with the next's), stitched by one ``Stitcher``,
with the same nodata rule and the same probability encoding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from segnet_cli.config import TTA, Blend, ProbabilityDtype, ProbabilityMode
from segnet_cli.errors import OutputError
from segnet_cli.io.images import to_model_input
from segnet_cli.io.tiff import RegionReader, SourceInfo, iter_bands
from segnet_cli.pipeline import Work, crop, read_ahead, run_works
from segnet_cli.tiling import Stitcher, TileGrid


def nodata_mask(band: np.ndarray, value: float) -> np.ndarray | None:
    """Pixels whose every band equals the nodata value (``None`` when it cannot occur)."""
    if math.isnan(value):
        if not np.issubdtype(band.dtype, np.floating):
            return None
        return np.isnan(band).all(axis=-1)
    if np.issubdtype(band.dtype, np.integer):
        info = np.iinfo(band.dtype)
        if value != int(value) or not info.min <= value <= info.max:
            return None
        value = int(value)
    return (band == np.asarray(value, band.dtype)).all(axis=-1)


def invalid_pixels(band: np.ndarray, y0: int, nodata: float | None, aoi) -> np.ndarray | None:
    """Pixels of ``band`` (image rows from ``y0``) that are nodata or outside the area of
    interest (``None`` when no pixel can be)."""
    invalid = nodata_mask(band, nodata) if nodata is not None else None
    if aoi is not None:
        outside = aoi.outside(y0, y0 + band.shape[0], band.shape[1])
        invalid = outside if invalid is None else (invalid | outside)
    return invalid


def all_invalid(invalid: np.ndarray, tile, b0: int, by_window: bool) -> bool:
    """Every pixel the tile decides is invalid: its core (center mode) or window (blending)."""
    y0, x0, y1, x1 = tile.window if by_window else tile.core
    return bool(invalid[y0 - b0 : y1 - b0, x0:x1].all())


def probability_block(conf: np.ndarray, dtype: ProbabilityDtype) -> np.ndarray:
    if dtype is ProbabilityDtype.UINT8:
        return np.clip(np.rint(conf * 255.0), 0, 255).astype(np.uint8)
    return conf.astype(np.float16)


def effective_nodata(source: SourceInfo, log=None) -> float | None:
    """The input's nodata value as the bands show it (``None``: no pixel is nodata)."""
    nodata = source.nodata
    if nodata is not None and source.palette:
        # A palette image's nodata is a colour-map index, gone once bands are expanded to RGB.
        if log:
            log("input nodata ignored: it names a palette index, not a colour")
        return None
    return nodata


def read_bands(
    reader: RegionReader, grid: TileGrid, offset: int = 0, ahead: int = 1
) -> Iterator[tuple[int, np.ndarray]]:
    """``(y0, band)`` for each grid row in order, read ``ahead`` bands ahead in a thread.

    ``offset``: the image row of the grid's row 0 (a Ray work unit's grid is shifted so
    that its first window starts at 0); ``y0`` is in the grid's coordinates.

    ``tiff.iter_bands`` reuses the rows a band shares with the previous one, so bands are
    read sequentially; ``pipeline.read_ahead`` reads the next while the model works on the
    current one. A caller that drops each band before asking for the next keeps
    ``ahead + 1`` alive (``TilingConfig.read_ahead``; the planner counts them).
    """
    ranges = [(r.window_start + offset, r.window_end + offset) for r in grid.rows]
    source = iter_bands(reader, ranges, dropped=ahead == 0)
    for _, fut in read_ahead(lambda _: next(source), ranges, depth=ahead, workers=1):
        y0, band = fut.result()
        del fut
        yield y0 - offset, band
        del band


def stitch_rows(
    seg,
    grid: TileGrid,
    bands: Iterator[tuple[int, np.ndarray]],
    *,
    blend: Blend,
    batch_size: int,
    source_path: Path,
    alpha: bool = False,
    probabilities: ProbabilityMode | None,
    probability_dtype: ProbabilityDtype,
    nodata: float | None,
    nodata_class: int,
    stats: dict | None = None,
    on_batch: Callable | None = None,
    tta: TTA = TTA.NONE,
    aoi=None,
    row_offset: int = 0,
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Run every grid row through the model and yield finished output rows, top to bottom.

    Args:
        seg: a ``Segmenter``.
        grid: the tiles to run, row by row.
        bands: ``(y0, band)`` for each grid row in order, in the grid's row coordinates
            (``read_bands``).
        blend: the stitcher's mode.
        batch_size: tiles per model batch.
        source_path: the input (for error messages).
        alpha: the input's last band is alpha (``SourceInfo.alpha``): it may be dropped.
        probabilities: ``None``, or what the probability raster holds.
        probability_dtype: its encoding.
        nodata: the input's nodata value (``effective_nodata``), or ``None``.
        nodata_class: the mask value of nodata pixels.
        stats: when given, ``model_seconds`` is added to it.
        on_batch: called with each batch's tiles once they are stitched (progress, signals).
        tta: ``flip`` also runs each grid row's mirrored view (``TileGrid.mirrored``).
        aoi: a ``geo.aoi.Aoi`` (pixel coordinates of the image): pixels outside it are
            nodata.
        row_offset: the image row of the grid's row 0 (a Ray work unit's shifted grid), to
            place the area of interest.

    Tiles whose every pixel is nodata (the input's nodata value, or outside the area of
    interest) are not run: in center mode when their core is all nodata, in gaussian mode
    when their whole window is, so the other pixels get exactly the values they get when
    every tile runs. ``stats["skipped_tiles"]`` counts them.

    Yields:
        ``(y0, mask, prob)``: rows ``[y0, y0 + len(mask))`` as uint8 class indices, and their
        probability raster in ``probability_dtype`` (``None`` without ``probabilities``).

    Raises:
        OutputError: the stitcher did not finish (an internal error).
    """
    prob = probabilities
    stitcher = Stitcher(
        grid,
        seg.num_classes,
        blend,
        confidence=prob is ProbabilityMode.CONFIDENCE,
        probabilities=prob is ProbabilityMode.CLASSES,
        mirrored=tta is TTA.FLIP,
    )
    channels = seg.info.in_channels
    by_window = blend is not Blend.CENTER

    def works():
        source = iter(bands)
        for r in range(len(grid.rows)):
            b0, band = next(source)  # not zip/enumerate: they keep the last item alive
            invalid = invalid_pixels(band, b0 + row_offset, nodata, aoi)
            tiles = grid.row_tiles(r, tta is TTA.FLIP)
            if invalid is not None:
                skipped = [t for t in tiles if all_invalid(invalid, t, b0, by_window)]
                if skipped:
                    for t in skipped:
                        stitcher.skip(t)
                    tiles = [t for t in tiles if t not in skipped]
                    if stats is not None:
                        stats["skipped_tiles"] = stats.get("skipped_tiles", 0) + len(skipped)
                    if on_batch is not None:
                        on_batch(skipped)

            def pixels(tile, band=band, b0=b0):
                return to_model_input(crop(band, tile, b0), channels, source_path, alpha)

            yield Work((b0, invalid), stitcher, tiles, pixels)
            # Drop every reference to the band (the closure's too) before the next is read:
            # two bands alive at most.
            del band, pixels, invalid

    def batch_done(pairs) -> None:
        if stats is not None:
            stats["model_seconds"] += time.perf_counter() - clock[0]
        if on_batch is not None:
            on_batch([t for _, t in pairs])
        clock[0] = time.perf_counter()

    clock = [time.perf_counter()]
    for work in run_works(seg, works(), batch_size, max_open=0, on_batch=batch_done):
        b0, invalid = work.key
        del work
        for y0, mask, conf, probs in stitcher.pop():
            if invalid is not None:
                nod = invalid[y0 - b0 : y0 - b0 + mask.shape[0]]
                if nod.any():
                    mask = np.where(nod, np.uint8(nodata_class), mask)
                    if conf is not None:
                        conf = np.where(nod, 0.0, conf)
                    if probs is not None:
                        probs = np.where(nod[..., None], 0.0, probs)
            p = None
            if prob is not None:
                p = probability_block(
                    probs if prob is ProbabilityMode.CLASSES else conf, probability_dtype
                )
            yield y0, mask, p
            # Drop this block before the next grid row runs: a loop variable would keep the
            # finished band's probabilities alive beside the next band (not in the budget).
            del mask, conf, probs, p
        del invalid
        clock[0] = time.perf_counter()
    if not stitcher.finished:
        raise OutputError("internal error: the stitcher did not finish", source_path)


__all__ = [
    "stitch_rows",
    "read_bands",
    "effective_nodata",
    "nodata_mask",
    "invalid_pixels",
    "probability_block",
]
