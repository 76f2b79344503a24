"""``segnet train --teacher``: distillation from the teachers' soft targets."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_train import data, quiet, sha256, straight, tiny  # noqa: F401  (shared fixtures)
from typer.testing import CliRunner

from segnet_cli.cli import app
from segnet_cli.config import Loss, Mix, TrainConfig
from segnet_cli.errors import ModelFileError, UsageError
from segnet_cli.model.modelfile import read_info
from segnet_cli.train import CHECKPOINT, make_dataset, run_train

runner = CliRunner()


def stream(config: TrainConfig, one_hot: bool = True):
    """The training batches of ``config`` with each pair's mask, one-hot, as its targets."""
    from segnet_cli.classes import load_classes
    from segnet_cli.dataset import find_pairs, load_mask

    classes = load_classes(config.classes)
    pairs, _ = find_pairs(config.images, None)
    eye = np.eye(classes.num_classes)
    targets = [(eye[load_mask(p.mask, classes, False)] * 255).astype(np.uint8) for p in pairs]
    ds = make_dataset(pairs, classes, 3, np.ones(classes.num_classes), config, 0, targets)
    return list(ds.as_numpy_iterator())


def test_targets_follow_their_pixels_through_padding_flips_and_mixing(data):  # noqa: F811
    # Scale 1: no resampling, so each pixel's target is exactly its mask's class. The
    # 25x27 image is smaller than the 31x29 crop: its padding has no class and no target.
    base = tiny(data, data / "unused", batch_size=3, scale=(1.0, 1.0), epochs=4)
    for config in (base, replace(base, mix=Mix.CLASSMIX, mix_prob=1.0)):
        batches = stream(config)
        assert len(batches) == 8
        for _x, y, w in batches:
            assert y.shape == (3, 31, 29, 4)
            label, t = y[..., 0], y[..., 1:]
            valid = w > 0
            np.testing.assert_array_equal(t.sum(-1), valid.astype(np.float32))
            np.testing.assert_array_equal(np.argmax(t, -1)[valid], label[valid])
        assert any((w == 0).any() for _x, _y, w in batches)  # the padded image was drawn
    # Scaled, the targets are resampled bilinearly and the mask by nearest neighbour: they
    # disagree only along class edges.
    agree = [
        (np.argmax(y[..., 1:], -1) == y[..., 0])[w > 0].mean()
        for _x, y, w in stream(replace(base, scale=(0.6, 1.4)))
    ]
    assert np.mean(agree) > 0.9


def test_a_distilled_run_records_its_teachers_and_resumes_exactly(data, straight, tmp_path):  # noqa: F811
    import keras

    from segnet_cli.losses import DistillationLoss

    teacher = straight / "model.keras"
    whole = tmp_path / "whole"
    messages: list[str] = []
    r = run_train(tiny(data, whole, teachers=(teacher,), distill=0.7), log=messages.append)
    assert r.return_code == 0 and r.details["epochs"] == 2
    assert any(m.startswith("teacher targets: 6 images x 1 teacher(s)") for m in messages)
    training = read_info(whole / "model.keras").training
    assert training["config"]["teachers"] == [str(teacher.absolute())]
    assert training["config"]["distill"] == 0.7
    assert training["teachers"] == [{"path": str(teacher.absolute()), "sha256": sha256(teacher)}]
    compiled = keras.saving.load_model(str(whole / CHECKPOINT), compile=True)
    assert isinstance(compiled.loss, DistillationLoss) and compiled.loss.alpha == 0.7
    # Stopped after one epoch and resumed: the targets are computed again, the same.
    cut = tmp_path / "cut"
    first = tiny(data, cut, teachers=(teacher,), distill=0.7, max_minutes=0)
    assert run_train(first, log=quiet).details["stopped_early"]
    assert run_train(TrainConfig(images=None, out=cut, resume=True), log=quiet).done == 1
    a = read_info(whole / CHECKPOINT).training["history"]
    b = read_info(cut / CHECKPOINT).training["history"]
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], rel=1e-5)


def test_targets_are_the_teachers_mean_mirrored_probabilities(data, straight, tmp_path):  # noqa: F811
    from segnet_cli.config import TTA, TilingConfig
    from segnet_cli.jobs import SignalGuard
    from segnet_cli.model.segmenter import open_segmenter
    from segnet_cli.pipeline import image_probabilities
    from segnet_cli.train import _load_data, _Start, _teacher_targets

    other = tmp_path / "other"
    run_train(tiny(data, other, epochs=1, seed=5), log=quiet)
    teachers = (straight / "model.keras", other / "model.keras")
    config = tiny(data, tmp_path / "unused", teachers=teachers)
    guard = SignalGuard()
    got = _teacher_targets(config, _load_data(config, _Start(), guard, quiet), guard, quiet)
    assert len(got.targets) == len(got.pairs) == 6
    segs = [open_segmenter(t) for t in teachers]
    tiling = TilingConfig()
    for pair, t in zip(got.pairs, got.targets):
        from segnet_cli.io.images import read_image, to_model_input

        x = to_model_input(read_image(pair.image), 3, pair.image)
        probs = [image_probabilities(s, x, tiling, TTA.FLIP) for s in segs]
        want = np.round(255 * (probs[0] + probs[1]) / 2)
        assert t.dtype == np.uint8 and t.shape == (*x.shape[:2], 3)
        assert np.abs(t - want).max() <= 1 and (t == want).mean() > 0.99
        # The mean, not either teacher alone (their probabilities differ).
        assert (np.abs(t - np.round(255 * probs[0])) > 2).any()
        assert (np.abs(t - np.round(255 * probs[1])) > 2).any()


def test_a_distilled_run_in_mixed_bfloat16(data, straight, tmp_path):  # noqa: F811
    import keras

    out = tmp_path / "bf16"
    config = tiny(data, out, epochs=1, precision="bfloat16", teachers=(straight / "model.keras",))
    r = run_train(config, log=quiet)
    assert r.return_code == 0 and keras.mixed_precision.global_policy().name == "float32"
    assert np.isfinite(read_info(out / CHECKPOINT).training["history"][0]["loss"])


def test_resume_takes_the_teachers_where_they_are_now_but_only_the_same_ones(
    data, straight, tmp_path  # noqa: F811
):
    teacher = Path(shutil.copy(straight / "model.keras", tmp_path / "teacher.keras"))
    out = tmp_path / "run"
    run_train(tiny(data, out, epochs=3, teachers=(teacher,), max_minutes=0), log=quiet)
    # Moved: given where it is now, the same file continues the run.
    moved = Path(shutil.move(teacher, tmp_path / "moved.keras"))
    with pytest.raises(ModelFileError, match="give --teacher with where it is now"):
        run_train(TrainConfig(images=None, out=out, resume=True), log=quiet)
    r = run_train(TrainConfig(images=None, out=out, resume=True, teachers=(moved,),
                              max_minutes=0), log=quiet)  # fmt: skip
    assert r.done == 1
    # Another model (the same classes, other weights) at either path is refused, and so is
    # another number of teachers.
    shutil.copy(straight / CHECKPOINT, moved)
    with pytest.raises(UsageError, match="not one of the models the run began with"):
        run_train(TrainConfig(images=None, out=out, resume=True, teachers=(moved,)), log=quiet)
    r = runner.invoke(app, ["train", "--resume", "--out", str(out), "--teacher",
                            str(moved), "--teacher", str(moved)])  # fmt: skip
    assert r.exit_code == 2 and "--teacher" in r.stderr
    assert read_info(out / CHECKPOINT).training["epoch"] == 2


def test_resume_with_two_teachers_in_any_order_but_not_with_one_changed(
    data, straight, tmp_path  # noqa: F811
):
    a = Path(shutil.copy(straight / "model.keras", tmp_path / "a.keras"))
    b = Path(shutil.copy(straight / CHECKPOINT, tmp_path / "b.keras"))
    out = tmp_path / "run"
    run_train(tiny(data, out, epochs=3, teachers=(a, b), max_minutes=0), log=quiet)
    r = run_train(TrainConfig(images=None, out=out, resume=True, teachers=(b, a),
                              max_minutes=0), log=quiet)  # fmt: skip
    assert r.done == 1
    shutil.copy(a, b)  # b now holds a's model: one of the two is another
    with pytest.raises(UsageError, match="not one of the models") as err:
        run_train(TrainConfig(images=None, out=out, resume=True), log=quiet)
    assert err.value.path == b
    with pytest.raises(UsageError, match="contradict them: --teacher"):
        run_train(TrainConfig(images=None, out=out, resume=True, teachers=(a,)), log=quiet)


def test_teacher_refusals(data, straight, tiny_model, tmp_path):  # noqa: F811
    from conftest import make_model_file

    teacher = straight / "model.keras"
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="--distill needs at least one --teacher"):
        tiny(data, out, distill=0.3)
    with pytest.raises(UsageError, match="--teacher trains with --loss ce"):
        tiny(data, out, teachers=(teacher,), loss=Loss.CE_LOVASZ)
    with pytest.raises(UsageError, match="--distill must be from 0 to 1"):
        tiny(data, out, teachers=(teacher,), distill=1.5)
    four = make_model_file(tmp_path / "four.keras", num_classes=4)
    cases = [
        (dict(teachers=(tiny_model,)), UsageError, "other classes"),  # other class names
        (dict(teachers=(four,)), UsageError, "other classes"),
        (dict(teachers=(tmp_path / "none.keras",)), ModelFileError, "model file not found"),
    ]
    for kw, error, message in cases:
        messages: list[str] = []
        with pytest.raises(error, match=message):
            run_train(tiny(data, out, **kw), log=messages.append)
        assert not any("verifying" in m for m in messages), kw  # before any pair is read
        assert not out.exists(), kw
    wide = make_model_file(tmp_path / "wide.keras", in_channels=4,
                           class_names=("ground", "disc", "square"))  # fmt: skip
    cases = [
        (dict(teachers=(teacher,), cache_mb=0.001), UsageError, "raise it"),
        (dict(teachers=(teacher, wide)), UsageError, "take different numbers of channels"),
        (dict(teachers=(wide,)), UsageError, "--teacher takes 4-channel images"),
    ]
    for kw, error, message in cases:
        messages = []
        with pytest.raises(error, match=message):
            run_train(tiny(data, out, **kw), log=messages.append)
        # Only the last needs the images' channels, known once they are verified.
        assert not any("verifying" in m for m in messages) or "4-channel" in message, kw
        assert not out.exists(), kw


def test_teacher_options_on_the_command_line(data, straight, tmp_path):  # noqa: F811
    teacher = straight / "model.keras"
    common = ["--classes", str(data / "classes.json"), "--width", "0.0625", "--stages", "2",
              "--crop", "31x29", "-b", "2", "--epochs", "1"]  # fmt: skip
    out = tmp_path / "cli"
    r = runner.invoke(app, ["train", str(data / "train"), "--out", str(out), *common,
                            "--teacher", str(teacher), "--teacher", str(teacher),
                            "--distill", "0.25"])  # fmt: skip
    assert r.exit_code == 0, r.output
    config = read_info(out / "model.keras").training["config"]
    assert config["teachers"] == [str(teacher.absolute())] * 2 and config["distill"] == 0.25
    r = runner.invoke(app, ["info", "--model", str(out / "model.keras")])
    assert r.exit_code == 0
    digest = sha256(teacher)[:12]
    assert (f"distilled from 2 teacher(s): model.keras (sha256 {digest}), model.keras "
            f"(sha256 {digest}); distillation share 0.25") in r.output
    r = runner.invoke(app, ["train", str(data / "train"), "--out", str(tmp_path / "x"),
                            *common, "--distill", "0.5"])  # fmt: skip
    assert r.exit_code == 2 and "--distill needs at least one --teacher" in r.stderr
    r = runner.invoke(app, ["train", str(data / "train"), "--out", str(tmp_path / "y"),
                            *common, "--teacher", str(teacher), "--cache-mb", "0.001"])  # fmt: skip
    assert r.exit_code == 2 and "more than --cache-mb 0.001: raise it" in r.stderr
    assert "--teacher" in runner.invoke(app, ["train", "--help"]).output
