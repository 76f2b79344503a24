"""``segnet tile --engine ray``: one huge image, its grid rows spread over a Ray cluster.

The driver plans exactly as the local engine does (``tile.plan_tile``: the same global
``TileGrid``, batch size and outputs), takes the same claim and skips an up-to-date output
the same way (``tile.run_planned``). The grid's rows are then cut into *work units* of
whole grid rows (``plan_units``). Each unit owns a block of output rows:

* ``center`` blend: the cores of its grid rows. Cores partition the image, so a unit runs
  exactly its own tiles and no pixel is computed twice.
* ``gaussian`` blend: the rows the local stitcher finishes with its grid rows. Those rows
  also receive blended windows of the grid row(s) above, so a unit recomputes them first
  (one grid row for the usual halo), in the same order; units are at least
  ``GAUSSIAN_MIN_UNIT_ROWS`` grid rows, so that costs at most a quarter more compute.

Actors (a Ray Data ``map_batches`` callable class; the model is loaded once per actor) open
the input themselves, read only their unit's rows (``sources.open_reader``), run them through
``tile.stitch_rows`` (the very code the local engine runs, same windows and batches, so the
same bytes) and stream the unit's block into the *parts folder*, a hidden folder beside the
output named after the run's provenance: one ``.npy`` per unit and raster, written under a
temporary name and renamed when complete. The store is chunked by unit: a part is a whole
block of full-width output rows, so the driver finds every output row in exactly one part.
Only a small result row per unit travels back.

The driver then streams the final TIFF(s) from the parts, one row of output tiles at a time
through memory maps, with ``tile.open_outputs`` (same writer, tags, colour map, nodata and
provenance, temporary file renamed into place), and deletes the parts folder. A run that
stopped (signal, failed unit, lost cluster) keeps its finished parts: the next run with the
same provenance reuses them unit by unit; a parts folder of another provenance is deleted.

Every node must see the input and the output's folder at the same absolute paths (a shared
filesystem) and have ``segnet-cli`` installed in the same environment.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from segnet_cli.cluster import (
    cluster_shape,
    device_mode,
    import_ray,
    plan_actors,
    quiet_ray_data,
    root_cause,
    session,
)
from segnet_cli.config import (
    TTA,
    Blend,
    Precision,
    ProbabilityDtype,
    ProbabilityMode,
    Report,
    TileConfig,
)
from segnet_cli.errors import Interrupted, OutputError, SegnetError, UsageError
from segnet_cli.geo.aoi import Aoi
from segnet_cli.gigapixel.outputs import open_outputs
from segnet_cli.gigapixel.plan import TilePlan, run_planned
from segnet_cli.gigapixel.rows import effective_nodata, read_bands, stitch_rows
from segnet_cli.io.files import TMP_PREFIX, temporary_name
from segnet_cli.io.sources import open_reader
from segnet_cli.io.tiff import SourceInfo
from segnet_cli.tiling import Span, TileGrid

MiB = 1024 * 1024

#: Output pixels a work unit aims at (whole grid rows, at least one). Big enough that reading
#: a unit's halo rows twice costs little, small enough that a crash loses little and the
#: parts stay a few hundred MiB: ~90 s of the bundled model on a 2-core CPU.
UNIT_TARGET_PIXELS = 64 * MiB
#: Grids are cut into at least this many units when they have enough rows, so a cluster's
#: actors all get work (units are whole grid rows: a grid with fewer rows gets fewer).
MIN_UNITS = 8
#: Gaussian units recompute the grid row above them: at least this many rows keeps the extra
#: compute at or under 1 / GAUSSIAN_MIN_UNIT_ROWS.
GAUSSIAN_MIN_UNIT_ROWS = 4
#: After a signal, how long the driver waits for actors to abandon their units (they look for
#: the stop marker after every model batch) before it stops waiting.
STOP_DRAIN_SECONDS = 60.0
#: How often the driver looks at its signal flag while it waits for result rows.
POLL_SECONDS = 0.2

PARTS_INFIX = ".parts-"
STOP_PREFIX = ".stop-"


class UnitFailedError(SegnetError):
    """Work units failed (or the Ray job did); finished parts are kept for a re-run."""


# --------------------------------------------------------------------------- work units


@dataclass(frozen=True)
class Unit:
    """One work unit: output rows ``[y0, y1)``, made from grid rows ``[first, r1)``.

    Grid rows ``[r0, r1)`` are the unit's own (its tiles, for progress); ``first < r0`` only
    with gaussian blending, whose rows above must be recomputed for their overlap.
    """

    index: int
    y0: int
    y1: int
    first: int
    r0: int
    r1: int
    tiles: int

    def row(self) -> dict[str, int]:
        """The unit as a dataset row."""
        return {"u": self.index, "y0": self.y0, "y1": self.y1, "first": self.first,
                "r0": self.r0, "r1": self.r1, "tiles": self.tiles}

    @classmethod
    def from_row(cls, row: dict) -> Unit:
        return cls(*(int(row[k]) for k in ("u", "y0", "y1", "first", "r0", "r1", "tiles")))


def default_unit_rows(grid: TileGrid, blend: Blend) -> int:
    """Grid rows per unit: about ``UNIT_TARGET_PIXELS``, at least ``MIN_UNITS`` units.

    Depends on the grid only (never on the cluster), so a re-run on another cluster cuts
    the same units and can reuse the parts of an interrupted run.
    """
    n = len(grid.rows)
    core = max(r.core_end - r.core_start for r in grid.rows)
    by_size = max(1, UNIT_TARGET_PIXELS // (core * grid.width))
    k = min(by_size, max(1, math.ceil(n / MIN_UNITS)))
    if blend is Blend.GAUSSIAN:
        k = max(k, GAUSSIAN_MIN_UNIT_ROWS)
    return max(1, min(k, n))


def plan_units(grid: TileGrid, blend: Blend | str, rows_per_unit: int | None = None) -> list[Unit]:
    """Cut the grid into units of ``rows_per_unit`` whole grid rows (see the module notes).

    The units' output rows partition ``[0, height)`` in order.

    Raises:
        UsageError: an unknown blend or a unit size under one row.
    """
    blend = Blend.parse(blend, "--blend")
    k = default_unit_rows(grid, blend) if rows_per_unit is None else int(rows_per_unit)
    if k < 1:
        raise UsageError("work units need at least one grid row")
    rows, n, ncols = grid.rows, len(grid.rows), len(grid.cols)
    units: list[Unit] = []
    for r0 in range(0, n, k):
        r1 = min(n, r0 + k)
        if blend is Blend.CENTER:
            y0, y1, first = rows[r0].core_start, rows[r1 - 1].core_end, r0
        else:
            # The local stitcher finishes rows [window_start(r0), window_start(r1)) once grid
            # row r1 - 1 is in; they are also covered by the windows of earlier grid rows
            # that reach below window_start(r0) (window ends increase with the row).
            y0 = rows[r0].window_start if r0 else 0
            y1 = rows[r1].window_start if r1 < n else grid.height
            first = next(r for r in range(r0 + 1) if rows[r].window_end > y0 or r == r0)
        units.append(Unit(len(units), y0, y1, first, r0, r1, (r1 - r0) * ncols))
    return units


def unit_grid(grid: TileGrid, unit: Unit) -> tuple[TileGrid, int]:
    """The unit's grid rows as a grid of their own, and the input row its row 0 is.

    Rows are shifted so the unit's first window starts at row 0 (a stitcher then holds only
    the unit's rows); columns, tile sizes and window shapes are the global grid's, so every
    tile and every batch is the one the local engine runs.
    """
    rows = grid.rows[unit.first : unit.r1]
    off = rows[0].window_start
    shifted = tuple(
        Span(s.window_start - off, s.window_end - off, s.core_start - off, s.core_end - off)
        for s in rows
    )
    return replace(grid, height=rows[-1].window_end - off, rows=shifted), off


# --------------------------------------------------------------------------- the parts folder


def parts_key(prov_json: str, units: list[Unit]) -> str:
    """What a part depends on: the run's provenance and the cut into units."""
    text = prov_json + json.dumps([(u.y0, u.y1, u.first, u.r1) for u in units])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parts_folder(output: Path, key: str) -> Path:
    """``.<output name>.parts-<key>`` beside the output."""
    return output.with_name(f".{output.name}{PARTS_INFIX}{key}")


@dataclass(frozen=True)
class TileJob:
    """Everything an actor needs, the same for every unit (passed once per actor)."""

    source: SourceInfo  # with an absolute path: actors do not share the driver's cwd
    grid: TileGrid
    blend: Blend
    batch_size: int
    model: str
    precision: Precision
    device: str | None
    num_classes: int
    probabilities: ProbabilityMode | None
    probability_dtype: ProbabilityDtype
    nodata: float | None
    nodata_class: int
    max_pixels: int | None
    parts: str
    stop_file: str
    tta: TTA = TTA.NONE
    aoi: Aoi | None = None  # area of interest, pixel coordinates (plain bytes: pickles)
    read_ahead: int = 1  # bands read while the model works (TilingConfig.read_ahead)

    def part_files(self, unit: Unit) -> list[tuple[Path, tuple[int, ...], np.dtype]]:
        """``(path, shape, dtype)`` of the unit's parts, probabilities first, mask last.

        Parts are committed in this order, so a unit whose mask part exists is complete
        (``part_complete`` checks them all anyway).
        """
        parts = Path(self.parts)
        h, w = unit.y1 - unit.y0, self.grid.width
        out = []
        if self.probabilities is not None:
            per_class = self.probabilities is ProbabilityMode.CLASSES
            shape = (h, w, self.num_classes) if per_class else (h, w)
            dtype = np.dtype(str(self.probability_dtype))
            out.append((parts / f"unit-{unit.index:05d}.prob.npy", shape, dtype))
        out.append((parts / f"unit-{unit.index:05d}.mask.npy", (h, w), np.dtype(np.uint8)))
        return out

    def part_bytes(self, unit: Unit) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.part_files(unit))


def part_complete(job: TileJob, unit: Unit) -> bool:
    """The unit's parts all exist with the expected shape and type (headers only)."""
    for path, shape, dtype in job.part_files(unit):
        try:
            arr = np.load(path, mmap_mode="r")
            ok = arr.shape == shape and arr.dtype == dtype
            del arr
        except (OSError, ValueError):
            return False
        if not ok:
            return False
    return True


class _PartWriter:
    """Streams rows, top to bottom, into a ``.npy`` under a temporary name.

    Rows arrive in order, so a plain sequential write suffices: no memory map whose dirty
    pages would pile up in the actor's resident set, only the block being written.
    """

    def __init__(self, final: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.final = final
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.tmp = final.with_name(temporary_name(final))
        self.rows = 0
        self._fh = open(self.tmp, "wb")
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_1_0(self._fh, header)

    def write(self, block: np.ndarray) -> None:
        if block.shape[1:] != self.shape[1:] or self.rows + block.shape[0] > self.shape[0]:
            raise OutputError(f"internal error: block {block.shape} does not fit {self.shape}", self.final)
        self._fh.write(np.ascontiguousarray(block, self.dtype).tobytes())
        self.rows += block.shape[0]

    def commit(self) -> None:
        """Complete: flush to disk (a resumed run trusts every part it finds), rename."""
        if self.rows != self.shape[0]:
            raise OutputError(f"internal error: {self.rows} of {self.shape[0]} rows", self.final)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        try:
            self._fh.close()
        finally:
            try:
                self.tmp.unlink()
            except OSError:
                pass


def read_part_rows(path: Path, y0: int, y1: int, out: np.ndarray) -> None:
    """Copy rows ``[y0, y1)`` of a part into ``out`` through a memory map, then unmap.

    Mapping only for the copy keeps the driver's resident set to one band, however large
    the part.
    """
    arr = np.load(path, mmap_mode="r")
    try:
        out[...] = arr[y0:y1]
    finally:
        del arr


# --------------------------------------------------------------------------- the actor


class _Stopped(Exception):
    """The driver asked the actors to stop (its stop marker exists)."""


class TileActor:
    """Ray Data callable class: loads the model once, then computes units into parts.

    Each input row is a ``Unit.row()``; each output row holds ``u``, ``status`` (done,
    skipped when its parts already exist, stopped, failed), ``seconds`` and ``error``. A
    failed unit is a row, not an exception: the other units still finish and are kept.
    """

    def __init__(self, job: TileJob) -> None:
        from segnet_cli.model.segmenter import open_segmenter

        self.job = job
        # Ray has already pinned this actor to its GPU (CUDA_VISIBLE_DEVICES), so TF's own
        # placement is right; only an explicit ``cpu`` is passed on.
        self.seg = open_segmenter(job.model, job.precision, "cpu" if job.device == "cpu" else None)
        if self.seg.stride != job.grid.stride or self.seg.num_classes != job.num_classes:
            raise UsageError("the model changed since it was planned")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        units = [Unit.from_row({k: v[j] for k, v in batch.items()}) for j in range(len(batch["u"]))]
        rows = [self.run(u) for u in units]
        return {
            "u": np.array([u.index for u in units], np.int64),
            "status": np.array([r[0] for r in rows], object),
            "seconds": np.array([r[1] for r in rows], np.float64),
            "error": np.array([r[2] for r in rows], object),
        }

    def _check_stop(self, _tiles=None) -> None:
        if os.path.exists(self.job.stop_file):
            raise _Stopped()

    def run(self, unit: Unit) -> tuple[str, float, str]:
        """Compute one unit into its parts; returns ``(status, seconds, error)``."""
        t0 = time.perf_counter()
        try:
            self._check_stop()
            if part_complete(self.job, unit):
                return "skipped", 0.0, ""  # finished meanwhile (by an earlier, dying run)
            self._compute(unit)
        except _Stopped:
            return "stopped", time.perf_counter() - t0, ""
        except SegnetError as exc:
            # The driver names the input already; other paths (the parts folder) stay.
            text = exc.message if exc.path == self.job.source.path else str(exc)
            return "failed", time.perf_counter() - t0, text
        except Exception as exc:  # a decoder's or the filesystem's: one line for the driver
            return "failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
        return "done", time.perf_counter() - t0, ""

    def _compute(self, unit: Unit) -> None:
        job = self.job
        sub, off = unit_grid(job.grid, unit)
        writers = [_PartWriter(path, shape, dtype) for path, shape, dtype in job.part_files(unit)]
        *prob_writer, mask_writer = writers
        reader = open_reader(job.source, job.max_pixels)
        bands = read_bands(reader, sub, off, ahead=job.read_ahead)
        try:
            rows = stitch_rows(
                self.seg,
                sub,
                bands,
                blend=job.blend,
                batch_size=job.batch_size,
                source_path=job.source.path,
                alpha=job.source.alpha,
                probabilities=job.probabilities,
                probability_dtype=job.probability_dtype,
                nodata=job.nodata,
                nodata_class=job.nodata_class,
                on_batch=self._check_stop,
                tta=job.tta,
                aoi=job.aoi,
                row_offset=off,
            )
            for y, mask, prob in rows:
                # Gaussian units also finish rows above their own (incomplete there): skip.
                a, b = max(y + off, unit.y0), min(y + off + mask.shape[0], unit.y1)
                if b <= a:
                    continue
                s = slice(a - y - off, b - y - off)
                mask_writer.write(mask[s])
                if prob_writer:
                    prob_writer[0].write(prob[s])
                del mask, prob  # written: not alive while the next grid row runs
            for w in writers:
                w.commit()
        except BaseException:
            for w in writers:
                w.discard()
            raise
        finally:
            bands.close()
            reader.close()


# --------------------------------------------------------------------------- the driver


def run_ray(config: TileConfig, progress=None, log=None, unit_rows: int | None = None) -> Report:
    """``run_tile`` on a Ray cluster: the same outputs, claims, skips and exit codes.

    Args:
        config: the options; ``config.address`` is the cluster (``host:port`` or
            ``ray://host:port``); ``None`` follows Ray's rule: ``RAY_ADDRESS``, else a
            cluster started with ``ray start`` on this machine, else a new local cluster for
            this run. A Ray session this process had already started is used as it is.
        progress: optional ``ui.Progress``-like object, counting tiles.
        log: optional callable for one-line human messages.
        unit_rows: grid rows per work unit (default ``default_unit_rows``).

    Returns:
        A report: 0 (written or up to date) or 130/143 (interrupted: no output written,
        finished units kept for the next run).

    Raises:
        UsageError: Ray is not installed, the cluster cannot be reached, or a bad option.
        UnitFailedError: units failed or the Ray job did (finished units are kept).
        SegnetError: as ``run_tile``.
    """
    if config.plan_only:  # a plan needs neither a cluster nor Ray itself
        return run_planned(config, None, progress, log)
    import_ray()  # before any work: a missing extra is a usage error
    device_mode(config.inference.device)  # a bad --device fails before the input is hashed
    stream = functools.partial(_stream, address=config.address, unit_rows=unit_rows)
    return run_planned(
        config,
        stream,
        progress,
        log,
        "interrupted: no output written; finished work units are kept for the next run",
    )


def make_job(plan, config: TileConfig, parts: Path, nodata: float | None, run_id: str) -> TileJob:
    """The actors' job for a plan (absolute paths: actors do not share our cwd)."""
    return TileJob(
        source=replace(plan.source, path=plan.source.path.absolute()),
        grid=plan.grid,
        blend=plan.tiling.blend,
        batch_size=plan.tiling.batch_size,
        read_ahead=plan.tiling.read_ahead,
        model=str(plan.model_path.absolute()),
        precision=config.inference.precision,
        device=config.inference.device,
        num_classes=plan.model.num_classes,
        probabilities=config.probabilities,
        probability_dtype=config.probability_dtype,
        nodata=nodata,
        nodata_class=config.nodata_class,
        max_pixels=config.inference.max_pixels,
        parts=str(parts.absolute()),
        stop_file=str((parts / f"{STOP_PREFIX}{run_id}").absolute()),
        tta=config.inference.tta,
        aoi=plan.aoi,
    )


def _prepare_parts(output: Path, parts: Path, log) -> None:
    """Create our parts folder; delete other provenances' folders and dead runs' leftovers.

    Called under the output's claim: no other run is using any of them.
    """
    stale = 0
    prefix = f".{output.name}{PARTS_INFIX}"
    for p in output.parent.iterdir():  # not glob: the name may hold glob characters
        if p.name.startswith(prefix) and p != parts and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            stale += 1
    if stale and log:
        log(f"removed {stale} work folder(s) of an earlier run with other inputs or settings")
    try:
        parts.mkdir(exist_ok=True)
        for p in parts.iterdir():
            if p.name.startswith((TMP_PREFIX, STOP_PREFIX)):
                p.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write the work folder: {exc.strerror or exc}", parts) from None


def _stream(plan, config: TileConfig, prov, guard, progress, log, *, address, unit_rows) -> dict:
    """``run_planned``'s stream for Ray: units on the cluster, then the TIFF from the parts."""
    t_start = time.perf_counter()
    grid, source = plan.grid, plan.source
    units = plan_units(grid, plan.tiling.blend, unit_rows)
    parts = parts_folder(plan.output, parts_key(prov.to_json(), units))
    _prepare_parts(plan.output, parts, log)
    nodata = effective_nodata(source, log)
    job = make_job(plan, config, parts, nodata, uuid.uuid4().hex[:12])
    todo = [u for u in units if not part_complete(job, u)]
    reused = len(units) - len(todo)
    if reused and log:
        log(f"reusing {reused} of {len(units)} work unit(s) finished by an earlier run")
    need = sum(job.part_bytes(u) for u in todo)
    free = shutil.disk_usage(parts).free
    if need > free:
        raise OutputError(
            f"the work units need {need / MiB:,.0f} MiB beside the output until the TIFF is "
            f"written, but only {free / MiB:,.0f} MiB are free",
            parts,
        )
    if source.layout == "whole" and todo and log:
        log(f"{source.fmt} cannot be read window by window: every work unit decodes it whole")
    stats: dict = {
        "engine": "ray",
        "units": len(units),
        "units_reused": reused,
        "unit_rows": units[0].r1 - units[0].r0,
    }
    if progress is not None:
        progress.start(len(grid), sum(u.tiles for u in units) - sum(u.tiles for u in todo))
    if todo:
        _compute(job, todo, config, address, guard, progress, log, stats)
    guard.check()
    t_asm = time.perf_counter()
    stats["areas"], timings = _assemble(plan, config, prov, job, units, nodata, guard)
    stats.update(timings)  # the COG and the polygons
    stats["assemble_seconds"] = time.perf_counter() - t_asm
    shutil.rmtree(parts, ignore_errors=True)
    wall = time.perf_counter() - t_start
    stats.update(
        {
            "stream_seconds": wall,
            "tiles": len(grid),
            "mpx_per_s": source.pixels / wall / 1e6 if wall > 0 else 0.0,
            "prob_output": None if plan.prob_output is None else str(plan.prob_output),
        }
    )
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()}


def _compute(job: TileJob, todo: list[Unit], config: TileConfig, address, guard, progress, log, stats) -> None:
    """Run the units on the cluster (started or joined here); raises on a stop or failure."""
    from ray.data import ActorPoolStrategy

    failures: list[str] = []
    done_px = 0
    t0 = time.perf_counter()
    by_index = {u.index: u for u in todo}

    def on_row(row: dict) -> None:
        nonlocal done_px
        unit = by_index[int(row["u"])]
        status = str(row["status"])
        stats["unit_seconds"] = stats.get("unit_seconds", 0.0) + float(row["seconds"])
        if status == "failed":
            failures.append(f"rows {unit.y0}-{unit.y1}: {row['error']}")
        elif status in ("done", "skipped") and progress is not None:
            done_px += (unit.y1 - unit.y0) * job.grid.width
            rate = done_px / max(1e-9, time.perf_counter() - t0) / 1e6
            progress.advance(unit.tiles, extra=f"{rate:.2f} Mpx/s")

    signum = error = None
    # Ray's core worker resets SIGTERM to its default action as it shuts down (below Python,
    # which still reports the guard's handler); ``session`` puts the guard's back, or a
    # SIGTERM while the TIFF is assembled would kill us with temporaries left behind.
    with session(address, guard) as ray:
        guard.check()
        actors = plan_actors(*cluster_shape(ray), len(todo), config.inference.device)
        stats["actors"] = actors.describe()
        if log:
            log(f"ray: {len(todo)} work unit(s) of {stats['unit_rows']} grid row(s) on {actors.describe()}")
        ds = ray.data.from_items(
            [u.row() for u in todo],
            # One unit per block, so each actor task is one unit and units spread over actors.
            override_num_blocks=len(todo),
        ).map_batches(
            TileActor,
            batch_size=1,
            batch_format="numpy",
            # One unit in flight per actor: a unit is long, so queueing more on one actor
            # would only leave others idle at the end.
            compute=ActorPoolStrategy(size=actors.size, max_tasks_in_flight_per_actor=1),
            num_cpus=actors.num_cpus,
            num_gpus=actors.num_gpus or None,
            fn_constructor_kwargs={"job": job},
        )
        with quiet_ray_data():
            signum, error = _consume(ds, guard, Path(job.stop_file), on_row)
    if signum is not None:
        raise Interrupted(signum)
    if error is not None:
        raise UnitFailedError(
            f"the Ray job failed ({root_cause(error)}); finished work units are kept for a re-run",
            Path(job.source.path),
        )
    if failures:
        raise UnitFailedError(
            f"{len(failures)} of {len(todo)} work unit(s) failed, first at {failures[0]}; the "
            "others are kept for a re-run",
            Path(job.source.path),
        )


def _consume(ds, guard, stop_file: Path, on_row) -> tuple[int | None, BaseException | None]:
    """Iterate the dataset's result rows; returns ``(signal number, cluster error)``.

    The rows are pulled in a thread, because a unit takes minutes and waiting for the next
    row blocks: the main thread keeps watching the signal flag. On a signal it creates the
    stop marker (actors abandon their unit at the next model batch and answer the queued
    ones at once), collects what still arrives for a while, and returns.
    """
    rows_q: queue.Queue = queue.Queue()
    halt = threading.Event()

    def pump() -> None:
        rows = iter(ds.iter_rows())
        try:
            for row in rows:
                rows_q.put(("row", row))
                if halt.is_set():
                    break
        except BaseException as exc:  # the cluster failed (an actor died, a node was lost)
            rows_q.put(("error", exc))
        finally:
            try:
                # Closing the iterator stops the streaming executor and its actor pool now.
                close = getattr(rows, "close", None)
                if close is not None:
                    close()
            finally:
                rows_q.put(("end", None))

    thread = threading.Thread(target=pump, name="segnet-ray-rows", daemon=True)
    thread.start()
    signum, error, deadline = None, None, None
    while True:
        if guard.stop and signum is None:
            signum = guard.signum
            try:
                stop_file.touch()
            except OSError:
                pass  # then the units run to their end; nothing partial is kept either way
            deadline = time.monotonic() + STOP_DRAIN_SECONDS
        try:
            kind, value = rows_q.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if deadline is not None and time.monotonic() > deadline:
                halt.set()
                break
            continue
        if kind == "row":
            on_row(value)
        elif kind == "error":
            error = value
        else:
            break
    thread.join(timeout=5.0)
    if not thread.is_alive():
        try:
            stop_file.unlink(missing_ok=True)
        except OSError:
            pass
    return signum, (None if signum is not None else error)


def _assemble(
    plan, config: TileConfig, prov, job: TileJob, units: list[Unit], nodata, guard
) -> tuple[dict, dict]:
    """Stream the final TIFF(s) from the parts, one row of output tiles at a time; returns
    the class-area report and the finishing's timings (COG, polygons)."""
    height = plan.grid.height
    step = config.out_tile
    files = {u.index: job.part_files(u) for u in units}
    first = 0
    with open_outputs(
        plan, config, prov, plan.model.palette, plan.declares_nodata, guard.check
    ) as outputs:
        for y in range(0, height, step):
            y1 = min(height, y + step)
            while units[first].y1 <= y:
                first += 1
            blocks = [np.empty((y1 - y, *shape[1:]), dtype) for _, shape, dtype in files[units[first].index]]
            i = first
            while i < len(units) and units[i].y0 < y1:
                u = units[i]
                a, b = max(y, u.y0), min(y1, u.y1)
                for block, (path, _, _) in zip(blocks, files[u.index]):
                    read_part_rows(path, a - u.y0, b - u.y0, block[a - y : b - y])
                i += 1
            *prob, mask = blocks
            outputs.add(mask, prob[0] if prob else None)
            guard.check()
    return outputs.report, outputs.timings


# --------------------------------------------------------------------------- the plan


def plan_dict(plan: TilePlan, unit_rows: int | None = None) -> dict:
    """What ``--engine ray`` adds to ``segnet tile --plan`` (no cluster, no Ray needed)."""
    import importlib.util

    units = plan_units(plan.grid, plan.tiling.blend, unit_rows)
    return {
        "engine": "ray",
        "units": len(units),
        "unit_rows": units[0].r1 - units[0].r0,
        "computed_tiles": sum((u.r1 - u.first) * len(plan.grid.cols) for u in units),
        "parts_bytes": plan.mask_bytes + plan.prob_bytes,
        "ray_installed": importlib.util.find_spec("ray") is not None,
    }


__all__ = [
    "run_ray",
    "plan_units",
    "unit_grid",
    "Unit",
    "TileJob",
    "TileActor",
    "UnitFailedError",
    "plan_dict",
]
