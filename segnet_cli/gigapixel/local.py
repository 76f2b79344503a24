"""``segnet tile`` on this machine: one huge image streamed through the one pipeline.

1. a reader thread assembles the band of input rows that one grid row of windows needs
   (``rows.read_bands``), one band ahead of the model (or, when the memory budget needs it,
   only once the model is done with the previous one: ``TilingConfig.read_ahead``);
2. the main thread runs ``rows.stitch_rows``: the grid row's windows, scaled as every
   command scales them, through the ``Segmenter`` in batches of equal shape, into the
   ``Stitcher``;
3. finished rows go to the writer threads of ``outputs.open_outputs``, which encode them as
   compressed tiles of the output TIFF(s).

So the whole image, the whole mask and the whole probability map are never in memory.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np

from segnet_cli.config import TileConfig
from segnet_cli.errors import SegnetError, UsageError
from segnet_cli.gigapixel.isolated import isolated_rows, runs_model_apart
from segnet_cli.gigapixel.outputs import open_outputs
from segnet_cli.gigapixel.plan import TilePlan, peak_rss
from segnet_cli.gigapixel.rows import effective_nodata, read_bands, stitch_rows
from segnet_cli.io.sources import open_reader
from segnet_cli.jobs import Provenance


def stream(plan: TilePlan, config: TileConfig, prov: Provenance, guard, progress, log) -> dict:
    """The streaming run itself (``plan.run_planned``'s ``stream``); returns timing figures.

    With ``--vector`` the model runs in a child process (``isolated``; unless this process
    already holds TensorFlow) and this process only writes the rows it sends: the polygons
    that follow the stream then do not stack on what TensorFlow keeps after its last tile
    (oneDNN's memory pool, about 400 MiB that the process never gives back).
    """
    from segnet_cli.model.tfload import release_memory

    source, grid = plan.source, plan.grid
    stats = {"model_seconds": 0.0, "read_wait_seconds": 0.0, "write_wait_seconds": 0.0}
    total_px = source.pixels
    done_px = 0
    isolate = runs_model_apart(config)
    if log:
        where = " in a model process (--vector: polygons follow)" if isolate else ""
        log(f"loading model {plan.model_path}{where}")
    if progress is not None:
        progress.start(len(grid), 0)
    t_start = time.perf_counter()

    def on_batch(tiles: int, pixels: int) -> None:
        nonlocal done_px
        done_px += pixels
        if progress is not None:
            rate = done_px / max(1e-9, time.perf_counter() - t_start) / 1e6
            progress.advance(tiles, extra=f"{rate:.2f} Mpx/s")
        guard.check()

    if isolate:
        rows = isolated_rows(plan, config, stats, on_batch, guard.check)
    else:
        rows = model_rows(plan, config, stats, on_batch, guard.check, log)
    with open_outputs(
        plan, config, prov, plan.model.palette, plan.declares_nodata, guard.check
    ) as outputs:
        try:
            for _y0, mask, prob in rows:
                tw = time.perf_counter()
                outputs.add(mask, prob)
                stats["write_wait_seconds"] += time.perf_counter() - tw
                del mask, prob  # copied into the output blocks: not alive during the next row
        finally:
            rows.close()  # the reader, its read-ahead and the model (or its process) go
        if isolate:
            # This process's peak while the model process ran beside it (see run_planned).
            stats["stream_peak_rss_bytes"] = peak_rss()
        tw = time.perf_counter()
        outputs.finish()
        stats["write_wait_seconds"] += time.perf_counter() - tw
        # The model's part is done: free what it held before the COG and the polygons.
        del rows
        release_memory()
    wall = time.perf_counter() - t_start
    stats["areas"] = outputs.report
    stats.update(outputs.timings)
    stats.update(
        {
            "stream_seconds": wall,
            "tiles": len(grid),
            "mpx_per_s": total_px / wall / 1e6 if wall > 0 else 0.0,
            "prob_output": None if plan.prob_output is None else str(plan.prob_output),
        }
    )
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()}


def model_rows(
    plan: TilePlan,
    config: TileConfig,
    stats: dict,
    on_batch: Callable[[int, int], None] | None,
    check: Callable[[], None] | None = None,
    log=None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """The finished output rows of the whole image: reader, model and stitcher, top to bottom.

    Args:
        plan: the plan.
        config: the options.
        stats: ``model_seconds`` and ``read_wait_seconds`` are added to it.
        on_batch: called with ``(tiles, core pixels)`` after each batch.
        check: called once the model is loaded; it raises to stop.
        log: optional callable for one-line messages.

    Yields:
        ``(y0, mask rows, probability rows or None)``. Closing the generator closes the
        reader and drops the model.
    """
    from segnet_cli.model.segmenter import open_segmenter

    source, grid, tiling = plan.source, plan.grid, plan.tiling
    inference = config.inference
    seg = open_segmenter(plan.model_path, inference.precision, inference.device)
    if seg.stride != grid.stride or seg.num_classes != plan.model.num_classes:
        raise UsageError("the model changed since it was planned")
    if check is not None:
        check()
    nodata = effective_nodata(source, log)

    def batch_done(tiles) -> None:
        if on_batch is not None:
            pixels = sum((t.core[2] - t.core[0]) * (t.core[3] - t.core[1]) for t in tiles)
            on_batch(len(tiles), pixels)

    reader = open_reader(source, inference.max_pixels)
    bands = read_bands(reader, grid, ahead=tiling.read_ahead)
    try:
        yield from stitch_rows(
            seg,
            grid,
            _timed(bands, stats),
            blend=tiling.blend,
            batch_size=tiling.batch_size,
            source_path=source.path,
            alpha=source.alpha,
            probabilities=config.probabilities,
            probability_dtype=config.probability_dtype,
            nodata=nodata,
            nodata_class=config.nodata_class,
            stats=stats,
            on_batch=batch_done,
            tta=inference.tta,
            aoi=plan.aoi,
        )
    finally:
        bands.close()
        reader.close()


def _timed(
    bands: Iterator[tuple[int, np.ndarray]], stats: dict
) -> Iterator[tuple[int, np.ndarray]]:
    """Pass bands on, adding the time spent waiting for each to ``read_wait_seconds``."""
    while True:
        t = time.perf_counter()
        try:
            item = next(bands)
        except StopIteration:
            return
        stats["read_wait_seconds"] += time.perf_counter() - t
        yield item
        del item


def serve_rows() -> int:
    """The model process of ``isolated.isolated_rows``: read the plan and the options on
    standard input, send the rows, the figures and ``end`` (or the error) on standard output.

    Returns:
        The process's exit status: 0 when every row was sent.
    """
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else printed goes to standard error, never into the messages
    # Ctrl-C reaches the whole process group: the parent decides, then ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from segnet_cli.model.tfload import import_tf

    plan, config = pickle.load(sys.stdin.buffer)
    import_tf()  # with its C++ start-up chatter kept off standard error
    stats = {"model_seconds": 0.0, "read_wait_seconds": 0.0}
    try:
        for y0, mask, prob in model_rows(
            plan, config, stats, lambda n, px: _send(out, "batch", (n, px))
        ):
            send_rows(out, y0, mask, prob)
            del mask, prob
        _send(out, "stats", {**stats, "model_process_peak_rss_bytes": peak_rss()})
    except BrokenPipeError:
        return 1  # the parent is gone
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        try:
            _send(out, "error", exc)
        except Exception:
            _send(out, "error", SegnetError(f"{type(exc).__name__}: {exc}", plan.source.path))
        return 1
    _send(out, "end", None)
    return 0


def send_rows(out: BinaryIO, y0: int, mask: np.ndarray, prob: np.ndarray | None) -> None:
    """One band of finished rows: a pickled header, then each array's raw bytes (no copy)."""
    arrays = [np.ascontiguousarray(a) for a in (mask, prob) if a is not None]
    header = pickle.dumps(("rows", (y0, [(a.shape, a.dtype.str) for a in arrays])), protocol=5)
    out.write(header)
    for a in arrays:
        out.write(memoryview(a).cast("B"))
    out.flush()


def _send(out: BinaryIO, kind: str, payload: Any) -> None:
    # Pickled whole before writing, so a payload that cannot be pickled never leaves half a
    # message on the pipe.
    out.write(pickle.dumps((kind, payload), protocol=5))
    out.flush()


__all__ = ["model_rows", "send_rows", "serve_rows", "stream"]
