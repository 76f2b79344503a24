"""The bundled CamVid model: present, loadable, small, and tiled = whole at the defaults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import grid_of

from segnet_cli.classes import CAMVID
from segnet_cli.config import TilingConfig, default_model_path
from segnet_cli.model.modelfile import read_info
from segnet_cli.pipeline import segment_image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example_mosaic() -> np.ndarray:
    """The three CamVid photos in ``examples/`` as a 720x1440 scene, float32 [0, 1].

    Real street content, as the README's tiling figures use: a flat synthetic scene leaves
    large areas where two classes nearly tie, so it measures ties rather than tiling. The
    second row is the first mirrored and shifted, so no tile sees the same content twice.
    """
    from segnet_cli.io.images import read_image, to_model_input

    photos = [to_model_input(read_image(p), 3, p) for p in sorted(EXAMPLES.glob("*.jpg"))]
    assert len(photos) == 3 and all(p.shape == (360, 480, 3) for p in photos)
    top = np.concatenate(photos, axis=1)
    bottom = np.concatenate([p[:, ::-1] for p in photos[1:] + photos[:1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, bottom], axis=0))


def test_bundled_model_file():
    path = default_model_path()
    assert path.is_file(), f"bundled model missing at {path}"
    assert path.stat().st_size <= 25 * 2**20
    info = read_info(path)
    assert info.class_names == tuple(n for n, _ in CAMVID)
    assert info.palette[: len(CAMVID)] == tuple(c for _, c in CAMVID)
    assert info.in_channels == 3 and info.void_class == 11 and info.stride == 32
    # Figures on val/, or (when the final fit trained on val/) on a held-out drive.
    headline = info.headline()
    assert headline is not None and 0 < headline[1]["mean_iou"] <= 1


def test_defaults_agree_with_whole_image_inference():
    """At the default tile and halo, >= 99.9% of pixels equal whole-image inference."""
    from segnet_cli.model.segmenter import Segmenter

    seg = Segmenter()
    tiling = TilingConfig()
    img = example_mosaic()
    assert len(grid_of(seg, *img.shape[:2], tiling)) > 1  # really tiled at the defaults
    whole = np.argmax(seg.logits(img[None])[0], -1)
    tiled, _ = segment_image(seg, img, tiling)
    agreement = float((tiled == whole).mean())
    assert agreement >= 0.999, agreement
