"""SegNet model: any size in, same size out; metadata and .keras round trips."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from segnet_cli.errors import ModelFileError
from segnet_cli.model.modelfile import read_info
from segnet_cli.model.network import Architecture


def test_architecture_numbers():
    full = Architecture()
    assert full.widths() == (64, 128, 256, 512, 512)
    assert full.convs() == (2, 2, 3, 3, 3) and sum(full.convs()) == 13
    assert full.stride == 32
    slim = Architecture(width=0.25, stages=3)
    assert slim.widths() == (16, 32, 64) and slim.stride == 8
    # A receptive field grows with depth: 5 stages see far more than 3.
    assert full.receptive_field > slim.receptive_field > 40


def test_full_vgg16_segnet_structure():
    import keras

    from segnet_cli.model.network import build_segnet

    model = build_segnet(Architecture(width=1.0, stages=5, num_classes=11))
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 13 + 13 + 1  # encoder, mirrored decoder, 1x1 classifier
    assert convs[-1].kernel_size == (1, 1)
    assert not any(isinstance(layer, keras.layers.UpSampling2D) for layer in model.layers)
    assert sum(type(layer).__name__ == "MaxUnpooling2D" for layer in model.layers) == 5
    # The paper's SegNet has ~29.4M parameters (VGG16's 13 convs, mirrored).
    assert 29_000_000 < model.count_params() < 30_000_000


@pytest.mark.parametrize("channels", [1, 3, 4, 6])
@pytest.mark.parametrize("hw", [(1, 1), (3, 3), (37, 53), (1, 300), (64, 64)])
def test_any_size_in_same_size_out(channels, hw):
    from segnet_cli.model.network import build_segnet

    model = build_segnet(Architecture(width=0.0625, stages=3, in_channels=channels, num_classes=4))
    x = np.random.default_rng(0).random((2, *hw, channels)).astype(np.float32)
    y = model(x, training=False)
    assert tuple(y.shape) == (2, *hw, 4)
    assert np.isfinite(np.asarray(y)).all()


def test_keras_round_trip_identical_outputs(tiny_model, tmp_path):
    import keras

    from segnet_cli.model.network import load_model

    model, info = load_model(tiny_model)
    assert info.class_names == ("background", "disc", "square") and info.stride == 8
    # Plain Keras loads the same file with safe mode on (custom layers registered on import).
    import segnet_cli.model.layers  # noqa: F401

    plain = keras.saving.load_model(str(tiny_model), safe_mode=True, compile=False)
    x = np.random.default_rng(2).random((1, 37, 53, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(plain(x)))
    # No Lambda layers anywhere.
    assert not any(type(layer).__name__ == "Lambda" for layer in model.layers)


def test_fold_batch_norm_keeps_the_function(tiny_model):
    """The inference form (no batch norm, biased convolutions) computes the same logits."""
    import keras

    from segnet_cli.model.network import build_segnet, fold_batch_norm, load_model

    model, info = load_model(tiny_model)
    arch = Architecture(**{k: info.architecture[k] for k in ("width", "stages", "in_channels", "num_classes")})
    folded = build_segnet(arch, info.scaling.mean, info.scaling.std, batch_norm=False)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    fold_batch_norm(model, folded)
    x = np.random.default_rng(5).random((2, 37, 53, 3)).astype(np.float32)
    want = np.asarray(model(x, training=False))
    got = np.asarray(folded(x, training=False))
    assert np.abs(want).max() > 0.1  # a non-trivial function to compare
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # A model of another shape is refused by name, not silently half-copied.
    other = build_segnet(Architecture(width=0.0625, stages=4, num_classes=3), batch_norm=False)
    with pytest.raises(ValueError, match="missing"):
        fold_batch_norm(model, other)


def test_dropout_stages_are_the_central_ones():
    assert Architecture(stages=5, dropout=0.5).dropout_stages() == (3, 4, 5)
    assert Architecture(stages=4, dropout=0.5).dropout_stages() == (3, 4)  # "central four"
    assert Architecture(stages=3, dropout=0.5).dropout_stages() == (3,)
    assert Architecture(stages=2, dropout=0.1).dropout_stages() == (2,)
    assert Architecture(stages=1, dropout=0.1).dropout_stages() == (1,)
    assert Architecture(stages=5).dropout_stages() == ()


def test_dropout_acts_in_training_only_and_survives_save_and_load(tmp_path):
    """Dropout changes nothing at inference, in the saved model or in its inference form."""
    import keras

    from segnet_cli.model.modelfile import ModelInfo
    from segnet_cli.model.network import build_segnet, load_model, save_model
    from segnet_cli.model.segmenter import Segmenter

    keras.utils.set_random_seed(1)
    arch = Architecture(width=0.0625, stages=3, num_classes=3)
    with_dropout = build_segnet(Architecture(width=0.0625, stages=3, num_classes=3, dropout=0.5))
    plain = build_segnet(arch)
    Dropout = keras.layers.Dropout
    dropouts = [layer.name for layer in with_dropout.layers if isinstance(layer, Dropout)]
    assert dropouts == ["pool3_dropout", "dec3_dropout"]
    assert [w.path for w in with_dropout.weights] == [w.path for w in plain.weights]
    plain.set_weights(with_dropout.get_weights())
    x = np.random.default_rng(3).random((2, 37, 53, 3)).astype(np.float32)
    want = np.asarray(plain(x, training=False))
    np.testing.assert_array_equal(np.asarray(with_dropout(x, training=False)), want)
    # In training both use batch statistics, so dropout is the only difference. A call in
    # training mode moves the batch norms' statistics: put them back after.
    weights = with_dropout.get_weights()
    trained_plain = np.asarray(plain(x, training=True))
    trained_dropout = np.asarray(with_dropout(x, training=True))
    assert np.abs(trained_dropout - trained_plain).max() > 1e-3
    with_dropout.set_weights(weights)

    info = ModelInfo(
        class_names=("a", "b", "c"), palette=((0, 0, 0), (255, 0, 0), (0, 255, 0)),
        in_channels=3, stride=8,
        architecture={"width": 0.0625, "stages": 3, "in_channels": 3, "num_classes": 3,
                      "dropout": 0.5},
    )
    path = save_model(with_dropout, info, tmp_path / "dropout.keras")
    loaded, loaded_info = load_model(path)
    assert loaded_info.architecture["dropout"] == 0.5
    assert [layer.rate for layer in loaded.layers if isinstance(layer, Dropout)] == [0.5, 0.5]
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), want)
    seg = Segmenter(path)
    assert not any(isinstance(layer, Dropout) for layer in seg.model.layers)
    np.testing.assert_allclose(seg.run(x), want, rtol=1e-4, atol=1e-4)


def test_metadata_refuses_a_dropout_rate_outside_0_to_1():
    from segnet_cli.model.modelfile import ModelInfo

    base = {"class_names": ["a", "b"], "palette": [[0, 0, 0], [9, 9, 9]], "in_channels": 3,
            "stride": 8, "architecture": {"stages": 3}}
    assert ModelInfo.from_dict(base).architecture == {"stages": 3}
    for bad in (1, 1.5, -0.1, "0.5", None):
        with pytest.raises(ValueError, match="architecture.dropout"):
            ModelInfo.from_dict({**base, "architecture": {"stages": 3, "dropout": bad}})


def test_segmenter_runs_the_folded_model_compiled_or_not(tiny_model):
    """A shape's first batch (plain trace) and later ones (XLA windows) give the saved model's logits."""
    from segnet_cli.model.network import load_model
    from segnet_cli.model.segmenter import Segmenter

    seg = Segmenter(tiny_model)
    model, _ = load_model(tiny_model)
    x = np.random.default_rng(6).random((2, 37, 53, 3)).astype(np.float32)
    want = np.asarray(model(x, training=False))
    first, again = seg.logits(x), seg.logits(x)
    assert seg._shapes[x.shape] == 2
    np.testing.assert_allclose(first, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-5)


def test_segmenter_reduces_logits_where_the_model_runs(tiny_model):
    from segnet_cli.model.segmenter import Segmenter

    seg = Segmenter(tiny_model)
    x = np.random.default_rng(7).random((3, 37, 53, 3)).astype(np.float32)
    logits = seg.run(x, "logits")
    classes = seg.run(x, "classes")
    assert classes.dtype == np.uint8 and classes.shape == (3, 37, 53)
    np.testing.assert_array_equal(classes, np.argmax(logits, -1))
    classes2, conf = seg.run(x, "confidence")
    np.testing.assert_array_equal(classes2, classes)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(conf, (e / e.sum(-1, keepdims=True)).max(-1), rtol=1e-5)
    with pytest.raises(ValueError, match="output must be"):
        seg.run(x, "probabilities")


def test_missing_corrupt_foreign_model_files(tmp_path, tiny_model):
    from segnet_cli.model.network import load_model

    with pytest.raises(ModelFileError, match="not found"):
        read_info(tmp_path / "nope.keras")
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(ModelFileError, match="corrupt or foreign") as e:
        load_model(bad)
    assert str(bad) in str(e.value)
    foreign = tmp_path / "foreign.keras"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("config.json", "{}")
    with pytest.raises(ModelFileError, match="without segnet metadata"):
        read_info(foreign)
    # Metadata fine but the weights archive truncated: a one-line error naming the file.
    data = tiny_model.read_bytes()
    cut = tmp_path / "cut.keras"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError) as e:
        load_model(cut)
    assert str(cut) in str(e.value) and "\n" not in str(e.value)
    # The exports segnet writes for other runtimes are named for what they are.
    litert = tmp_path / "camvid.tflite"
    litert.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))  # a FlatBuffer's identifier
    saved = tmp_path / "camvid_savedmodel"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    for path, kind in ((litert, "LiteRT"), (saved, "SavedModel")):
        with pytest.raises(ModelFileError, match=f"a {kind} export, which segnet does not read"):
            read_info(path)


def test_conv_flops_matches_keras_layer_shapes():
    """The analytic FLOP count equals the sum over the built model's Conv2D layers."""
    import keras

    from segnet_cli.model.network import build_segnet, conv_flops

    arch = Architecture(width=0.125, stages=4, in_channels=3, num_classes=5)
    model = build_segnet(arch)
    h, w = 45, 61
    x = keras.Input(batch_shape=(1, h, w, 3))
    # Walk the graph at a concrete size: output shapes of each conv at 45x61.
    probe = keras.Model(model.inputs, [layer.output for layer in model.layers if isinstance(layer, keras.layers.Conv2D)])
    outs = probe(np.zeros((1, h, w, 3), np.float32))
    total = 0
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    for layer, out in zip(convs, outs):
        kh, kw, cin, cout = layer.kernel.shape
        total += 2 * out.shape[1] * out.shape[2] * kh * kw * cin * cout
    assert conv_flops(arch, h, w) == total
    del x


def test_headline_prefers_validation_then_held_out(tiny_model):
    """Validation figures (recorded, else the history's best epoch) come first; a model whose
    final fit saw its validation split quotes held-out figures, labelled so."""
    import dataclasses

    info = read_info(tiny_model)
    val = {"mean_iou": 0.6}
    held = {"mean_iou": 0.4, "split": "drive B"}
    history = [{"epoch": 1, "val_miou": 0.3}, {"epoch": 2, "val_miou": 0.5}, {"epoch": 3}]
    cases = [
        ({"val": val, "held_out": held}, ("val", val)),
        ({"history": history, "held_out": held}, "history"),
        ({"history": [{"epoch": 1}], "held_out": held}, ("held-out", held)),
        ({"history": [{"epoch": 1}]}, None),
    ]
    for training, expected in cases:
        got = dataclasses.replace(info, training=training).headline()
        if expected == "history":
            assert got[0] == "val" and got[1]["mean_iou"] == 0.5 and got[1]["epoch"] == 2
        else:
            assert got == expected, training


def test_replace_info_keeps_weights(tiny_model, tmp_path):
    import dataclasses
    import shutil

    from segnet_cli.model.modelfile import replace_info
    from segnet_cli.model.network import load_model

    copy = tmp_path / "m.keras"
    shutil.copyfile(tiny_model, copy)
    info = read_info(copy)
    val = {"mean_iou": 0.5, "global_accuracy": 0.8, "class_accuracy": 0.6, "per_class_iou": [0.5] * 3}
    replace_info(copy, dataclasses.replace(info, training={"val": val}))
    assert read_info(copy).validation() == val
    a, _ = load_model(tiny_model)
    b, _ = load_model(copy)
    x = np.random.default_rng(0).random((1, 16, 24, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))
