"""`segnet predict` end to end: sizes, formats, resumability, atomicity, failures, signals."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model_file, shapes_image, write_png
from PIL import Image
from typer.testing import CliRunner

from segnet_cli.cli import app
from segnet_cli.io.files import TMP_PREFIX
from segnet_cli.jobs import Claim
from segnet_cli.pipeline import segment_image

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def photos(tmp_path) -> Path:
    """A folder of good images of many sizes, modes and formats, one nested."""
    d = tmp_path / "in"
    img, _ = shapes_image(37, 53)
    write_png(d / "odd.png", img)
    write_png(d / "line.png", shapes_image(1, 300)[0])
    write_png(d / "nested" / "deep" / "col.png", shapes_image(300, 1)[0])
    Image.fromarray(shapes_image(64, 80, 2)[0]).save(d / "photo.jpg", quality=90, dpi=(300, 300))
    Image.fromarray((np.random.default_rng(0).random((45, 33)) * 65535).astype(np.uint16)).save(d / "gray16.png")
    Image.fromarray(shapes_image(41, 41)[0]).convert("P").save(d / "pal.png")
    Image.fromarray(np.dstack([shapes_image(20, 30)[0], np.full((20, 30), 128, np.uint8)])).save(d / "rgba.png")
    Image.fromarray(shapes_image(50, 70)[0]).save(d / "bitmap.bmp")
    import tifffile

    tifffile.imwrite(d / "scan.tif", shapes_image(70, 90)[0], compression="zlib")
    return d


def masks_in(out: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(out)): np.asarray(Image.open(p))
        for p in sorted(out.rglob("*.png"))
        if not p.name.startswith(".")
    }


def test_predict_folder_all_formats_sizes(photos, tmp_path, tiny_model):
    out = tmp_path / "out"
    r = run("predict", photos, "--out", out, "--model", tiny_model, "--overlay")
    assert r.exit_code == 0, r.output
    masks = masks_in(out)
    expect = {
        "odd.png": (37, 53), "line.png": (1, 300), "nested/deep/col.png": (300, 1),
        "photo.png": (64, 80), "gray16.png": (45, 33), "pal.png": (41, 41), "rgba.png": (20, 30),
        "bitmap.png": (50, 70), "scan.png": (70, 90),
    }
    assert {k: v.shape for k, v in masks.items() if "overlay" not in k} == expect
    im = Image.open(out / "odd.png")
    assert im.mode == "P" and im.getpalette()[3:6] == [230, 25, 75]
    assert max(int(m.max()) for m in masks.values()) < 3
    assert (out / "odd.overlay.jpg").exists()
    assert "9 done" in r.output
    # The input's resolution is kept: a mask measures as its image does.
    for name in ("photo.png", "photo.overlay.jpg"):
        assert Image.open(out / name).info["dpi"] == pytest.approx((300, 300), abs=0.01)
    assert "dpi" not in Image.open(out / "line.png").info


def test_predict_equals_engine_whole_and_tiled(tmp_path, tiny_model):
    from segnet_cli.config import TilingConfig
    from segnet_cli.io.images import read_image, to_model_input
    from segnet_cli.model.segmenter import Segmenter

    img, _ = shapes_image(157, 211, seed=4)
    src = write_png(tmp_path / "in" / "a.png", img)
    out = tmp_path / "out"
    r = run("predict", src, "--out", out, "--model", tiny_model, "--tile", 64, "--halo", 16, "-b", 3)
    assert r.exit_code == 0, r.output
    seg = Segmenter(tiny_model)
    x = to_model_input(read_image(src), 3)
    expected, _ = segment_image(seg, x, TilingConfig(tile=64, halo=16, batch_size=1))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a.png")), expected)


def test_rerun_skips_then_model_change_and_overwrite_redo(photos, tmp_path, tiny_model):
    out = tmp_path / "out"
    assert run("predict", photos, "--out", out, "--model", tiny_model).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    r = run("predict", photos, "--out", out, "--model", tiny_model, "--json")
    assert r.exit_code == 0
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert {line["status"] for line in lines[:-1]} == {"skipped"}
    assert lines[-1]["summary"]["done"] == 0 and lines[-1]["summary"]["skipped"] == 9
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    # Another model: every mask is stale.
    other = make_model_file(tmp_path / "other.keras", seed=1)
    r = run("predict", photos, "--out", out, "--model", other)
    assert r.exit_code == 0 and "9 done" in r.output
    # Changed input content: only that one is redone.
    write_png(photos / "odd.png", shapes_image(37, 53, seed=9)[0])
    r = run("predict", photos, "--out", out, "--model", other, "--json")
    done = [json.loads(line) for line in r.stdout.splitlines() if '"status": "done"' in line]
    assert [Path(d["path"]).name for d in done] == ["odd.png"]
    r = run("predict", photos, "--out", out, "--model", other, "--overwrite")
    assert "9 done" in r.output


def test_dry_run_writes_nothing(photos, tmp_path, tiny_model):
    out = tmp_path / "out"
    r = run("predict", photos, "--out", out, "--model", tiny_model, "--dry-run", "--json")
    assert r.exit_code == 0
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    planned = [o for o in lines[:-1] if o.get("status") == "planned"]
    assert len(planned) == 9 == len(lines) - 1
    assert lines[-1]["summary"]["planned"] == 9 and lines[-1]["summary"]["done"] == 0
    assert not out.exists() or not list(out.rglob("*.png"))


def test_bad_inputs_are_isolated(photos, tmp_path, tiny_model):
    (photos / "zero.png").write_bytes(b"")
    (photos / "text.jpg").write_text("not a jpeg")
    good = (photos / "odd.png").read_bytes()
    (photos / "trunc.png").write_bytes(good[: len(good) // 3])
    import tifffile

    tifffile.imwrite(photos / "trunc.tif", np.zeros((64, 64, 3), np.uint8))
    data = (photos / "trunc.tif").read_bytes()
    (photos / "trunc.tif").write_bytes(data[:200])
    (photos / "dir.png").mkdir()
    os.symlink(photos / "gone.png", photos / "broken.png")
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(photos / "bomb.png")
    out = tmp_path / "out"
    r = run("predict", photos, "--out", out, "--model", tiny_model, "--max-pixels", 60000, "--json")
    assert r.exit_code == 1
    events = {Path(e["path"]).name: e for e in map(json.loads, r.stdout.splitlines()[:-1])}
    for name in ["zero.png", "text.jpg", "trunc.png", "trunc.tif", "dir.png", "broken.png", "bomb.png"]:
        assert events[name]["status"] == "failed", name
        assert events[name]["error"], name
    assert sum(e["status"] == "done" for e in events.values()) == 9
    summary = json.loads(r.stdout.splitlines()[-1])["summary"]
    assert summary == {**summary, "done": 9, "failed": 7, "return_code": 1}
    assert "zero.png" in r.stderr and "empty" in r.stderr  # human messages on stderr


def test_usage_errors_exit_2(tmp_path, tiny_model):
    r = run("predict", tmp_path / "nothing*.png", "--out", tmp_path / "o", "--model", tiny_model)
    assert r.exit_code == 2 and "no input matched" in r.output
    assert "nothing*.png (matched nothing)" in r.output, r.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    r = run("predict", tmp_path / "empty", tmp_path / "gone", "--out", tmp_path / "o",
            "--model", tiny_model)
    assert r.exit_code == 2, r.output
    assert "gone (not found)" in r.output and "empty (a folder with no " in r.output, r.output
    src = write_png(tmp_path / "a.png", shapes_image(8, 8)[0])
    r = run("predict", src, "--out", tmp_path / "o", "--model", tmp_path / "none.keras")
    assert r.exit_code == 2 and "none.keras" in r.output
    r = run("predict", src, "--out", tmp_path / "o", "--model", tiny_model, "--tile", 8, "--halo", 8)
    assert r.exit_code == 2
    r = run("predict", src, "--out", tmp_path / "o", "--model", tiny_model, "--precision", "int8")
    assert r.exit_code == 2
    r = run("predict", "--out", tmp_path / "o")
    assert r.exit_code == 2
    r = run("predict", src, "--out", tmp_path / "o", "--model", tiny_model, "--engine", "spark")
    assert r.exit_code == 2 and "--engine" in r.output
    r = run("predict", src, "--out", tmp_path / "o", "--model", tiny_model, "--address", "h:1")
    assert r.exit_code == 2 and "--engine ray" in r.output
    # None of these runs made the output folder: a refused run leaves nothing behind.
    assert not (tmp_path / "o").exists()
    (tmp_path / "f").write_text("a file")
    r = run("predict", src, "--out", tmp_path / "f", "--model", tiny_model)
    assert r.exit_code == 2 and "is a file, not a folder" in r.output, r.output
    assert (tmp_path / "f").read_text() == "a file"


def test_disk_full_leaves_no_partial_file(photos, tmp_path, tiny_model, monkeypatch):
    import segnet_cli.io.files as files

    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("odd.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", full)
    out = tmp_path / "out"
    r = run("predict", photos, "--out", out, "--model", tiny_model)
    assert r.exit_code == 1
    assert "No space left on device" in r.output and "odd.png" in r.output
    assert not (out / "odd.png").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_stale_temporaries_removed_and_claimed_outputs_skipped(photos, tmp_path, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    from segnet_cli.io.files import HOST_TOKEN

    stale = out / f"{TMP_PREFIX}999999999.{HOST_TOKEN}-odd.png.abc.png"
    stale.write_bytes(b"half a png")
    old_style = out / f"{TMP_PREFIX}999999998-odd.png.abd.png"  # pid only: taken as local
    old_style.write_bytes(b"half a png")
    # Another machine's temporary on a shared folder: its pid means nothing here, keep it.
    foreign = out / f"{TMP_PREFIX}999999999.0badc0de-odd.png.abe.png"
    foreign.write_bytes(b"half a png")
    claim = Claim(out, out / "odd.png")  # as if another run were writing odd.png now
    assert claim.acquire()
    try:
        r = run("predict", photos, "--out", out, "--model", tiny_model, "--json")
    finally:
        claim.release()
    assert r.exit_code == 0
    assert not stale.exists() and not old_style.exists() and foreign.exists()
    ev = {Path(e["path"]).name: e for e in map(json.loads, r.stdout.splitlines()[:-1])}
    assert ev["odd.png"]["status"] == "skipped" and "another" in ev["odd.png"]["reason"]
    assert not (out / "odd.png").exists()


def _segnet_cmd():
    return [sys.executable, "-m", "segnet_cli"]


@pytest.mark.parametrize(
    "signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)]
)
def test_real_subprocess_signal_midway_then_resume(tmp_path, tiny_model, signum, code):
    """A real `segnet` process stopped mid-batch leaves only whole, valid masks; SIGINT and
    SIGTERM exit 128+N with no temporaries; after SIGKILL the next run removes the dead
    run's temporaries and finishes the rest."""
    src = tmp_path / "in"
    n = 30
    for i in range(n):
        write_png(src / f"img{i:02d}.png", shapes_image(448, 448, seed=i)[0])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [*_segnet_cmd(), "predict", str(src), "--out", str(out), "--model", str(tiny_model)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and list(out.glob("img*.png"))):
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    written = sorted(out.glob("img*.png"))
    if proc.returncode == 0:
        pytest.skip("the batch finished before the signal arrived")
    assert proc.returncode == code, err.decode()
    assert 0 < len(written) < n
    for p in written:  # every mask under a final name is complete and valid
        assert np.asarray(Image.open(p)).shape == (448, 448)
    if signum != signal.SIGKILL:
        assert "interrupted" in err.decode()
        assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX)]
    done = subprocess.run(
        [*_segnet_cmd(), "predict", str(src), "--out", str(out), "--model", str(tiny_model), "--json"],
        capture_output=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout.decode().splitlines()[-1])["summary"]
    assert summary["done"] == n - len(written) and summary["skipped"] == len(written)
    assert len(list(out.glob("img*.png"))) == n
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_two_overlapping_runs_never_write_the_same_mask(tmp_path, tiny_model):
    src = tmp_path / "in"
    for i in range(24):
        write_png(src / f"img{i:02d}.png", shapes_image(384, 384, seed=i)[0])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [*_segnet_cmd(), "predict", str(src), "--out", str(out), "--model", str(tiny_model), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1].decode()[-500:] for r in results]
    done_sets = []
    for stdout, _ in results:
        events = [json.loads(line) for line in stdout.decode().splitlines()]
        done_sets.append({e["path"] for e in events[:-1] if e["status"] == "done"})
        # Whatever a run did not do, it skipped for a stated reason.
        assert all(e["status"] in ("done", "skipped") for e in events[:-1])
    assert not (done_sets[0] & done_sets[1])  # no mask written twice
    assert len(done_sets[0] | done_sets[1]) == 24
    assert len(list(out.glob("img*.png"))) == 24


def test_device_option_and_split_batches_agree(tmp_path, tiny_model):
    """`--device cpu` runs there; a batch split across several devices gives the same logits."""
    from segnet_cli.model.segmenter import Segmenter

    seg = Segmenter(tiny_model, device="cpu")
    assert seg.devices == ["/CPU:0"]
    x = np.random.default_rng(0).random((3, 40, 56, 3)).astype(np.float32)
    one = seg.logits(x)
    seg.devices = ["/CPU:0", "/CPU:0"]  # the multi-GPU code path, on the CPU
    np.testing.assert_allclose(seg.logits(x), one, rtol=1e-5, atol=1e-5)
    # --batch-size counts per device: a batch of 1 still gives every device a tile.
    assert seg.batch_tiles(1) == 2
    from segnet_cli.pipeline import Work, crop, run_works
    from segnet_cli.tiling import Stitcher, TileGrid

    wide = np.random.default_rng(1).random((40, 200, 3)).astype(np.float32)
    grid = TileGrid.make(40, 200, 64, 8, 8)  # 4 tiles of one shape
    sizes = []
    work = Work(None, Stitcher(grid, seg.num_classes), list(grid.tiles()), lambda t: crop(wide, t))
    list(run_works(seg, [work], 1, on_batch=lambda pairs: sizes.append(len(pairs))))
    assert sizes == [2, 2]
    r = run("predict", write_png(tmp_path / "a.png", shapes_image(20, 20)[0]), "--out", tmp_path / "o",
            "--model", tiny_model, "--device", "gpu:7")
    assert r.exit_code == 2 and "GPU" in r.output
