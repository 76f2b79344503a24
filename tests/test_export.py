"""``segnet export``: each format run outside segnet against ``segnet predict``'s masks,
the metadata read back, ``--model x.onnx`` through predict/tile/eval, and the errors.

The exports are made once per module from the tiny model (a few seconds each). A format
whose extra is not installed is skipped (CI installs them: ``.ci/run``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import shapes_image, write_png
from PIL import Image
from typer.testing import CliRunner

from segnet_cli.cli import app
from segnet_cli.io.files import TMP_PREFIX

runner = CliRunner()

#: Odd sizes, a one-row image, a CamVid-sized one and one that --tile 64 cuts into tiles.
SIZES = [(37, 53), (1, 300), (360, 480), (150, 190)]
TILE = 96  # predict's tile for the parity run: the 150x190 image is tiled
NEEDS = {"onnx": ("onnx", "onnxruntime", "tf2onnx"), "saved_model": (),
         "litert": ("ai_edge_litert",)}
SUFFIX = {"onnx": ".onnx", "saved_model": "", "litert": ".tflite"}


def need(fmt: str) -> None:
    for module in NEEDS[fmt]:
        pytest.importorskip(module)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model):
    """``(format, classes_output) -> path``, exported on first use."""
    folder = tmp_path_factory.mktemp("exports")
    made: dict[tuple[str, bool], Path] = {}

    def get(fmt: str, classes: bool = False) -> Path:
        need(fmt)
        key = (fmt, classes)
        if key not in made:
            out = folder / f"tiny{'-classes' if classes else ''}{SUFFIX[fmt] or '_savedmodel'}"
            args = ["export", "--model", str(tiny_model), "--format", fmt, "--out", str(out)]
            r = runner.invoke(app, args + (["--classes-output"] if classes else []))
            assert r.exit_code == 0, r.output
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="module")
def photos(tmp_path_factory, tiny_model):
    """The test images as PNGs and ``segnet predict``'s masks of them (tiled where large).

    The halo is half the receptive field, so the tiled mask is the whole-image mask.
    """
    from segnet_cli.model.modelfile import read_info

    folder = tmp_path_factory.mktemp("photos")
    for i, (h, w) in enumerate(SIZES):
        write_png(folder / "in" / f"{h}x{w}.png", shapes_image(h, w, seed=i)[0])
    halo = read_info(tiny_model).receptive_field // 2
    r = runner.invoke(app, ["predict", str(folder / "in"), "--out", str(folder / "masks"),
                            "--model", str(tiny_model), "--tile", str(TILE), "--halo", str(halo)])
    assert r.exit_code == 0, r.output
    return folder


def pixels(path: Path) -> np.ndarray:
    """A PNG as the exported model's input: uint8 / 255, float32, a batch of one."""
    return (np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0)[None]


def run_outside(fmt: str, path: Path):
    """``batch -> output`` with the format's own runtime, no segnet code involved."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"]
        return lambda x: session.run(None, {"image": x})[0]
    if fmt == "saved_model":
        import tensorflow as tf

        sig = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda x: next(iter(sig(image=tf.constant(x)).values())).numpy()
    from ai_edge_litert.interpreter import Interpreter

    run = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    return lambda x: next(iter(run(image=x).values()))


@pytest.mark.parametrize("fmt", ["onnx", "saved_model", "litert"])
def test_export_runs_outside_segnet_like_predict(fmt, exports, photos, tiny_model):
    """Probabilities out, any size: argmax equals predict's masks (tiled ones too)."""
    from segnet_cli.tiling import TileGrid

    run = run_outside(fmt, exports(fmt))
    for h, w in SIZES:
        x = pixels(photos / "in" / f"{h}x{w}.png")
        probs = run(x)
        assert probs.shape == (1, h, w, 3) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        mask = np.asarray(Image.open(photos / "masks" / f"{h}x{w}.png"))
        agree = float((probs[0].argmax(-1) == mask).mean())
        assert agree >= 0.999, (fmt, h, w, agree)
        assert agree == 1.0  # in fact identical on these
    assert len(TileGrid.make(150, 190, TILE, 40, 8)) > 1  # predict did tile that one


@pytest.mark.parametrize("fmt", ["onnx", "saved_model", "litert"])
def test_classes_output_is_the_mask(fmt, exports, photos):
    run = run_outside(fmt, exports(fmt, classes=True))
    x = np.concatenate([pixels(photos / "in" / "37x53.png")] * 2)  # a batch of two
    classes = run(x)
    assert classes.shape == (2, 37, 53) and classes.dtype == np.uint8
    mask = np.asarray(Image.open(photos / "masks" / "37x53.png"))
    np.testing.assert_array_equal(classes[0], mask)
    np.testing.assert_array_equal(classes[1], mask)


def test_onnx_metadata_and_graph(exports, tiny_model):
    """The class table and scaling read back with plain ``onnx``; unpooling is unpooling."""
    need("onnx")
    import onnx

    from segnet_cli.model.modelfile import read_info

    proto = onnx.load(str(exports("onnx")))
    props = {p.key: p.value for p in proto.metadata_props}
    info = read_info(tiny_model)
    assert json.loads(props["class_names"]) == ["background", "disc", "square"]
    assert json.loads(props["palette"]) == [list(c) for c in info.palette]
    assert int(props["in_channels"]) == 3 and int(props["stride"]) == 8
    assert int(props["receptive_field"]) == info.receptive_field
    assert json.loads(props["input_scaling"])["mean"] == list(info.scaling.mean)
    assert props["source_sha256"] == hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    full = json.loads(props["segnet.json"])
    assert full["export"]["input"]["dtype"] == "float32" and full["export"]["input"]["layout"] == "NHWC"
    # Dynamic height and width, named.
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "height", "width", 3]
    ops = {n.op_type for n in proto.graph.node}
    # Unpooling by equal-and-select on the recorded positions: no resize, no upsampling,
    # no TensorFlow or XLA op left behind.
    assert {"Equal", "Where", "ReduceMax", "Conv"} <= ops
    assert not ops & {"Resize", "Upsample", "ConvTranspose"}
    assert all(onnx.defs.has(n.op_type, n.domain or "") for n in proto.graph.node)


def test_saved_model_and_litert_metadata(exports, tiny_model):
    sha = hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    folder = exports("saved_model")
    data = json.loads((folder / "assets.extra" / "segnet.json").read_text())
    assert data["class_names"] == ["background", "disc", "square"]
    assert data["export"]["source_sha256"] == sha
    import tensorflow as tf

    loaded = tf.saved_model.load(str(folder))
    assert json.loads(loaded.segnet_metadata.numpy().decode()) == data

    from segnet_cli.export import read_litert_metadata

    lite = read_litert_metadata(exports("litert"))
    assert lite["class_names"] == data["class_names"] and lite["export"]["source_sha256"] == sha
    assert lite["stride"] == 8 and lite["scaling"]["std"] == [0.25, 0.25, 0.25]


def test_onnx_segmenter_matches_segmenter(exports, tiny_model):
    from segnet_cli.model.onnxmodel import OnnxSegmenter
    from segnet_cli.model.segmenter import Segmenter, open_segmenter

    onnx_seg = open_segmenter(exports("onnx"))
    assert isinstance(onnx_seg, OnnxSegmenter)
    seg = Segmenter(tiny_model)
    assert (onnx_seg.stride, onnx_seg.num_classes, onnx_seg.batch_tiles(3)) == (8, 3, 3)
    assert onnx_seg.info == replace(seg.info, training={})
    x = np.random.default_rng(2).random((2, 29, 45, 3), dtype=np.float32)
    np.testing.assert_allclose(onnx_seg.run(x, "logits"), seg.run(x, "logits"), atol=1e-4)
    np.testing.assert_array_equal(onnx_seg.run(x, "classes"), seg.run(x, "classes"))
    c1, p1 = onnx_seg.run(x, "confidence")
    c2, p2 = seg.run(x, "confidence")
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(p1, p2, atol=1e-5)


def test_onnx_model_through_predict_tile_eval_info(exports, tiny_model, tmp_path):
    """``--model x.onnx``: the same masks, tiled outputs and scores as the .keras model."""
    import tifffile

    onnx_model = exports("onnx")
    src = tmp_path / "in"
    for i, (h, w) in enumerate([(37, 53), (150, 190)]):
        img, mask = shapes_image(h, w, seed=10 + i)
        write_png(src / f"im{i}.png", img)
        write_png(tmp_path / "inannot" / f"im{i}.png", mask)
    tiling = ["--tile", "64", "--halo", "16"]
    for name, model in (("keras", tiny_model), ("onnx", onnx_model)):
        r = runner.invoke(app, ["predict", str(src), "--out", str(tmp_path / f"p-{name}"),
                                "--model", str(model), *tiling])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["tile", str(src / "im1.png"), "--out",
                                str(tmp_path / f"t-{name}.tif"), "--model", str(model), *tiling,
                                "--probabilities", "confidence"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["eval", str(src), "--model", str(model), "--json", *tiling])
        assert r.exit_code == 0, r.output
        (tmp_path / f"e-{name}.json").write_text(r.stdout)
    for i in range(2):
        keras_mask = np.asarray(Image.open(tmp_path / "p-keras" / f"im{i}.png"))
        onnx_mask = np.asarray(Image.open(tmp_path / "p-onnx" / f"im{i}.png"))
        np.testing.assert_array_equal(onnx_mask, keras_mask)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "t-onnx.tif"),
                                  tifffile.imread(tmp_path / "t-keras.tif"))
    np.testing.assert_allclose(tifffile.imread(tmp_path / "t-onnx.prob.tif").astype(np.float32),
                               tifffile.imread(tmp_path / "t-keras.prob.tif").astype(np.float32),
                               atol=1e-3)
    scores = [json.loads((tmp_path / f"e-{n}.json").read_text()) for n in ("keras", "onnx")]
    assert scores[0]["confusion"] == scores[1]["confusion"]
    r = runner.invoke(app, ["info", "--model", str(onnx_model)])
    assert r.exit_code == 0 and "disc" in r.output and "stride 8" in r.output
    r = runner.invoke(app, ["predict", str(src), "--out", str(tmp_path / "x"), "--model",
                            str(onnx_model), "--precision", "bfloat16"])
    assert r.exit_code == 2 and "float32" in r.output


# --------------------------------------------------------------------------- errors


def test_usage_errors_exit_2(tmp_path, tiny_model, exports):
    def export(*args):
        return runner.invoke(app, ["export", "--model", str(tiny_model), *map(str, args)])

    r = export("--format", "onnx", "--out", tmp_path / "m.tflite")
    assert r.exit_code == 2 and "must end in .onnx" in r.output
    r = export("--format", "pytorch", "--out", tmp_path / "m.pt")
    assert r.exit_code == 2 and "onnx, saved_model, litert" in r.output
    (tmp_path / "there.tflite").write_bytes(b"old")
    r = export("--format", "litert", "--out", tmp_path / "there.tflite")
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (tmp_path / "there.tflite").read_bytes() == b"old"
    r = runner.invoke(app, ["export", "--model", str(exports("onnx")), "--format", "litert",
                            "--out", str(tmp_path / "again.tflite")])
    assert r.exit_code == 2 and ".keras" in r.output
    r = runner.invoke(app, ["info", "--model", str(tiny_model.with_suffix(".onnx"))])
    assert r.exit_code == 2


def test_overwrite_replaces_only_a_saved_model_and_never_the_source(tmp_path, tiny_model, exports):
    run = tmp_path / "run"
    run.mkdir()
    model = run / "model.keras"
    model.write_bytes(tiny_model.read_bytes())
    (run / "checkpoint.keras").write_bytes(b"weeks of training")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "a-file").write_text("not a folder")
    for out, model_path, message in [
        (run, model, "holds the model being exported"),
        (mine, tiny_model, "not a SavedModel"),
        (model, model, "is the model being exported"),  # a SavedModel is a folder, never a file
        (tmp_path / "a-file", tiny_model, "a SavedModel is a folder"),
        (tmp_path / "a-file" / "sm", tiny_model, "is a file, not a folder"),  # cannot be written
    ]:
        r = runner.invoke(app, ["export", "--model", str(model_path), "--format", "saved_model",
                                "--out", str(out), "--overwrite"])
        assert r.exit_code == 2 and message in r.output, r.output
    assert (run / "checkpoint.keras").read_bytes() == b"weeks of training"
    assert model.read_bytes() == tiny_model.read_bytes()
    assert (mine / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "a-file").read_text() == "not a folder"
    r = runner.invoke(app, ["export", "--format", "onnx", "--model", str(tiny_model),
                            "--out", str(tmp_path / "a-file" / "m.onnx")])
    assert r.exit_code == 2 and "is a file, not a folder" in r.output, r.output


def test_missing_extra_names_the_install_command(tmp_path, tiny_model, monkeypatch, exports):
    import sys

    onnx_model = exports("onnx")
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import fails as if not installed
    r = runner.invoke(app, ["export", "--model", str(tiny_model), "--format", "onnx",
                            "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "pip install 'segnet-cli[onnx]'" in r.output
    assert not (tmp_path / "m.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    write_png(tmp_path / "in" / "a.png", shapes_image(20, 20)[0])
    r = runner.invoke(app, ["predict", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                            "--model", str(onnx_model)])
    assert r.exit_code == 2 and "pip install 'segnet-cli[onnx]'" in r.output
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    r = runner.invoke(app, ["export", "--model", str(tiny_model), "--format", "litert",
                            "--out", str(tmp_path / "m.tflite")])
    assert r.exit_code == 2 and "pip install 'segnet-cli[litert]'" in r.output


@pytest.mark.parametrize("fmt", ["onnx", "saved_model", "litert"])
def test_failed_parity_check_leaves_nothing(fmt, tmp_path, tiny_model, monkeypatch):
    """An export whose file disagrees with Keras is not left behind (nor its temporary)."""
    need(fmt)
    from segnet_cli import export as export_mod

    real = export_mod.runner

    def broken(f, path):
        run = real(f, path)
        return lambda x: np.flip(run(x), axis=2).copy()  # a converter that mirrors the image

    monkeypatch.setattr(export_mod, "runner", broken)
    out = tmp_path / f"m{SUFFIX[fmt] or '_sm'}"
    r = runner.invoke(app, ["export", "--model", str(tiny_model), "--format", fmt,
                            "--out", str(out)])
    assert r.exit_code == 1 and "disagrees" in r.output, r.output
    assert list(tmp_path.iterdir()) == []
    assert not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["onnx", "litert"])
def test_converter_that_cannot_handle_a_layer_names_it(fmt, tmp_path, tiny_model, monkeypatch):
    """An op the converter lacks (here a Bessel function slipped into the unpooling)."""
    need(fmt)
    import tensorflow as tf

    from segnet_cli.model import layers

    real = layers._unpool

    def unpool(values, where, reference, kh, kw, export=False):
        out = real(values, where, reference, kh, kw, export)
        return out + 0.0 * tf.math.bessel_i0e(out) if export else out

    monkeypatch.setattr(layers, "_unpool", unpool)
    out = tmp_path / f"m{SUFFIX[fmt]}"
    r = runner.invoke(app, ["export", "--model", str(tiny_model), "--format", fmt,
                            "--out", str(out)])
    assert r.exit_code == 1, r.output
    assert "cannot handle layer 'unpool" in r.output and "MaxUnpooling2D" in r.output
    assert "BesselI0e" in r.output
    assert list(tmp_path.iterdir()) == []


def test_unknown_layer_is_named_before_converting():
    import keras

    from segnet_cli.config import ExportFormat
    from segnet_cli.errors import ExportError
    from segnet_cli.export import check_layers

    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.UpSampling2D(name="up")(inputs))
    with pytest.raises(ExportError, match="layer 'up' \\(UpSampling2D\\)"):
        check_layers(model, ExportFormat.ONNX)
