"""``segnet tile --engine ray``: the same mask TIFF as the local engine, resumable unit by unit.

The input is a 301 x 517 tiled GeoTIFF with a nodata block; tiles of 64 with a halo of 8
(the tiny model's stride is 8) make a 6 x 11 grid, cut into 6 work units (center blend) or
2 (gaussian). Actor start-up (TensorFlow import, model load) costs seconds, so the cluster,
a 2-CPU ``ray.init(num_cpus=2)`` started once for the module, runs only three jobs: one
interrupted after its first unit, its resumption, and a gaussian run with probabilities
through the CLI. Everything else (unit arithmetic, the actor's unit logic, skips, options)
runs without a cluster.
"""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import local_ray_cluster, shapes_image
from typer.testing import CliRunner

from segnet_cli.cli import app
from segnet_cli.config import InferenceConfig, TileConfig, TilingConfig
from segnet_cli.errors import EXIT_SIGINT, UsageError
from segnet_cli.gigapixel import run_tile
from segnet_cli.io.files import TMP_PREFIX
from segnet_cli.tiling import TileGrid

TILING = TilingConfig(tile=64, halo=8, batch_size=3)
H, W = 301, 517
GEO = [
    (33550, 12, 3, (0.5, 0.5, 0.0), True),
    (33922, 12, 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), True),
    (34735, 3, 8, (1, 1, 0, 1, 3072, 0, 1, 32633), True),
    (34737, 2, 0, "WGS 84 / UTM zone 33N|", True),
    (42113, 2, 0, "0", True),  # GDAL_NODATA: the all-zero block below
]

runner = CliRunner()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    data = shapes_image(H, W, seed=3)[0]
    data[:30, :40] = 0
    path = tmp_path_factory.mktemp("raytile") / "scene.tif"
    tifffile.imwrite(
        path, data, tile=(64, 48), compression="zlib", resolution=(2, 2), resolutionunit=3,
        extratags=GEO,
    )
    return path


def cfg(src: Path, model: Path, out: Path, tiling: TilingConfig = TILING, **kw) -> TileConfig:
    return TileConfig(input=src, inference=InferenceConfig(model=model, tiling=tiling), out=out, **kw)


@pytest.fixture(scope="module")
def local_center(src, tiny_model, tmp_path_factory) -> Path:
    """The local engine's mask: the reference."""
    out = tmp_path_factory.mktemp("local") / "center.tif"
    assert run_tile(cfg(src, tiny_model, out)).done == 1
    return out


@pytest.fixture(scope="module")
def local_gaussian(src, tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "gauss.mask.tif"
    config = cfg(src, tiny_model, out, tiling=replace(TILING, blend="gaussian"),
                 probabilities="classes", probability_dtype="uint8")
    assert run_tile(config).done == 1
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """One 2-CPU local cluster for the module, shut down after it."""
    with local_ray_cluster() as ray:
        yield ray


def tags_of(path: Path) -> dict:
    """Every tag but the ones that locate data in the file."""
    skip = {273, 279, 324, 325}  # strip/tile offsets and byte counts
    with tifffile.TiffFile(path) as tif:
        return {
            t.code: t.value.tolist() if isinstance(t.value, np.ndarray) else t.value
            for t in tif.pages[0].tags.values()
            if t.code not in skip
        }


def assert_same_tiff(a: Path, b: Path) -> None:
    ta, tb = tags_of(a), tags_of(b)
    assert 270 in ta and (320 in ta or ta[262] != 3)  # provenance; masks: a colour map
    assert ta == tb
    np.testing.assert_array_equal(tifffile.imread(a), tifffile.imread(b))
    # Same pixels, tags and provenance through the same writer: the very same bytes.
    assert a.read_bytes() == b.read_bytes()


class Recorder:
    """A ``ui.Progress``-like counter; optionally raises SIGINT once the first unit is in."""

    def __init__(self, interrupt: bool = False) -> None:
        self.total = self.start_done = None
        self.steps = 0
        self.interrupt = interrupt
        self.log: list[str] = []

    def start(self, total: int, done: int = 0) -> None:
        self.total, self.start_done = total, done

    def advance(self, n: int = 1, extra: str | None = None) -> None:
        self.steps += n
        if self.interrupt and self.steps == n:
            signal.raise_signal(signal.SIGINT)  # as a Ctrl-C would, in the main thread


# --------------------------------------------------------------------------- no cluster


@pytest.mark.parametrize("blend", ["center", "gaussian"])
@pytest.mark.parametrize("k", [None, 1, 2, 3, 100])
def test_units_partition_rows_and_cover_their_windows(blend, k):
    from segnet_cli.gigapixel.ray import plan_units, unit_grid

    for h, tile, halo in ((301, 64, 8), (1000, 96, 32), (50, 64, 8), (700, 64, 24)):
        grid = TileGrid.make(h, W, tile, halo, 8)
        units = plan_units(grid, blend, k)
        assert units[0].y0 == 0 and units[-1].y1 == h
        assert all(a.y1 == b.y0 and a.r1 == b.r0 for a, b in zip(units, units[1:]))
        assert sum(u.tiles for u in units) == len(grid)
        for u in units:
            # Exactly the grid rows that touch the unit's rows are computed: through their
            # cores (center), or through their windows, blended (gaussian).
            lo, hi = ("core_start", "core_end") if blend == "center" else ("window_start", "window_end")
            touching = [
                r for r, s in enumerate(grid.rows)
                if getattr(s, lo) < u.y1 and getattr(s, hi) > u.y0
            ]
            assert touching == list(range(u.first, u.r1))
            sub, off = unit_grid(grid, u)
            assert sub.rows[0].window_start == 0 and off == grid.rows[u.first].window_start
            assert [t.window[2] - t.window[0] for t in sub.row_tiles(0)] == [
                t.window[2] - t.window[0] for t in grid.row_tiles(u.first)
            ]
    grid = TileGrid.make(H, W, 64, 8, 8)
    assert len(plan_units(grid, "center")) == 6  # six grid rows: a unit each
    assert [u.r1 - u.r0 for u in plan_units(grid, "gaussian")] == [4, 2]


def test_actor_writes_parts_equal_to_local_rows_and_stops_on_the_marker(
    src, tiny_model, local_center, tmp_path
):
    """The actor's unit logic, in-process: no cluster needed."""
    from segnet_cli.gigapixel import plan_tile
    from segnet_cli.gigapixel.ray import TileActor, make_job, plan_units

    plan = plan_tile(cfg(src, tiny_model, tmp_path / "m.tif"))
    units = plan_units(plan.grid, "center")
    parts = tmp_path / "parts"
    parts.mkdir()
    job = make_job(plan, plan.config, parts, 0.0, "run1")
    actor = TileActor(job)
    batch = {k: np.array([units[2].row()[k], units[5].row()[k]]) for k in units[0].row()}
    rows = actor(batch)
    assert list(rows["status"]) == ["done", "done"], rows["error"]
    expect = tifffile.imread(local_center)
    for u in (units[2], units[5]):
        (path, shape, _), = job.part_files(u)
        np.testing.assert_array_equal(np.load(path), expect[u.y0 : u.y1])
    assert actor.run(units[2])[0] == "skipped"  # its parts exist already

    # The driver's stop marker appears after the unit's first model batch: the unit is
    # abandoned there, its temporary deleted; queued units are answered at once.
    run = actor.seg.run
    calls = []

    def first_batch_then_stop(*args):
        calls.append(1)
        if len(calls) == 2:
            Path(job.stop_file).touch()
        return run(*args)

    actor.seg.run = first_batch_then_stop
    assert actor.run(units[3])[0] == "stopped"
    assert actor.run(units[4])[0] == "stopped"
    assert sorted(p.name for p in parts.iterdir()) == [
        ".stop-run1", "unit-00002.mask.npy", "unit-00005.mask.npy"
    ]


def test_address_without_ray_engine_is_a_usage_error(src, tiny_model):
    r = runner.invoke(app, ["tile", str(src), "--model", str(tiny_model), "--address", "x:6379"])
    assert r.exit_code == 2 and "--address needs --engine ray" in r.output
    r = runner.invoke(app, ["tile", str(src), "--model", str(tiny_model), "--engine", "spark"])
    assert r.exit_code == 2 and "--engine" in r.output
    with pytest.raises(UsageError, match="--engine"):
        run_tile(TileConfig(input=src, inference=InferenceConfig(model=tiny_model), engine="spark"))


def test_plan_needs_no_cluster(src, tiny_model, tmp_path):
    out = tmp_path / "p.tif"
    r = runner.invoke(app, ["tile", str(src), "--model", str(tiny_model), "--out", str(out),
                            "--engine", "ray", "--tile", "64", "--halo", "8", "--plan"])
    assert r.exit_code == 0, r.output
    assert "ray:     6 work unit(s) of 1 grid row(s)" in r.output and not out.exists()


# --------------------------------------------------------------------------- on a cluster


def test_interrupted_run_resumes_and_equals_local(ray_cluster, src, tiny_model, local_center, tmp_path):
    from segnet_cli.gigapixel.ray import run_ray

    out = tmp_path / "ray" / "scene.mask.tif"
    out.parent.mkdir()
    stale = out.parent / f".{out.name}.parts-0123456789abcdef"  # another provenance's
    stale.mkdir()
    (stale / "unit-00000.mask.npy").write_bytes(b"old")
    rec = Recorder(interrupt=True)
    config = cfg(src, tiny_model, out)
    report = run_ray(config, progress=rec, log=rec.log.append)
    assert report.return_code == EXIT_SIGINT and report.details["interrupted"] == signal.SIGINT
    assert not out.exists() and not stale.exists()
    (parts,) = out.parent.glob(f".{out.name}.parts-*")
    kept = sorted(p.name for p in parts.iterdir())
    # The first unit is kept, and any the actor finished before it saw the stop marker;
    # the one in progress was abandoned (no temporary, no stop marker left).
    assert kept and all(n.endswith(".mask.npy") for n in kept), kept

    rec = Recorder()
    report = run_ray(config, progress=rec, log=rec.log.append)
    assert report.return_code == 0 and report.done == 1
    d = report.details
    assert d["engine"] == "ray" and d["units"] == 6 and d["units_reused"] == len(kept)
    assert rec.total == 66 and rec.start_done + rec.steps == 66
    assert_same_tiff(local_center, out)
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.is_tiled
        assert tuple(page.colormap[:, 1]) == (230 * 257, 25 * 257, 75 * 257)
        assert page.tags[42113].value == "255" and 33922 in page.tags
        assert (page.asarray()[:30, :40] == 255).all()
    assert not parts.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith((".", TMP_PREFIX))
                and p.name != ".segnet-locks"]

    # A re-run finds the mask up to date: nothing runs, no cluster is needed.
    mtime = out.stat().st_mtime_ns
    again = run_ray(config)
    assert again.skipped == 1 and again.details["reason"] == "up to date"
    assert out.stat().st_mtime_ns == mtime


def test_cli_gaussian_with_probabilities_equals_local(ray_cluster, src, tiny_model, local_gaussian, tmp_path):
    out = tmp_path / "g.mask.tif"
    r = runner.invoke(app, [
        "tile", str(src), "--engine", "ray", "--model", str(tiny_model), "--out", str(out),
        "--tile", "64", "--halo", "8", "--batch-size", "3", "--blend", "gaussian",
        "--probabilities", "classes", "--prob-dtype", "uint8",
    ])
    assert r.exit_code == 0, r.output
    assert "ray: 2 work unit(s)" in r.output
    assert_same_tiff(local_gaussian, out)
    assert_same_tiff(local_gaussian.with_name("gauss.prob.tif"), tmp_path / "g.prob.tif")
