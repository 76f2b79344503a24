"""`segnet train` on a tiny generated dataset: loss, model file, exact resume, kill, weights.

Everything is tiny (a 2-stage SegNet of width 0.0625, 37x53 images, 31x29 crops, batch 2),
so a training run costs a few seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model_file, shapes_image, write_png
from typer.testing import CliRunner

from segnet_cli.cli import app
from segnet_cli.config import DEFAULT_EPOCHS, Loss, TrainConfig
from segnet_cli.errors import DatasetError, LockedError, ModelFileError, NoInputError, UsageError
from segnet_cli.model.modelfile import read_info
from segnet_cli.pipeline import segment_image
from segnet_cli.train import CHECKPOINT, LOCK, epoch_plan, load_class_weights, run_train

runner = CliRunner()
COLOURS = [[10, 10, 10], [230, 25, 75], [60, 180, 75]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Six training pairs (37x53, and one smaller than the crop) and two validation pairs."""
    root = tmp_path_factory.mktemp("shapes")
    sizes = [(37, 53)] * 5 + [(25, 27)]
    for i, (h, w) in enumerate(sizes):
        img, mask = shapes_image(h, w, seed=i)
        write_png(root / "train" / f"s{i}.png", img)
        write_png(root / "trainannot" / f"s{i}.png", mask)
    for i in range(2):
        img, mask = shapes_image(41, 29, seed=10 + i)
        write_png(root / "val" / f"v{i}.png", img)
        write_png(root / "valannot" / f"v{i}.png", mask)
    (root / "classes.json").write_text(json.dumps({"classes": [
        {"name": n, "color": c} for n, c in zip(("ground", "disc", "square"), COLOURS)
    ]}))
    return root


def tiny(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        images=data / "train", out=out, classes=str(data / "classes.json"), width=0.0625,
        stages=2, crop=(31, 29), batch_size=2, epochs=2, learning_rate=0.01, warmup_epochs=1,
    )
    return TrainConfig(**{**base, **kw})


def quiet(_msg: str) -> None:
    pass


def checkpoint_optimizer(path: Path):
    import keras

    import segnet_cli.losses  # noqa: F401
    from segnet_cli.model import layers  # noqa: F401

    return keras.saving.load_model(str(path), compile=True).optimizer


def with_val(data: Path, out: Path, **kw) -> TrainConfig:
    return tiny(data, out, val_images=data / "val", val_masks=data / "valannot", **kw)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """A 2-epoch run with validation, never interrupted (shared: a run costs seconds)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    report = run_train(with_val(data, out), log=quiet)
    assert report.return_code == 0 and report.details["epochs"] == 2
    return out


def test_two_epochs_lower_the_loss_and_ship_a_ready_model(data, straight):
    import keras

    from segnet_cli.classes import load_classes
    from segnet_cli.config import TilingConfig
    from segnet_cli.dataset import find_pairs, verify
    from segnet_cli.model.network import load_model
    from segnet_cli.model.segmenter import Segmenter
    from segnet_cli.train import channel_stats

    out = straight
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"]
    assert all(0 <= h["val_miou"] <= 1 and len(h["val_iou"]) == 3 for h in history)
    csv_lines = (out / "history.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,loss,lr") and len(csv_lines) == 3
    # The schedule's rate, read through the optimizer's public property, decays.
    assert history[0]["lr"] > history[1]["lr"] > 0
    for name in ("checkpoint.keras", "best.keras", "model.keras"):
        assert (out / name).exists(), name

    model, info = load_model(out / "model.keras")
    assert info.class_names == ("ground", "disc", "square")
    assert [list(c) for c in info.palette] == COLOURS
    pairs, _ = find_pairs(data / "train")
    mean, std = channel_stats(pairs, 3)
    assert list(info.scaling.mean) == mean and list(info.scaling.std) == std
    assert info.architecture["stages"] == 2 and info.stride == 4
    # The shipped model carries no optimizer state (the checkpoint does).
    assert getattr(keras.saving.load_model(str(out / "model.keras"), compile=True), "optimizer", None) is None
    assert checkpoint_optimizer(out / "checkpoint.keras") is not None
    # 'auto' class weights are verify's median-frequency weights (tempered by the default
    # --weight-power), recorded in the file.
    vr = verify(pairs, load_classes("3"), weight_power=TrainConfig.weight_power)
    assert info.training["class_weights"] == pytest.approx(vr.weights.tolist())
    # Ready for predict: the engine segments an odd-sized image at full size.
    seg = Segmenter(out / "model.keras")
    img, _ = shapes_image(23, 31, seed=5)
    mask, _ = segment_image(seg, img.astype(np.float32) / 255, TilingConfig())
    assert mask.shape == (23, 31) and mask.max() < 3


def test_interrupted_run_resumes_exactly(data, straight, tmp_path):
    """1 epoch, stop, --resume: the same weights and optimizer state as 2 epochs straight."""
    out = tmp_path / "resumed"
    # A zero time budget stops after the first epoch, as a kill after its checkpoint would.
    r = run_train(with_val(data, out, max_minutes=0), log=quiet)
    assert r.details["stopped_early"] and read_info(out / CHECKPOINT).training["epoch"] == 1
    assert int(checkpoint_optimizer(out / CHECKPOINT).iterations.numpy()) == 3  # 6 pairs / 2

    messages: list[str] = []
    # Only the folder is given: the settings (validation included) come from the checkpoint,
    # and the epochs are the run's own total (2), not the default of a new run.
    r = run_train(TrainConfig(images=None, out=out, resume=True), log=messages.append)
    assert r.details["epochs"] == 2 and r.done == 1
    assert any("resuming after epoch 1 (optimizer step 3)" in m for m in messages)
    state = read_info(out / CHECKPOINT).training
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert "val_miou" in state["history"][1]

    a = checkpoint_optimizer(straight / CHECKPOINT)
    b = checkpoint_optimizer(out / CHECKPOINT)
    assert int(b.iterations.numpy()) == int(a.iterations.numpy()) == 2 * 3
    # The schedule continued from its step: same rate after the same number of steps.
    assert float(b.learning_rate) == pytest.approx(float(a.learning_rate))
    for va, vb in zip(a.variables, b.variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=1e-6, atol=1e-7)
    hist_a = read_info(straight / CHECKPOINT).training["history"]
    for key in ("loss", "lr", "val_miou"):
        assert [h[key] for h in state["history"]] == pytest.approx([h[key] for h in hist_a])

    # Nothing left to do at the planned total; a bigger --epochs extends the run.
    r = run_train(TrainConfig(images=None, out=out, resume=True), log=quiet)
    assert r.done == 0
    r = run_train(TrainConfig(images=data / "train", out=out, resume=True, epochs=3), log=messages.append)
    assert r.done == 1 and read_info(out / CHECKPOINT).training["epoch"] == 3
    assert any("planned for 2 epochs" in m for m in messages)


def test_resume_and_checkpoint_guards(data, tmp_path):
    with pytest.raises(UsageError, match="nothing to resume"):
        run_train(tiny(data, tmp_path / "empty", resume=True), log=quiet)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / CHECKPOINT).write_bytes(b"x")
    with pytest.raises(UsageError, match="--resume"):
        run_train(tiny(data, tmp_path / "used"), log=quiet)
    # A run folder held by another live trainer is refused before anything is read.
    import fcntl

    busy = tmp_path / "busy"
    busy.mkdir()
    fd = os.open(busy / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(LockedError, match="another"):
            run_train(tiny(data, busy), log=quiet)
    finally:
        os.close(fd)
    with pytest.raises(UsageError, match="IMAGES"):
        run_train(replace(tiny(data, tmp_path / "x"), images=None), log=quiet)
    # Through the CLI both are usage errors (exit 2) with the reason on stderr.
    r = runner.invoke(app, ["train", str(data / "train"), "--resume", "--out", str(tmp_path / "e2")])
    assert r.exit_code == 2 and "nothing to resume" in r.stderr
    r = runner.invoke(app, ["train", str(data / "train"), "--out", str(tmp_path / "used")])
    assert r.exit_code == 2 and "already has a checkpoint" in r.stderr
    # A finished run whose checkpoint was deleted keeps its models: a new run is refused.
    done = tmp_path / "done"
    done.mkdir()
    (done / "model.keras").write_bytes(b"a trained model")
    r = runner.invoke(app, ["train", str(data / "train"), "--out", str(done)])
    assert r.exit_code == 2 and "model.keras" in r.stderr and "another --out" in r.stderr
    assert (done / "model.keras").read_bytes() == b"a trained model"


def test_class_weight_options(data, tmp_path):
    computed = np.array([0.5, 1.0, 2.0])
    assert load_class_weights("auto", computed, 3).tolist() == [0.5, 1.0, 2.0]
    assert load_class_weights("none", computed, 3).tolist() == [1.0, 1.0, 1.0]
    f = tmp_path / "w.txt"
    f.write_text("0.1, 2\n3.5\n")
    assert load_class_weights(str(f), computed, 3).tolist() == pytest.approx([0.1, 2, 3.5])
    j = tmp_path / "w.json"
    j.write_text("[1, 0, 4]")
    assert load_class_weights(str(j), computed, 3).tolist() == [1, 0, 4]
    short = tmp_path / "w2.json"
    short.write_text("[1, 2]")
    with pytest.raises(UsageError, match="2 values"):
        load_class_weights(str(short), computed, 3)
    with pytest.raises(UsageError, match="cannot read"):
        load_class_weights(str(tmp_path / "missing.txt"), computed, 3)
    # The CLI refuses a weights file of the wrong length before any training.
    r = runner.invoke(app, ["train", str(data / "train"), "--classes", "3", "--out",
                            str(tmp_path / "r"), "--class-weights", str(short)])
    assert r.exit_code == 2 and "2 values" in r.stderr


def test_train_refuses_a_dataset_with_problems(data, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data / "train", bad / "train")
    shutil.copytree(data / "trainannot", bad / "trainannot")
    (bad / "trainannot" / "s0.png").unlink()
    with pytest.raises(DatasetError) as exc:
        run_train(replace(tiny(data, tmp_path / "r"), images=bad / "train"), log=quiet)
    assert any("s0.png" in p for p in exc.value.problems)
    # No validation split, so no per-split counts to name.
    assert str(exc.value).startswith("1 problem(s) in the dataset")
    assert "validation" not in str(exc.value)
    assert not (tmp_path / "r" / CHECKPOINT).exists()


def test_epoch_plan_is_a_function_of_seed_and_epoch():
    a_idx, a_seed = epoch_plan(7, 3, 2, seed=0, epoch=4)
    b_idx, b_seed = epoch_plan(7, 3, 2, seed=0, epoch=4)
    assert a_idx.tolist() == b_idx.tolist() and (a_seed == b_seed).all()
    assert len(set(a_idx.tolist())) == 6  # a permutation, the remainder dropped
    c_idx, _ = epoch_plan(7, 3, 2, seed=0, epoch=5)
    d_idx, _ = epoch_plan(7, 3, 2, seed=1, epoch=4)
    assert c_idx.tolist() != a_idx.tolist() or d_idx.tolist() != a_idx.tolist()


def test_sigterm_mid_run_stops_cleanly_with_143_and_a_resumable_checkpoint(data, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable, "-m", "segnet_cli", "train", str(data / "train"), "--out", str(out),
        "--classes", "3", "--width", "0.0625", "--stages", "2", "--crop", "31x29", "-b", "2",
        "--epochs", "500", "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 180
        while not (out / CHECKPOINT).exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 3 minutes"
            time.sleep(0.2)
        time.sleep(0.5)  # well into a later epoch, perhaps mid-save
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    # Stopped by segnet itself, not killed by the signal: 128 + 15, one clear line.
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    # Nothing half-written: no model temporaries, no final model of a cut-short run.
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    assert not (out / "model.keras").exists()
    state = read_info(out / CHECKPOINT).training
    done = state["epoch"]
    assert f"holds epoch {done}" in err
    assert done >= 1 and [h["epoch"] for h in state["history"]] == list(range(1, done + 1))
    # Resume for one more epoch: the count and the optimizer's step continue.
    r = run_train(TrainConfig(images=data / "train", out=out, resume=True, epochs=done + 1), log=quiet)
    assert r.done == 1
    state = read_info(out / CHECKPOINT).training
    assert [h["epoch"] for h in state["history"]] == list(range(1, done + 2))
    assert state["epochs"] == done + 1 and state["schedule_epochs"] == 500
    assert int(checkpoint_optimizer(out / CHECKPOINT).iterations.numpy()) == (done + 1) * 3


@pytest.mark.parametrize(
    "args, option",
    [
        (["-b", "0"], "--batch-size"),
        (["--val-every", "0"], "--val-every"),
        (["--crop", "0"], "--crop"),
        (["--crop", "31x-2"], "--crop"),
        (["--crop", "7x"], "--crop"),  # a typo is not read as 7x7
        (["--crop", "x7"], "--crop"),
        (["--crop", "7xx8"], "--crop"),
        (["--crop", "7x8x9"], "--crop"),
        (["--workers", "-3"], "--workers"),
        (["--epochs", "0"], "--epochs"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.001"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--scale", "1.25,0.75"], "--scale"),
        (["--scale", "0,1"], "--scale"),
        (["--scale", "0.5,"], "--scale"),
        (["--stages", "6"], "--stages"),
        (["--stages", "0"], "--stages"),
        (["--width", "0"], "--width"),
        (["--width", "-0.5"], "--width"),
        (["--precision", "int8"], "--precision"),
        (["--hold-out", "s0*", "--val", "v"], "--hold-out"),
        (["--hold-out", ""], "--hold-out"),
        (["--weight-power", "-1"], "--weight-power"),
    ],
)
def test_bad_options_are_refused_before_any_data_is_read(tmp_path, args, option):
    out = tmp_path / "run"
    # The images folder does not exist: a check that ran after reading data would say so.
    r = runner.invoke(app, ["train", str(tmp_path / "no-such-images"), "--out", str(out), *args])
    assert r.exit_code == 2, r.output
    assert option in r.stderr and "not found" not in r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not out.exists()
    # The library refuses the same values: the check is in TrainConfig itself.
    with pytest.raises(UsageError, match="must"):
        TrainConfig(images=tmp_path, batch_size=0)


def test_out_must_be_a_folder_that_can_be_written(data, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = [
        (a_file, "names a file"),
        (a_file / "run", "cannot create the run folder"),  # its parent is a file
    ]
    if Path("/sys/kernel").is_dir():  # sysfs: no folder can be made, nothing written
        cases += [
            (Path("/sys/segnet-test-run"), "cannot create the run folder"),
            (Path("/sys/kernel"), "cannot write in the run folder"),
        ]
    for out, reason in cases:
        r = runner.invoke(app, ["train", str(data / "train"), "--classes", "3", "--out", str(out)])
        assert r.exit_code == 2, (out, r.output)
        assert reason in r.stderr and str(out) in r.stderr
        assert r.exception is None or isinstance(r.exception, SystemExit)
    assert a_file.read_text() == "not a folder"


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(LOCK))
    return dst


def test_resume_refuses_options_that_contradict_the_run(data, straight, tmp_path):
    run = copy_run(straight, tmp_path / "run")
    before = (run / CHECKPOINT).read_bytes()
    r = runner.invoke(app, ["train", str(tmp_path), "--resume", "--out", str(run),
                            "--lr", "0.5", "--width", "0.5", "--classes", "5"])
    assert r.exit_code == 2, r.output
    for text in ("--lr 0.5 (the run's: 0.01)", "--width 0.5 (the run's: 0.0625)",
                 "--classes 5 (the run's:", f"IMAGES {tmp_path} (the run's:"):
        assert text in r.stderr
    # Typed, even a default value is an option the user meant: the run used another one.
    r = runner.invoke(app, ["train", "--resume", "--out", str(run), "--lr", "0.002"])
    assert r.exit_code == 2 and "--lr 0.002 (the run's: 0.01)" in r.stderr
    # A script's config: a field that differs from its default is an option set too.
    with pytest.raises(UsageError, match=r"--batch-size 4 \(the run's: 2\)"):
        run_train(TrainConfig(images=None, out=run, resume=True, batch_size=4), log=quiet)
    assert (run / CHECKPOINT).read_bytes() == before
    # Options equal to the run's, and those about this invocation only, are fine.
    r = runner.invoke(app, [
        "train", str(data / "train"), "--resume", "--out", str(run), "--lr", "0.01",
        "--width", "0.0625", "--stages", "2", "--classes", str(data / "classes.json"),
        "--crop", "31x29", "-b", "2", "--val", str(data / "val"), "--masks",
        str(data / "trainannot"), "--epochs", "2", "--workers", "1", "--max-minutes", "5",
    ])
    assert r.exit_code == 0, r.output
    assert "already trained 2 of 2 epochs" in r.stderr
    # A total below what is trained is a usage error, and writes nothing.
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    r = runner.invoke(app, ["train", "--resume", "--out", str(run), "--epochs", "1"])
    assert r.exit_code == 2 and "--epochs 1 is fewer than the 2 epochs" in r.stderr, r.output
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_needs_a_checkpoint_with_training_and_optimizer_state(
    straight, tiny_model, tmp_path
):
    import shutil

    cases = [
        # A shipped model copied over the checkpoint: weights, but no optimizer state.
        (straight / "best.keras", "no optimizer state"),
        (tiny_model, "not a training checkpoint"),
        (None, "not a .keras model file"),
    ]
    for i, (source, reason) in enumerate(cases):
        run = copy_run(straight, tmp_path / f"run{i}")
        if source is None:
            (run / CHECKPOINT).write_bytes(b"not a zip")
        else:
            shutil.copyfile(source, run / CHECKPOINT)
        r = runner.invoke(app, ["train", "--resume", "--out", str(run)])
        assert r.exit_code == 2, r.output
        assert reason in r.stderr and str(run / CHECKPOINT) in r.stderr
        assert r.exception is None or isinstance(r.exception, SystemExit)
        assert "verifying" not in r.stderr  # refused before the data is read


def test_resume_refuses_images_whose_channels_changed(data, tmp_path):
    import shutil

    from PIL import Image

    root = tmp_path / "d"
    shutil.copytree(data / "trainannot", root / "trainannot")
    (root / "train").mkdir()
    for p in sorted((data / "train").glob("*.png")):
        Image.open(p).convert("L").save(root / "train" / p.name)
    out = tmp_path / "run"
    run_train(replace(tiny(data, out), images=root / "train", epochs=1), log=quiet)
    assert read_info(out / CHECKPOINT).in_channels == 1
    for p in sorted((data / "train").glob("*.png")):
        shutil.copyfile(p, root / "train" / p.name)  # the images are RGB now
    r = runner.invoke(app, ["train", "--resume", "--out", str(out), "--epochs", "2"])
    assert r.exit_code == 2, r.output
    assert "3 channel(s) but the run was trained on 1" in r.stderr
    assert read_info(out / CHECKPOINT).training["epoch"] == 1


def test_lovasz_loss_trains_and_resumes_in_mixed_bfloat16(data, tmp_path):
    import keras

    out = tmp_path / "ce+lovasz"
    # One epoch, stopped; --resume loads the checkpoint compiled with the Lovász loss.
    # Mixed bfloat16: the loss is computed in float32 (from the float32 logits).
    config = tiny(data, out, loss=Loss.CE_LOVASZ, precision="bfloat16", max_minutes=0)
    r = run_train(config, log=quiet)
    assert r.details["stopped_early"]
    assert keras.mixed_precision.global_policy().name == "float32"  # put back after the run
    r = run_train(TrainConfig(images=None, out=out, resume=True), log=quiet)
    assert r.done == 1
    history = read_info(out / CHECKPOINT).training["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"]
    assert read_info(out / "model.keras").training["config"]["loss"] == "ce+lovasz"


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def trainable(path: Path) -> dict:
    """A model file's trainable weights by layer name (batch norm statistics move in training)."""
    import keras

    from segnet_cli.model import layers  # noqa: F401

    model = keras.saving.load_model(str(path), compile=False)
    return {
        f"{layer.name}/{i}": w.numpy()
        for layer in model.layers
        for i, w in enumerate(layer.trainable_weights)
    }


def frozen(data: Path, out: Path, **kw) -> TrainConfig:
    """One epoch at a learning rate of 1e-9: the trained weights stay the initial ones."""
    base = dict(
        images=data / "train", out=out, classes=str(data / "classes.json"), crop=(31, 29),
        batch_size=2, epochs=1, learning_rate=1e-9, warmup_epochs=0, weight_decay=0.0,
    )
    return TrainConfig(**{**base, **kw})


def test_init_starts_a_new_run_from_a_models_weights(data, tiny_model, tmp_path):
    digest = sha256(tiny_model)
    out = tmp_path / "init"
    messages: list[str] = []
    # Width and stages are not given: they come from the model (3 stages; tiny() uses 2).
    run_train(frozen(data, out, init=tiny_model), log=messages.append)
    assert any("taken from it" in m and str(tiny_model) in m for m in messages)
    info = read_info(out / CHECKPOINT)
    assert info.architecture["stages"] == 3 and info.architecture["width"] == 0.0625
    assert info.scaling.mean == (0.5, 0.5, 0.5) and info.scaling.std == (0.25, 0.25, 0.25)
    assert info.training["init"] == {"path": str(tiny_model.absolute()), "sha256": digest}
    assert read_info(out / "model.keras").training["init"]["sha256"] == digest
    source, trained = trainable(tiny_model), trainable(out / CHECKPOINT)
    assert source.keys() == trained.keys()
    for name, value in source.items():
        np.testing.assert_allclose(trained[name], value, atol=1e-6, err_msg=name)
    # A fresh optimizer: its step counts this run's steps only.
    assert int(checkpoint_optimizer(out / CHECKPOINT).iterations.numpy()) == 3
    assert sha256(tiny_model) == digest  # the model's own file is never written


def test_an_interrupted_init_run_resumes(data, tiny_model, tmp_path):
    """A fine-tune started with --init continues with --resume, keeping its start record."""
    digest = sha256(tiny_model)
    out = tmp_path / "init-resumed"
    # A zero time budget stops after the first of two epochs, as a kill after it would.
    r = run_train(frozen(data, out, init=tiny_model, epochs=2, max_minutes=0), log=quiet)
    assert r.details["stopped_early"] and read_info(out / CHECKPOINT).training["epoch"] == 1
    messages: list[str] = []
    r = run_train(TrainConfig(images=None, out=out, resume=True), log=messages.append)
    assert r.return_code == 0 and r.done == 1
    assert any("resuming after epoch 1" in m for m in messages)
    info = read_info(out / CHECKPOINT)
    assert info.training["epoch"] == 2 and info.architecture["stages"] == 3  # the model's
    assert info.training["init"] == {"path": str(tiny_model.absolute()), "sha256": digest}
    assert read_info(out / "model.keras").training["init"]["sha256"] == digest
    # Through the CLI too, with only the run folder given.
    r = runner.invoke(app, ["train", "--resume", "--out", str(out), "--epochs", "3"])
    assert r.exit_code == 0, r.output
    assert read_info(out / CHECKPOINT).training["epoch"] == 3


def test_init_with_other_classes_keeps_all_but_the_classifier(data, tmp_path):
    five = make_model_file(tmp_path / "five.keras", stages=2, num_classes=5, seed=3)
    digest = sha256(five)
    out = tmp_path / "run"
    r = runner.invoke(app, [
        "train", str(data / "train"), "--init", str(five), "--out", str(out),
        "--classes", str(data / "classes.json"), "--crop", "31x29", "-b", "2", "--epochs", "1",
        "--lr", "1e-9", "--weight-decay", "0",
    ])
    assert r.exit_code == 0, r.output
    assert "the model has 5 classes and the training data 3" in r.stderr
    assert "classifier, which starts afresh" in r.stderr
    source, trained = trainable(five), trainable(out / CHECKPOINT)
    assert trained["classifier/0"].shape == (1, 1, 4, 3) and trained["classifier/1"].shape == (3,)
    assert source["classifier/0"].shape == (1, 1, 4, 5)
    others = [n for n in source if not n.startswith("classifier/")]
    assert len(others) == len(trained) - 2 > 0
    for name in others:
        np.testing.assert_allclose(trained[name], source[name], atol=1e-6, err_msg=name)
    assert read_info(out / "model.keras").class_names == ("ground", "disc", "square")
    assert sha256(five) == digest


def test_init_refusals(data, tiny_model, tmp_path):
    import shutil

    # A model for grey images and RGB training images: the file and both counts are named.
    grey = make_model_file(tmp_path / "grey.keras", stages=2, in_channels=1)
    with pytest.raises(UsageError) as exc:
        run_train(frozen(data, tmp_path / "r1", init=grey), log=quiet)
    assert str(grey) in str(exc.value) and "1-channel" in str(exc.value)
    assert "have 3 channel(s)" in str(exc.value)
    # Missing, broken and foreign model files, before any data is read.
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    foreign = tmp_path / "foreign.keras"
    shutil.copyfile(tiny_model, foreign)
    import zipfile

    with zipfile.ZipFile(tiny_model) as src, zipfile.ZipFile(foreign, "w") as dst:
        for item in src.infolist():
            if item.filename != "segnet.json":
                dst.writestr(item, src.read(item.filename))
    onnx = tmp_path / "model.onnx"  # an export: nothing to train
    onnx.write_bytes(b"\x08\x07")
    for path in (tmp_path / "missing.keras", broken, foreign, tmp_path, onnx):
        messages: list[str] = []
        with pytest.raises(ModelFileError) as exc:
            run_train(frozen(data, tmp_path / "r2", init=path), log=messages.append)
        assert exc.value.path == path and not any("verifying" in m for m in messages)
        assert not (tmp_path / "r2").exists()  # a refused new run leaves no folder
    # Through the CLI: --width/--stages that contradict the model, and --init with --resume.
    r = runner.invoke(app, ["train", str(data / "train"), "--init", str(tiny_model),
                            "--stages", "2", "--width", "0.0625", "--out", str(tmp_path / "r3")])
    assert r.exit_code == 2 and "--stages 2 (the model's: 3)" in r.stderr
    assert "--width 0.0625" not in r.stderr  # the model's own width is no contradiction
    r = runner.invoke(app, ["train", str(data / "train"), "--init", str(tiny_model), "--resume",
                            "--out", str(tmp_path / "r4")])
    assert r.exit_code == 2 and "give only one" in r.stderr


def test_refusals_before_verifying_and_an_empty_val_leave_no_run_folder(data, tmp_path):
    (tmp_path / "ev").mkdir()
    (tmp_path / "evannot").mkdir()
    out = tmp_path / "run"
    cases = [
        (dict(val_images=tmp_path / "ev"), NoInputError, "--val: no validation"),
        (dict(class_weights=str(tmp_path / "none.txt")), UsageError, "cannot read class weights"),
        (dict(batch_size=7), UsageError, "6 training pairs are fewer than the batch size (7)"),
        (dict(images=data / "train" / "s0.png"), UsageError, "is an image"),
    ]
    for kw, error, message in cases:
        messages: list[str] = []
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
            run_train(tiny(data, out, **kw), log=messages.append)
        assert not any("verifying" in m for m in messages), kw  # before any pair is read
        assert not out.exists(), kw
    # A folder that was there before stays, whatever it holds.
    out.mkdir()
    with pytest.raises(NoInputError):
        run_train(tiny(data, out, val_images=tmp_path / "ev"), log=quiet)
    assert out.is_dir()


def test_dropout_is_recorded_resumed_and_inherited_by_init(data, tmp_path):
    """--dropout trains with dropout layers; the model files say so, --init keeps the rate."""
    import keras

    from segnet_cli.model import layers  # noqa: F401

    first = tmp_path / "dropout"
    r = runner.invoke(app, [
        "train", str(data / "train"), "--out", str(first), "--classes", str(data / "classes.json"),
        "--width", "0.0625", "--stages", "2", "--crop", "31x29", "-b", "2", "--epochs", "1",
        "--dropout", "0.3",
    ])
    assert r.exit_code == 0, r.output
    for name in (CHECKPOINT, "model.keras"):
        assert read_info(first / name).architecture["dropout"] == 0.3
    model = keras.saving.load_model(str(first / "model.keras"), compile=False)
    rates = {x.name: x.rate for x in model.layers if isinstance(x, keras.layers.Dropout)}
    assert rates == {"pool2_dropout": 0.3, "dec2_dropout": 0.3}
    r = runner.invoke(app, ["info", "--model", str(first / "model.keras")])
    assert r.exit_code == 0 and "trained with dropout 0.3" in r.stdout
    # --resume keeps the run's rate and refuses another.
    r = runner.invoke(app, ["train", "--resume", "--out", str(first), "--dropout", "0.5"])
    assert r.exit_code == 2 and "--dropout 0.5" in r.stderr
    # --init: the model's rate unless --dropout is given (0 turns it off for a fine-tune).
    from segnet_cli.train import _settings

    kept_out = tmp_path / "kept"
    kept, _ = _settings(frozen(data, kept_out, init=first / "model.keras"), kept_out)
    assert kept.dropout == 0.3
    run_train(frozen(data, tmp_path / "off", init=first / "model.keras", dropout=0.0,
                     given=frozenset({"dropout"})), log=quiet)
    assert read_info(tmp_path / "off" / "model.keras").architecture["dropout"] == 0.0
    np.testing.assert_allclose(
        trainable(tmp_path / "off" / CHECKPOINT)["dec2_1_conv/0"],
        trainable(first / "model.keras")["dec2_1_conv/0"], atol=1e-6,
    )
    for bad in ("1", "-0.1", "nan"):
        r = runner.invoke(app, ["train", str(data / "train"), "--dropout", bad,
                                "--out", str(tmp_path / "bad")])
        assert r.exit_code == 2 and "--dropout" in r.stderr, (bad, r.output)
    assert not (tmp_path / "bad").exists()


def test_a_new_run_without_epochs_takes_the_default_schedule(tmp_path):
    """No --epochs: the cross-drive study's schedule; an explicit value is kept."""
    from segnet_cli.train import _settings

    cfg, _ = _settings(TrainConfig(images=tmp_path, out=tmp_path), tmp_path)
    assert cfg.epochs == DEFAULT_EPOCHS == 300
    cfg, _ = _settings(TrainConfig(images=tmp_path, out=tmp_path, epochs=7), tmp_path)
    assert cfg.epochs == 7


def test_split_held_out_matches_a_file_name_or_its_path_under_the_root(tmp_path):
    """Globs name groups (a drive, a site folder); the order of the pairs is kept."""
    from segnet_cli.dataset import Pair, split_held_out

    root = tmp_path / "images"
    names = ["0001TP_1.png", "siteA/0006R0_2.png", "0006R0_3.png", "siteB/x_4.png"]
    pairs = [Pair(root / n, tmp_path / "masks" / n) for n in names]
    outside = Pair(tmp_path / "elsewhere" / "0006R0_5.png", tmp_path / "m.png")

    train, held = split_held_out(pairs + [outside], ("0006R0_*",), root)
    assert [p.image.name for p in held] == ["0006R0_2.png", "0006R0_3.png", "0006R0_5.png"]
    assert [p.image.name for p in train] == ["0001TP_1.png", "x_4.png"]
    # A path under the root: the folder of one site; several globs add up.
    train, held = split_held_out(pairs, ("siteB/*", "0001TP_*"), root)
    assert [p.image.name for p in held] == ["0001TP_1.png", "x_4.png"]
    assert len(train) == 2
    # Case-sensitive on every platform, as file names are on the machines that train.
    assert split_held_out(pairs, ("0006r0_*",), root)[1] == []


def test_hold_out_validates_on_a_group_and_never_trains_on_it(data, tmp_path):
    from segnet_cli.classes import load_classes
    from segnet_cli.dataset import find_pairs, verify
    from segnet_cli.train import channel_stats

    out = tmp_path / "run"
    lines: list[str] = []
    report = run_train(tiny(data, out, epochs=1, hold_out=("s0.*", "s[34].png")), log=lines.append)
    assert report.return_code == 0
    assert "holding out 3 of 6 pairs ('s0.*' 's[34].png') to validate on" in lines
    assert "verifying 3 training pairs ..." in lines and "verifying 3 validation pairs ..." in lines
    history = json.loads((out / "history.json").read_text())
    # Validation ran on the held-out images: segnet eval of the epoch's model on them agrees.
    listfile = tmp_path / "held.txt"
    listfile.write_text("".join(
        f"{data / 'train' / n} {data / 'trainannot' / n}\n" for n in ("s0.png", "s3.png", "s4.png")
    ))
    r = runner.invoke(app, ["eval", str(listfile), "--model", str(out / "best.keras"),
                            "--classes", str(data / "classes.json"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mean_iou"] == pytest.approx(history[0]["val_miou"], abs=1e-5)
    # The class weights and input scaling come from the three pairs left to train on.
    train = [p for p in find_pairs(data / "train")[0] if p.image.name in ("s1.png", "s2.png", "s5.png")]
    info = read_info(out / "model.keras")
    assert list(info.scaling.mean) == channel_stats(train, 3)[0]
    weights = verify(train, load_classes("3"), weight_power=TrainConfig.weight_power).weights
    assert info.training["class_weights"] == pytest.approx(weights.tolist())
    r = runner.invoke(app, ["info", "--model", str(out / "model.keras")])
    assert "validation on held-out images matching 's0.*' 's[34].png': mIoU" in r.output
    # A run that starts from this model, holding out what it held out, warns of nothing.
    more = tmp_path / "more"
    lines.clear()
    report = run_train(
        tiny(data, more, epochs=1, hold_out=("s0.*",), init=out / "model.keras"),
        log=lines.append,
    )
    assert report.return_code == 0 and not [x for x in lines if "warning" in x]
    # --resume keeps the split; another one contradicts the run.
    r = runner.invoke(app, ["train", "--resume", "--out", str(out), "--hold-out", "s1*"])
    assert r.exit_code == 2 and "--hold-out 's1*' (the run's: 's0.*' 's[34].png')" in r.stderr
    r = runner.invoke(app, ["train", "--resume", "--out", str(out), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert "holding out 3 of 6 pairs" in r.stderr
    # --quiet keeps the closing summary, and only it.
    r = runner.invoke(app, ["train", "--resume", "--out", str(out), "--epochs", "3", "-q"])
    assert r.exit_code == 0 and "holding out" not in r.output, r.output
    assert "(epochs 3, best val mIoU " in r.output
    assert len(json.loads((out / "history.json").read_text())[1]["val_iou"]) == 3


def test_hold_out_that_matches_none_or_all_is_refused(data, tmp_path):
    base = ["train", str(data / "train"), "--classes", str(data / "classes.json")]
    for glob, reason in (("0006R0_*", "matches none of the 6"), ("s*", "matches all 6")):
        out = tmp_path / glob.replace("*", "")
        r = runner.invoke(app, [*base, "--out", str(out), "--hold-out", glob])
        assert r.exit_code == 2, r.output
        assert reason in r.stderr and str(data / "train") in r.stderr
        assert not (out / CHECKPOINT).exists()


def test_hold_out_warns_when_the_init_model_trained_on_held_out_images(data, straight, tmp_path):
    """Validating on images the starting model learned overstates it: said, not refused."""
    lines: list[str] = []
    report = run_train(
        tiny(data, tmp_path / "run", epochs=1, hold_out=("s1.png",), init=straight / "model.keras"),
        log=lines.append,
    )
    assert report.return_code == 0
    warnings = [x for x in lines if x.startswith("warning:")]
    assert len(warnings) == 1 and "trained on 1 of the 1 held-out images" in warnings[0]
    assert str((data / "train" / "s1.png").resolve()) in warnings[0]
    # --resume on a --val run: adding --hold-out contradicts its split.
    r = runner.invoke(app, ["train", "--resume", "--out", str(straight), "--hold-out", "s1*"])
    assert r.exit_code == 2 and "--hold-out 's1*' (the run's: none)" in r.stderr
    assert read_info(straight / "model.keras").validation()["split"] == "val"


def test_hold_out_in_a_list_file_and_problems_of_both_splits_at_once(data, tmp_path):
    """Globs on paths under a list file's folder; every problem of both splits in one error."""
    import shutil

    root = tmp_path / "d"
    for sub in ("train", "trainannot"):
        shutil.copytree(data / sub, root / sub)
    # A mask of the wrong size in each split.
    for name in ("s1.png", "s2.png"):
        write_png(root / "trainannot" / name, np.zeros((5, 5), np.uint8))
    lines = [f"{(root / 'train' / f'{n}').absolute()} {(root / 'trainannot' / f'{n}').absolute()}"
             for n in ("s0.png", "s1.png", "s2.png", "s3.png", "s4.png", "s5.png")]
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    listfile = Path(os.path.relpath(root / "list.txt"))  # relative, its lines absolute
    cfg = tiny(data, tmp_path / "run", images=listfile, hold_out=("train/s2.png",))
    with pytest.raises(DatasetError) as err:
        run_train(cfg, log=quiet)
    assert "2 problem(s) in the dataset (1 in the training pairs, 1 in the validation" in str(err.value)
    problems = err.value.problems
    assert any("s1.png" in p and not p.startswith("validation:") for p in problems)
    assert any(p.startswith("validation: ") and "s2.png" in p for p in problems)
    assert not (tmp_path / "run" / CHECKPOINT).exists()
