"""The one files module: temporaries never look like results; locks leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import shapes_image, write_png
from typer.testing import CliRunner

from segnet_cli.cli import app
from segnet_cli.errors import OutputError
from segnet_cli.io.files import (
    LOCK_DIR,
    TMP_PREFIX,
    TMP_SUFFIX,
    Lock,
    atomic_path,
    remove_dead_temporaries,
)

runner = CliRunner()


def test_temporary_has_no_final_extension_and_vanishes(tmp_path):
    final = tmp_path / "masks" / "a.png"
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(TMP_PREFIX)
        assert tmp.name.endswith(TMP_SUFFIX) and not tmp.name.endswith(".png")
        assert not list(final.parent.glob("*.png")) and not list(final.parent.rglob("*.png"))
        tmp.write_bytes(b"x")
    assert final.read_bytes() == b"x"
    assert os.listdir(final.parent) == ["a.png"]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    final = tmp_path / "a.png"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert final.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.png"]


def test_disk_full_names_the_output_not_the_temporary(tmp_path, monkeypatch):
    import errno

    import segnet_cli.io.files as files

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(OutputError) as err:
        with atomic_path(tmp_path / "out.tif") as tmp:
            tmp.write_bytes(b"x")
    assert err.value.path == tmp_path / "out.tif" and TMP_PREFIX not in str(err.value)


def test_lock_is_exclusive_and_removed_on_release(tmp_path):
    a, b = Lock(tmp_path / "locks" / "x.lock"), Lock(tmp_path / "locks" / "x.lock")
    assert a.acquire() and not b.acquire()
    a.release()
    assert not (tmp_path / "locks").exists()  # the last lock takes its folder with it
    assert b.acquire()
    b.release()


def test_lock_survives_removal_races(tmp_path):
    """Many threads taking and releasing one lock: never two holders at once."""
    path = tmp_path / "locks" / "x.lock"
    holders, overlaps = [0], []
    guard = threading.Lock()

    errors = []

    def worker():
        try:
            for _ in range(200):
                lock = Lock(path)
                if lock.acquire():
                    with guard:
                        holders[0] += 1
                        if holders[0] > 1:
                            overlaps.append(1)
                    with guard:
                        holders[0] -= 1
                    lock.release()
        except Exception as exc:  # a worker that dies would make the test pass vacuously
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not overlaps and not path.parent.exists()


def test_dead_temporaries_removed_live_and_foreign_kept(tmp_path):
    dead = tmp_path / f"{TMP_PREFIX}999999999-a.png.x{TMP_SUFFIX}"
    mine = tmp_path / f"{TMP_PREFIX}{os.getpid()}-b.png.x{TMP_SUFFIX}"
    foreign = tmp_path / f"{TMP_PREFIX}999999999.0badc0de-c.png.x{TMP_SUFFIX}"
    for p in (dead, mine, foreign):
        p.write_bytes(b"x")
    assert remove_dead_temporaries(tmp_path) == 1
    assert not dead.exists() and mine.exists() and foreign.exists()


def test_run_with_failing_inputs_leaves_only_masks(tmp_path, tiny_model):
    src = tmp_path / "in"
    write_png(src / "good.png", shapes_image(37, 53)[0])
    write_png(src / "sub" / "good2.png", shapes_image(20, 30)[0])
    (src / "bad.png").write_bytes(b"not a png")
    (src / "empty.jpg").write_bytes(b"")
    out = tmp_path / "masks"
    r = runner.invoke(app, ["predict", str(src), "--out", str(out), "--model", str(tiny_model)])
    assert r.exit_code == 1
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["good.png", "sub", "sub/good2.png"], left


def test_killed_run_leaves_nothing_a_glob_takes_for_a_mask(tmp_path, tiny_model):
    """SIGKILL mid-run: whatever is left, `*.png` matches only complete masks."""
    src = tmp_path / "in"
    for i in range(12):
        write_png(src / f"img{i:02d}.png", shapes_image(64, 80, seed=i)[0])
    out = tmp_path / "masks"
    proc = subprocess.Popen(
        [sys.executable, "-m", "segnet_cli", "predict", str(src), "--out", str(out),
         "--model", str(tiny_model), "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("img*.png")):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    from PIL import Image

    for p in out.rglob("*.png"):
        with Image.open(p) as im:
            im.load()  # every file a glob finds is a whole mask
    leftovers = [p for p in out.rglob("*") if not p.name.endswith(".png")]
    # Only hidden things may remain: a temporary (not *.png) and the claims' lock folder.
    assert all(p.name.startswith(".") or p.parent.name == LOCK_DIR for p in leftovers), leftovers
    assert all(p.name.endswith(TMP_SUFFIX) for p in leftovers if p.name.startswith(TMP_PREFIX))


def test_unicode_and_undecodable_names(tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    good = write_png(src / "café.png", shapes_image(20, 20)[0])
    raw = os.fsencode(src) + b"/bad\xff.png"
    with open(raw, "wb") as fh:
        fh.write(good.read_bytes())
    out = tmp_path / "out"
    r = runner.invoke(app, ["predict", str(src), "--out", str(out), "--model", str(tiny_model)])
    assert r.exit_code == 0, r.output
    assert (out / "café.png").exists() and os.path.exists(os.fsencode(out) + b"/bad\xff.png")
    assert np.asarray(__import__("PIL.Image").Image.open(out / "café.png")).shape == (20, 20)
    assert not (out / LOCK_DIR).exists()


def test_atomic_folder_renames_into_place_replaces_and_leaves_nothing_on_failure(tmp_path):
    from segnet_cli.errors import OutputError
    from segnet_cli.io.files import TMP_PREFIX, TMP_SUFFIX, atomic_folder

    final = tmp_path / "saved_model"
    with atomic_folder(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(TMP_PREFIX)
        assert tmp.name.endswith(TMP_SUFFIX) and not final.exists()
        (tmp / "assets").mkdir()
        (tmp / "assets" / "a.txt").write_text("one")
    assert (final / "assets" / "a.txt").read_text() == "one"
    with pytest.raises(OutputError, match="already exists"):
        with atomic_folder(final) as tmp:
            (tmp / "b.txt").write_text("two")
    with pytest.raises(RuntimeError):
        with atomic_folder(final, replace=True) as tmp:
            (tmp / "b.txt").write_text("two")
            raise RuntimeError("converter failed")
    assert (final / "assets" / "a.txt").read_text() == "one"  # untouched
    with atomic_folder(final, replace=True) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved_model"]  # no temporaries
