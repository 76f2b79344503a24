"""Data safety (issue 13): never overwrite what the user owns, repair damaged outputs, and
turn every odd input into a clear error with the right exit code.

Every test drives the command line (``segnet_cli.cli.app``) the way a user would, and
compares the inputs byte for byte before and after where an input is at risk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import shapes_image, write_png
from PIL import Image
from typer.testing import CliRunner

from segnet_cli.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def digests(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones too) by relative path -> content hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def photos(folder: Path, n: int = 2, size: tuple[int, int] = (24, 32)) -> Path:
    for i in range(n):
        write_png(folder / f"p{i}.png", shapes_image(*size, seed=i)[0])
    return folder


# --------------------------------------------------------------------------- outputs on inputs


def test_out_same_as_input_folder_is_refused_naming_the_file(tmp_path, tiny_model):
    same = photos(tmp_path / "same")
    before = digests(same)
    r = run("predict", same, "--out", same, "--model", tiny_model)
    assert r.exit_code == 2, r.output
    assert "p0.png" in r.output and "overwrite" in r.output
    assert "no input matched" not in r.output
    assert digests(same) == before


def test_out_same_as_input_folder_without_collision_is_refused(tmp_path, tiny_model):
    """JPEGs would not be overwritten, but their masks would be inputs of the next run."""
    same = tmp_path / "same"
    same.mkdir()
    Image.fromarray(shapes_image(24, 32)[0]).save(same / "a.jpg")
    before = digests(same)
    r = run("predict", same, "--out", same, "--model", tiny_model)
    assert r.exit_code == 2 and "input folder" in r.output, r.output
    assert digests(same) == before


def test_glob_out_same_folder_is_refused(tmp_path, tiny_model):
    same = photos(tmp_path / "same")
    before = digests(same)
    r = run("predict", f"{same}/*.png", "--out", same, "--model", tiny_model)
    assert r.exit_code == 2 and "overwrite" in r.output, r.output
    assert digests(same) == before


def test_overlay_on_an_input_is_refused(tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(shapes_image(24, 32)[0]).save(src / "a.png")
    Image.fromarray(shapes_image(24, 32, 1)[0]).save(src / "a.overlay.jpg")
    before = digests(src)
    r = run("predict", src / "a.png", src / "a.overlay.jpg", "--out", src, "--overlay",
            "--model", tiny_model)
    assert r.exit_code == 2 and "overwrite" in r.output, r.output
    assert digests(src) == before


def test_output_through_a_symlink_onto_an_input_is_refused(tmp_path, tiny_model):
    src = photos(tmp_path / "in", n=1)
    link = tmp_path / "link"
    link.symlink_to(src)
    before = digests(src)
    r = run("predict", src / "p0.png", "--out", link, "--model", tiny_model)
    assert r.exit_code == 2 and "overwrite" in r.output, r.output
    assert digests(src) == before


def test_dotdot_glob_never_writes_outside_out(tmp_path, tiny_model, monkeypatch):
    imgs = tmp_path / "imgs"
    photos(imgs / "sub", n=1)
    write_png(imgs / "a.png", shapes_image(24, 32, 5)[0])
    before = digests(imgs)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    r = run("predict", "imgs/*/../../imgs/a.png", "--out", out, "--model", tiny_model)
    assert r.exit_code == 0, r.output
    assert digests(imgs) == before
    assert [str(p.relative_to(out)) for p in out.rglob("*.png")] == ["a.png"]


@pytest.mark.parametrize("spec", ["{src}", "{src}/**/*.png"])
def test_output_folder_inside_an_input_folder_is_not_an_input(tmp_path, tiny_model, spec):
    src = photos(tmp_path / "photos")
    photos(src / "nested", n=1)
    out = src / "masks"
    for _ in range(2):
        r = run("predict", spec.format(src=src), "--out", out, "--model", tiny_model, "--json")
        assert r.exit_code == 0, r.output
    assert not (out / "masks").exists()
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "nested/p0.png", "p0.png", "p1.png"
    ]


def test_eval_save_masks_refuses_the_ground_truth(tmp_path, tiny_model):
    images, masks = tmp_path / "imgs", tmp_path / "imgsannot"
    for i in range(2):
        img, mask = shapes_image(24, 32, seed=i)
        write_png(images / f"p{i}.png", img)
        write_png(masks / f"p{i}.png", mask)
    other = tmp_path / "otherannot"  # another split's ground truth
    write_png(other / "p1.png", shapes_image(24, 32, seed=5)[1])
    before = digests(tmp_path)
    for target in (masks, images):
        r = run("eval", images, "--masks", masks, "--model", tiny_model, "--save-masks", target)
        assert r.exit_code == 2 and "overwrite" in r.output, r.output
    r = run("eval", images, "--masks", masks, "--model", tiny_model, "--save-masks", other)
    assert r.exit_code == 2 and "did not write" in r.output and "p1.png" in r.output, r.output
    r = run("eval", images, "--masks", masks, "--model", tiny_model, "--save-masks", other,
            "--plot", other / "p0.png")  # the chart onto a mask being saved
    assert r.exit_code == 2 and "--save-masks writes" in r.output, r.output
    assert digests(tmp_path) == before
    r = run("eval", images, "--masks", masks, "--model", tiny_model, "--save-masks", other,
            "--overwrite")
    assert r.exit_code == 0, r.output
    from segnet_cli.jobs import foreign_image

    assert not foreign_image(other / "p1.png")  # replaced by a mask segnet wrote
    # Its own saved masks are replaced by the next eval, as before.
    saved = tmp_path / "saved"
    for _ in range(2):
        r = run("eval", images, "--masks", masks, "--model", tiny_model, "--save-masks", saved)
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in saved.iterdir() if not p.name.startswith(".")) == ["p0.png", "p1.png"]


def test_predict_never_replaces_images_it_did_not_write(tmp_path, tiny_model):
    """`predict imgs --out imgsannot`, a slip that would replace the ground truth."""
    images, masks = tmp_path / "imgs", tmp_path / "imgsannot"
    for i in range(3):
        img, mask = shapes_image(24, 32, seed=i)
        write_png(images / f"p{i}.png", img)
    write_png(masks / "p1.png", shapes_image(24, 32, seed=1)[1])  # a ground truth
    (masks / "p2.overlay.jpg").write_bytes((images / "p0.png").read_bytes())  # not a JPEG,
    # but readable: someone's file under an overlay's name
    before = digests(tmp_path)
    r = run("predict", images, "--out", masks, "--model", tiny_model, "--overlay")
    assert r.exit_code == 2 and "did not write" in r.output and "p1.png" in r.output, r.output
    assert "and 1 more" in r.output and "--overwrite" in r.output
    assert digests(tmp_path) == before  # nothing written, not even the masks that were free
    # An empty or cut-short file is not protected: it is what a crash leaves, and is redone.
    (masks / "p2.overlay.jpg").unlink()
    (masks / "p1.png").write_bytes(b"\x89PNG\r\n")
    r = run("predict", images, "--out", masks, "--model", tiny_model)
    assert r.exit_code == 0 and sorted(p.name for p in masks.iterdir() if p.suffix == ".png") == [
        "p0.png", "p1.png", "p2.png"], r.output
    # Its own masks are redone or skipped as usual; --overwrite replaces a foreign image.
    write_png(masks / "p1.png", shapes_image(24, 32, seed=1)[1])
    r = run("predict", images, "--out", masks, "--model", tiny_model)
    assert r.exit_code == 2 and "p1.png" in r.output
    r = run("predict", images, "--out", masks, "--model", tiny_model, "--overwrite")
    assert r.exit_code == 0 and "3 done" in r.output, r.output
    r = run("predict", images, "--out", masks, "--model", tiny_model)
    assert r.exit_code == 0 and "3 skipped" in r.output, r.output


def test_a_file_that_is_not_an_image_at_an_output_name_is_never_replaced(tmp_path, tiny_model):
    """Notes or a document saved under a mask's, overlay's, chart's or raster's name: segnet
    never leaves a cut-short file at a final name, so a file no reader opens is someone's."""
    images = photos(tmp_path / "imgs")
    masks = tmp_path / "imgsannot"
    for i in range(2):
        write_png(masks / f"p{i}.png", shapes_image(24, 32, seed=i)[1])
    out, saved, scene = tmp_path / "out", tmp_path / "saved", tmp_path / "scene.tif"
    tifffile.imwrite(scene, shapes_image(40, 48)[0], tile=(16, 16))
    notes = {
        out / "p0.overlay.jpg": b"field notes, not an overlay\n",
        out / "p1.png": b"%PDF-1.7 a report\n",
        tmp_path / "chart.png": b"hi\n",
        saved / "p0.png": b"keep me",
        tmp_path / "scene.mask.tif": b"<html>a page</html>",
    }
    for path, data in notes.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    before = digests(tmp_path)
    commands = [
        ("predict", images, "--out", out, "--overlay", "--model", tiny_model),
        ("eval", images, "--masks", masks, "--model", tiny_model, "--plot", tmp_path / "chart.png"),
        ("eval", images, "--masks", masks, "--model", tiny_model, "--save-masks", saved),
        ("tile", scene, "--out", tmp_path / "scene.mask.tif", "--model", tiny_model),
    ]
    for args in commands:
        r = run(*args)
        assert r.exit_code == 2 and "did not write" in r.output, (args[0], r.output)
        assert "--overwrite" in r.output, r.output
    assert digests(tmp_path) == before
    r = run("predict", images, "--out", out, "--overlay", "--model", tiny_model)
    assert "p0.overlay.jpg" in r.output and "and 1 more" in r.output, r.output
    # Asked to, each replaces the file; an empty one (what a crashed disk may leave) is free.
    for args in commands:
        r = run(*args, "--overwrite")
        assert r.exit_code == 0, (args[0], r.output)
    assert all(path.read_bytes() != data for path, data in notes.items())
    (out / "p1.png").write_bytes(b"")
    r = run("predict", images, "--out", out, "--overlay", "--model", tiny_model, "--json")
    assert r.exit_code == 0 and statuses(r)["p1.png"] == "done", r.output


def test_foreign_image_does_not_depend_on_pillows_pixel_guard(tmp_path, monkeypatch):
    from segnet_cli.io.images import write_mask_png
    from segnet_cli.jobs import Provenance, foreign_image

    theirs = write_png(tmp_path / "theirs.png", shapes_image(40, 50, seed=1)[1])
    ours = tmp_path / "ours.png"
    write_mask_png(shapes_image(40, 50, seed=1)[1], ours, [(0, 0, 0)] * 3,
                   {"segnet": Provenance("a", "b", "c").to_json()})
    for limit in (None, 1500, 500):  # no guard; warned about (1x-2x); refused (over 2x)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        assert foreign_image(theirs) and not foreign_image(ours), limit


def test_tile_probability_raster_never_replaces_the_input(tmp_path, tiny_model):
    src = tmp_path / "a.prob.tif"
    tifffile.imwrite(src, shapes_image(40, 40)[0], tile=(16, 16))
    before = digests(tmp_path)
    r = run("tile", src, "--out", tmp_path / "a.tif", "--probabilities", "confidence",
            "--model", tiny_model, "--tile", 32, "--halo", 8)
    assert r.exit_code == 2 and "overwrite" in r.output, r.output
    r = run("tile", src, "--out", src, "--model", tiny_model)
    assert r.exit_code == 2, r.output
    assert digests(tmp_path) == before


def test_tile_never_replaces_a_raster_it_did_not_write(tmp_path, tiny_model):
    src = tmp_path / "a.tif"
    tifffile.imwrite(src, shapes_image(40, 40)[0], tile=(16, 16))
    dem = tmp_path / "dem.tif"  # someone's raster, named as --out by mistake
    tifffile.imwrite(dem, np.arange(1600, dtype=np.float32).reshape(40, 40))
    photo = write_png(tmp_path / "b.prob.tif", shapes_image(40, 40)[0])  # not a TIFF at all
    before = digests(tmp_path)
    for out, extra in ((dem, ()), (tmp_path / "b.tif", ("--probabilities", "confidence"))):
        r = run("tile", src, "--out", out, "--model", tiny_model, *extra)
        assert r.exit_code == 2 and "segnet did not write" in r.output, r.output
    # Nor someone's JSON where the mask's class-area report goes (x.tif -> x.areas.json).
    notes = tmp_path / "notes.areas.json"
    notes.write_text('{"my": "notes"}')
    before = digests(tmp_path)
    r = run("tile", src, "--out", tmp_path / "notes.tif", "--model", tiny_model)
    assert r.exit_code == 2 and "notes.areas.json" in r.output, r.output
    assert "segnet did not write" in r.output
    # A mask is a GeoTIFF: another suffix would name a TIFF as something else. And tile
    # takes one image: a folder is a usage error, as a missing file is.
    for args in (("--out", tmp_path / "m.png"), ("--out", tmp_path / "m")):
        r = run("tile", src, *args, "--model", tiny_model)
        assert r.exit_code == 2 and "not a .tif or .tiff name" in r.output, r.output
    r = run("tile", tmp_path, "--model", tiny_model)
    assert r.exit_code == 2 and "is a folder" in r.output, r.output
    assert digests(tmp_path) == before and photo.exists()
    # --overwrite replaces them; from then on they are segnet's: skipped when up to date.
    for out in (dem, tmp_path / "notes.tif"):
        r = run("tile", src, "--out", out, "--model", tiny_model, "--overwrite")
        assert r.exit_code == 0, r.output
        r = run("tile", src, "--out", out, "--model", tiny_model)
        assert r.exit_code == 0 and "up to date" in r.output, r.output
    assert json.loads(notes.read_text())["files"]


def test_log_file_never_appends_to_an_image_or_a_model(tmp_path, tiny_model):
    src = tmp_path / "in"
    image = write_png(src / "a.png", shapes_image(16, 16)[0])
    other_model = tmp_path / "other.keras"  # a model this run does not use
    other_model.write_bytes(tiny_model.read_bytes())
    before = image.read_bytes(), other_model.read_bytes()
    for log in (image, other_model):
        r = run("predict", src, "--out", tmp_path / "out", "--model", tiny_model,
                "--log-file", log)
        assert r.exit_code == 2 and "not a text log" in r.output and log.name in r.output, r.output
    assert (image.read_bytes(), other_model.read_bytes()) == before
    assert not (tmp_path / "out").exists()
    # A text log is appended to, as before.
    log = tmp_path / "run.log"
    log.write_text("earlier run\n")
    r = run("predict", src, "--out", tmp_path / "out", "--model", tiny_model, "--log-file", log)
    assert r.exit_code == 0, r.output
    assert log.read_text().startswith("earlier run\n") and "1 done" in log.read_text()
    # A named pipe is written to, never read first (reading one would block the run).
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    proc = subprocess.run(
        [sys.executable, "-m", "segnet_cli", "predict", str(src), "--out", str(tmp_path / "o2"),
         "--model", str(tiny_model), "--dry-run", "--log-file", str(fifo)],
        capture_output=True, text=True, timeout=120,
    )
    reader.join(30)
    assert proc.returncode == 0, proc.stderr
    assert got and b"would segment" in got[0]


def test_log_file_is_never_an_input_or_an_output_of_the_run(tmp_path, tiny_model):
    """The log is refused before it is opened: no file is created, none is changed."""
    src = tmp_path / "in"
    image = write_png(src / "a.png", shapes_image(16, 16)[0])
    notes = tmp_path / "notes.txt"
    notes.write_text("field notes\n")
    # An input named on the command line, or a hard link to it, would gain log lines.
    (tmp_path / "link.txt").hardlink_to(notes)
    for log in (notes, tmp_path / "link.txt"):
        r = run("predict", image, notes, "--out", tmp_path / "out", "--model", tiny_model,
                "--log-file", log)
        assert r.exit_code == 2 and "--log-file is also an input" in r.output, r.output
    assert notes.read_text() == "field notes\n" and not (tmp_path / "out").exists()
    (tmp_path / "link.txt").unlink()
    r = run("predict", src, "--out", tmp_path / "out", "--model", tiny_model,
            "--log-file", tmp_path / "out")
    assert r.exit_code == 2 and "--log-file is also --out" in r.output, r.output
    assert not (tmp_path / "out").exists()
    # A log where a mask or an overlay goes would be replaced by it.
    masks = tmp_path / "masks"
    masks.mkdir()
    for name, kind in (("a.png", "mask"), ("a.overlay.jpg", "overlay")):
        (masks / name).write_text("earlier run: 500 done\n")
        r = run("predict", src, "--out", masks, "--overlay", "--model", tiny_model,
                "--log-file", masks / name)
        assert r.exit_code == 2 and f"--log-file is where the {kind} of" in r.output, r.output
        assert (masks / name).read_text().startswith("earlier run: 500 done\n")
        (masks / name).unlink()
    # A glob over the folder the log is in never takes the log for an input.
    r = run("predict", str(src / "*"), "--out", masks, "--model", tiny_model,
            "--log-file", src / "predict.log")
    assert r.exit_code == 0 and "1 done, 0 skipped, 0 failed" in r.output, r.output
    assert "1 done" in (src / "predict.log").read_text()
    (src / "predict.log").unlink()
    shutil.rmtree(masks)
    # tile: the mask (default or given), its report and sidecar would replace the log.
    tif = tmp_path / "scene.tif"
    tifffile.imwrite(tif, shapes_image(16, 16)[0])
    for log, option in (
        (tmp_path / "scene.mask.tif", "--out"),
        (tmp_path / "scene.areas.json", "area report"),
        (tmp_path / "scene.mask.tif.aux.xml", "class names"),
        (tmp_path / "polygons.gpkg", "--vector"),
    ):
        r = run("tile", tif, "--model", tiny_model, "--vector", tmp_path / "polygons.gpkg",
                "--log-file", log)
        assert r.exit_code == 2 and option in r.output and log.name in r.output, r.output
        assert not log.exists()
    r = run("tile", tif, "--out", tmp_path / "m.tif", "--model", tiny_model,
            "--log-file", tmp_path / "m.tif")
    assert r.exit_code == 2 and "--log-file is also --out" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "notes.txt", "scene.tif"]

# --------------------------------------------------------------------------- up to date, repaired


def statuses(result) -> dict[str, str]:
    """``--json`` events: input file name -> status."""
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {Path(e["path"]).name: e["status"] for e in events if "path" in e}


def test_adding_overlay_redoes_the_masks(tmp_path, tiny_model):
    src, out = photos(tmp_path / "in"), tmp_path / "out"
    assert run("predict", src, "--out", out, "--model", tiny_model).exit_code == 0
    r = run("predict", src, "--out", out, "--overlay", "--model", tiny_model, "--json")
    assert r.exit_code == 0 and statuses(r) == {"p0.png": "done", "p1.png": "done"}, r.output
    assert (out / "p0.overlay.jpg").is_file() and (out / "p1.overlay.jpg").is_file()
    r = run("predict", src, "--out", out, "--overlay", "--model", tiny_model, "--json")
    assert statuses(r) == {"p0.png": "skipped", "p1.png": "skipped"}, r.output


def test_a_failed_overlay_leaves_no_mask_and_is_redone(tmp_path, tiny_model):
    src, out = photos(tmp_path / "in"), tmp_path / "out"
    (out / "p0.overlay.jpg").mkdir(parents=True)  # the overlay of p0 cannot be written
    r = run("predict", src, "--out", out, "--overlay", "--model", tiny_model, "--json")
    assert r.exit_code == 1, r.output
    assert statuses(r) == {"p0.png": "failed", "p1.png": "done"}
    assert (out / "p1.overlay.jpg").is_file() and not (out / "p0.png").exists()
    (out / "p0.overlay.jpg").rmdir()
    r = run("predict", src, "--out", out, "--overlay", "--model", tiny_model, "--json")
    assert r.exit_code == 0 and statuses(r) == {"p0.png": "done", "p1.png": "skipped"}, r.output
    assert (out / "p0.png").is_file() and (out / "p0.overlay.jpg").is_file()


@pytest.mark.parametrize("cut", [2, 20, 60])
@pytest.mark.parametrize("damaged", ["p0.png", "p0.overlay.jpg"])
def test_truncated_mask_or_overlay_is_redone(tmp_path, tiny_model, damaged, cut):
    """Header and text chunks survive: only the end of the pixels (or the end marker) is lost."""
    src, out = photos(tmp_path / "in"), tmp_path / "out"
    args = ("predict", src, "--out", out, "--overlay", "--model", tiny_model, "--json")
    assert run(*args).exit_code == 0
    whole = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / damaged).write_bytes(whole[damaged][:-cut])
    r = run(*args)
    assert r.exit_code == 0 and statuses(r) == {"p0.png": "done", "p1.png": "skipped"}, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == whole


def test_truncated_tile_output_is_redone(tmp_path, tiny_model):
    src, out = tmp_path / "big.tif", tmp_path / "big.mask.tif"
    tifffile.imwrite(src, shapes_image(100, 120)[0], tile=(32, 32))
    args = ("tile", src, "--out", out, "--model", tiny_model, "--tile", 48, "--halo", 8,
            "--out-tile", 32, "--compression", "none")
    assert run(*args).exit_code == 0
    whole = out.read_bytes()
    out.write_bytes(whole[: len(whole) - 2000])  # the IFD is at the start: header intact
    r = run(*args)
    assert r.exit_code == 0 and "up to date" not in r.output, r.output
    assert out.read_bytes() == whole


# --------------------------------------------------------------------------- odd inputs, clear errors


def test_undecodable_names_in_tile_and_dry_run(tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    raw = os.fsencode(src) + b"/bad\xff.png"
    with open(raw, "wb") as fh:
        fh.write(write_png(tmp_path / "x.png", shapes_image(20, 20)[0]).read_bytes())
    r = run("predict", src, "--out", tmp_path / "out", "--model", tiny_model, "--dry-run")
    assert r.exit_code == 0, r.output
    tif = os.fsencode(tmp_path) + b"/scan\xfe.tif"
    tifffile.imwrite(os.fsdecode(tif), shapes_image(40, 40)[0], tile=(16, 16))
    r = run("tile", os.fsdecode(tif), "--model", tiny_model, "--tile", 32, "--halo", 8)
    assert r.exit_code == 0, r.output
    assert os.path.exists(os.fsencode(tmp_path) + b"/scan\xfe.mask.tif")


def test_a_thousand_nested_folders(tmp_path, tiny_model):
    folders = [tmp_path / "in"]
    for _ in range(1000):  # not os.makedirs: it recurses too
        folders.append(folders[-1] / "d")
    try:
        for f in folders:
            f.mkdir()
        write_png(folders[-1] / "a.png", shapes_image(16, 16)[0])
        r = run("predict", folders[0], "--out", tmp_path / "out", "--model", tiny_model,
                "--dry-run")
        assert r.exit_code == 0 and "1 to do" in r.output, r.output
    finally:  # bottom-up: pytest's own clean-up of old temporary folders recurses
        (folders[-1] / "a.png").unlink(missing_ok=True)
        for f in reversed(folders):
            if f.exists():
                f.rmdir()


@pytest.mark.parametrize(
    "option", [("--device", "gpu:x"), ("--device", "gpu:-1"), ("--device", "tpu"),
               ("--max-pixels", "0"), ("--max-pixels", "-5")]
)
def test_bad_device_and_pixel_limit_are_usage_errors(tmp_path, tiny_model, option):
    src = photos(tmp_path / "in", n=1)
    for cmd in (("predict", src, "--out", tmp_path / "out"), ("tile", src / "p0.png")):
        r = run(*cmd, "--model", tiny_model, *option)
        assert r.exit_code == 2 and option[0] in r.output, (cmd, r.output)
    assert not (tmp_path / "out").exists() and not (src / "p0.mask.tif").exists()


def test_unusable_output_folder_is_a_usage_error(tmp_path, tiny_model):
    src = photos(tmp_path / "in", n=1)
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a folder")
    for out in (afile, afile / "sub"):
        r = run("predict", src, "--out", out, "--model", tiny_model)
        assert r.exit_code == 2, r.output
    r = run("tile", src / "p0.png", "--out", afile / "sub" / "m.tif", "--model", tiny_model)
    assert r.exit_code == 2, r.output
    img, mask = shapes_image(24, 32)
    write_png(tmp_path / "imgs" / "a.png", img)
    write_png(tmp_path / "imgsannot" / "a.png", mask)
    r = run("eval", tmp_path / "imgs", "--model", tiny_model, "--save-masks", afile)
    assert r.exit_code == 2, r.output
    assert afile.read_bytes() == b"not a folder"


def test_a_closed_event_reader_stops_the_run_as_sigpipe_would():
    from segnet_cli.config import Status
    from segnet_cli.jobs import SIGPIPE, Outcome, Run, SignalGuard

    seen = []

    def reader_gone(outcome):
        seen.append(outcome.path)
        raise BrokenPipeError

    run, guard = Run(reader_gone), SignalGuard()
    run.attach(guard)
    for name in ("a.png", "b.png"):
        run.emit(Outcome(name, f"out/{name}", Status.DONE))
    assert seen == ["a.png"] and guard.signum == SIGPIPE == 13
    assert run.counts[Status.DONE] == 2  # counted, though no longer told
    # Closed while planning (skips reported before the engine's guard exists), and on
    # Windows (EINVAL): the guard, once attached, stops the run; a dry run exits 141 too.
    run = Run(lambda o: (_ for _ in ()).throw(OSError(errno.EINVAL, "Invalid argument")))
    run.skip("a.png", "out/a.png", "up to date")
    assert run.events_closed and run.return_code == 141
    guard = SignalGuard()
    run.attach(guard)
    assert guard.signum == SIGPIPE
    # Any other failure of the caller's callback is the caller's, and is raised.
    run = Run(lambda o: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError, match="No space"):
        run.skip("a.png", "out/a.png", "up to date")


def test_predict_json_into_a_closed_pipe_stops_cleanly_with_141(tmp_path, tiny_model):
    """`segnet predict --json | head -1`: no traceback, no hang, only whole masks, no claims
    left; the next run does the rest. A closed stderr loses the messages, not the work."""
    n = 300
    src, out = photos(tmp_path / "in", n=n), tmp_path / "out"
    cmd = [sys.executable, "-m", "segnet_cli", "predict", str(src), "--model", str(tiny_model)]
    proc = subprocess.Popen([*cmd, "--out", str(out), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert b'"status": "done"' in proc.stdout.readline()
    proc.stdout.close()  # the reader has seen enough
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141, err.decode()[-2000:]
    assert b"Traceback" not in err and b"output closed" in err, err.decode()[-2000:]
    masks = sorted(out.glob("*.png"))
    assert 1 <= len(masks) < n
    for mask in masks:
        with Image.open(mask) as im:
            im.load()  # whole files only
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix != ".png"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, timeout=300)
    assert done.returncode == 0 and len(list(out.glob("*.png"))) == n, done.stderr[-2000:]
    quiet = subprocess.Popen([*cmd, "--out", str(tmp_path / "o2")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    quiet.stderr.close()
    assert quiet.wait(timeout=300) == 0
    assert len(list((tmp_path / "o2").glob("*.png"))) == n


@pytest.mark.parametrize("where", ["writer", "on_event"])
def test_a_failure_in_the_writer_thread_stops_predict_instead_of_hanging(tmp_path, tiny_model,
                                                                         monkeypatch, where):
    """The writer thread must never die and leave the model waiting on a full queue: not on
    a defect of its own, nor on an error of the caller's callback (``--json > file`` on a
    full disk) raised while it reports a mask."""
    import segnet_cli.predict.local as local
    from segnet_cli.config import InferenceConfig, PredictConfig
    from segnet_cli.predict import run_predict

    def defect(*args, **kwargs):
        raise RuntimeError("a defect in the writer")

    def disk_full(outcome):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "writer":
        monkeypatch.setattr(local, "write_outputs", defect)
    src, out = photos(tmp_path / "in", n=40), tmp_path / "out"
    config = PredictConfig(inputs=(str(src),), out=out,
                           inference=InferenceConfig(model=tiny_model))
    errors = []

    def go():
        try:
            run_predict(config, on_event=disk_full if where == "on_event" else None)
        except Exception as exc:
            errors.append(exc)

    worker = threading.Thread(target=go, daemon=True)
    worker.start()
    worker.join(300)
    assert not worker.is_alive(), "predict hung"
    assert len(errors) == 1 and isinstance(errors[0], (RuntimeError, OSError)), errors
    claims = [p for p in out.rglob("*") if p.is_file() and p.suffix != ".png"]
    assert not claims  # every claim released


def test_concurrent_writability_probes_never_collide(tmp_path):
    """Three processes probing one output folder at once (issue: a fixed probe name)."""
    code = (
        "import sys\n"
        "from segnet_cli.io.files import check_writable\n"
        "for _ in range(300):\n"
        "    check_writable(sys.argv[1])\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert os.listdir(tmp_path) == []


def test_disk_full_in_tile_names_the_output(tmp_path, tiny_model, monkeypatch):
    import errno

    real = tifffile.imwrite

    def full(path, data=None, **kw):
        if data is not None and not isinstance(data, np.ndarray):
            next(iter(data))  # a tile was encoded, then the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, **kw)

    src = tmp_path / "a.tif"
    real(src, shapes_image(64, 64)[0], tile=(16, 16))
    monkeypatch.setattr(tifffile, "imwrite", full)
    out = tmp_path / "a.mask.tif"
    r = run("tile", src, "--out", out, "--model", tiny_model, "--tile", 32, "--halo", 8)
    assert r.exit_code == 1, r.output
    assert "No space left on device" in r.output and str(out) in r.output
    assert ".segnet-tmp-" not in r.output
    assert sorted(os.listdir(tmp_path)) == ["a.tif"]


# --------------------------------------------------------------------------- reading rules


def test_tile_refuses_a_png_bomb_that_predict_refuses(tmp_path, tiny_model):
    """10000 x 10000 (100 Mpx, 100 KB on disk) is over Pillow's default of ~89.5 Mpx.

    A fresh process each time: the default limit must not depend on what ran before (the
    header sniffing of `tile` used to switch Pillow's guard off before it was remembered).
    """
    bomb = tmp_path / "bomb.png"
    Image.new("L", (10000, 10000)).save(bomb)
    assert bomb.stat().st_size < 1_000_000
    for args in (("tile", bomb, "--plan"), ("tile", bomb), ("predict", bomb, "--out", tmp_path / "o")):
        proc = subprocess.run(
            [sys.executable, "-m", "segnet_cli", *map(str, args), "--model", str(tiny_model)],
            capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 1 and "limit" in proc.stderr, (args, proc.stderr[-2000:])
    assert sorted(os.listdir(tmp_path)) == ["bomb.png", "o"]


def test_byte_budget_refuses_many_deep_bands_before_decoding(tmp_path, tiny_model):
    """Few pixels, many bytes: 300 x 300 x 8 float64 is 5.5 MiB for a 100000-pixel limit
    (a budget of 400000 bytes); the pixel count alone (90000) is under the limit."""
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, np.zeros((300, 300, 8)), photometric="minisblack",
                     planarconfig="contig", compression="zlib")
    r = run("predict", deep, "--out", tmp_path / "o", "--model", tiny_model, "--max-pixels", 100000)
    assert r.exit_code == 1 and "MiB" in r.output and "limit" in r.output, r.output


def test_byte_budget_default_refuses_a_3000x3000x32_float64_tiff(tmp_path, monkeypatch):
    """The issue's file: 2.1 GiB decoded; refused from its header, nothing decoded."""
    from segnet_cli.errors import ImageTooLargeError
    from segnet_cli.io.images import check_decoded_size, read_image

    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, shape=(3000, 3000, 32), dtype=np.float64, photometric="minisblack",
                     planarconfig="contig")  # an empty (sparse) file
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ImageTooLargeError, match="decodes to 2,197 MiB"):
        read_image(deep)
    with pytest.raises(ImageTooLargeError, match="over the limit of 763 MiB"):
        read_image(deep, max_pixels=200_000_000)  # --max-pixels raises the budget with it
    check_decoded_size(3000, 3000, 256, 600_000_000, deep)  # 2,289 MiB allowed: no error
    # A tiny limit is quoted in KiB, not as "0 MiB".
    with pytest.raises(ImageTooLargeError, match=r"decodes to 10.5 KiB, over the limit of 3.9 KiB"):
        check_decoded_size(30, 30, 12, 1000, deep)


def test_tile_plans_with_the_exif_rotated_size(tmp_path, tiny_model):
    arr = shapes_image(24, 40)[0]
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # displayed turned by 90 degrees: 24 x 40 becomes 40 x 24
    src = tmp_path / "turned.jpg"
    im.save(src, exif=exif, quality=95)
    out = tmp_path / "turned.mask.tif"
    r = run("tile", src, "--out", out, "--model", tiny_model, "--tile", 32, "--halo", 8)
    assert r.exit_code == 0, r.output
    assert tifffile.imread(out).shape == (40, 24)


def two_band_tiff(path: Path, alpha: bool) -> Path:
    data = np.dstack([shapes_image(24, 32)[0][:, :, 0], np.full((24, 32), 200, np.uint8)])
    extra = {"extrasamples": ["unassalpha"]} if alpha else {}
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="contig", **extra)
    return path


def test_a_second_band_is_dropped_only_when_it_is_alpha(tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    two_band_tiff(src / "two.tif", alpha=False)
    two_band_tiff(src / "gray_alpha.tif", alpha=True)
    Image.fromarray(np.dstack([shapes_image(24, 32)[0][:, :, 0]] * 2), "LA").save(src / "la.png")
    four = np.dstack([shapes_image(24, 32)[0], np.full((24, 32), 9, np.uint8)])
    tifffile.imwrite(src / "rgbn.tif", four, photometric="minisblack", planarconfig="contig")
    r = run("predict", src, "--out", tmp_path / "out", "--model", tiny_model, "--json")
    assert r.exit_code == 1, r.output
    assert statuses(r) == {"two.tif": "failed", "rgbn.tif": "failed",
                           "gray_alpha.tif": "done", "la.png": "done"}, r.output
    assert "2 channels but the model takes 3" in r.output
    for name, code in (("two.tif", 1), ("gray_alpha.tif", 0)):
        r = run("tile", src / name, "--out", tmp_path / f"{name}.mask.tif", "--model", tiny_model,
                "--tile", 32, "--halo", 8)
        assert r.exit_code == code, (name, r.output)


def test_multi_page_tiff_is_refused_but_overviews_are_fine(tmp_path, tiny_model):
    pages = tmp_path / "in" / "pages.tif"
    pages.parent.mkdir()
    with tifffile.TiffWriter(pages) as tw:
        for seed in range(3):
            tw.write(shapes_image(24, 32, seed)[0], photometric="rgb")
    pyramid = tmp_path / "in" / "pyramid.tif"
    with tifffile.TiffWriter(pyramid) as tw:
        tw.write(shapes_image(48, 64)[0], photometric="rgb", tile=(16, 16))
        tw.write(shapes_image(24, 32)[0], photometric="rgb", tile=(16, 16), subfiletype=1)
    r = run("predict", pages.parent, "--out", tmp_path / "out", "--model", tiny_model, "--json")
    assert r.exit_code == 1 and statuses(r) == {"pages.tif": "failed", "pyramid.tif": "done"}
    assert "3 pages" in r.output
    r = run("tile", pages, "--model", tiny_model)
    assert r.exit_code == 1 and "3 pages" in r.output, r.output
    r = run("tile", pyramid, "--model", tiny_model, "--tile", 32, "--halo", 8)
    assert r.exit_code == 0, r.output


def test_symlink_loop_is_not_called_a_broken_link(tmp_path, tiny_model):
    src = photos(tmp_path / "in", n=1)
    (src / "loop.png").symlink_to("loop.png")
    (src / "gone.png").symlink_to("nowhere.png")
    r = run("predict", src, "--out", tmp_path / "out", "--model", tiny_model)
    assert r.exit_code == 1
    loop = next(line for line in r.output.splitlines() if "loop.png" in line)
    gone = next(line for line in r.output.splitlines() if "gone.png" in line)
    assert "loop" in loop.split("loop.png", 1)[1] and "broken" not in loop, loop
    assert "broken" in gone, gone
    r = run("tile", src / "loop.png", "--model", tiny_model)
    assert r.exit_code != 0 and "link loop" in r.output, r.output


# --------------------------------------------------------------------------- model files


def with_metadata(model: Path, dest: Path, **changes) -> Path:
    """A copy of ``model`` whose segnet.json has ``changes`` (``scaling_mean``: the mean)."""
    import zipfile

    with zipfile.ZipFile(model) as src, zipfile.ZipFile(dest, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "segnet.json":
                meta = json.loads(data)
                for k, v in changes.items():
                    if k == "scaling_mean":
                        meta["scaling"]["mean"] = v
                    else:
                        meta[k] = v
                data = json.dumps(meta).encode()
            dst.writestr(item, data)
    return dest


@pytest.mark.parametrize(
    "change", [{"scaling_mean": ["a", "b", "c"]}, {"scaling_mean": "0.5"}, {"stride": 0},
               {"stride": "x"}, {"in_channels": 0}, {"palette": [[1, 2]]}, {"format_version": "x"}]
)
def test_bad_model_metadata_is_a_usage_error_naming_the_file(tmp_path, tiny_model, change):
    bad = with_metadata(tiny_model, tmp_path / "bad-model.keras", **change)
    src = photos(tmp_path / "in", n=1)
    for cmd in (("predict", src, "--out", tmp_path / "out"), ("tile", src / "p0.png"),
                ("info", )):
        args = [*cmd, "--model", bad] if cmd[0] != "info" else ["info", bad]
        r = run(*args)
        assert r.exit_code == 2 and "bad-model.keras" in r.output, (cmd, r.output)
    assert not list(tmp_path.rglob("*.tif")) and not list((tmp_path / "out").rglob("*"))


# --------------------------------------------------------------------------- nothing to do


def test_nothing_to_check_or_score_is_a_usage_error(tmp_path, tiny_model):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgsannot").mkdir()
    r = run("verify", tmp_path / "imgs")
    assert r.exit_code == 2 and "no image/mask pairs" in r.output, r.output
    r = run("eval", tmp_path / "imgs", "--model", tiny_model)
    assert r.exit_code == 2, r.output
    write_png(tmp_path / "imgs" / "lonely.png", shapes_image(8, 8)[0])  # no mask: a problem
    r = run("verify", tmp_path / "imgs")
    assert r.exit_code == 2 and "lonely.png" in r.output, r.output
    r = run("eval", tmp_path / "imgs", "--model", tiny_model)
    assert r.exit_code == 2 and "lonely.png" in r.output, r.output


# --------------------------------------------------------------------------- messages


def test_names_with_newlines_and_escapes_cannot_forge_lines(tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a\nerror: forged.png").write_bytes(b"not an image")  # fails: its name is printed
    (src / "b\x1b[2Jc.png").write_bytes(b"not an image either")
    log = tmp_path / "run.log"
    r = run("predict", src, "--out", tmp_path / "out", "--model", tiny_model, "--log-file", log)
    assert r.exit_code == 1
    for text in (r.output, log.read_text()):
        lines = text.splitlines()
        assert not any(line.split(" ", 1)[-1].startswith("error: forged") for line in lines), text
        assert not any(line.startswith("error: forged") for line in lines), text
        assert "a\\nerror: forged.png" in text and "b\\x1b[2Jc.png" in text, text
        assert "\x1b" not in text
    good = write_png(tmp_path / "x\nerror: forged.png", shapes_image(16, 16)[0])
    r = run("tile", good, "--plan", "--model", tiny_model)
    assert r.exit_code == 0 and "x\\nerror: forged.png" in r.output, r.output
    assert not any(line.startswith("error: forged") for line in r.output.splitlines())
