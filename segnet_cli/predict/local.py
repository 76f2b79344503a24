"""``segnet predict`` on this machine: folders of images in, palette-PNG masks out.

The run is the one pipeline (``segnet_cli.pipeline``) with three threads of work, so the
model is never waiting on the disk:

1. reader threads claim each input as it enters the pipeline (``plan.claim``), hash and
   decode it ahead of the model (``pipeline.read_ahead``: a bounded look-ahead of
   ``queue_depth`` images, so memory stays bounded whatever the folder size);
2. the main thread runs ``pipeline.run_works``: each image becomes a work of tiles (one tile
   for an image that fits), and tiles of the same shape from different images share a batch;
3. a writer thread encodes finished masks and writes them atomically
   (``plan.write_outputs``) while the model goes on with the next batch.
"""

from __future__ import annotations

import queue
import threading
import time

from segnet_cli.config import PredictConfig, Report, Status
from segnet_cli.errors import ImageReadError, SegnetError
from segnet_cli.io.files import check_writable, remove_dead_temporaries
from segnet_cli.io.images import read_image, to_model_input
from segnet_cli.jobs import Outcome, Run, SignalGuard, stopped_by
from segnet_cli.pipeline import image_work, read_ahead, run_works
from segnet_cli.predict.plan import Job, begin, claim, refuse_file_out, write_outputs
from segnet_cli.tiling import TileGrid, stitch_all

#: Reader threads: decoding overlaps itself as well as the model.
READERS = 2


def run_local(config: PredictConfig, run: Run) -> Report:
    """Segment every input of ``config`` on this machine and write its mask.

    Returns:
        The run's report: 0 (all done or skipped), 1 (some failed) or 130/143 (interrupted).
    """
    refuse_file_out(config.out)
    jobs, model_sha, early = begin(config, run)
    if not config.dry_run and (early is None or config.out.is_dir()):
        # Created only now: a run refused while planning leaves no empty --out behind. A
        # run with nothing to do still clears a killed run's temporaries.
        check_writable(config.out)
        removed = remove_dead_temporaries(config.out)
        if removed:
            run.log(f"removed {removed} temporary file(s) left by an interrupted run")
    if early is not None:
        return early
    details: dict = {"model_sha256": model_sha}
    with SignalGuard() as guard:
        run.attach(guard)
        _segment(config, jobs, run, guard, details)
    if guard.stop:
        run.interrupted = guard.signum
        run.log(f"{stopped_by(guard.signum)}: unfinished inputs are left for the next run "
                "(nothing partial written)")
    return run.report(**details)


def _segment(config: PredictConfig, jobs: list[Job], run: Run, guard: SignalGuard, details: dict) -> None:
    from segnet_cli.model.segmenter import open_segmenter

    inference = config.inference
    t_load = time.perf_counter()
    seg = open_segmenter(inference.model, inference.precision, inference.device)
    details["model_load_seconds"] = round(time.perf_counter() - t_load, 3)
    info, tiling = seg.info, inference.tiling
    depth = config.queue_depth
    if run.progress is not None:
        run.progress.start(len(jobs), 0)

    broken: list[BaseException] = []  # what stopped the writer, re-raised by the main thread

    def stopping() -> bool:
        return guard.stop or bool(broken)

    def finish(job: Job, status: Status, error: str | None = None) -> None:
        job.claim.release()
        job.raw = None
        output = str(job.mask) if status is Status.DONE else None
        run.emit(Outcome(str(job.item.path), output, status, time.perf_counter() - job.seconds, error))

    def entering():
        """Jobs as they enter the pipeline, each claimed (skips and failures reported)."""
        for job in jobs:
            if stopping():
                return
            job.seconds = time.perf_counter()
            try:
                why = claim(job, config.overwrite)
            except OSError as exc:
                run.fail(job.item.path, f"cannot claim the output: {exc.strerror or exc}")
                continue
            if why is not None:
                run.skip(job.item.path, job.mask, why)
                continue
            yield job

    def read(job: Job):
        try:
            job.ensure_provenance()
        except OSError as exc:
            raise ImageReadError(f"cannot read: {exc.strerror or exc}", job.item.path) from None
        raw = read_image(job.item.path, inference.max_pixels)
        return raw, to_model_input(raw, info.in_channels, job.item.path)

    def works():
        for job, fut in read_ahead(read, entering(), depth, workers=READERS):
            if stopping():
                job.claim.release()
                return
            try:
                raw, image = fut.result()
                grid = TileGrid.make(*image.shape[:2], tiling.tile, tiling.halo, seg.stride)
            except SegnetError as exc:
                finish(job, Status.FAILED, exc.message if exc.path else str(exc))
                continue
            except Exception as exc:  # an unexpected decoder failure must not stop the batch
                finish(job, Status.FAILED, f"{type(exc).__name__}: {exc}")
                continue
            del fut
            job.raw = raw if job.overlay is not None else None
            yield image_work(job, image, grid, seg.num_classes, tiling, inference.tta)
            del raw, image

    # The writer: encoding and writing overlap the model's next batches.
    write_q: queue.Queue = queue.Queue(maxsize=depth)

    def writer() -> None:
        # It drains the queue to the end whatever happens: the main thread must never wait
        # on a full queue that nobody empties.
        while (got := write_q.get()) is not None:
            job, mask = got
            if broken:
                job.claim.release()
                continue
            status, error = Status.DONE, None
            try:
                write_outputs(job, mask, job.raw, info, config.overlay_alpha)
            except (SegnetError, OSError, ValueError) as exc:
                status, error = Status.FAILED, str(getattr(exc, "message", exc))
            except BaseException as exc:  # a defect: stop the run, and say what it was
                broken.append(exc)
                job.claim.release()
                continue
            try:
                finish(job, status, error)  # once: reporting must not report itself again
            except BaseException as exc:  # the caller's on_event failed
                broken.append(exc)

    wthread = threading.Thread(target=writer, name="segnet-writer", daemon=True)
    wthread.start()
    try:
        stream = run_works(
            seg, works(), tiling.batch_size, max_open=depth, should_stop=stopping
        )
        for work in stream:
            grid = work.stitcher.grid
            mask, _ = stitch_all(work.stitcher, grid.height, grid.width)
            write_q.put((work.key, mask))
    finally:
        if "stream" in locals():
            stream.close()  # stops the readers now, not when the garbage collector runs
        write_q.put(None)
        wthread.join()
        # Inputs not finished are neither done nor failed; nothing partial was written.
        for job in jobs:
            job.claim.release()
    if broken:
        raise broken[0]


__all__ = ["run_local"]
