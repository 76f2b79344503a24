"""``segnet predict --engine ray``: the same read-predict-write, spread over a Ray cluster.

The driver does what the local engine does before any model is loaded (``predict.plan``:
inputs, up-to-date skips, duplicate output names), then hands the remaining jobs to Ray
Data as a small in-memory dataset of paths. ``map_batches`` runs them through a pool of
actors (a callable class): each actor loads the model once, then for every input reads
the image itself, segments it with ``Segmenter.segment`` (the same tiling and stitching as
every other command), takes the output's ``Claim`` and writes the mask atomically with the
same PNG text chunks as the local engine. Only a small result row per input travels back;
pixels never pass through the driver or the object store.

So the outputs, their resumability and their atomicity are those of the local engine, on
one condition: every node must see the inputs and the output folder at the same absolute
paths (a shared filesystem), and have ``segnet-cli`` installed in the same environment.

Ray is an optional dependency: it is imported only inside the functions that need it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segnet_cli.batch import Outcome, SignalGuard, Timer, remove_dead_temporaries
from segnet_cli.config import PredictConfig, Report, TilingConfig
from segnet_cli.errors import EXIT_OK, EXIT_SOME_FAILED, SegnetError, UsageError

#: What to tell a user who asks for the Ray engine without Ray Data installed.
INSTALL_HINT = "the ray engine needs Ray Data; install the ray extra: pip install 'segnet-cli[ray]'"

#: Inputs per actor call. One image per call keeps results (and the progress bar) flowing
#: back as each image finishes; the model batches tiles *within* an image anyway.
BATCH_SIZE = 1


def import_ray():
    """Import Ray and Ray Data, or explain how to install them.

    Raises:
        UsageError: Ray (or its Data library) is not installed.
    """
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks pyarrow/pandas)
    except ImportError as exc:
        raise UsageError(f"{INSTALL_HINT} ({exc})") from None
    return ray


# --------------------------------------------------------------------------- actor sizing


@dataclass(frozen=True)
class ActorPlan:
    """How many actors to start and what each reserves."""

    size: int
    num_cpus: float
    num_gpus: float

    def describe(self) -> str:
        each = f"{self.num_cpus:g} CPU" + (f" + {self.num_gpus:g} GPU" if self.num_gpus else "")
        return f"{self.size} actor(s), {each} reserved each"


def device_mode(device: str | None) -> str:
    """``--device`` for the Ray engine: ``auto``, ``cpu`` or ``gpu``.

    Raises:
        UsageError: anything else, including ``gpu:N`` (Ray gives each actor its own GPU,
            so picking one by number means nothing on a cluster).
    """
    want = (device or "auto").lower()
    if want.startswith("gpu:"):
        raise UsageError(f"--device {device}: with --engine ray use --device gpu (one actor per GPU)")
    if want not in ("auto", "cpu", "gpu"):
        raise UsageError(f"--device must be cpu or gpu with --engine ray, not {device!r}")
    return want


def plan_actors(
    node_cpus: list[float], total_gpus: float, jobs: int, device: str | None = None
) -> ActorPlan:
    """Size the actor pool for a cluster.

    * GPUs (unless ``device`` is ``cpu``): one actor per whole GPU, each reserving one GPU.
    * Otherwise one actor per node. Each reserves all but one of the smallest node's CPUs
      (at least half a CPU): big enough that no two actors share a node (TensorFlow uses
      every core of its node), yet never every CPU, because actors that reserve all CPUs
      starve Ray Data's other tasks and the job hangs (ray-project/ray#44687).

    The pool never has more actors than jobs: each actor loads the model once, which costs
    more than segmenting one image.

    Args:
        node_cpus: the CPU count of each alive node.
        total_gpus: the cluster's GPU count.
        jobs: the number of inputs to segment.
        device: ``PredictConfig.device``.

    Raises:
        UsageError: a bad ``device``, or a GPU asked for on a cluster without one.
    """
    want = device_mode(device)
    cpus = [c for c in node_cpus if c > 0] or [1.0]
    total_cpus = sum(cpus)
    gpus = int(total_gpus)
    if want == "gpu" and gpus < 1:
        raise UsageError(f"--device {device}: the Ray cluster has no GPU")
    if gpus >= 1 and want != "cpu":
        # A CPU per GPU actor feeds it, but a host with as many GPUs as CPUs must still
        # keep one CPU free for the rest of the pipeline.
        per = min(1.0, max(0.1, (total_cpus - 1) / gpus))
        return ActorPlan(size=max(1, min(gpus, jobs)), num_cpus=round(per, 2), num_gpus=1.0)
    per = max(0.5, min(cpus) - 1)
    return ActorPlan(size=max(1, min(len(cpus), jobs)), num_cpus=per, num_gpus=0.0)


# --------------------------------------------------------------------------- the actor


class SegmentActor:
    """Ray Data callable class: loads the model once, then segments and writes batches.

    Each input row holds ``i`` (the job's index in the driver), ``path``, ``mask``,
    ``overlay`` ("" for none), ``provenance`` (JSON) and ``source`` (the input's file name).
    Each output row holds ``i``, ``status`` (done/failed/skipped), ``seconds``, ``error``
    and ``reason`` (for skips). A failure of one input is a failed row, never an exception:
    one bad file must not take the whole dataset down.
    """

    def __init__(
        self,
        model: str,
        precision: str,
        device: str | None,
        tiling: TilingConfig,
        out: str,
        max_pixels: int | None,
        overwrite: bool,
        overlay_alpha: float,
    ) -> None:
        # Ray sets OMP_NUM_THREADS to the CPUs reserved (one fewer than the node has), but
        # TensorFlow's own thread pools, which do the work, still use every core of the
        # node: measured, forcing OMP_NUM_THREADS up changed nothing.
        from segnet_cli import __version__
        from segnet_cli.engine import Segmenter

        # Ray has already pinned this actor to its GPU (CUDA_VISIBLE_DEVICES), so TF's own
        # placement is right; only an explicit ``cpu`` is passed on.
        self.seg = Segmenter(model, precision, "cpu" if device == "cpu" else None)
        self.tiling = tiling
        self.out = Path(out)
        self.max_pixels = max_pixels
        self.overwrite = overwrite
        self.overlay_alpha = overlay_alpha
        self.software = f"segnet {__version__}"
        self.classes = ",".join(self.seg.info.class_names)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.one({k: v[j] for k, v in batch.items()}) for j in range(len(batch["i"]))]
        return {
            "i": np.array([r[0] for r in rows], np.int64),
            "status": np.array([r[1] for r in rows], object),
            "seconds": np.array([r[2] for r in rows], np.float64),
            "error": np.array([r[3] for r in rows], object),
            "reason": np.array([r[4] for r in rows], object),
        }

    def one(self, row: dict) -> tuple[int, str, float, str, str]:
        """Segment and write one input; returns ``(i, status, seconds, error, reason)``."""
        from segnet_cli.batch import Claim, Provenance
        from segnet_cli.predict import read_provenance

        t0 = time.perf_counter()
        i = int(row["i"])
        mask_path = Path(str(row["mask"]))
        claim = Claim(self.out, mask_path)
        try:
            if not claim.acquire():
                return i, "skipped", 0.0, "", "another segnet run is writing this mask"
        except OSError as exc:
            return i, "failed", 0.0, f"cannot lock the output: {exc.strerror or exc}", ""
        try:
            prov = Provenance.from_json(str(row["provenance"]))
            # Re-check under the claim: an overlapping run may have finished it meanwhile.
            if not self.overwrite and read_provenance(mask_path) == prov:
                return i, "skipped", 0.0, "", "up to date"
            error = self._segment_and_write(row, mask_path)
            status = "failed" if error else "done"
            return i, status, time.perf_counter() - t0, error, ""
        finally:
            claim.release()

    def _segment_and_write(self, row: dict, mask_path: Path) -> str:
        """Read, segment, write; returns "" on success, else the error message."""
        from segnet_cli.imageio import read_image, to_model_input, write_mask_png, write_overlay
        from segnet_cli.predict import PROVENANCE_KEY

        path = Path(str(row["path"]))
        info = self.seg.info
        try:
            raw = read_image(path, self.max_pixels)
            image = to_model_input(raw, info.in_channels, path)
            mask, _ = self.seg.segment(image, self.tiling)
        except SegnetError as exc:
            return exc.message if exc.path else str(exc)
        except Exception as exc:  # an unexpected decoder failure must not stop the batch
            return f"{type(exc).__name__}: {exc}"
        text = {
            PROVENANCE_KEY: str(row["provenance"]),
            "Software": self.software,
            "Source": str(row["source"]),
            "Classes": self.classes,
        }
        try:
            write_mask_png(mask, mask_path, info.palette, text)
            overlay = str(row["overlay"])
            if overlay:
                write_overlay(raw, mask, Path(overlay), info.palette, self.overlay_alpha)
        except (SegnetError, OSError, ValueError) as exc:
            return str(getattr(exc, "message", exc))
        return ""


# --------------------------------------------------------------------------- the driver


def run_predict_ray(
    config: PredictConfig,
    on_event=None,
    progress=None,
    log=None,
    address: str | None = None,
) -> Report:
    """Segment every input of ``config`` on a Ray cluster and write its mask.

    Args:
        config: the options (``engine`` is not consulted: calling this is the choice).
        on_event: called with each input's ``Outcome`` as soon as it is final.
        progress: optional ``ui.Progress``-like object (``start``, ``advance``).
        log: optional callable for one-line human messages.
        address: the cluster to use (``host:port`` or ``ray://host:port``). ``None``: Ray's
            own rule: ``RAY_ADDRESS``, else a cluster started with ``ray start`` on this
            machine, else a new local cluster for this run. A Ray session this process had
            already started (``ray.init`` by the caller) is used as it is and left running.

    Returns:
        A report with the local engine's return codes: 0 (all done or skipped), 1 (some
        failed) or 130/143 (interrupted).

    Raises:
        UsageError: Ray is not installed, the cluster cannot be reached, or a bad option.
        SegnetError: as ``predict.plan`` (no input, a bad model file, ...).
    """
    from segnet_cli.predict import begin, check_writable

    ray = import_ray()  # before any work: a missing extra is a usage error, even for --dry-run
    device_mode(config.device)  # a bad --device fails before a cluster is started
    timer = Timer()
    emit = on_event or (lambda o: None)
    if not config.dry_run:
        check_writable(config.out)
    # A dry run, or nothing to segment: no cluster is started or contacted.
    jobs, counts, model_sha, early = begin(config, emit, timer, engine="ray")
    if early is not None:
        return early

    details: dict = {"engine": "ray", "model_sha256": model_sha}
    started = not ray.is_initialized()
    # A signal during the seconds a cluster takes to start stops the run as cleanly as
    # one during the run.
    with SignalGuard() as guard:
        try:
            if started:
                _init(ray, address)
                _reclaim_sigterm(guard)
            if started and not guard.stop and _is_local_session(ray):
                # Temporaries carry only a pid, so they can be judged dead only on this
                # host: clean up when the cluster is ours and local, never a shared one.
                removed = remove_dead_temporaries(config.out)
                if removed and log:
                    log(f"removed {removed} temporary file(s) left by an interrupted run")
            interrupted = guard.signum
            if interrupted is None:
                actors = plan_actors(*_cluster_shape(ray), len(jobs), config.device)
                details["actors"] = actors.describe()
                if log:
                    log(f"ray: {len(jobs)} image(s) on {actors.describe()}")
                interrupted = _stream(ray, config, jobs, actors, guard, emit, counts, progress, log)
        finally:
            if started and ray.is_initialized():
                # Our own driver session only: a local cluster dies with it, a remote one
                # is merely disconnected from. A session the caller started is left alone.
                ray.shutdown()
    if interrupted is not None and log:
        log("interrupted: unfinished inputs are left for the next run (nothing partial written)")
    code = EXIT_SOME_FAILED if counts["failed"] else EXIT_OK
    if interrupted is not None:
        code = 128 + interrupted
    details["interrupted"] = interrupted
    return Report(
        return_code=code,
        done=counts["done"],
        skipped=counts["skipped"],
        failed=counts["failed"],
        seconds=timer(),
        details=details,
    )


def _init(ray, address: str | None) -> None:
    """Start or join a cluster, quietly (the library never prints)."""
    try:
        ray.init(
            address=address,
            ignore_reinit_error=True,
            logging_level=logging.WARNING,
            # Actor stdout/stderr stays in the cluster's log files; failures come back
            # to us as result rows or exceptions, not as text on our terminal.
            log_to_driver=False,
        )
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
        where = address or os.environ.get("RAY_ADDRESS") or "a local cluster"
        raise UsageError(f"cannot start or reach the Ray cluster ({where}): {exc}") from None


def _reclaim_sigterm(guard: SignalGuard) -> None:
    """Put the guard's SIGTERM handler back: ``ray.init`` replaces it with one that exits.

    The guard's ``__exit__`` still restores the handler that was there before it.
    """
    guard.reinstall()


def _is_local_session(ray) -> bool:
    """True when every node of the cluster is this machine (a local cluster)."""
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        here = ray.util.get_node_ip_address()
        return all(n.get("NodeManagerAddress") == here for n in nodes)
    except Exception:  # an unanswerable question means "do not risk deleting anything"
        return False


def _cluster_shape(ray) -> tuple[list[float], float]:
    """``(cpus of each alive node, total GPUs)``."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
    gpus = float(ray.cluster_resources().get("GPU", 0))
    return node_cpus, gpus


def _stream(ray, config: PredictConfig, jobs, actors: ActorPlan, guard, emit, counts, progress, log):
    """Run the dataset and turn its rows into outcomes; returns the signal number or None."""
    from ray.data import ActorPoolStrategy

    from segnet_cli.engine import resolve_model_path

    items = []
    for k, job in enumerate(jobs):
        try:
            # Hashed here, not while planning, for inputs that had no mask yet.
            provenance = job.ensure_provenance().to_json()
        except OSError as exc:
            counts["failed"] += 1
            emit(Outcome(str(job.item.path), None, "failed", error=f"cannot read: {exc.strerror or exc}"))
            continue
        items.append(
            {
                "i": k,
                # Absolute paths: actors do not share the driver's working directory.
                "path": str(job.item.path.absolute()),
                "mask": str(job.mask.absolute()),
                "overlay": str(job.overlay.absolute()) if job.overlay is not None else "",
                "provenance": provenance,
                "source": job.item.path.name,
            }
        )
    if not items:
        return None
    ds = ray.data.from_items(items).map_batches(
        SegmentActor,
        batch_size=BATCH_SIZE,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors.size),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus or None,
        fn_constructor_kwargs={
            "model": str(resolve_model_path(config.model).absolute()),
            "precision": config.precision,
            "device": config.device,
            "tiling": config.tiling,
            "out": str(Path(config.out).absolute()),
            "max_pixels": config.max_pixels,
            "overwrite": config.overwrite,
            "overlay_alpha": config.overlay_alpha,
        },
    )
    if progress is not None:
        progress.start(len(jobs), len(jobs) - len(items))  # unreadable ones are already done
    seen: set[int] = set()
    interrupted = None
    with _quiet_ray_data():
        rows = iter(ds.iter_rows())
        try:
            for row in rows:
                _emit_row(row, jobs, emit, counts, progress, seen)
                if guard.stop:
                    break
        except Exception as exc:  # the cluster failed (an actor died, a node was lost)
            if not guard.stop:
                error = f"not run: the Ray job failed ({_root_cause(exc)})"
                if log:
                    log(error)
                _fail_rest(jobs, seen, error, emit, counts, progress)
        finally:
            # Closing the iterator stops the streaming executor and its actor pool now,
            # not when the garbage collector gets to it.
            close = getattr(rows, "close", None)
            if close is not None:
                close()
        if guard.stop:
            interrupted = guard.signum
    return interrupted


@contextmanager
def _quiet_ray_data():
    """Keep Ray Data off the terminal for one run, then restore the caller's settings.

    Progress is the caller's (``progress``); Ray Data's own bars, start-up banner, INFO
    lines and its "progress bars disabled" notice would print. Errors still get through.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    logger = logging.getLogger("ray.data")
    level = logger.level
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        logger.setLevel(level)


def _root_cause(exc: BaseException) -> str:
    """One line for a Ray failure: the last line of its remote traceback, without colours.

    Ray's errors carry the whole remote traceback in their text; the last line names the
    exception that started it (say ``ModelFileError: ...`` from an actor's constructor).
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last if len(last) <= 300 else last[:297] + "..."


def _emit_row(row: dict, jobs, emit, counts, progress, seen: set[int]) -> None:
    i = int(row["i"])
    job = jobs[i]
    seen.add(i)
    status = str(row["status"])
    if status == "done":
        o = Outcome(str(job.item.path), str(job.mask), "done", float(row["seconds"]))
    elif status == "skipped":
        o = Outcome(str(job.item.path), str(job.mask), "skipped", extra={"reason": str(row["reason"])})
    else:
        status = "failed"
        o = Outcome(str(job.item.path), None, "failed", float(row["seconds"]), str(row["error"]))
    counts[status] += 1
    emit(o)
    if progress is not None:
        progress.advance(1)


def _fail_rest(jobs, seen: set[int], error: str, emit, counts, progress) -> None:
    """Report every input the cluster did not get to as failed, with the cluster's error."""
    for i, job in enumerate(jobs):
        if i not in seen:
            counts["failed"] += 1
            emit(Outcome(str(job.item.path), None, "failed", error=error))
            if progress is not None:
                progress.advance(1)


__all__ = ["run_predict_ray", "plan_actors", "ActorPlan", "SegmentActor", "import_ray", "INSTALL_HINT"]
