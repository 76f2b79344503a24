"""Data safety (issue 13): never overwrite what the user owns, repair damaged outputs, and
turn every odd input into a clear error with the right exit code.

Every test drives the command line (``segnet_cli.cli.app``) the way a user would, and
compares the inputs byte for byte before and after where an input is at risk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

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
    before = digests(tmp_path)
    for target in (masks, images):
        r = run("eval", images, "--masks", masks, "--model", tiny_model, "--save-masks", target)
        assert r.exit_code == 2 and "overwrite" in r.output, r.output
    assert digests(tmp_path) == before


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
