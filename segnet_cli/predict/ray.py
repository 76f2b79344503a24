"""``segnet predict --engine ray``: the same read-segment-write, spread over a Ray cluster.

The driver does what the local engine does before any model is loaded (``plan.begin``:
inputs, up-to-date skips, duplicate output names), then hands the remaining jobs to Ray
Data as a small in-memory dataset of paths. ``map_batches`` runs them through a pool of
actors (a callable class): each actor loads the model once, then for every input takes the
output's claim (``plan.claim``), reads the image itself, segments it with
``pipeline.segment_image`` (the one pipeline: same tiling and stitching as every other
command) and writes it with ``plan.write_outputs``. Only a small result row per input
travels back; pixels never pass through the driver or the object store.

So the outputs, their resumability and their atomicity are those of the local engine, on
one condition: every node must see the inputs and the output folder at the same absolute
paths (a shared filesystem), and have ``segnet-cli`` installed in the same environment.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from segnet_cli.cluster import (
    ActorPlan,
    cluster_shape,
    device_mode,
    import_ray,
    is_local_session,
    plan_actors,
    quiet_ray_data,
    root_cause,
    session,
)
from segnet_cli.config import InferenceConfig, PredictConfig, Report, Status
from segnet_cli.errors import SegnetError
from segnet_cli.io.files import check_writable, remove_dead_temporaries
from segnet_cli.jobs import Claim, InputItem, Outcome, Run, SignalGuard, stopped_by
from segnet_cli.predict.plan import Job, begin, claim, refuse_file_out, write_outputs

#: Inputs per actor call. One image per call keeps results (and the progress bar) flowing
#: back as each image finishes; the model batches tiles *within* an image anyway.
BATCH_SIZE = 1


class SegmentActor:
    """Ray Data callable class: loads the model once, then segments and writes batches.

    Each input row holds ``i`` (the job's index in the driver's list). The jobs themselves
    (paths, outputs, provenance) reach the actor once, with its constructor. Each output row
    holds ``i``, ``status`` (done/failed/skipped), ``seconds``, ``error`` and ``reason`` (for
    skips). A failure of one input is a failed row, never an exception: one bad file must not
    take the whole dataset down.
    """

    def __init__(
        self, jobs: list[Job], inference: InferenceConfig, overwrite: bool, overlay_alpha: float
    ) -> None:
        from segnet_cli.model.segmenter import open_segmenter

        # Ray has already pinned this actor to its GPU (CUDA_VISIBLE_DEVICES), so TF's own
        # placement is right; only an explicit ``cpu`` is passed on.
        device = "cpu" if inference.device == "cpu" else None
        self.seg = open_segmenter(inference.model, inference.precision, device)
        self.jobs = jobs
        self.inference = inference
        self.overwrite = overwrite
        self.overlay_alpha = overlay_alpha

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.one(int(i)) for i in batch["i"]]
        return {
            "i": np.array([r[0] for r in rows], np.int64),
            "status": np.array([r[1] for r in rows], object),
            "seconds": np.array([r[2] for r in rows], np.float64),
            "error": np.array([r[3] for r in rows], object),
            "reason": np.array([r[4] for r in rows], object),
        }

    def one(self, i: int) -> tuple[int, str, float, str, str]:
        """Segment and write one input; returns ``(i, status, seconds, error, reason)``."""
        t0 = time.perf_counter()
        job = self.jobs[i]
        try:
            why = claim(job, self.overwrite)
        except OSError as exc:
            return i, Status.FAILED.value, 0.0, f"cannot claim the output: {exc.strerror or exc}", ""
        if why is not None:
            return i, Status.SKIPPED.value, 0.0, "", why
        try:
            error = self._segment_and_write(job)
        finally:
            job.claim.release()
        status = Status.FAILED if error else Status.DONE
        return i, status.value, time.perf_counter() - t0, error, ""

    def _segment_and_write(self, job: Job) -> str:
        """Read, segment, write; returns "" on success, else the error message."""
        from segnet_cli.io.images import read_image, to_model_input
        from segnet_cli.pipeline import segment_image

        info = self.seg.info
        try:
            raw = read_image(job.item.path, self.inference.max_pixels)
            image = to_model_input(raw, info.in_channels, job.item.path)
            mask, _ = segment_image(
                self.seg, image, self.inference.tiling, tta=self.inference.tta
            )
        except SegnetError as exc:
            return exc.message if exc.path else str(exc)
        except Exception as exc:  # an unexpected decoder failure must not stop the batch
            return f"{type(exc).__name__}: {exc}"
        try:
            write_outputs(job, mask, raw if job.overlay is not None else None, info, self.overlay_alpha)
        except (SegnetError, OSError, ValueError) as exc:
            return str(getattr(exc, "message", exc))
        return ""


def run_ray(config: PredictConfig, run: Run) -> Report:
    """Segment every input of ``config`` on a Ray cluster and write its mask.

    ``config.address`` is the cluster (``host:port`` or ``ray://host:port``); ``None``
    follows Ray's own rule: ``RAY_ADDRESS``, else a cluster started with ``ray start`` on
    this machine, else a new local cluster for this run.

    Returns:
        A report with the local engine's return codes: 0 (all done or skipped), 1 (some
        failed) or 130/143 (interrupted).

    Raises:
        UsageError: Ray is not installed, the cluster cannot be reached, or a bad option.
        SegnetError: as ``plan.plan`` (no input, a bad model file, ...).
    """
    import_ray()  # before any work: a missing extra is a usage error, even for --dry-run
    device_mode(config.inference.device)  # a bad --device fails before a cluster is started
    refuse_file_out(config.out)
    # A dry run, or nothing to segment: no cluster is started or contacted.
    jobs, model_sha, early = begin(config, run, engine="ray")
    if early is not None:
        return early
    check_writable(config.out)  # created only now: a refused run leaves no empty --out
    details: dict = {"engine": "ray", "model_sha256": model_sha}
    with SignalGuard() as guard, session(config.address, guard) as ray:
        run.attach(guard)
        if not guard.stop and is_local_session(ray):
            # Temporaries carry a pid, so they can be judged dead only on this host: clean
            # up when the cluster is ours and local, never a shared one.
            removed = remove_dead_temporaries(config.out)
            if removed:
                run.log(f"removed {removed} temporary file(s) left by an interrupted run")
        if not guard.stop:
            actors = plan_actors(*cluster_shape(ray), len(jobs), config.inference.device)
            details["actors"] = actors.describe()
            run.log(f"ray: {len(jobs)} image(s) on {actors.describe()}")
            _stream(ray, config, jobs, actors, guard, run)
    if guard.stop:
        run.interrupted = guard.signum
        run.log(f"{stopped_by(guard.signum)}: unfinished inputs are left for the next run "
                "(nothing partial written)")
    return run.report(**details)


def _stream(ray, config: PredictConfig, jobs: list[Job], actors: ActorPlan, guard, run: Run) -> None:
    """Run the dataset and turn its rows into outcomes."""
    from ray.data import ActorPoolStrategy

    from segnet_cli.model.modelfile import resolve_model_path

    if run.progress is not None:
        run.progress.start(len(jobs), 0)
    ready: list[Job] = []
    for job in jobs:
        try:
            job.ensure_provenance()  # hashed here, not while planning, for new inputs
        except OSError as exc:
            run.fail(job.item.path, f"cannot read: {exc.strerror or exc}")
            continue
        # Absolute paths: actors do not share the driver's working directory.
        job.item = InputItem(job.item.path.absolute(), job.item.rel)
        job.mask = job.mask.absolute()
        job.overlay = None if job.overlay is None else job.overlay.absolute()
        job.claim = Claim(Path(config.out).absolute(), job.mask)
        ready.append(job)
    if not ready:
        return
    jobs = ready
    inference = replace(
        config.inference, model=resolve_model_path(config.inference.model).absolute()
    )
    ds = ray.data.from_items([{"i": k} for k in range(len(jobs))]).map_batches(
        SegmentActor,
        batch_size=BATCH_SIZE,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors.size),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus or None,
        fn_constructor_kwargs={
            "jobs": jobs,
            "inference": inference,
            "overwrite": config.overwrite,
            "overlay_alpha": config.overlay_alpha,
        },
    )
    seen: set[int] = set()
    with quiet_ray_data():
        rows = iter(ds.iter_rows())
        try:
            for row in rows:
                i = int(row["i"])
                seen.add(i)
                run.emit(_outcome(jobs[i], row))
                if guard.stop:
                    break
        except Exception as exc:  # the cluster failed (an actor died, a node was lost)
            if not guard.stop:
                error = f"not run: the Ray job failed ({root_cause(exc)})"
                run.log(error)
                for i, job in enumerate(jobs):
                    if i not in seen:
                        run.fail(job.item.path, error)
        finally:
            # Closing the iterator stops the streaming executor and its actor pool now,
            # not when the garbage collector gets to it.
            close = getattr(rows, "close", None)
            if close is not None:
                close()


def _outcome(job: Job, row: dict) -> Outcome:
    status = Status.parse(str(row["status"]), "status")
    path = str(job.item.path)
    if status is Status.DONE:
        return Outcome(path, str(job.mask), status, float(row["seconds"]))
    if status is Status.SKIPPED:
        return Outcome(path, str(job.mask), status, extra={"reason": str(row["reason"])})
    return Outcome(path, None, Status.FAILED, float(row["seconds"]), str(row["error"]))


__all__ = ["run_ray", "SegmentActor"]
