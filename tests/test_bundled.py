"""The bundled CamVid model: present, loadable, small, and tiled = whole at the defaults."""

from __future__ import annotations

import numpy as np
from conftest import grid_of

from segnet_cli.classes import CAMVID
from segnet_cli.config import TilingConfig, default_model_path
from segnet_cli.model.modelfile import read_info
from segnet_cli.pipeline import segment_image


def street_scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A synthetic street-like scene (sky, facades with windows, road, cars), float32 [0, 1]."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    yy = np.linspace(0, 1, h)[:, None]
    img[:] = (0.55 + 0.3 * (1 - yy))[..., None] * np.array([0.8, 0.85, 0.95], np.float32)
    horizon = int(h * 0.55)
    x = 0
    while x < w:
        bw = int(rng.integers(w // 12, w // 5))
        top = int(rng.integers(h // 10, horizon - h // 10))
        colour = rng.uniform(0.25, 0.6, 3).astype(np.float32)
        img[top:horizon, x : x + bw] = colour
        for wy in range(top + 10, horizon - 10, 28):
            for wx in range(x + 6, min(x + bw, w) - 10, 22):
                img[wy : wy + 12, wx : wx + 9] = colour * 0.4
        x += bw
    img[horizon:] = np.array([0.5, 0.42, 0.5], np.float32)
    for _ in range(max(1, w // 300)):
        cx, cy = int(rng.integers(0, w - 120)), int(rng.integers(horizon, h - 50))
        img[cy : cy + 45, cx : cx + 110] = rng.uniform(0.1, 0.9, 3)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def test_bundled_model_file():
    path = default_model_path()
    assert path.is_file(), f"bundled model missing at {path}"
    assert path.stat().st_size <= 25 * 2**20
    info = read_info(path)
    assert info.class_names == tuple(n for n, _ in CAMVID)
    assert info.palette[: len(CAMVID)] == tuple(c for _, c in CAMVID)
    assert info.in_channels == 3 and info.void_class == 11 and info.stride == 32
    # Figures on val/, or (when the final fit trained on val/) on a held-out drive.
    figures = info.validation() or info.training.get("held_out")
    assert figures is not None and 0 < figures["mean_iou"] <= 1


def test_defaults_agree_with_whole_image_inference():
    """At the default tile and halo, >= 99.9% of pixels equal whole-image inference."""
    from segnet_cli.model.segmenter import Segmenter

    seg = Segmenter()
    tiling = TilingConfig()
    img = street_scene(1100, 1400)
    assert len(grid_of(seg, 1100, 1400, tiling)) > 1  # really tiled at the defaults
    whole = np.argmax(seg.logits(img[None])[0], -1)
    tiled, _ = segment_image(seg, img, tiling)
    agreement = float((tiled == whole).mean())
    assert agreement >= 0.999, agreement
