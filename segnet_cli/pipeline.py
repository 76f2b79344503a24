"""THE loop: source -> grid -> batches -> model -> stitcher -> sink, for every command.

A *work* is one stretch of pixels with its tiles: a whole image (``predict``, ``eval``, the
Python API) or one grid row of a huge image (``tile``, streamed band by band). ``run_works``
takes works from any source, cuts them into their tiles, batches tiles of one shape (across
works, so a folder of photos fills batches like one big image does), runs the batches
through the ``Segmenter``, adds each output to its work's ``Stitcher`` and hands back each
work as soon as its last tile is stitched. What happens to the pixels before (reading,
scaling) and after (writing a PNG, a TIFF, a confusion matrix) is the caller's: sources and
sinks are thin, the loop is one.

Memory stays bounded: at most ``max_open`` works have tiles in flight; when more are open,
every pending batch is flushed (``max_open=0``: each work is flushed on its own, which is how
``tile`` keeps one band of rows in memory). ``read_ahead`` is the one read-ahead helper:
decoding the next inputs in threads while the model runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from segnet_cli.config import TTA, TilingConfig
from segnet_cli.tiling import Stitcher, Tile, TileGrid, stitch_all

T = TypeVar("T")


def crop(image: np.ndarray, tile: Tile, y0: int = 0) -> np.ndarray:
    """The tile's window of ``image`` (whose first row is image row ``y0``), as the model
    sees it: mirrored left-right for a tile of the mirrored view (test-time augmentation)."""
    wy0, x0, wy1, x1 = tile.window
    window = image[wy0 - y0 : wy1 - y0, x0:x1]
    return window[:, ::-1] if tile.flipped else window


def split_outputs(outputs) -> list:
    """One entry per tile from a batch output of ``Segmenter.run``."""
    if isinstance(outputs, tuple):
        return list(zip(*outputs))
    return list(outputs)


def read_ahead(
    fn: Callable[[T], object], items: Iterable[T], depth: int, workers: int = 1
) -> Iterator[tuple[T, Future]]:
    """Yield ``(item, future of fn(item))`` in order, reading ``depth`` items ahead.

    While the caller holds item ``i``, items ``i+1 .. i+depth`` are being read; the next one
    is submitted only when the caller asks for ``i+1``. So a caller that drops its
    references before asking (``del``) keeps at most ``depth + 1`` results alive: for
    ``tile``'s bands of rows (``depth=1``), the band the model uses and the one being read.

    Items are taken from ``items`` only as they are submitted, so a lazy iterable (one that
    claims each input as it enters the pipeline) is consumed ``depth`` items ahead of the
    caller, never further. With ``workers=1`` the calls run one after another in order, for
    readers that must read sequentially. Closing the generator (or leaving the loop)
    cancels what was not started and waits for what was.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="segnet-read")
    queue: deque[tuple[T, Future]] = deque()
    it = iter(items)

    def submit_one() -> None:
        for item in it:
            queue.append((item, pool.submit(fn, item)))
            return

    try:
        for _ in range(depth + 1):
            submit_one()
        while queue:
            pair = queue.popleft()
            yield pair
            del pair  # the caller is done with it: keep none of its results alive
            submit_one()
    finally:
        for _, fut in queue:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(eq=False)
class Work:
    """One stretch of pixels on its way through the model.

    Attributes:
        key: the caller's handle (a job, a grid row, ...), handed back untouched.
        stitcher: where the tiles' outputs go; its ``needs`` says what the model returns.
        tiles: the tiles to run (a whole grid, or one grid row of it).
        pixels: ``tile -> (h, w, C) float32`` model input of the tile's window.
    """

    key: object
    stitcher: Stitcher
    tiles: list[Tile]
    pixels: Callable[[Tile], np.ndarray]
    remaining: int = field(default=0, init=False)


def run_works(
    segmenter,
    works: Iterable[Work],
    batch_size: int,
    max_open: int = 0,
    should_stop: Callable[[], bool] | None = None,
    on_batch: Callable[[list[tuple[Work, Tile]]], None] | None = None,
) -> Iterator[Work]:
    """Run every tile of every work through the model; yield each work once it is complete.

    Args:
        segmenter: a ``model.segmenter.Segmenter`` (or anything with its ``run`` and
            ``batch_tiles``).
        works: the works, in order; pulled one at a time.
        batch_size: tiles per model batch and device.
        max_open: works with tiles in flight before every pending batch is flushed
            (``0``: flush after each work, so a work's batches never mix with the next's).
        should_stop: checked after every batch; when it returns True the loop ends without
            flushing (the caller reports the interruption).
        on_batch: called with each batch's ``(work, tile)`` pairs once they are stitched
            (progress, signals).

    Yields:
        Each ``Work`` whose every tile has been added to its stitcher, in completion order.
    """
    bs = segmenter.batch_tiles(batch_size)
    pending: dict[tuple, list[tuple[Work, Tile, np.ndarray]]] = {}
    open_works: list[Work] = []
    finished: list[Work] = []

    def run(group: list[tuple[Work, Tile, np.ndarray]]) -> None:
        batch = np.stack([p for _, _, p in group])
        outputs = split_outputs(segmenter.run(batch, group[0][0].stitcher.needs))
        del batch
        for (work, tile, _), out in zip(group, outputs):
            work.stitcher.add(tile, out)
            work.remaining -= 1
            if work.remaining == 0:
                open_works.remove(work)
                finished.append(work)
        if on_batch is not None:
            on_batch([(w, t) for w, t, _ in group])

    def stopped() -> bool:
        return should_stop is not None and should_stop()

    def flush() -> None:
        for key in list(pending):
            run(pending.pop(key))

    for work in works:
        if stopped():
            return
        work.remaining = len(work.tiles)
        if not work.remaining:
            yield work
            del work
            continue
        open_works.append(work)
        for tile in work.tiles:
            px = work.pixels(tile)
            key = px.shape
            group = pending.setdefault(key, [])
            group.append((work, tile, px))
            del px, group
            if len(pending[key]) >= bs:
                run(pending.pop(key))
                yield from _drain(finished)
                if stopped():
                    return
        if len(open_works) > max_open:
            flush()
            yield from _drain(finished)
            if stopped():
                return
        # Hold no reference to a finished work (nor its pixels) while the next is read.
        del work, tile
    flush()
    yield from _drain(finished)


def _drain(finished: list[Work]) -> Iterator[Work]:
    while finished:
        yield finished.pop(0)


def image_work(key, image: np.ndarray, grid: TileGrid, num_classes: int, tiling: TilingConfig,
               tta: TTA = TTA.NONE, confidence: bool = False,
               probabilities: bool = False) -> Work:
    """A whole in-memory ``(H, W, C)`` float32 image as one work of the pipeline."""
    mirrored = tta is TTA.FLIP
    stitcher = Stitcher(grid, num_classes, tiling.blend, confidence=confidence,
                        probabilities=probabilities, mirrored=mirrored)
    return Work(key, stitcher, grid.all_tiles(mirrored), lambda t: crop(image, t))


def _stitched(segmenter, image: np.ndarray, tiling: TilingConfig, tta: TTA,
              should_stop: Callable[[], bool] | None = None, **outputs) -> Stitcher:
    """Run one in-memory image through the grid and the model; its filled stitcher."""
    h, w = image.shape[:2]
    grid = TileGrid.make(h, w, tiling.tile, tiling.halo, segmenter.stride)
    work = image_work(None, image, grid, segmenter.num_classes, tiling, tta, **outputs)
    for _ in run_works(segmenter, [work], tiling.batch_size, should_stop=should_stop):
        pass
    return work.stitcher


def segment_image(
    segmenter,
    image: np.ndarray,
    tiling: TilingConfig,
    confidence: bool = False,
    tta: TTA = TTA.NONE,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segment one ``(H, W, C)`` float32 image in memory; returns ``(mask, confidence)``.

    The same grid, batches and stitching as every command: a mask equal to the one
    ``segnet predict`` writes for the image.
    """
    stitcher = _stitched(segmenter, image, tiling, tta, confidence=confidence)
    return stitch_all(stitcher, *image.shape[:2], confidence)


def image_probabilities(
    segmenter,
    image: np.ndarray,
    tiling: TilingConfig,
    tta: TTA = TTA.NONE,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """The ``(H, W, K)`` float32 class probabilities of one in-memory image.

    The same grid, batches and stitching as ``segment_image``: their argmax is the mask
    ``segnet predict`` writes with the same settings (``segnet train --teacher`` learns from
    them). ``should_stop`` is checked after every batch, as ``run_works`` does; once it
    returns True the result is incomplete and the caller must discard it.
    """
    stitcher = _stitched(segmenter, image, tiling, tta, should_stop, probabilities=True)
    out = np.zeros((*image.shape[:2], segmenter.num_classes), np.float32)
    for y0, _mask, _conf, prob in stitcher.pop():
        out[y0 : y0 + prob.shape[0]] = prob
    return out


__all__ = [
    "Work",
    "run_works",
    "read_ahead",
    "image_work",
    "segment_image",
    "image_probabilities",
    "crop",
    "split_outputs",
]
