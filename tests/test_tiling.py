"""Tile geometry (pure numpy) and stitching round trips; exactness against whole images."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import grid_of

from segnet_cli.errors import UsageError
from segnet_cli.pipeline import segment_image
from segnet_cli.tiling import (
    Stitcher,
    TileGrid,
    axis_spans,
    band_bytes,
    gaussian_window,
    stitch_all,
)

SIZES = [1, 2, 31, 37, 53, 300, 511, 512, 513, 543, 544, 1000, 1537, 2049, 4099]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("tile,halo,stride", [(512, 96, 32), (256, 64, 32), (96, 40, 8), (64, 0, 8)])
def test_axis_spans_cover_exactly_with_context(size, tile, halo, stride):
    spans = axis_spans(size, tile, halo, stride)
    owner = np.zeros(size, int)
    for s in spans:
        owner[s.core_start : s.core_end] += 1
        assert s.window_start % stride == 0  # pooling windows line up with the whole image
        assert 0 <= s.window_start <= s.core_start < s.core_end <= s.window_end <= size
        assert s.window <= tile + stride - 1
        if s.core_start > 0:
            assert s.core_start - s.window_start >= halo
        if s.core_end < size:
            assert s.window_end - s.core_end >= halo
    assert (owner == 1).all()  # every pixel has exactly one owning core
    if size < tile + stride:
        assert len(spans) == 1 and spans[0].window == size  # fits: runs whole, no halo


def test_grid_counts_shapes_and_alignment():
    g = TileGrid.make(1537, 2049, 500, 90, 32)  # rounded to tile 480, halo 96
    assert (g.tile, g.halo) == (480, 96)
    assert len(g) == len(g.rows) * len(g.cols) == sum(g.shapes().values())
    assert g.overhead() > 1.0
    assert g.band_rows() <= g.tile + g.stride - 1
    tiles = list(g.tiles())
    assert [t.index for t in tiles] == list(range(len(g)))
    # Corners: first and last tiles touch the image corners.
    assert tiles[0].window[:2] == (0, 0) and tiles[-1].window[2:] == (1537, 2049)
    single = TileGrid.make(360, 480, 512, 96, 32)
    assert single.single and single.overhead() == 1.0


def test_grid_rejects_impossible_settings():
    with pytest.raises(UsageError, match="no core") as err:
        TileGrid.make(1000, 1000, 128, 64, 32)
    assert "become" not in str(err.value)  # nothing was rounded
    # A rounded tile or halo is said, so "tile 96" is not a mystery after --tile 100.
    with pytest.raises(UsageError, match="--tile 100 and --halo 40 become 96 and 64"):
        TileGrid.make(1000, 1000, 100, 40, 32)
    with pytest.raises(UsageError):
        TileGrid.make(0, 10, 128, 0, 32)


def _fake_logits(h, w, k, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((h, w, k)).astype(np.float32)


@pytest.mark.parametrize("mode", ["center", "gaussian"])
@pytest.mark.parametrize("hw", [(37, 53), (1, 300), (300, 1), (129, 257), (700, 1100)])
def test_stitch_round_trip_of_position_only_logits(mode, hw):
    """When logits depend only on position, any tiling must reproduce them exactly."""
    h, w = hw
    full = _fake_logits(h, w, 4)
    g = TileGrid.make(h, w, 64, 16, 8)
    st = Stitcher(g, 4, mode, confidence=True)
    tiles = list(g.tiles())
    # Tiles may arrive out of order across rows (batches mix shapes): reverse each pair of rows.
    order = sorted(tiles, key=lambda t: (t.row // 2, -t.row, -t.col))
    blocks = []
    for t in order:
        y0, x0, y1, x1 = t.window
        st.add(t, full[y0:y1, x0:x1])
        blocks.extend(st.pop())
    assert st.finished
    mask = np.full((h, w), 255, np.uint8)
    starts = []
    for y0, m, _c, _ in blocks:
        starts.append(y0)
        mask[y0 : y0 + m.shape[0]] = m
    assert starts == sorted(starts)  # finished rows come out top to bottom
    np.testing.assert_array_equal(mask, np.argmax(full, -1))


def test_confidence_is_softmax_max():
    h, w = 50, 70
    full = _fake_logits(h, w, 3, seed=3)
    g = TileGrid.make(h, w, 32, 8, 8)
    st = Stitcher(g, 3, "center", confidence=True)
    for t in g.tiles():
        y0, x0, y1, x1 = t.window
        st.add(t, full[y0:y1, x0:x1])
    mask, conf = stitch_all(st, h, w, confidence=True)
    e = np.exp(full - full.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(conf, p.max(-1), rtol=1e-5)


@pytest.mark.parametrize("confidence", [False, True])
def test_center_stitcher_takes_classes_as_well_as_logits(confidence):
    """What ``needs`` asks for (classes computed where the model ran) stitches the same mask."""
    h, w = 70, 90
    full = _fake_logits(h, w, 5, seed=4)
    e = np.exp(full - full.max(-1, keepdims=True))
    prob = (e / e.sum(-1, keepdims=True)).max(-1).astype(np.float32)
    g = TileGrid.make(h, w, 32, 8, 8)
    from_logits = Stitcher(g, 5, "center", confidence=confidence)
    from_classes = Stitcher(g, 5, "center", confidence=confidence)
    assert from_classes.needs == ("confidence" if confidence else "classes")
    for t in g.tiles():
        y0, x0, y1, x1 = t.window
        from_logits.add(t, full[y0:y1, x0:x1])
        classes = np.argmax(full[y0:y1, x0:x1], -1).astype(np.uint8)
        from_classes.add(t, (classes, prob[y0:y1, x0:x1]) if confidence else classes)
    a = stitch_all(from_logits, h, w, confidence)
    b = stitch_all(from_classes, h, w, confidence)
    np.testing.assert_array_equal(a[0], b[0])
    if confidence:
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5)
    # Blending needs probabilities: a gaussian stitcher refuses bare classes.
    gauss = Stitcher(g, 5, "gaussian")
    assert gauss.needs == "logits"
    t = next(iter(g.tiles()))
    with pytest.raises(ValueError, match="needs logits"):
        gauss.add(t, np.zeros(t.shape, np.uint8))


def test_gaussian_window_and_band_memory():
    win = gaussian_window((65, 33))
    assert win.shape == (65, 33) and win.max() == pytest.approx(1.0) and win.min() > 0
    assert win[32, 16] == win.max()
    # Band memory depends on width and tile, never on height.
    a = TileGrid.make(10_000, 5_000, 512, 96, 32)
    b = TileGrid.make(90_000, 5_000, 512, 96, 32)
    for mode in ("center", "gaussian"):
        assert band_bytes(a, 11, mode) == band_bytes(b, 11, mode)
    wide = TileGrid.make(10_000, 10_000, 512, 96, 32)
    assert band_bytes(wide, 11, "center") > band_bytes(a, 11, "center")


def test_tiled_inference_identical_to_whole_image_at_half_receptive_field(tiny_model):
    """With halo >= receptive field / 2, tiles reproduce whole-image inference exactly."""
    from segnet_cli.config import TilingConfig
    from segnet_cli.model.segmenter import Segmenter

    seg = Segmenter(tiny_model)
    rf = seg.info.receptive_field
    halo = -(-rf // 2 // seg.stride) * seg.stride
    rng = np.random.default_rng(5)
    for h, w in [(150, 230), (37, 301), (301, 37)]:
        img = rng.random((h, w, 3)).astype(np.float32)
        whole = seg.logits(img[None])[0]
        mask, _ = segment_image(seg, img, TilingConfig(tile=2 * halo + 3 * seg.stride, halo=halo, batch_size=3))
        grid = grid_of(seg, h, w, TilingConfig(tile=2 * halo + 3 * seg.stride, halo=halo))
        assert len(grid) > 4  # really tiled
        ref = np.argmax(whole, -1)
        # Float kernels may differ in the last bits between tile shapes; only exact ties
        # could flip. Require identity wherever the top-2 margin is not a float tie.
        top2 = np.sort(whole, -1)[..., -2:]
        decided = (top2[..., 1] - top2[..., 0]) > 1e-4
        assert (mask[decided] == ref[decided]).all()
        assert decided.mean() > 0.99


def test_small_halo_differs_but_mostly_agrees(tiny_model):
    from segnet_cli.config import TilingConfig
    from segnet_cli.model.segmenter import Segmenter

    seg = Segmenter(tiny_model)
    img = np.random.default_rng(6).random((160, 200, 3)).astype(np.float32)
    ref = np.argmax(seg.logits(img[None])[0], -1)
    mask, _ = segment_image(seg, img, TilingConfig(tile=48, halo=8, batch_size=4))
    agree = (mask == ref).mean()
    assert 0.5 < agree < 1.0  # too little context changes some pixels: the halo matters
