"""``segnet predict --engine ray``: the same masks, skips and failures as the local engine.

Ray is needed only by the tests that ask for it (they skip themselves without it). Ray
start-up and each actor's model load cost seconds, so the engine runs on a cluster only
twice: a full run on a local cluster the engine starts and stops itself (as the CLI does),
and an interrupted run on a 2-CPU cluster (``ray.init(num_cpus=2)``) that a module fixture
starts and shuts down, which the engine must use and leave running. Everything that needs
no cluster (actor sizing, the actor's per-input logic, dry runs, re-runs with nothing to
do) is tested without one.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import local_ray_cluster, shapes_image, write_png
from PIL import Image

from segnet_cli.cluster import INSTALL_HINT, ActorPlan, plan_actors
from segnet_cli.config import InferenceConfig, PredictConfig, TilingConfig
from segnet_cli.errors import EXIT_SIGINT, UsageError
from segnet_cli.predict.ray import SegmentActor

# A tile smaller than the images, so tiling and stitching are exercised too.
TILING = TilingConfig(tile=64, halo=16, batch_size=2)
GOOD = ("odd.png", "line.png", "a.png", "b.png", "c.png", "sub/nested.png")


@pytest.fixture(scope="module")
def ray_cluster(ray_out):
    """A 2-CPU local cluster, started after ``ray_out`` (whose engine starts its own) and
    shut down after the module."""
    with local_ray_cluster() as ray:
        yield ray


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Odd sizes, a nested file and one broken file (``.jpg``, so ``**/*.png`` leaves it out)."""
    d = tmp_path_factory.mktemp("rayin")
    write_png(d / "odd.png", shapes_image(37, 53)[0])
    write_png(d / "line.png", shapes_image(1, 300)[0])
    for k, name in enumerate("abc"):
        write_png(d / f"{name}.png", shapes_image(100, 150, seed=k + 1)[0])
    write_png(d / "sub" / "nested.png", shapes_image(100, 150, seed=7)[0])
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return d


def config(folder: Path, out: Path, model: Path, **kw) -> PredictConfig:
    inference = InferenceConfig(model=model, tiling=TILING)
    return PredictConfig(inputs=(str(folder),), out=out, inference=inference, **kw)


@pytest.fixture(scope="module")
def local_out(folder, tiny_model, tmp_path_factory) -> Path:
    """The local engine's masks and overlays: the reference."""
    from segnet_cli.predict import run_predict

    out = tmp_path_factory.mktemp("local")
    report = run_predict(config(folder, out, tiny_model, overlay=True))
    assert (report.done, report.failed) == (6, 1)
    return out


class Recorder:
    """Events and a ``ui.Progress``-like counter; optionally raises SIGINT on the first step."""

    def __init__(self, interrupt: bool = False) -> None:
        self.events: list = []
        self.total = None
        self.steps = 0
        self.interrupt = interrupt

    def start(self, total: int, done: int) -> None:
        self.total = total

    def advance(self, n: int) -> None:
        self.steps += n
        if self.interrupt and self.steps == 1:
            signal.raise_signal(signal.SIGINT)  # as a Ctrl-C would, in the main thread


def assert_same_mask(a: Path, b: Path) -> None:
    with Image.open(a) as ia, Image.open(b) as ib:
        assert ia.mode == ib.mode == "P"
        assert np.array_equal(np.asarray(ia), np.asarray(ib)), a.name
        assert ia.getpalette() == ib.getpalette()
        assert ia.info == ib.info  # provenance, software, source and classes text chunks


# --------------------------------------------------------------------------- no cluster


def test_plan_actors_never_reserves_every_cpu():
    # One 2-CPU node: one actor, one CPU left for Ray Data's other tasks (ray#44687).
    assert plan_actors([2.0], 0, jobs=10) == ActorPlan(1, 1.0, 0.0)
    assert plan_actors([1.0], 0, jobs=10) == ActorPlan(1, 0.5, 0.0)
    # One actor per node, sized by the smallest node.
    assert plan_actors([16.0, 8.0, 8.0], 0, jobs=100) == ActorPlan(3, 7.0, 0.0)
    # Never more actors than inputs: each loads the model.
    assert plan_actors([16.0, 8.0, 8.0], 0, jobs=2).size == 2
    # GPUs: one actor per GPU; CPUs still left over when there are as many GPUs as CPUs.
    assert plan_actors([32.0], 4, jobs=100) == ActorPlan(4, 1.0, 1.0)
    gpu_heavy = plan_actors([4.0], 4, jobs=100)
    assert gpu_heavy.size == 4 and gpu_heavy.num_cpus * 4 < 4
    assert plan_actors([32.0], 4, jobs=100, device="cpu").num_gpus == 0
    with pytest.raises(UsageError, match="no GPU"):
        plan_actors([8.0], 0, jobs=1, device="gpu")
    for bad in ("gpu:1", "tpu"):  # Ray picks each actor's GPU; a number means nothing
        with pytest.raises(UsageError, match="--device"):
            plan_actors([8.0], 2, jobs=1, device=bad)


def test_cluster_failure_is_one_readable_line():
    from segnet_cli.cluster import root_cause

    remote = (
        "ActorDiedError: The actor died ... \x1b[36mray::MapWorker(MapBatches(SegmentActor))"
        "\x1b[39m\n  File \"x.py\", line 7, in __init__\n    raise ...\n"
        "ModelFileError: /m.keras: not a segnet model\n"
    )
    assert root_cause(RuntimeError(remote)) == "ModelFileError: /m.keras: not a segnet model"


def test_without_ray_the_engine_is_a_usage_error(monkeypatch, tmp_path, tiny_model):
    from segnet_cli.predict import run_predict

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(UsageError, match=r"pip install 'segnet-cli\[ray\]'") as err:
        run_predict(config(tmp_path, tmp_path / "out", tiny_model, engine="ray"))
    assert INSTALL_HINT in str(err.value)


def test_actor_rows_done_failed_skipped(folder, local_out, tiny_model, tmp_path):
    """The actor's per-input logic, called in-process: no cluster needed."""
    from segnet_cli.jobs import Claim
    from segnet_cli.predict.plan import plan

    cfg = config(folder, tmp_path / "out", tiny_model)
    jobs, _, _, _ = plan(cfg)
    index = {j.item.rel.as_posix(): i for i, j in enumerate(jobs)}
    actor = SegmentActor(jobs, cfg.inference, False, 0.5)

    def batch(*names):
        return {"i": np.array([index[n] for n in names], np.int64)}

    other = Claim(cfg.out, jobs[index["a.png"]].mask)  # another run is writing a.png
    assert other.acquire()
    try:
        rows = actor(batch("odd.png", "broken.jpg", "a.png"))
    finally:
        other.release()
    assert list(rows["status"]) == ["done", "failed", "skipped"]
    assert "cannot decode" in rows["error"][1] and rows["error"][0] == ""
    assert rows["reason"][2].startswith("another segnet run")
    assert_same_mask(local_out / "odd.png", cfg.out / "odd.png")
    assert not (cfg.out / "a.png").exists()
    # Finished meanwhile by another run: the re-check under the claim skips it.
    assert actor(batch("odd.png"))["reason"][0] == "up to date"


def test_dry_run_writes_nothing(folder, tiny_model, tmp_path):
    pytest.importorskip("ray.data")
    from segnet_cli.predict import run_predict

    rec = Recorder()
    out = tmp_path / "out"
    report = run_predict(
        config(folder, out, tiny_model, dry_run=True, engine="ray"), on_event=rec.events.append
    )
    assert report.return_code == 0 and report.details["planned"] == 7
    assert sorted(o.status for o in rec.events) == ["planned"] * 7
    assert not out.exists()


# --------------------------------------------------------------------------- on a cluster


@pytest.fixture(scope="module")
def ray_out(folder, tiny_model, tmp_path_factory):
    """One full run, with overlays, on a cluster the engine starts and stops itself (as the
    CLI does): ``(out, report, recorder)``."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from segnet_cli.io.files import TMP_PREFIX
    from segnet_cli.predict import run_predict

    out = tmp_path_factory.mktemp("ray")
    owned = not ray.is_initialized()
    dead = out / f"{TMP_PREFIX}999999999-odd.png.x.tmp"  # left by a crashed run
    dead.write_bytes(b"partial")
    rec = Recorder()
    report = run_predict(
        config(folder, out, tiny_model, overlay=True, engine="ray"),
        on_event=rec.events.append, progress=rec, log=rec.events.append,
    )
    if owned:
        assert not ray.is_initialized()  # its own local cluster is shut down
        assert not dead.exists()
        assert "removed 1 temporary file(s) left by an interrupted run" in rec.events
    rec.events = [e for e in rec.events if not isinstance(e, str)]
    return out, report, rec


def test_ray_masks_identical_to_local_engine(ray_out, local_out, folder):
    out, report, rec = ray_out
    assert (report.return_code, report.done, report.failed, report.skipped) == (1, 6, 1, 0)
    assert rec.total == 7 and rec.steps == 7
    by_status = {}
    for o in rec.events:
        by_status.setdefault(o.status, []).append(o)
    (broken,) = by_status["failed"]
    assert broken.path == str(folder / "broken.jpg") and "cannot decode" in broken.error
    assert sorted(Path(o.output).relative_to(out).as_posix() for o in by_status["done"]) == sorted(GOOD)
    for name in GOOD:
        assert_same_mask(local_out / name, out / name)
        overlay = Path(name).with_suffix("").as_posix() + ".overlay.jpg"
        assert (out / overlay).read_bytes() == (local_out / overlay).read_bytes()
    assert not [p for p in out.rglob(".segnet-tmp-*")]


def test_second_ray_run_skips_everything(ray_out, folder, tiny_model):
    from segnet_cli.predict import run_predict

    out, _, _ = ray_out
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    rec = Recorder()
    cfg = PredictConfig(  # every good image; the broken one would be retried (and fail) again
        inputs=(f"{folder}/**/*.png",), out=out, inference=InferenceConfig(model=tiny_model, tiling=TILING),
        overlay=True, engine="ray",
    )
    report = run_predict(cfg, on_event=rec.events.append)
    assert (report.return_code, report.done, report.skipped) == (0, 0, 6)
    assert report.details.get("nothing_to_do")  # decided by the driver: no actor started
    assert {o.extra["reason"] for o in rec.events} == {"up to date"}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before


def test_interrupt_stops_with_130_and_writes_only_whole_masks(
    ray_cluster, folder, local_out, tiny_model, tmp_path
):
    from segnet_cli.predict import run_predict

    out = tmp_path / "out"
    rec = Recorder(interrupt=True)
    report = run_predict(
        config(folder, out, tiny_model, engine="ray"), on_event=rec.events.append, progress=rec
    )
    assert report.return_code == EXIT_SIGINT and report.details["interrupted"] == signal.SIGINT
    assert len(rec.events) == 1  # nothing consumed after the signal
    # Actors may have finished a few more before they were stopped: whole masks only.
    for p in out.rglob("*.png"):
        if not p.name.startswith("."):
            assert_same_mask(local_out / p.relative_to(out), p)
    # The actor pool is gone: the cluster's CPUs come back for the next run.
    import time

    deadline = time.monotonic() + 30
    while ray_cluster.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == 2
