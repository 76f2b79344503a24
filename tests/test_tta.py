"""Test-time augmentation (``--tta flip``): the mean of the image's and its mirror's
probabilities, exact under tiling, the same in every command."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import grid_of, shapes_image, write_png
from PIL import Image
from typer.testing import CliRunner

from segnet_cli.cli import app
from segnet_cli.config import TTA, TilingConfig
from segnet_cli.pipeline import segment_image
from segnet_cli.tiling import TileGrid, softmax

runner = CliRunner()


@pytest.fixture(scope="module")
def seg(tiny_model):
    from segnet_cli.model.segmenter import Segmenter

    return Segmenter(tiny_model)


def reference(seg, img: np.ndarray) -> np.ndarray:
    """Whole-image TTA by its definition, in NumPy: mean of the two views' softmax."""
    p = softmax(seg.logits(img[None])[0])
    q = softmax(seg.logits(img[None, :, ::-1])[0])[:, ::-1]
    return (p + q) / 2


def exact_halo(seg) -> int:
    return -(-seg.info.receptive_field // 2 // seg.stride) * seg.stride


def test_mirrored_tiles_partition_the_image():
    grid = TileGrid.make(70, 203, 48, 8, 8)
    seen = np.zeros((70, 203), int)
    for t in grid.all_tiles(mirrored=True):
        if t.flipped:
            y0, x0, y1, x1 = t.core
            seen[y0:y1, x0:x1] += 1
            wy0, wx0, wy1, wx1 = t.window
            assert (203 - wx1) % 8 == 0  # stride-aligned in the mirrored image
    assert (seen == 1).all()


@pytest.mark.parametrize("shape", [(37, 53), (1, 300), (150, 233)])
def test_tta_whole_equals_numpy_reference(seg, shape):
    img = np.random.default_rng(1).random((*shape, 3)).astype(np.float32)
    mask, conf = segment_image(seg, img, TilingConfig(tile=4096), confidence=True, tta=TTA.FLIP)
    ref = reference(seg, img)
    top2 = np.sort(ref, -1)[..., -2:]
    decided = (top2[..., 1] - top2[..., 0]) > 1e-5
    assert (mask[decided] == np.argmax(ref, -1)[decided]).all() and decided.mean() > 0.99
    np.testing.assert_allclose(conf, ref.max(-1), atol=1e-4)
    # It is not a no-op: the mirrored view changes some pixels of this random model.
    plain, _ = segment_image(seg, img, TilingConfig(tile=4096))
    if shape == (150, 233):
        assert (plain != mask).any()


@pytest.mark.parametrize("shape", [(150, 233), (37, 301), (301, 37)])
def test_tta_tiled_identical_to_whole(seg, shape):
    halo = exact_halo(seg)
    tiling = TilingConfig(tile=2 * halo + 3 * seg.stride, halo=halo, batch_size=3)
    img = np.random.default_rng(2).random((*shape, 3)).astype(np.float32)
    assert len(grid_of(seg, *shape, tiling)) > 2
    tiled, _ = segment_image(seg, img, tiling, tta=TTA.FLIP)
    ref = reference(seg, img)
    top2 = np.sort(ref, -1)[..., -2:]
    decided = (top2[..., 1] - top2[..., 0]) > 1e-5
    assert (tiled[decided] == np.argmax(ref, -1)[decided]).all() and decided.mean() > 0.99


def test_tile_and_predict_and_eval_agree_with_tta(tmp_path, tiny_model):
    img = shapes_image(150, 190, seed=9)[0]
    src = tmp_path / "a.tif"
    tifffile.imwrite(src, img, tile=(32, 32), compression="zlib")
    common = ["--model", str(tiny_model), "--tile", "64", "--halo", "16", "--tta", "flip"]
    r = runner.invoke(app, ["tile", str(src), "--out", str(tmp_path / "a.mask.tif"), *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["predict", str(src), "--out", str(tmp_path / "p"), *common])
    assert r.exit_code == 0, r.output
    tiled = tifffile.imread(tmp_path / "a.mask.tif")
    predicted = np.asarray(Image.open(tmp_path / "p" / "a.png"))
    np.testing.assert_array_equal(tiled, predicted)
    plain = runner.invoke(app, ["predict", str(src), "--out", str(tmp_path / "q"),
                                *common[:-2]])
    assert plain.exit_code == 0
    assert (np.asarray(Image.open(tmp_path / "q" / "a.png")) != predicted).any()
    # eval with --tta scores exactly the masks predict --tta wrote.
    write_png(tmp_path / "ev" / "a.png", img)
    write_png(tmp_path / "evannot" / "a.png", predicted)
    r = runner.invoke(app, ["eval", str(tmp_path / "ev"), "--classes", "3", "--json", *common])
    assert r.exit_code == 0, r.output
    assert '"global_accuracy": 1.0' in r.stdout and '"tta": "flip"' in r.stdout


def test_tta_is_part_of_up_to_date(tmp_path, tiny_model):
    write_png(tmp_path / "in" / "a.png", shapes_image(40, 50)[0])
    args = ["predict", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--model", str(tiny_model), "--json"]
    assert '"status": "done"' in runner.invoke(app, args).stdout
    assert '"status": "skipped"' in runner.invoke(app, args).stdout
    assert '"status": "done"' in runner.invoke(app, [*args, "--tta", "flip"]).stdout
    r = runner.invoke(app, [*args, "--tta", "rotate"])
    assert r.exit_code == 2 and "--tta" in r.output


@pytest.mark.parametrize("shape", [(37, 53), (1, 300), (150, 233)])
def test_image_probabilities_are_the_stitched_probabilities_of_the_mask(seg, shape):
    from segnet_cli.pipeline import image_probabilities

    img = np.random.default_rng(3).random((*shape, 3)).astype(np.float32)
    halo = exact_halo(seg)
    # Several tiles with an exact halo: the same probabilities as the whole image.
    tiling = TilingConfig(tile=2 * halo + 3 * seg.stride, halo=halo, batch_size=2)
    for tta, want in ((TTA.NONE, softmax(seg.logits(img[None])[0])),
                      (TTA.FLIP, reference(seg, img))):  # fmt: skip
        prob = image_probabilities(seg, img, tiling, tta)
        assert prob.shape == (*shape, seg.num_classes) and prob.dtype == np.float32
        np.testing.assert_allclose(prob, want, atol=1e-4)
        mask, _ = segment_image(seg, img, tiling, tta=tta)
        top2 = np.sort(prob, -1)[..., -2:]
        decided = (top2[..., 1] - top2[..., 0]) > 1e-5
        assert (mask[decided] == np.argmax(prob, -1)[decided]).all()
