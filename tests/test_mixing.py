"""``segnet train --mix``: CutMix and ClassMix of the crops of a batch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_train import data, quiet, tiny  # noqa: F401  (data: the shared fixture)
from typer.testing import CliRunner

from segnet_cli.cli import app
from segnet_cli.config import Mix, TrainConfig
from segnet_cli.mixing import mix_batch
from segnet_cli.model.modelfile import read_info
from segnet_cli.train import CHECKPOINT, make_dataset, run_train

runner = CliRunner()
K = 5


def batch(b: int = 4, h: int = 23, w: int = 31, seed: int = 0):
    """Crops whose pixels say where they came from: image value = crop index + 1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, size=(b, h, w)).astype(np.int32)
    weights = rng.uniform(0.5, 2.0, size=(b, h, w)).astype(np.float32)
    weights[:, :3] = 0.0  # ignored pixels (void, padding): their label is 0
    labels[:, :3] = 0
    images = np.broadcast_to(np.arange(1, b + 1, dtype=np.float32)[:, None, None, None],
                             (b, h, w, 3)).copy()
    return images, labels, weights


def run(mode: Mix, prob: float, seed=(3, 4), b: int = 4):
    images, labels, weights = batch(b)
    out = mix_batch(images, labels, weights, np.array(seed, np.int64), mode, prob, K)
    return (images, labels, weights), tuple(np.asarray(t) for t in out)


def pasted(before, after):
    """Where each crop took the next crop's pixels, checked to be whole pixels of it."""
    images, labels, weights = before
    mi, ml, mw = after
    nxt = [np.roll(t, -1, axis=0) for t in before]
    took = mi[..., 0] != images[..., 0]
    np.testing.assert_array_equal(mi[..., 0], np.where(took, nxt[0][..., 0], images[..., 0]))
    # A pasted pixel brings its label and weight; the others keep their own.
    np.testing.assert_array_equal(ml, np.where(took, nxt[1], labels))
    np.testing.assert_array_equal(mw, np.where(took, nxt[2], weights))
    assert mi.dtype == images.dtype and ml.dtype == labels.dtype
    return took


def test_classmix_pastes_whole_classes_of_the_next_crop_and_never_its_ignored_pixels():
    before, after = run(Mix.CLASSMIX, 1.0)
    took = pasted(before, after)
    other_labels = np.roll(before[1], -1, axis=0)
    other_weights = np.roll(before[2], -1, axis=0)
    assert not took[other_weights == 0].any()
    counts = []
    for b in range(took.shape[0]):
        counted = other_weights[b] > 0
        taken = set()
        for c in range(K):
            mask = counted & (other_labels[b] == c)
            share = took[b][mask].mean()
            assert share in (0.0, 1.0), "a class is pasted whole or not at all"
            if share:
                taken.add(c)
        counts.append(len(taken))
    # About half of the five classes, drawn per crop; not all, not none, over the batch.
    assert 0 < sum(counts) < K * len(counts)


def cutmix_reference(seed, b: int, h: int, w: int) -> np.ndarray:
    """CutMix's rectangles in NumPy, from the same stateless draws as ``mix_masks``."""
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(tf.constant(seed, tf.int64), num=4)
    mixed = tf.random.stateless_uniform([b], s[0]).numpy() < 1.0
    area = tf.random.stateless_uniform([b], s[1]).numpy()
    centre = tf.random.stateless_uniform([b, 2], s[2]).numpy()
    rows = np.arange(h)[None, :] + 0.5
    cols = np.arange(w)[None, :] + 0.5
    in_rows = np.abs(rows - centre[:, :1] * h) < (h * np.sqrt(area) / 2)[:, None]
    in_cols = np.abs(cols - centre[:, 1:] * w) < (w * np.sqrt(area) / 2)[:, None]
    return in_rows[:, :, None] & in_cols[:, None, :] & mixed[:, None, None]


def test_cutmix_pastes_one_rectangle_of_the_drawn_size_ignored_pixels_included():
    pasted_ignored = False
    for seed in range(6):
        before, after = run(Mix.CUTMIX, 1.0, seed=(seed, 1))
        took = pasted(before, after)
        b, h, w = took.shape
        np.testing.assert_array_equal(took, cutmix_reference((seed, 1), b, h, w))
        for i in range(b):
            rows, cols = np.nonzero(took[i])
            if rows.size:
                box = np.zeros_like(took[i])
                box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
                np.testing.assert_array_equal(took[i], box)
        # The next crop's ignored pixels come along, and stay ignored.
        ignored = took & (np.roll(before[2], -1, axis=0) == 0)
        pasted_ignored |= bool(ignored.any())
        assert (after[2][ignored] == 0).all()
    assert pasted_ignored


def test_mixing_needs_two_crops_a_batch_and_mix_prob_needs_mix(data):  # noqa: F811
    from segnet_cli.errors import UsageError

    with pytest.raises(UsageError, match="--batch-size of 2 or more"):
        tiny(data, data / "unused", batch_size=1, mix=Mix.CUTMIX)
    with pytest.raises(UsageError, match="--mix-prob needs --mix"):
        tiny(data, data / "unused", mix_prob=0.3)


@pytest.mark.parametrize("mode,prob", [(Mix.NONE, 1.0), (Mix.CLASSMIX, 0.0), (Mix.CUTMIX, 0.0)])
def test_no_mix_leaves_the_batch_as_it_was(mode, prob):
    before, after = run(mode, prob)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_mixing_is_a_function_of_the_seed_and_prob_mixes_some_crops():
    _, a = run(Mix.CLASSMIX, 0.5, seed=(1, 2), b=16)
    _, b = run(Mix.CLASSMIX, 0.5, seed=(1, 2), b=16)
    _, c = run(Mix.CLASSMIX, 0.5, seed=(2, 2), b=16)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])
    images, _, _ = batch(16)
    changed = (a[0] != images).any(axis=(1, 2, 3))
    assert 0 < changed.sum() < 16


def batches(config: TrainConfig, pairs, classes, n: int = 3):
    ds = make_dataset(pairs, classes, 3, np.ones(classes.num_classes, np.float32), config)
    return [tuple(t.numpy() for t in item) for item in ds.take(n)]


def test_the_training_stream_mixes_its_own_crops_deterministically(data):  # noqa: F811
    from segnet_cli.classes import load_classes
    from segnet_cli.dataset import find_pairs

    base = tiny(data, data / "unused", batch_size=3)
    classes = load_classes(base.classes)
    pairs, _ = find_pairs(base.images, None)
    plain = batches(base, pairs, classes)
    mixed = batches(replace(base, mix=Mix.CLASSMIX, mix_prob=1.0), pairs, classes)
    again = batches(replace(base, mix=Mix.CLASSMIX, mix_prob=1.0), pairs, classes)
    for p, m, a in zip(plain, mixed, again):
        for x, y in zip(m, a):
            np.testing.assert_array_equal(x, y)
        # Every pixel is its own crop's or the next crop's, as the unmixed stream has them.
        nxt = [np.roll(t, -1, axis=0) for t in p]
        own = (m[0] == p[0]).all(-1) & (m[1] == p[1]) & (m[2] == p[2])
        other = (m[0] == nxt[0]).all(-1) & (m[1] == nxt[1]) & (m[2] == nxt[2])
        assert (own | other).all()
    assert any(not np.array_equal(p[1], m[1]) for p, m in zip(plain, mixed))


def test_mix_trains_is_recorded_and_resumes_exactly(data, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    r = run_train(tiny(data, straight, mix=Mix.CLASSMIX, mix_prob=0.75), log=quiet)
    assert r.return_code == 0 and r.details["epochs"] == 2
    config = read_info(straight / CHECKPOINT).training["config"]
    assert (config["mix"], config["mix_prob"]) == ("classmix", 0.75)
    # Stopped after one epoch and resumed: the same losses as the run straight through.
    cut = tmp_path / "cut"
    first = tiny(data, cut, mix=Mix.CLASSMIX, mix_prob=0.75, max_minutes=0)
    assert run_train(first, log=quiet).details["stopped_early"]
    run_train(TrainConfig(images=None, out=cut, resume=True), log=quiet)
    a = read_info(straight / CHECKPOINT).training["history"]
    b = read_info(cut / CHECKPOINT).training["history"]
    assert len(a) == len(b) == 2
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], rel=1e-5)
    # --resume keeps the run's mixing and refuses another.
    r = runner.invoke(app, ["train", "--resume", "--out", str(cut), "--mix", "cutmix"])
    assert r.exit_code == 2 and "--mix cutmix" in r.stderr


def test_mix_options_on_the_command_line(data, tmp_path):  # noqa: F811
    out = tmp_path / "cli"
    r = runner.invoke(app, [
        "train", str(data / "train"), "--out", str(out), "--classes",
        str(data / "classes.json"), "--width", "0.0625", "--stages", "2", "--crop", "31x29",
        "-b", "2", "--epochs", "1", "--mix", "cutmix", "--mix-prob", "0.25",
    ])
    assert r.exit_code == 0, r.output
    config = read_info(out / "model.keras").training["config"]
    assert (config["mix"], config["mix_prob"]) == ("cutmix", 0.25)


@pytest.mark.parametrize("args", [["--mix", "mosaic"], ["--mix-prob", "1.5"],
                                  ["--mix-prob", "nan"], ["--mix-prob", "-0.1"]])
def test_bad_mix_options_are_refused_before_any_data_is_read(tmp_path, args):
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", str(tmp_path / "no-such-images"), "--out", str(out), *args])
    assert r.exit_code == 2, r.output
    assert args[0] in r.stderr and "not found" not in r.stderr
    assert not out.exists()


def test_mixing_pastes_soft_targets_with_their_pixels():
    images, labels, weights = batch()
    targets = np.eye(K, dtype=np.float32)[labels]  # each pixel's target: its own class
    seed = np.array((3, 4), np.int64)
    plain = mix_batch(images, labels, weights, seed, Mix.CLASSMIX, 1.0, K)
    out = [np.asarray(t) for t in
           mix_batch(images, labels, weights, seed, Mix.CLASSMIX, 1.0, K, targets=targets)]
    assert len(out) == 4
    for a, b in zip(out[:3], plain):  # the targets change nothing else
        np.testing.assert_array_equal(a, np.asarray(b))
    assert (out[1] != labels).any()
    np.testing.assert_array_equal(out[3], np.eye(K, dtype=np.float32)[out[1]])
