"""The Python API: the same masks as the CLI, a light import, plain-Keras loading."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from conftest import shapes_image, write_png
from PIL import Image
from typer.testing import CliRunner

import segnet_cli
from segnet_cli.cli import app

runner = CliRunner()


def test_import_is_light():
    code = "import sys, segnet_cli; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_segment_equals_cli_masks_small_and_tiled(tmp_path, tiny_model):
    small = write_png(tmp_path / "in" / "small.png", shapes_image(37, 53)[0])
    big = write_png(tmp_path / "in" / "big.png", shapes_image(150, 190, seed=4)[0])
    r = runner.invoke(app, ["predict", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                            "--model", str(tiny_model), "--tile", "64", "--halo", "16"])
    assert r.exit_code == 0, r.output
    model = segnet_cli.load_model(tiny_model)
    for path in (small, big):
        cli = np.asarray(Image.open(tmp_path / "out" / path.name))
        from_file = model.segment(path, tile=64, halo=16)
        from_array = model.segment(np.asarray(Image.open(path)), tile=64, halo=16)
        np.testing.assert_array_equal(from_file, cli)
        np.testing.assert_array_equal(from_array, cli)
        assert from_file.dtype == np.uint8 and from_file.shape == cli.shape
    # The big image really was tiled at these settings (and whole at the defaults).
    from segnet_cli.tiling import TileGrid

    assert len(TileGrid.make(150, 190, 64, 16, model.info.stride)) > 1
    mask, conf = model.segment(small, confidence=True)
    assert conf.shape == mask.shape and conf.dtype == np.float32 and (conf <= 1).all()
    assert model.class_names == tuple(model.info.class_names)


def test_plain_keras_loads_a_segnet_file(tiny_model):
    import keras

    km = keras.saving.load_model(str(tiny_model), custom_objects=segnet_cli.custom_objects())
    x = np.random.default_rng(0).random((1, 37, 53, 3)).astype(np.float32)
    logits = km.predict(x, verbose=0)
    assert logits.shape[:3] == (1, 37, 53)
    model = segnet_cli.load_model(tiny_model)
    np.testing.assert_array_equal(np.argmax(logits[0], -1), model.segment(x[0]))
