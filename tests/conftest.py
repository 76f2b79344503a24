"""Shared fixtures: a tiny fixed-seed SegNet saved as a segnet model file, tiny images."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from segnet_cli.geo import load_before_tensorflow

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# GeoPackages need GDAL's own SQLite (see load_before_tensorflow): load it before any test
# module imports TensorFlow, whatever order the modules are collected in.
load_before_tensorflow()

TINY_CLASSES = ("background", "disc", "square")
TINY_PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75))


def make_model_file(
    path: Path,
    width: float = 0.0625,
    stages: int = 3,
    in_channels: int = 3,
    num_classes: int = 3,
    seed: int = 0,
    class_names: tuple[str, ...] | None = None,
) -> Path:
    """Build a small random SegNet with fixed weights and save it with segnet metadata.

    BatchNorm statistics are randomised too, so inference is not a trivial identity.
    ``class_names`` default to ``TINY_CLASSES`` (then ``class3``, ...).
    """
    import keras

    from segnet_cli.model.modelfile import InputScaling, ModelInfo
    from segnet_cli.model.network import Architecture, build_segnet, save_model

    keras.utils.set_random_seed(seed)
    arch = Architecture(width=width, stages=stages, in_channels=in_channels, num_classes=num_classes)
    model = build_segnet(arch)
    rng = np.random.default_rng(seed)
    weights = []
    for w in model.weights:
        v = w.numpy()
        if "moving_variance" in w.path:
            v = rng.uniform(0.5, 1.5, v.shape).astype(v.dtype)
        elif "moving_mean" in w.path:
            v = rng.normal(0, 0.1, v.shape).astype(v.dtype)
        weights.append(v)
    model.set_weights(weights)
    names = class_names or tuple(TINY_CLASSES[:num_classes]) + tuple(
        f"class{i}" for i in range(len(TINY_CLASSES), num_classes)
    )
    palette = tuple(TINY_PALETTE[:num_classes]) + tuple(
        (i * 40 % 256, 100, 200) for i in range(len(TINY_PALETTE), num_classes)
    )
    info = ModelInfo(
        class_names=names,
        palette=palette,
        in_channels=in_channels,
        scaling=InputScaling(mean=(0.5,) * in_channels, std=(0.25,) * in_channels),
        stride=arch.stride,
        receptive_field=arch.receptive_field,
        architecture={"width": width, "stages": stages, "in_channels": in_channels,
                      "num_classes": num_classes, "params": int(model.count_params())},
    )
    save_model(model, info, path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 3-stage, 3-class SegNet model file (stride 8), fixed seed."""
    return make_model_file(tmp_path_factory.mktemp("models") / "tiny.keras")


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def shapes_image(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image of a disc and a square on a noisy background, and its 3-class mask."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 60 + 40).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, r = rng.integers(0, h), rng.integers(0, w), max(2, min(h, w) // 4)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[disc] = (220, 40, 40)
    mask[disc] = 1
    y0, x0 = rng.integers(0, max(1, h - r)), rng.integers(0, max(1, w - r))
    sq = (yy >= y0) & (yy < y0 + r) & (xx >= x0) & (xx < x0 + r)
    img[sq] = (40, 200, 60)
    mask[sq] = 2
    return img, mask


@contextmanager
def local_ray_cluster() -> Iterator:
    """A 2-CPU local Ray cluster for a test module, shut down after it.

    An already running session (someone else's) is used and left running. Skips the caller
    when Ray is not installed.
    """
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    if ray.is_initialized():
        yield ray
        return
    ray.init(
        num_cpus=2,
        object_store_memory=80 * 2**20,  # result rows are tiny: pixels never enter the store
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def grid_of(seg, height: int, width: int, tiling):
    """The tile grid a segmenter's model gives an image under ``tiling``."""
    from segnet_cli.tiling import TileGrid

    return TileGrid.make(height, width, tiling.tile, tiling.halo, seg.stride)
