"""``segnet predict``: folders of images in, palette-PNG masks out, pipelined and resumable.

The run is a three-stage pipeline so the model is never waiting on the disk:

1. reader threads decode images ahead of the model (a bounded look-ahead of
   ``queue_depth`` images: memory stays bounded whatever the folder size);
2. the main thread cuts images into tiles (one tile for an image that fits) and runs them
   through the model in batches; tiles of the same shape from *different* images share a
   batch, so a folder of photos fills batches like one big image does;
3. a writer thread encodes and writes finished masks atomically (temporary name, fsync,
   rename), while the model goes on with the next batch.

Every mask records its provenance (input content hash, model hash, settings) in a PNG text
chunk; a re-run skips masks that are up to date. Each output is claimed with a lock, so two
overlapping runs never write the same mask.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segnet_cli import __version__
from segnet_cli.batch import (
    Claim,
    InputItem,
    Outcome,
    Provenance,
    SignalGuard,
    Timer,
    collect_inputs,
    file_digest,
    remove_dead_temporaries,
    settings_key,
)
from segnet_cli.config import PredictConfig, Report
from segnet_cli.errors import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    ImageReadError,
    OutputError,
    SegnetError,
    UsageError,
)
from segnet_cli.imageio import (
    atomic_path,
    read_image,
    to_model_input,
    write_mask_png,
    write_overlay,
)
from segnet_cli.modelfile import read_info

PROVENANCE_KEY = "segnet"


def mask_path(out: Path, item: InputItem) -> Path:
    return out / item.rel.with_suffix(".png")


def overlay_path(out: Path, item: InputItem) -> Path:
    return out / item.rel.parent / f"{item.rel.stem}.overlay.jpg"


def read_provenance(mask: Path) -> Provenance | None:
    """The provenance recorded in an existing mask PNG (None if absent or unreadable)."""
    if not mask.is_file():
        return None
    try:
        from PIL import Image

        with Image.open(mask) as im:
            return Provenance.from_json(im.info.get(PROVENANCE_KEY))
    except Exception:
        return None


@dataclass
class Job:
    """One input on its way through the pipeline."""

    item: InputItem
    mask: Path
    overlay: Path | None
    claim: Claim
    model_sha: str = ""
    settings: str = ""
    provenance: Provenance | None = None  # computed on first need (see ensure_provenance)
    timer: Timer = field(default_factory=Timer)
    raw: np.ndarray | None = None
    image: np.ndarray | None = None
    stitcher: object = None
    grid: object = None
    remaining: int = 0

    def ensure_provenance(self) -> Provenance:
        """Hash the input (once) and return the provenance its mask will record.

        Planning hashes only inputs whose mask already exists (to decide a skip); new inputs
        are hashed by the reader threads, in parallel and just before decoding, so a first
        run over a big folder starts at once and reads each file while it is in the cache.
        """
        if self.provenance is None:
            self.provenance = Provenance(file_digest(self.item.path), self.model_sha, self.settings)
        return self.provenance


def check_writable(out: Path) -> None:
    """Fail early, with a clear message, when the output folder cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / ".segnet-write-test") as tmp:
            tmp.write_bytes(b"ok")
        (out / ".segnet-write-test").unlink()
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write to the output folder: {exc.strerror or exc}", out) from None


def plan(config: PredictConfig, on_event=None) -> tuple[list[Job], list[Outcome], str, str]:
    """Decide, before loading any model, what each input needs: work, skip, or failure.

    Returns:
        ``(jobs, outcomes, model_sha, settings)``. Claims are taken later, one input at a
        time as it enters the pipeline, so a huge folder never holds more than a queue's
        worth of locks (or file descriptors).
    """
    from segnet_cli.engine import PRECISIONS, model_fingerprint, resolve_model_path, validate_tiling

    model_path = resolve_model_path(config.model)
    info = read_info(model_path)  # a foreign or corrupt model fails here, before any work
    validate_tiling(config.tiling, info.stride)
    if config.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}")
    model_sha = model_fingerprint(model_path)
    t = config.tiling
    settings = settings_key(
        tile=t.tile, halo=t.halo, blend=t.blend, precision=config.precision, version=1
    )
    items, missing = collect_inputs(config.inputs)
    outcomes: list[Outcome] = []
    for spec in missing:
        outcomes.append(Outcome(spec, None, "failed", error="no input matched this"))
    jobs: list[Job] = []
    claimed_outputs: dict[Path, Path] = {}
    for item in items:
        m = mask_path(config.out, item)
        if m in claimed_outputs:
            outcomes.append(
                Outcome(
                    str(item.path), str(m), "failed",
                    error=f"same output name as {claimed_outputs[m]} (rename one of them)",
                )
            )
            continue
        claimed_outputs[m] = item.path
        if not item.path.is_file():
            why = "is a folder, not an image" if item.path.is_dir() else (
                "broken symbolic link" if item.path.is_symlink() else "not a regular file"
            )
            outcomes.append(Outcome(str(item.path), None, "failed", error=why))
            continue
        ov = overlay_path(config.out, item) if config.overlay else None
        claim = Claim(config.out, m)  # acquired only when the input enters the pipeline
        job = Job(item, m, ov, claim, model_sha, settings)
        if not config.overwrite and m.exists():
            try:
                up_to_date = read_provenance(m) == job.ensure_provenance()
            except OSError as exc:
                outcomes.append(Outcome(str(item.path), None, "failed", error=f"cannot read: {exc.strerror}"))
                continue
            if up_to_date:
                outcomes.append(
                    Outcome(str(item.path), str(m), "skipped", extra={"reason": "up to date"})
                )
                continue
        jobs.append(job)
    return jobs, outcomes, model_sha, settings


def begin(config: PredictConfig, emit, timer: Timer, **details):
    """What every engine does before segmenting: plan, report skips and failures found while
    planning, and answer a dry run or a run with nothing to do without loading any model.

    Returns:
        ``(jobs, counts, model_sha, early_report)``; ``early_report`` is not None when the run
        ends here. ``details`` are added to that report's details.
    """
    jobs, outcomes, model_sha, _settings = plan(config)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for o in outcomes:
        counts[o.status] += 1
        emit(o)
    early = None
    if config.dry_run:
        for job in jobs:
            emit(Outcome(str(job.item.path), str(job.mask), "planned"))
        early = {"planned": len(jobs), "dry_run": True}
    elif not jobs:
        early = {"nothing_to_do": True}
    if early is None:
        return jobs, counts, model_sha, None
    return jobs, counts, model_sha, Report(
        return_code=EXIT_SOME_FAILED if counts["failed"] else EXIT_OK,
        skipped=counts["skipped"],
        failed=counts["failed"],
        seconds=timer(),
        details={**early, **details},
    )


def run_predict(config: PredictConfig, on_event=None, progress=None, log=None) -> Report:
    """Segment every input of ``config`` and write its mask.

    Args:
        config: the options.
        on_event: called with each input's ``Outcome`` as soon as it is final.
        progress: optional ``ui.Progress``-like object (``start``, ``advance``).
        log: optional callable for one-line human messages.

    Returns:
        A report whose ``return_code`` is 0 (all done or skipped), 1 (some failed) or
        130/143 (interrupted).
    """
    if config.engine == "ray":
        from segnet_cli.ray_engine import run_predict_ray

        return run_predict_ray(config, on_event, progress, log, address=config.address)
    if config.engine != "local":
        raise UsageError(f"--engine must be 'local' or 'ray', not {config.engine!r}")
    timer = Timer()
    emit = on_event or (lambda o: None)
    if not config.dry_run:
        check_writable(config.out)
        removed = remove_dead_temporaries(config.out)
        if removed and log:
            log(f"removed {removed} temporary file(s) left by an interrupted run")
    jobs, counts, model_sha, early = begin(config, emit, timer)
    if early is not None:
        return early
    interrupted = None
    try:
        with SignalGuard() as guard:
            interrupted = _run_jobs(config, jobs, guard, emit, counts, progress, log)
    finally:
        for job in jobs:
            job.claim.release()
    code = EXIT_SOME_FAILED if counts["failed"] else EXIT_OK
    if interrupted is not None:
        code = 128 + interrupted
    return Report(
        return_code=code,
        done=counts["done"],
        skipped=counts["skipped"],
        failed=counts["failed"],
        seconds=timer(),
        details={
            "interrupted": interrupted,
            "model_sha256": model_sha,
            "model_load_seconds": round(counts.get("model_load_seconds", 0.0), 3),
        },
    )


def _run_jobs(config, jobs, guard, emit, counts, progress, log) -> int | None:
    """The pipeline itself; returns the signal number if interrupted, else None."""
    from segnet_cli.engine import Segmenter, crop, split_outputs
    from segnet_cli.tiling import Stitcher, TileGrid, stitch_all

    t_load = time.perf_counter()
    seg = Segmenter(config.model, config.precision, config.device)
    counts["model_load_seconds"] = time.perf_counter() - t_load
    info = seg.info
    tiling = config.tiling
    bs = seg.batch_tiles(tiling.batch_size)  # a batch for each device
    depth = max(1, config.queue_depth)
    if progress is not None:
        progress.start(len(jobs), 0)
    lock = threading.Lock()

    def finish(job: Job, status: str, error: str | None = None, output=None) -> None:
        with lock:
            counts[status] += 1
        job.claim.release()
        job.raw = job.image = job.stitcher = None
        emit(Outcome(str(job.item.path), output, status, job.timer(), error))
        if progress is not None:
            progress.advance(1)

    def skip(job: Job, reason: str) -> None:
        with lock:
            counts["skipped"] += 1
        job.claim.release()
        emit(Outcome(str(job.item.path), str(job.mask), "skipped", extra={"reason": reason}))
        if progress is not None:
            progress.advance(1)

    # ---- stage 1: readers
    def read(job: Job):
        try:
            job.ensure_provenance()
        except OSError as exc:
            raise ImageReadError(f"cannot read: {exc.strerror or exc}", job.item.path) from None
        raw = read_image(job.item.path, config.max_pixels)
        return raw, to_model_input(raw, info.in_channels, job.item.path)

    # ---- stage 3: writer
    write_q: queue.Queue = queue.Queue(maxsize=depth)

    def writer() -> None:
        while True:
            got = write_q.get()
            if got is None:
                return
            job, mask = got
            try:
                text = {
                    PROVENANCE_KEY: job.provenance.to_json(),
                    "Software": f"segnet {__version__}",
                    "Source": job.item.path.name,
                    "Classes": ",".join(info.class_names),
                }
                write_mask_png(mask, job.mask, info.palette, text)
                if job.overlay is not None and job.raw is not None:
                    write_overlay(job.raw, mask, job.overlay, info.palette, config.overlay_alpha)
                finish(job, "done", output=str(job.mask))
            except (SegnetError, OSError, ValueError) as exc:
                finish(job, "failed", str(getattr(exc, "message", exc)), None)

    wthread = threading.Thread(target=writer, name="segnet-writer", daemon=True)
    wthread.start()

    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="segnet-reader")
    ahead: deque[tuple[Job, Future]] = deque()
    next_submit = 0
    active: list[Job] = []  # images with tiles not yet stitched
    pending: dict[tuple, list] = {}  # window shape -> [(job, tile, pixels)]
    interrupted = None

    def submit_more() -> None:
        nonlocal next_submit
        while next_submit < len(jobs) and len(ahead) < depth and not guard.stop:
            job = jobs[next_submit]
            next_submit += 1
            try:
                got = job.claim.acquire()
            except OSError as exc:
                finish(job, "failed", f"cannot lock the output: {exc.strerror or exc}")
                continue
            if not got:
                skip(job, "another segnet run is writing this mask")
                continue
            # Re-check under the claim: an overlapping run may have finished it meanwhile.
            if not config.overwrite and job.mask.exists():
                try:
                    up_to_date = read_provenance(job.mask) == job.ensure_provenance()
                except OSError as exc:
                    finish(job, "failed", f"cannot read: {exc.strerror or exc}")
                    continue
                if up_to_date:
                    skip(job, "up to date")
                    continue
            ahead.append((job, pool.submit(read, job)))

    def run_group(group) -> None:
        batch = np.stack([p for _, _, p in group])
        outputs = split_outputs(seg.run(batch, group[0][0].stitcher.needs))
        for (job, tile, _), out in zip(group, outputs):
            job.stitcher.add(tile, out)
            job.remaining -= 1
            if job.remaining == 0:
                mask, _ = stitch_all(job.stitcher, job.grid.height, job.grid.width)
                active.remove(job)
                job.image = None
                write_q.put((job, mask))

    def flush_all() -> None:
        for key in list(pending):
            run_group(pending.pop(key))

    try:
        submit_more()
        while ahead:
            if guard.stop:
                break
            job, fut = ahead.popleft()
            submit_more()
            try:
                raw, image = fut.result()
            except SegnetError as exc:
                finish(job, "failed", exc.message if exc.path else str(exc))
                continue
            except Exception as exc:  # an unexpected decoder failure must not stop the batch
                finish(job, "failed", f"{type(exc).__name__}: {exc}")
                continue
            job.raw = raw if job.overlay is not None else None
            job.image = image
            h, w = image.shape[:2]
            try:
                job.grid = TileGrid.make(h, w, tiling.tile, tiling.halo, seg.stride)
            except SegnetError as exc:
                finish(job, "failed", exc.message)
                continue
            job.stitcher = Stitcher(job.grid, seg.num_classes, tiling.blend)
            job.remaining = len(job.grid)
            active.append(job)
            for tile in job.grid.tiles():
                px = crop(image, tile)
                group = pending.setdefault(px.shape, [])
                group.append((job, tile, px))
                if len(group) >= bs:
                    run_group(pending.pop(px.shape))
                    if guard.stop:
                        break
            # Bound memory: never hold more than `depth` partly-done images.
            if len(active) > depth:
                flush_all()
        if guard.stop:
            interrupted = guard.signum
        else:
            flush_all()
    finally:
        for _, fut in ahead:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        write_q.put(None)
        wthread.join()
    if interrupted is not None:
        # Inputs not finished are neither done nor failed; nothing partial was written.
        if log:
            log("interrupted: unfinished inputs are left for the next run (nothing partial written)")
    return interrupted


def summary_line(report: Report) -> str:
    parts = [f"{report.done} done", f"{report.skipped} skipped", f"{report.failed} failed"]
    d = report.details or {}
    if d.get("dry_run"):
        parts.insert(0, f"{d.get('planned', 0)} to do (dry run)")
    s = ", ".join(parts) + f" in {report.seconds:.1f}s"
    if d.get("nothing_to_do"):
        s += " (nothing to do)"
    if report.done and report.seconds > 0:
        s += f" ({report.done / report.seconds:.2f} images/s)"
    if d.get("interrupted"):
        s += " - interrupted"
    return s


__all__ = ["run_predict", "plan", "summary_line", "mask_path", "read_provenance"]
