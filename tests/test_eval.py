"""`segnet eval`: figures against a hand computation, JSON, plot, model mode, failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import grid_of, shapes_image, write_png
from PIL import Image
from typer.testing import CliRunner

from segnet_cli.cli import app
from segnet_cli.config import EvalConfig, InferenceConfig
from segnet_cli.evaluate import run_eval
from segnet_cli.pipeline import segment_image

runner = CliRunner()
VOID = 255


@pytest.fixture(autouse=True)
def _loud_ui():
    from segnet_cli import ui

    ui.configure(False)


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0, 0, 0, 200] + [0] * 756)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture()
def scored(tmp_path) -> tuple[Path, Path]:
    """Ground truth and predictions whose confusion matrix is worked out in the test."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    write_png(gt / "a.png", np.array([[0, 0, 1, VOID], [1, 1, 2, 2]], np.uint8))
    write_png(pred / "a.png", np.array([[0, 1, 1, 2], [1, 0, 2, 0]], np.uint8))
    write_png(gt / "sub" / "b.png", np.array([[2, 2], [0, 0]], np.uint8))
    # A palette PNG prediction (what `segnet predict` writes): read as its indices.
    write_palette_png(pred / "sub" / "b.png", np.array([[2, 1], [0, 0]]))
    return gt, pred


# By hand, void dropped. a: true 0 -> 0, 1; true 1 -> 1, 1, 0; true 2 -> 2, 0.
# b: true 2 -> 2, 1; true 0 -> 0, 0. Summed, rows true, columns predicted:
HAND_CM = [[3, 1, 0, 0], [1, 2, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]]


def test_pred_mode_matches_hand_computation(scored, tmp_path):
    gt, pred = scored
    plot = tmp_path / "cm.png"
    r = run("eval", "--pred", pred, "--masks", gt, "--classes", "4", "--void", VOID,
            "--json", "--plot", plot)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["confusion"] == HAND_CM
    assert d["images"] == 2 and d["failed"] == 0 and d["pixels"] == 11
    # G = (3 + 2 + 2) / 11; recall 3/4, 2/3, 2/4; class 3 never true nor predicted.
    assert d["global_accuracy"] == pytest.approx(7 / 11)
    assert d["class_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 4) / 3)
    # Column sums 5, 4, 2: IoU 3/(4+5-3), 2/(3+4-2), 2/(4+2-2).
    ious = [3 / 6, 2 / 5, 2 / 4]
    assert [c["iou"] for c in d["per_class"][:3]] == pytest.approx(ious)
    assert d["mean_iou"] == pytest.approx(sum(ious) / 3)
    assert d["fw_iou"] == pytest.approx(4 / 11 * ious[0] + 3 / 11 * ious[1] + 4 / 11 * ious[2])
    absent = d["per_class"][3]
    assert absent["iou"] is None and absent["accuracy"] is None and absent["truth_pixels"] == 0
    assert d["void"] == VOID and d["classes"] == ["class0", "class1", "class2", "class3"]
    assert {i["key"]: (i["pixels"], i["correct"]) for i in d["per_image"]} == {
        "a": (7, 4), "sub/b": (4, 3)}
    # Human output on stderr: the table (absent class shown as '-') and the headline.
    assert "G 63.6  C 63.9  mIoU 46.7  fwIoU 47.3" in r.stderr
    row = next(line for line in r.stderr.splitlines() if "class3" in line)
    assert "-" in row and "50.0" not in row
    # The plot is a readable PNG whose diagonal cells are dark blue.
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.width > 150 and im.height > 150
        px = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    dark_blue = (px[:, 2] > px[:, 0] + 40) & (px[:, 0] < 120)
    assert dark_blue.sum() > 200


@pytest.mark.parametrize("target, message", [
    ("gt/a.png", "would overwrite"),  # a ground-truth mask
    ("pred/sub/b.png", "would overwrite"),  # a prediction
    ("cm.jpg", "ending in .png"),  # the file would hold a PNG under another name
    ("gt", "ending in .png"),
    ("a-file/cm.png", "is a file, not a folder"),  # cannot be written
])
def test_plot_never_replaces_a_scored_file_and_is_checked_first(scored, tmp_path, target, message):
    gt, pred = scored
    (tmp_path / "a-file").write_text("not a folder")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = run("eval", "--pred", pred, "--masks", gt, "--classes", "4", "--void", VOID,
            "--plot", tmp_path / target)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and "mIoU" not in r.stderr  # refused before any scoring
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_plot_replaces_its_own_chart_but_not_someone_elses_image(scored, tmp_path):
    gt, pred = scored
    args = ["eval", "--pred", pred, "--masks", gt, "--classes", "4", "--void", VOID]
    photo = write_png(tmp_path / "holiday.png", np.zeros((4, 4), np.uint8))
    before = photo.read_bytes()
    r = run(*args, "--plot", photo)
    assert r.exit_code == 2 and "did not write" in r.output and "--overwrite" in r.output
    assert photo.read_bytes() == before
    r = run(*args, "--plot", photo, "--overwrite")
    assert r.exit_code == 0 and photo.read_bytes() != before, r.output
    r = run(*args, "--plot", photo)  # now segnet's chart: replaced without --overwrite
    assert r.exit_code == 0, r.output


def test_missing_prediction_fails_that_image_and_scores_the_rest(scored):
    gt, pred = scored
    write_png(gt / "c.png", np.ones((3, 3), np.uint8))
    r = run("eval", "--pred", pred, "--masks", gt, "--classes", "4", "--void", VOID, "--json")
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["return_code"] == 1 and d["failed"] == 1
    assert d["failures"][0]["path"].endswith("c.png") and "no prediction" in d["failures"][0]["error"]
    assert d["confusion"] == HAND_CM  # the other two were scored as before
    assert "c.png" in r.stderr and "error" in r.stderr


def test_bad_predictions_and_truth_are_reported_not_scored(scored):
    gt, pred = scored
    write_png(gt / "small.png", np.zeros((3, 3), np.uint8))
    write_png(pred / "small.png", np.zeros((3, 4), np.uint8))  # wrong size
    write_png(gt / "range.png", np.zeros((2, 2), np.uint8))
    write_png(pred / "range.png", np.full((2, 2), 9, np.uint8))  # no class 9
    write_png(gt / "undeclared.png", np.full((2, 2), 77, np.uint8))  # neither class nor void
    write_png(pred / "undeclared.png", np.zeros((2, 2), np.uint8))
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(gt / "lossy.jpg")
    write_png(pred / "lossy.png", np.zeros((2, 2), np.uint8))
    (pred / "unreadable.png").write_bytes(b"not a png")
    write_png(gt / "unreadable.png", np.zeros((2, 2), np.uint8))
    report = run_eval(EvalConfig(images=None, masks=gt, pred=pred, classes="4", void=VOID))
    assert report.return_code == 1 and report.failed == 5 and report.done == 2
    errors = {Path(f["path"]).name: f["error"] for f in report.details["failures"]}
    assert "3x3" in errors["small.png"] and "4x3" in errors["small.png"]
    assert "9" in errors["range.png"]
    assert "77" in errors["undeclared.png"] and "--void" in errors["undeclared.png"]
    assert "JPEG" in errors["lossy.jpg"]
    assert "unreadable.png" in errors
    assert report.details["confusion"] == HAND_CM


def test_flat_predictions_match_list_file_ground_truth(tmp_path):
    # Ground truth from a list file (masks in their own folder), predictions flat by stem.
    img, mask = shapes_image(13, 17)
    write_png(tmp_path / "data" / "img" / "x.png", img)
    write_png(tmp_path / "data" / "ann" / "x.png", mask)
    listfile = tmp_path / "data" / "test.txt"
    listfile.write_text("img/x.png ann/x.png\n")
    write_png(tmp_path / "pred" / "x.png", mask)
    write_png(tmp_path / "pred" / "x.overlay.jpg", img)  # predict --overlay's picture
    logged: list[str] = []
    report = run_eval(EvalConfig(images=listfile, pred=tmp_path / "pred", classes="3"),
                      log=logged.append)
    assert report.return_code == 0 and report.done == 1
    assert not any("no ground truth" in m for m in logged), logged  # not a stray prediction
    assert report.details["global_accuracy"] == 1.0 and report.details["mean_iou"] == 1.0


def test_usage_errors_exit_2(tmp_path, scored):
    gt, pred = scored
    assert run("eval", "--pred", tmp_path / "nope", "--masks", gt).exit_code == 2
    assert run("eval", "--pred", pred).exit_code == 2  # no ground truth given
    (tmp_path / "empty").mkdir()
    r = run("eval", "--pred", pred, "--masks", tmp_path / "empty")
    assert r.exit_code == 2 and "no ground-truth masks" in r.stderr


def test_pred_mode_never_imports_tensorflow(scored):
    gt, pred = scored
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from segnet_cli.cli import app\n"
        f"r = CliRunner().invoke(app, ['eval', '--pred', {str(pred)!r}, '--masks', {str(gt)!r},"
        f" '--classes', '4', '--void', '255', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------- model mode


@pytest.fixture()
def labelled(tmp_path) -> tuple[Path, Path]:
    """Odd-sized shape images (one larger than the test's tile) and their true masks."""
    images, masks = tmp_path / "test", tmp_path / "testannot"
    for i, (h, w) in enumerate([(37, 53), (29, 31), (70, 45)]):
        img, mask = shapes_image(h, w, seed=i)
        mask[0, :3] = VOID
        write_png(images / f"im{i}.png", img)
        write_png(masks / f"im{i}.png", mask)
    return images, masks


def test_model_mode_scores_what_the_engine_predicts(labelled, tiny_model, tmp_path):
    from segnet_cli.config import TilingConfig
    from segnet_cli.io.images import read_image, read_mask, to_model_input
    from segnet_cli.metrics import confusion
    from segnet_cli.model.segmenter import Segmenter

    images, masks = labelled
    saved = tmp_path / "saved"
    # Tiles of 40 px with an 8 px halo: the 70x45 image is stitched from several tiles.
    r = run("eval", images, "--model", tiny_model, "--void", VOID, "--tile", 40, "--halo", 8,
            "--json", "--save-masks", saved)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["mode"] == "model" and d["images"] == 3
    assert d["classes"] == ["background", "disc", "square"]  # from the model's metadata
    assert d["tiling"]["tile"] == 40 and d["tiling"]["halo"] == 8

    seg = Segmenter(tiny_model)
    tiling = TilingConfig(tile=40, halo=8)
    assert len(grid_of(seg, 70, 45, tiling)) > 1
    cm = np.zeros((3, 3), np.int64)
    for p in sorted(images.glob("*.png")):
        x = to_model_input(read_image(p), 3)
        pred, _ = segment_image(seg, x, tiling)
        np.testing.assert_array_equal(np.asarray(Image.open(saved / p.name)), pred)
        cm += confusion(read_mask(masks / p.name), pred, 3, VOID)
    assert d["confusion"] == cm.tolist()
    assert d["pixels"] == 37 * 53 + 29 * 31 + 70 * 45 - 9  # void pixels left out

    # Scoring the saved masks with --pred gives the very same figures.
    again = run_eval(
        EvalConfig(images=None, masks=masks, pred=saved, inference=InferenceConfig(model=tiny_model), void=VOID)
    )
    assert again.details["confusion"] == d["confusion"]
    assert again.details["mean_iou"] == pytest.approx(d["mean_iou"])


def test_list_file_names_items_by_image_and_never_saves_two_masks_as_one(tmp_path, tiny_model):
    # Images and masks named differently, from folders of the same image names.
    lines = []
    for i, d in enumerate(("a", "b")):
        img, mask = shapes_image(20, 24, seed=i)
        write_png(tmp_path / d / "x.png", img)
        write_png(tmp_path / d / "x_L.png", mask)
        lines.append(f"{d}/x.png {d}/x_L.png")
    listfile = tmp_path / "list.txt"
    listfile.write_text("\n".join(lines) + "\n")
    saved = tmp_path / "saved"
    r = run("eval", listfile, "--model", tiny_model, "--save-masks", saved, "--json")
    assert r.exit_code == 1, r.output  # the second x.png is refused, the first scored
    d = json.loads(r.stdout)
    assert d["images"] == 1 and d["failed"] == 1 and [i["key"] for i in d["per_image"]] == ["x"]
    assert d["failures"][0]["path"].endswith("b/x.png") and "same name" in d["failures"][0]["error"]
    assert sorted(p.name for p in saved.iterdir()) == ["x.png"]  # as predict names it
    # Without saved masks or predictions nothing is shared: both are scored.
    r = run("eval", listfile, "--model", tiny_model, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["images"] == 2, r.output


def test_model_mode_missing_mask_and_class_mismatch(labelled, tiny_model):
    images, masks = labelled
    write_png(images / "extra.png", shapes_image(20, 20)[0])  # no ground truth
    r = run("eval", images, "--masks", masks, "--model", tiny_model, "--void", VOID, "--json")
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["images"] == 3 and d["failed"] == 1 and "extra.png" in d["failures"][0]["path"]
    r = run("eval", images, "--model", tiny_model, "--classes", "camvid")
    assert r.exit_code == 2 and "11 classes" in r.stderr
    # A tiling that cannot work is a usage error for the run, not a failure per image.
    r = run("eval", images, "--model", tiny_model, "--void", VOID, "--tile", 32, "--halo", 16)
    assert r.exit_code == 2 and "tile" in r.stderr, r.output
    # Refused before the model is loaded and any image segmented, as a bad --plot is.
    assert "segmenting" not in r.output
    r = run("eval", images, "--model", tiny_model, "--void", VOID, "--plot", "chart.txt")
    assert r.exit_code == 2 and "segmenting" not in r.output, r.output
