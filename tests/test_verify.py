"""`segnet verify`: every defect of a generated dataset reported in one run, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shapes_image, write_png
from PIL import Image
from typer.testing import CliRunner

from segnet_cli.cli import app
from segnet_cli.dataset import find_pairs

runner = CliRunner()


@pytest.fixture(autouse=True)
def _loud_ui():
    from segnet_cli import ui

    ui.configure(False)  # another test's --quiet must not hide this one's messages


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _good(images: Path, masks: Path, stem: str, h: int = 37, w: int = 53, seed: int = 0) -> None:
    img, mask = shapes_image(h, w, seed)
    write_png(images / f"{stem}.png", img)
    write_png(masks / f"{stem}.png", mask)


@pytest.fixture()
def broken(tmp_path) -> tuple[Path, Path, dict[str, str]]:
    """A dataset with one of each defect, plus two good pairs; returns what to expect."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    _good(images, masks, "good1", seed=1)
    _good(images, masks, "good2", 29, 31, seed=2)
    # Missing partner mask, and a mask without its image.
    write_png(images / "lonely.png", shapes_image(37, 53)[0])
    write_png(masks / "orphan.png", shapes_image(37, 53)[1])
    # Size mismatch: the mask is one row short.
    img, mask = shapes_image(37, 53, 3)
    write_png(images / "short.png", img)
    write_png(masks / "short.png", mask[:-1])
    # An RGB colour mask where class indices were expected.
    write_png(images / "colour.png", img)
    write_png(masks / "colour.png", np.dstack([mask * 100] * 3).astype(np.uint8))
    # A JPEG mask (lossy: indices change at every edge).
    write_png(images / "lossy.png", img)
    Image.fromarray(mask).save(masks / "lossy.jpg", quality=95)
    # A value outside the classes (3 classes, void 255).
    bad = mask.copy()
    bad[0, 0] = 7
    write_png(images / "badvalue.png", img)
    write_png(masks / "badvalue.png", bad)
    # An image that is not an image.
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    write_png(masks / "corrupt.png", mask)
    expect = {
        "lonely": "no mask",
        "orphan": "no image",
        "short": "53x36",
        "colour": "colour",
        "lossy": "JPEG",
        "badvalue": "7",
        "corrupt": "corrupt.png",
    }
    return images, masks, expect


def test_verify_reports_every_defect_in_one_run(broken):
    images, masks, expect = broken
    r = run("verify", images, "--masks", masks, "--classes", "3", "--void", "255")
    assert r.exit_code == 1
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    for stem, words in expect.items():
        hits = [line for line in lines if stem in line]
        assert hits, f"{stem} not reported:\n{r.stderr}"
        assert any(words in line for line in hits), (stem, hits)
    assert f"{len(expect)} problem(s) found" in r.stderr
    assert r.stdout == ""  # human output stays on stderr


def test_verify_json_lists_problems_and_counts_good_pairs(broken):
    images, masks, expect = broken
    r = run("verify", images, "--masks", masks, "--classes", "3", "--void", "255", "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False
    assert len(report["problems"]) == len(expect)
    # The pairs that could be read still count in the histogram.
    assert report["pairs"] == 7  # everything with a partner, defective or not
    assert sum(c["pixels"] for c in report["classes"]) > 0


def _hand_dataset(root: Path) -> tuple[Path, Path]:
    """Three tiny pairs whose histogram and weights are computed by hand in the test."""
    images, masks = root / "images", root / "imagesannot"
    rng = np.random.default_rng(0)
    for stem, m in {
        "a": [[0, 0, 0], [1, 255, 255]],  # 3 of class 0, 1 of class 1, 2 void
        "b": [[0, 0], [2, 2]],
        "c": [[1, 1], [1, 1]],
    }.items():
        m = np.asarray(m, np.uint8)
        write_png(masks / f"{stem}.png", m)
        write_png(images / f"{stem}.png", rng.integers(0, 255, m.shape + (3,), dtype=np.uint8))
    return images, masks


def test_clean_dataset_exits_0_with_histogram_and_weights(tmp_path):
    images, _ = _hand_dataset(tmp_path)
    # Masks default to <images>annot, CamVid's layout.
    r = run("verify", images, "--classes", "3", "--void", "255", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["ok"] and report["problems"] == [] and report["pairs"] == 3
    assert [c["pixels"] for c in report["classes"]] == [5, 5, 2]
    assert report["void_pixels"] == 2
    # freq: class 0 5/(4+4), class 1 5/(4+4), class 2 2/4 (void pixels not counted);
    # median 5/8 -> weights 1, 1, 1.25, tempered by default as segnet train does (w**0.5).
    assert [c["weight"] for c in report["classes"]] == pytest.approx([1.0, 1.0, 1.25**0.5])
    r = run("verify", images, "--classes", "3", "--void", "255", "--weight-power", "1", "--json")
    assert json.loads(r.stdout)["classes"][2]["weight"] == pytest.approx(1.25)

    r = run("verify", images, "--classes", "3", "--void", "255", "--weight-power", "1")
    assert r.exit_code == 0
    assert "OK: no problems found" in r.stderr
    assert "1.2500" in r.stderr and "class2" in r.stderr  # the table: weight and class name
    assert "void pixels (ignored): 2" in r.stderr


def test_list_file_pairs_relative_and_tutorial_paths(tmp_path):
    images, masks = _hand_dataset(tmp_path)
    listfile = tmp_path / "train.txt"
    listfile.write_text(
        "# image mask\n"
        "images/a.png imagesannot/a.png\n"
        # The SegNet tutorial's own absolute paths: looked up as folder/name beside the list.
        "/SegNet/CamVid/images/b.png /SegNet/CamVid/imagesannot/b.png\n"
        f"{images / 'c.png'} {masks / 'c.png'}\n"
    )
    pairs, problems = find_pairs(listfile)
    assert problems == []
    assert [(p.image.name, p.mask.name) for p in pairs] == [("a.png",) * 2, ("b.png",) * 2, ("c.png",) * 2]
    assert all(p.image.exists() and p.mask.exists() for p in pairs)
    r = run("verify", listfile, "--classes", "3", "--void", "255")
    assert r.exit_code == 0, r.output

    listfile.write_text(listfile.read_text() + "images/a.png other/annot/zz.png\njust-one-column\n")
    r = run("verify", listfile, "--classes", "3", "--void", "255")
    assert r.exit_code == 1
    # The missing path as the line wrote it, not the tutorial fallback's guess (annot/zz.png).
    assert "train.txt:5: not found: other/annot/zz.png" in r.stderr, r.stderr
    assert "expected 'image mask'" in r.stderr


def test_rgb_masks_mapped_through_the_class_colours(tmp_path):
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classes": [
        {"name": "ground", "color": [0, 0, 0]},
        {"name": "disc", "color": [230, 25, 75]},
        {"name": "square", "color": [60, 180, 75]},
    ]}))
    palette = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75]], np.uint8)
    images, masks = tmp_path / "images", tmp_path / "masks"
    img, mask = shapes_image(37, 53)
    write_png(images / "x.png", img)
    write_png(masks / "x.png", palette[mask])
    r = run("verify", images, "--masks", masks, "--classes", classes, "--rgb-masks", "--json")
    assert r.exit_code == 0, r.output
    got = [c["pixels"] for c in json.loads(r.stdout)["classes"]]
    assert got == np.bincount(mask.ravel(), minlength=3).tolist()
    # A colour that is no class is a problem, named by its RGB value.
    colours = palette[mask]
    colours[0, 0] = (1, 2, 3)
    write_png(masks / "x.png", colours)
    r = run("verify", images, "--masks", masks, "--classes", classes, "--rgb-masks")
    assert r.exit_code == 1 and "(1,2,3)" in r.stderr


def test_missing_folders_are_usage_errors(tmp_path):
    r = run("verify", tmp_path / "nope")
    assert r.exit_code == 2 and "not found" in r.stderr
    (tmp_path / "imgs").mkdir()
    r = run("verify", tmp_path / "imgs")  # no --masks and no imgsannot beside it
    assert r.exit_code == 2 and "annot" in r.stderr


def test_images_that_are_not_a_folder_nor_a_list_and_bad_class_options(tmp_path):
    images, masks = tmp_path / "im", tmp_path / "imannot"
    _good(images, masks, "a")
    listfile = tmp_path / "pairs.txt"
    listfile.write_text("im/a.png imannot/a.png\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("im/caf\xe9.png imannot/caf\xe9.png\n".encode("latin-1"))
    cases = [
        ((images / "a.png",), "is an image"),  # one image where the folder goes
        ((latin,), "UTF-8 text list"),
        ((listfile, "--masks", tmp_path / "nowhere"), "not used with a list file"),
        ((images, "--classes", "0"), "give 1 to 256 classes"),
        ((images, "--classes", "300"), "give 1 to 256 classes"),
        ((images, "--weight-power", "-1"), "--weight-power must be a number of 0 or more"),
    ]
    twice = tmp_path / "twice.csv"
    twice.write_text("road,128,64,128\ncar,64,0,128\nroad,0,0,0\n")
    cases.append(((images, "--classes", twice), "road appears more than once"))
    for args, message in cases:
        r = run("verify", *args)
        assert r.exit_code == 2 and message in r.stderr, (args, r.output)
    assert run("verify", listfile, "--classes", "3").exit_code == 0
