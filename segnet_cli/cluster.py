"""Ray, for the engines that run on a cluster: start or join it, size the actors, stay quiet.

Shared by ``segnet predict --engine ray`` (``predict.ray``) and ``segnet tile --engine ray``
(``gigapixel.ray``); neither imports the other. Ray is an optional dependency: it is
imported only inside the functions that need it, and a missing extra is a usage error that
names the install command.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from segnet_cli.errors import UsageError
from segnet_cli.jobs import SignalGuard

#: What to tell a user who asks for the Ray engine without Ray Data installed.
INSTALL_HINT = "the ray engine needs Ray Data; install the ray extra: pip install 'segnet-cli[ray]'"


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


def start(ray, address: str | None) -> None:
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


def reclaim_sigterm(guard: SignalGuard) -> None:
    """Put the guard's SIGTERM handler back: ``ray.init`` replaces it with one that exits.

    The guard's ``__exit__`` still restores the handler that was there before it.
    """
    guard.reinstall()


def is_local_session(ray) -> bool:
    """True when every node of the cluster is this machine (a local cluster)."""
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        here = ray.util.get_node_ip_address()
        return all(n.get("NodeManagerAddress") == here for n in nodes)
    except Exception:  # an unanswerable question means "do not risk deleting anything"
        return False


def cluster_shape(ray) -> tuple[list[float], float]:
    """``(cpus of each alive node, total GPUs)``."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
    gpus = float(ray.cluster_resources().get("GPU", 0))
    return node_cpus, gpus


@contextmanager
def quiet_ray_data():
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


def root_cause(exc: BaseException) -> str:
    """One line for a Ray failure: the last line of its remote traceback, without colours.

    Ray's errors carry the whole remote traceback in their text; the last line names the
    exception that started it (say ``ModelFileError: ...`` from an actor's constructor).
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last if len(last) <= 300 else last[:297] + "..."


@contextmanager
def session(address: str | None, guard: SignalGuard) -> Iterator[object]:
    """Ray, started or joined for one run, and left as it was found.

    Our own driver session is shut down at the end: a local cluster dies with it, a remote
    one is merely disconnected from. A session the caller had already started (``ray.init``
    in a notebook) is used as it is and left running. ``ray.init`` and Ray's shutdown
    replace the SIGTERM handler; the guard's is put back after each, so a signal stops the
    run as cleanly as one at any other moment.

    Yields:
        The ``ray`` module.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    try:
        if started:
            start(ray, address)
            reclaim_sigterm(guard)
        yield ray
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
            reclaim_sigterm(guard)


__all__ = [
    "INSTALL_HINT",
    "import_ray",
    "ActorPlan",
    "device_mode",
    "plan_actors",
    "session",
    "start",
    "reclaim_sigterm",
    "is_local_session",
    "cluster_shape",
    "quiet_ray_data",
    "root_cause",
]
