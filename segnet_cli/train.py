"""``segnet train``: train SegNet on image/mask folders, resumably, and keep the best model.

The recipe follows the SegNet paper (cross-entropy with median-frequency class balancing,
void ignored) with what a CPU needs: random crops (any size, odd allowed) with scale jitter,
flips and colour jitter; AdamW with a warm-up and a cosine decay; optional mixed bfloat16.
``--loss ce+lovasz`` adds the Lovász-softmax loss (``segnet_cli.losses``); ``--mix`` pastes
part of one crop into another (CutMix, ClassMix: ``segnet_cli.mixing``).

Files in the run folder (``--out``):

* ``checkpoint.keras`` after every epoch: weights, optimizer state (so the learning-rate
  schedule continues from its step) and, in its metadata, the epoch and the history.
  ``--resume`` restarts from it exactly where a killed run's last finished epoch ended.
* ``best.keras``: the model with the best validation mIoU, ready for ``segnet predict``.
* ``model.keras``: the final model (best on validation if there was one, else the last).
* ``history.csv`` / ``history.json``: loss, validation mIoU, G and C per epoch.

``--init MODEL`` starts a new run (fresh optimizer and schedule) from a segnet model's
weights, with its width, stages and input scaling; a classifier for another number of classes
starts afresh. The run records the model's path and SHA-256 (``training["init"]``).

Every file is written atomically, so a kill at any moment (even SIGKILL) leaves the previous
epoch's files. SIGINT and SIGTERM stop a run cleanly (exit 130/143): the step under way and
any save under way finish, the cut-short epoch is not saved, nothing else is written.

The data stream is a pure function of the seed and the epoch (``epoch_plan``: order and
per-crop stateless augmentation seeds), so a resumed run trains on exactly the crops the
uninterrupted run would have seen and reaches the same weights. A ``flock`` on the folder
keeps two trainers from sharing one run.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path

import keras
import numpy as np

from segnet_cli.classes import ClassTable, load_classes
from segnet_cli.config import DEFAULT_EPOCHS, Mix, Report, TrainConfig
from segnet_cli.dataset import Pair, find_pairs, load_mask, split_held_out, verify
from segnet_cli.errors import (
    DatasetError,
    Interrupted,
    LockedError,
    ModelFileError,
    NoInputError,
    SegnetError,
    UsageError,
)
from segnet_cli.io.files import atomic_path, file_digest, remove_dead_temporaries
from segnet_cli.io.images import read_image, to_model_input
from segnet_cli.jobs import SignalGuard
from segnet_cli.losses import make_loss
from segnet_cli.metrics import confusion, scores
from segnet_cli.mixing import mix_batch
from segnet_cli.model.modelfile import InputScaling, ModelInfo, read_info
from segnet_cli.model.network import Architecture, build_segnet, count_params, save_model

CHECKPOINT = "checkpoint.keras"
LOCK = ".segnet-train.lock"
BEST = "best.keras"
FINAL = "model.keras"


@contextlib.contextmanager
def _precision(precision: str):
    """Build and train under a Keras precision policy; the previous one is put back after."""
    from segnet_cli.model.network import POLICIES

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def channel_stats(pairs: list[Pair], channels: int, limit: int = 64) -> tuple[list, list]:
    """Per-channel mean and std of the (scaled) training images, from up to ``limit`` images."""
    idx = np.linspace(0, len(pairs) - 1, min(limit, len(pairs))).astype(int)
    s = np.zeros(channels)
    s2 = np.zeros(channels)
    n = 0
    for i in idx:
        x = to_model_input(read_image(pairs[i].image), channels, pairs[i].image).astype(np.float64)
        s += x.sum(axis=(0, 1))
        s2 += (x * x).sum(axis=(0, 1))
        n += x.shape[0] * x.shape[1]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 1e-6))
    return [round(float(v), 5) for v in mean], [round(float(max(v, 1e-3)), 5) for v in std]


def load_class_weights(spec: str, computed: np.ndarray, k: int) -> np.ndarray:
    """``auto`` -> the computed median-frequency weights; ``none`` -> ones; else a file."""
    if spec == "auto":
        return computed.astype(np.float32)
    if spec == "none":
        return np.ones(k, np.float32)
    path = Path(spec)
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else [
            float(v) for v in text.replace(",", " ").split()
        ]
        w = np.asarray(values, np.float32).reshape(-1)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read class weights: {exc}", path) from None
    if w.size != k:
        raise UsageError(f"class weights file has {w.size} values, the classes are {k}", path)
    return w


def epoch_plan(n: int, steps: int, batch_size: int, seed: int, epoch: int):
    """The crops of one epoch: which pairs, in which order, with which augmentation seeds.

    A pure function of ``(seed, epoch)``: a resumed run draws exactly the crops the killed
    run would have drawn, whatever the number of decoding threads.

    Returns:
        ``(indices, seeds)``: ``steps * batch_size`` pair indices (a permutation, the
        remainder dropped) and one ``(2,)`` int64 stateless-RNG seed per crop.
    """
    rng = np.random.default_rng([seed, epoch])
    need = steps * batch_size
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
    seeds = rng.integers(0, 2**31 - 1, size=(need, 2), dtype=np.int64)
    return order.astype(np.int64), seeds


def make_dataset(
    pairs: list[Pair],
    classes: ClassTable,
    channels: int,
    weights: np.ndarray,
    config: TrainConfig,
    first_epoch: int = 0,
    targets: list[np.ndarray] | None = None,
):
    """The training ``tf.data`` pipeline from ``first_epoch`` to ``config.epochs``.

    Parallel decoding (``config.workers`` threads, default: tf.data's choice), decoded pairs
    cached in memory when they fit in ``config.cache_mb`` (stored dtype, so uint8 photos
    take a quarter of float32), augmentation, batching, prefetch. Each epoch's order and
    each crop's augmentation come from ``epoch_plan``, so the stream is deterministic and a
    resumed run continues it exactly. The dataset holds ``steps`` batches per epoch.

    Yields ``(image, label, pixel_weight)``; labels outside the classes (void, crop padding)
    are set to 0 with weight 0, so the loss ignores them. With ``targets`` (one ``(H, W, K)``
    uint8 array of probabilities times 255 per pair: the teachers'), they are scaled,
    cropped, flipped and mixed with their image, and the label becomes
    ``concat([label, targets], -1)`` for ``DistillationLoss``.
    """
    import tensorflow as tf

    k = classes.num_classes
    void = classes.void
    images = [str(p.image) for p in pairs]
    masks = [str(p.mask) for p in pairs]
    steps = max(1, len(pairs) // config.batch_size)

    est_mb = 0.0
    if pairs:
        x0 = read_image(pairs[0].image)
        est_mb = len(pairs) * x0.shape[0] * x0.shape[1] * (x0[0, 0].nbytes + 1) / 2**20
    # The teachers' targets, already in memory, share the budget.
    est_mb += sum(t.nbytes for t in targets) / 2**20 if targets is not None else 0.0
    cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = (
        {} if est_mb <= config.cache_mb else None
    )

    def load(i):
        i = int(i)
        raw = cache.get(i) if cache is not None else None
        if raw is None:
            raw = (read_image(images[i]), load_mask(Path(masks[i]), classes, config.rgb_masks))
            if cache is not None:
                cache[i] = raw
        x = to_model_input(raw[0], channels, images[i])
        t = targets[i] if targets is not None else np.zeros((1, 1, 1), np.uint8)
        return x.astype(np.float32), raw[1].astype(np.int32), t

    ch, cw = config.crop
    lo, hi = config.scale
    wtab = tf.constant(np.asarray(weights, np.float32))

    def augment(i, seed):
        x, y, t = tf.numpy_function(load, [i], (tf.float32, tf.int32, tf.uint8))
        x.set_shape((None, None, channels))
        y.set_shape((None, None))
        t = tf.cast(t, tf.float32) / 255.0
        t.set_shape((None, None, k if targets is not None else 1))
        rs = tf.random.experimental.stateless_split(seed, num=7)
        shape = tf.shape(x)
        s = tf.random.stateless_uniform((), rs[0], lo, hi)
        nh = tf.maximum(1, tf.cast(tf.round(tf.cast(shape[0], tf.float32) * s), tf.int32))
        nw = tf.maximum(1, tf.cast(tf.round(tf.cast(shape[1], tf.float32) * s), tf.int32))
        x = tf.image.resize(x, (nh, nw), method="bilinear")
        y = tf.image.resize(y[..., None], (nh, nw), method="nearest")[..., 0]
        if targets is not None:
            t = tf.image.resize(t, (nh, nw), method="bilinear")
        # Pad up to the crop (labels -1: ignored) when the scaled image is smaller.
        ph, pw = tf.maximum(ch - nh, 0), tf.maximum(cw - nw, 0)
        x = tf.pad(x, [[0, ph], [0, pw], [0, 0]])
        y = tf.pad(y, [[0, ph], [0, pw]], constant_values=-1)
        if targets is not None:
            t = tf.pad(t, [[0, ph], [0, pw], [0, 0]])
        hh, ww = tf.shape(y)[0], tf.shape(y)[1]
        oy = tf.random.stateless_uniform((), rs[1], 0, hh - ch + 1, dtype=tf.int32)
        ox = tf.random.stateless_uniform((), rs[2], 0, ww - cw + 1, dtype=tf.int32)
        x = x[oy : oy + ch, ox : ox + cw]
        y = y[oy : oy + ch, ox : ox + cw]
        if targets is not None:
            t = t[oy : oy + ch, ox : ox + cw]
        if config.flip:
            flip = tf.random.stateless_uniform((), rs[3]) < 0.5
            x = tf.cond(flip, lambda: x[:, ::-1], lambda: x)
            y = tf.cond(flip, lambda: y[:, ::-1], lambda: y)
            if targets is not None:
                t = tf.cond(flip, lambda: t[:, ::-1], lambda: t)
        if config.jitter > 0:
            j = config.jitter
            x = x * tf.random.stateless_uniform((), rs[4], 1 - 2 * j, 1 + 2 * j)  # gain
            x = x + tf.random.stateless_uniform((), rs[5], -j, j)  # brightness
            if channels == 3:
                grey = tf.reduce_mean(x, axis=-1, keepdims=True)
                x = grey + (x - grey) * tf.random.stateless_uniform((), rs[6], 1 - 2 * j, 1 + 2 * j)
            x = tf.clip_by_value(x, 0.0, 1.0)
        valid = (y >= 0) & (y < k)
        if void is not None and void < k:
            valid &= y != void  # a void inside the class range is still ignored
        label = tf.where(valid, y, 0)
        w = tf.where(valid, tf.gather(wtab, label), 0.0)
        x.set_shape((ch, cw, channels))
        label.set_shape((ch, cw))
        w.set_shape((ch, cw))
        if targets is None:
            return x, label, w
        t.set_shape((ch, cw, k))
        return x, label, w, t

    plans = [
        epoch_plan(len(pairs), steps, config.batch_size, config.seed, e)
        for e in range(first_epoch, max(config.epochs, first_epoch))
    ]
    order = np.concatenate([p[0] for p in plans]) if plans else np.zeros(0, np.int64)
    seeds = np.concatenate([p[1] for p in plans]) if plans else np.zeros((0, 2), np.int64)
    workers = config.workers if config.workers else tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices((order, seeds))
    # deterministic=True keeps the order whatever thread finishes first.
    ds = ds.map(augment, num_parallel_calls=workers, deterministic=True)
    ds = ds.batch(config.batch_size, drop_remainder=True)
    if config.mix is not Mix.NONE and config.mix_prob > 0:
        # One seed per batch, folded from its first crop's seed: a stream of its own, and
        # as deterministic as the crops (a run without --mix draws exactly as before).
        batch_seeds = tf.data.Dataset.from_tensor_slices(seeds[:: config.batch_size])

        def mix(batch, seed):
            return mix_batch(
                *batch[:3],
                tf.random.experimental.stateless_fold_in(seed, 7),
                config.mix,
                config.mix_prob,
                k,
                targets=batch[3] if targets is not None else None,
            )

        ds = tf.data.Dataset.zip((ds, batch_seeds)).map(
            mix, num_parallel_calls=workers, deterministic=True
        )
    if targets is not None:

        def pack(x, label, w, t):
            return x, tf.concat([tf.cast(label, tf.float32)[..., None], t], axis=-1), w

        ds = ds.map(pack, num_parallel_calls=workers, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def evaluate_arrays(model, items, k: int, void: int | None, batch: int = 4) -> np.ndarray:
    """Confusion matrix of a model over ``(image, mask)`` arrays, whole-image inference.

    Images of the same size are batched; the model runs in inference mode.
    """
    cm = np.zeros((k, k), np.int64)
    by_size: dict = {}
    for x, y in items:
        by_size.setdefault(x.shape, []).append((x, y))
    for group in by_size.values():
        for i in range(0, len(group), batch):
            chunk = group[i : i + batch]
            xb = np.stack([c[0] for c in chunk])
            logits = model(xb, training=False)
            pred = np.argmax(np.asarray(logits, np.float32), axis=-1)
            for (_, y), p in zip(chunk, pred):
                cm += confusion(y, p, k, void)
    return cm


def _export_copy(model, arch_kwargs, mean, std):
    """A float32, optimizer-free copy of ``model`` for shipping and prediction."""
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        clone = build_segnet(Architecture(**arch_kwargs), mean, std)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    clone.set_weights(model.get_weights())
    return clone


def _write_history(out: Path, history: list[dict]) -> None:
    with atomic_path(out / "history.json") as tmp:
        tmp.write_text(json.dumps(history, indent=2))
    if history:
        buf = io.StringIO()
        keys = list(history[0].keys())
        for h in history:
            keys += [k for k in h if k not in keys]
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
        with atomic_path(out / "history.csv") as tmp:
            tmp.write_text(buf.getvalue())


@contextlib.contextmanager
def _run_lock(out: Path):
    """Hold an exclusive ``flock`` on the run folder: two trainers must never share one.

    The kernel drops the lock when the process dies (even by SIGKILL), so a killed run
    never blocks its own ``--resume``.

    Raises:
        LockedError: another live ``segnet train`` holds the folder.
        UsageError: nothing can be written in the folder (read-only, no permission).
    """
    try:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        reason = exc.strerror or exc
        raise UsageError(f"cannot write in the run folder (--out): {reason}", out) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockedError("another `segnet train` is running in this run folder", out) from None
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def run_train(config: TrainConfig, progress=None, log=print) -> Report:
    """Train a SegNet as ``config`` says and return a report.

    With ``config.resume`` the run's settings come from its checkpoint and training
    continues exactly: same weights, optimizer state, schedule step and data stream. Only the
    fields in ``TrainConfig.PER_INVOCATION`` (``out``, ``epochs``, ``max_minutes``,
    ``workers``, ...) are taken from ``config``; any other option it sets must equal the
    run's. With ``config.init`` a new run starts from a segnet model's weights.

    Args:
        config: the training options.
        progress: optional object with ``start(total_steps, done_steps)``,
            ``step(loss)`` and ``stop()`` (the CLI passes a rich bar).
        log: where one-line human messages go.

    SIGINT and SIGTERM stop the run cleanly: the step running finishes, a save under way
    completes, nothing more is written, and the report's ``return_code`` is 130 or 143 with
    ``details["interrupted"]`` the signal; the checkpoint holds the last finished epoch.

    Raises:
        UsageError, DatasetError: bad options or a dataset with problems.
        ModelFileError: a checkpoint or ``--init`` model that cannot be used.
        LockedError: another trainer is using the run folder.
    """
    t0 = time.time()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError("--out names a file; give a run folder", out)
    if config.resume and not (out / CHECKPOINT).exists():
        raise UsageError("nothing to resume: no checkpoint.keras in the run folder", out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or exc
        raise UsageError(f"cannot create the run folder (--out): {reason}", out) from None
    try:
        return _locked_run(config, out, t0, progress, log)
    finally:
        if created:
            _discard_if_unused(out)


def _discard_if_unused(out: Path) -> None:
    """Remove a run folder this run created when it holds nothing but the lock file.

    A run refused after the folder was made (bad data, a bad ``--init``) or stopped before
    its first save would otherwise leave an empty folder behind, holding only a hidden lock.
    """
    try:
        if [p.name for p in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink()
            out.rmdir()
    except OSError:
        pass


def _locked_run(config: TrainConfig, out: Path, t0: float, progress, log) -> Report:
    with _run_lock(out), SignalGuard() as guard:
        remove_dead_temporaries(out, recursive=False)  # a killed save's leftovers
        try:
            return _train(config, guard, progress, log)
        except Interrupted as exc:
            ckpt = out / CHECKPOINT
            return Report(
                return_code=exc.exit_code,
                seconds=time.time() - t0,
                details={
                    "out": str(out),
                    "model": None,
                    "interrupted": exc.signum,
                    "epochs": int(read_info(ckpt).training.get("epoch", 0)) if ckpt.exists() else 0,
                },
            )


def _train(config: TrainConfig, guard: SignalGuard, progress, log) -> Report:
    t0 = time.time()
    config, start = _settings(config, Path(config.out))
    data = _load_data(config, start, guard, log)
    if config.teachers:
        data = _teacher_targets(config, data, guard, log)
    with _precision(config.precision):
        return _train_model(config, start, data, guard, progress, log, t0)


def _train_model(
    config: TrainConfig, start: _Start, data: _Data, guard: SignalGuard, progress, log, t0: float
) -> Report:
    """Build (or load) the model, fit it epoch by epoch, write the final model."""
    out = Path(config.out)
    state = start.state
    keras.utils.set_random_seed(config.seed + int(state.get("epoch", 0)))
    steps = len(data.pairs) // config.batch_size
    model = _build_model(config, start, data, steps, log)
    run = _Run(
        config=config,
        out=out,
        data=data,
        arch=_architecture(config, data),
        params=count_params(model),
        planned=_planned_epochs(state) or config.epochs,
        history=list(state.get("history", [])),
        best=float(state.get("best_miou", -1.0)),
        seconds=float(state.get("seconds", 0.0)),
        t0=t0,
        init=start.init,
    )
    start_epoch = int(state.get("epoch", 0))
    epoch_end = EpochEnd(run, guard, progress, log)
    if start_epoch >= config.epochs:
        log(f"already trained {start_epoch} of {config.epochs} epochs: nothing to do")
    else:
        guard.check()
        _fit(model, run, steps, start_epoch, epoch_end, progress, log)
        guard.check()  # a signal stopped fit: no final model from a cut-short run
    final_state = _final_model(model, run)
    return Report(
        return_code=0,
        done=len(run.history) - len(state.get("history", [])),
        seconds=time.time() - t0,
        details={
            "out": str(out),
            "model": str(out / FINAL),
            "best_val_miou": run.best if run.best >= 0 else None,
            "epochs": int(final_state.get("epoch", start_epoch)),
            "stopped_early": epoch_end.stop_reason,
        },
    )


@dataclass(frozen=True)
class _Start:
    """What a run starts from: nothing, its checkpoint (--resume) or a model's weights (--init)."""

    state: dict = field(default_factory=dict)  # the checkpoint's training state
    path: Path | None = None  # the checkpoint or the --init model
    info: ModelInfo | None = None  # its metadata
    init: dict | None = None  # what the run records about its --init model: path, sha256


def _settings(config: TrainConfig, out: Path) -> tuple[TrainConfig, _Start]:
    """The settings this invocation trains with, and what the run starts from.

    A new run takes ``config`` as it is (``DEFAULT_EPOCHS`` unless given). ``--resume`` takes the
    run's settings from its checkpoint, so it goes on exactly as it began; only the fields
    about this invocation (``TrainConfig.PER_INVOCATION``) come from ``config``, and an
    option set to anything else than the run's own is refused rather than ignored.

    Raises:
        UsageError: a new run in a folder that already holds a run; options that contradict
            the resumed run.
        ModelFileError: the checkpoint is not one a run can continue from.
    """
    ckpt = out / CHECKPOINT
    if not config.resume:
        if ckpt.exists():
            raise UsageError(
                "run folder already has a checkpoint: pass --resume to continue it, or "
                "another --out",
                out,
            )
        # A finished run whose checkpoint was pruned (it is the largest file) still holds
        # its models: a new run here would replace them.
        kept = [n for n in (FINAL, BEST, "history.json") if (out / n).exists()]
        if kept:
            raise UsageError(
                f"run folder already holds a run's files ({', '.join(kept)}) that a new run "
                "would replace; give another --out, or move them away to start afresh here",
                out,
            )
        config = replace(config, epochs=config.epochs or DEFAULT_EPOCHS)
        if config.init is None:
            return config, _Start()
        return _init_settings(config)
    info, state = _checkpoint_state(ckpt)
    saved = state["config"]
    fields = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
    # --init is how the run began, not a setting to continue with (the start record is in
    # ``state["init"]``); kept, it would read as --init given with --resume.
    fields.pop("init", None)
    run = TrainConfig(**fields)
    clashes = _contradictions(config, run)
    if clashes:
        raise UsageError(
            "--resume continues the run with its own settings, and these options contradict "
            f"them: {'; '.join(clashes)}. Leave them out, or start a new run in another --out",
            out,
        )
    # Where the run is, how long to run and how many threads to use are about this
    # invocation, not the run: the folder may have moved, the machine may differ.
    # ``epochs`` given with --resume is the new total; not given, the run's own.
    now = {name: getattr(config, name) for name in TrainConfig.PER_INVOCATION}
    if config.teachers:  # where the teachers are now; _teacher_records checks they are the same
        now["teachers"] = config.teachers
    if config.epochs is None:
        now["epochs"] = int(saved.get("epochs") or state["epoch"])
    elif config.epochs < int(state["epoch"]):
        # A total below what is trained cannot be met; finishing the run here would write
        # its final model from more epochs than asked for.
        raise UsageError(
            f"--epochs {config.epochs} is fewer than the {state['epoch']} epochs this run "
            f"has trained; give {state['epoch']} or more (the new total), or leave it out",
            out,
        )
    resumed = replace(run, **now)
    return resumed, _Start(state, ckpt, info, state.get("init"))


def _init_settings(config: TrainConfig) -> tuple[TrainConfig, _Start]:
    """A new run from ``config.init``'s weights: its architecture, read from the model file.

    Raises:
        ModelFileError: the model file is missing, broken, not a segnet model or lacks its
            architecture.
        UsageError: ``--width`` or ``--stages`` set to other values than the model's.
    """
    path = Path(config.init)
    if path.suffix.lower() != ".keras":
        # An export (ONNX, SavedModel, LiteRT) holds no trainable Keras weights.
        raise ModelFileError("--init takes a segnet .keras model (an export cannot be "
                             "trained on)", path)
    info = read_info(path)
    arch = info.architecture
    if not all(key in arch for key in ("width", "stages", "in_channels", "num_classes")):
        raise ModelFileError("its metadata lacks the architecture (width, stages)", path)
    clashes = [
        f"{TrainConfig.option(name)} {getattr(config, name)} (the model's: {arch[name]})"
        for name in ("width", "stages")
        if config.was_given(name) and getattr(config, name) != arch[name]
    ]
    if clashes:
        raise UsageError(
            f"--init takes the architecture from the model: {'; '.join(clashes)}; leave "
            "--width and --stages out",
            path,
        )
    config = replace(config, width=float(arch["width"]), stages=int(arch["stages"]))
    if not config.was_given("dropout"):
        # A training choice, not the weights' shape: --dropout may change it, and without
        # it a fine-tune keeps the regularisation the model was trained with.
        config = replace(config, dropout=float(arch.get("dropout", 0.0)))
    record = {"path": str(path.absolute()), "sha256": file_digest(path, None)}
    return config, _Start(path=path, info=info, init=record)


def _checkpoint_state(ckpt: Path) -> tuple[ModelInfo, dict]:
    """A run's checkpoint metadata and training state, if a run can continue from it.

    Raises:
        ModelFileError: not a segnet model, no training state, or no optimizer state (a
            shipped model such as ``best.keras`` copied over the checkpoint).
    """
    info = read_info(ckpt)
    state = info.training
    if not all(key in state for key in ("epoch", "config", "mean", "std")):
        raise ModelFileError(
            "not a training checkpoint (it holds no training state): --resume continues only "
            "from the checkpoint.keras that `segnet train` wrote",
            ckpt,
        )
    if not _has_optimizer_state(ckpt):
        raise _no_optimizer_state(ckpt)
    return info, state


def _has_optimizer_state(path: Path) -> bool:
    """Whether a ``.keras`` file holds a compiled model (Keras then saves the optimizer).

    Read from the archive's ``config.json``, without TensorFlow, so the check comes before
    the data is verified.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            config = json.loads(zf.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    return bool(config.get("compile_config"))


def _no_optimizer_state(ckpt: Path) -> ModelFileError:
    return ModelFileError(
        "has no optimizer state (a shipped model such as best.keras copied over the "
        "checkpoint?), so the run cannot continue exactly; start a new run from it with "
        "--init instead",
        ckpt,
    )


def _contradictions(config: TrainConfig, run: TrainConfig) -> list[str]:
    """The options ``config`` sets that differ from the resumed run's, each described."""
    clashes = []
    for name in TrainConfig.__dataclass_fields__:
        if name in TrainConfig.PER_INVOCATION or not config.was_given(name):
            continue
        mine, theirs = getattr(config, name), getattr(run, name)
        if name == "teachers":
            # The same models elsewhere (a moved folder) are no contradiction: their
            # content is checked against the run's record when the targets are made.
            same = len(mine) == len(theirs)
        elif name in TrainConfig.PATHS:
            if name == "masks":  # not given: <images>annot, which find_pairs looks for
                mine, theirs = _masks_folder(config), _masks_folder(run)
            same = _same_path(mine, theirs)
        elif name == "classes" and Path(mine).is_file() and Path(theirs).is_file():
            same = os.path.samefile(mine, theirs)
        else:
            same = mine == theirs
        if not same:
            option = TrainConfig.option(name)
            clashes.append(f"{option} {_shown(mine, name)} (the run's: {_shown(theirs, name)})")
    return clashes


def _masks_folder(config: TrainConfig) -> Path | None:
    if config.masks is not None or config.images is None or Path(config.images).is_file():
        return config.masks
    return config.images.parent / f"{config.images.name}annot"


def _same_path(a: Path | None, b: Path | None) -> bool:
    if a is None or b is None:
        return a is b
    if Path(a).absolute() == Path(b).absolute():
        return True
    return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)


def _shown(value, name: str = "") -> str:
    if name == "hold_out":  # globs: quoted, as the shell takes them; a run may have none
        return " ".join(repr(g) for g in value) if value else "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


@dataclass
class _Data:
    """The run's data, read and checked: everything that does not depend on the model."""

    classes: ClassTable
    pairs: list[Pair]
    channels: int
    weights: np.ndarray
    mean: list[float]
    std: list[float]
    val_items: list[tuple[np.ndarray, np.ndarray]]
    #: With teachers: each training pair's soft targets, ``(H, W, K)`` probabilities x 255.
    targets: list[np.ndarray] | None = None
    #: With teachers: what the run records about each (path, sha256).
    teachers: list[dict] | None = None


def _load_data(config: TrainConfig, start: _Start, guard: SignalGuard, log) -> _Data:
    """Find and verify the training and validation pairs; class weights and input scaling.

    Raises:
        Interrupted: a signal came while the pairs were verified.
        DatasetError: the data has problems (every one is listed).
        UsageError: inconsistent channels (also with the resumed run), fewer pairs than a
            batch, bad class weights.
    """
    classes = load_classes(config.classes, config.void)
    pairs, problems = find_pairs(config.images, config.masks)
    val_pairs: list[Pair] = []
    vproblems: list[str] = []
    if config.hold_out:
        pairs, val_pairs = _held_out(config, pairs, start, log)
    elif config.val_images is not None:
        val_pairs, vproblems = find_pairs(config.val_images, config.val_masks)
        if not val_pairs:
            # Training on without it would choose no best model, silently.
            raise NoInputError(
                "--val: no validation image/mask pairs found"
                + (f" ({len(vproblems)} problem(s))" if vproblems else ""),
                config.val_images,
                problems=vproblems,
            )
    # What the options alone decide is refused before the minutes of verification.
    if config.class_weights not in ("auto", "none"):
        load_class_weights(config.class_weights, np.ones(classes.num_classes), classes.num_classes)
    teachers = _teacher_records(config, start, classes, pairs) if config.teachers else None
    if pairs and len(pairs) < config.batch_size:
        raise UsageError(f"{len(pairs)} training pairs are fewer than the batch size "
                         f"({config.batch_size}); lower --batch-size")
    log(f"verifying {len(pairs)} training pairs ...")
    # Verifying a large dataset takes minutes: a signal is answered between pairs.
    report = verify(
        pairs, classes, problems, config.rgb_masks, config.weight_power, lambda *_: guard.check()
    )
    vreport = None
    if val_pairs or vproblems:
        log(f"verifying {len(val_pairs)} validation pairs ...")
        vreport = verify(
            val_pairs, classes, vproblems, config.rgb_masks, progress=lambda *_: guard.check()
        )
    # Every problem of both splits at once, each split's named, so one round of fixes does.
    found = report.problems + [f"validation: {p}" for p in (vreport.problems if vreport else [])]
    if found:
        split = (
            f" ({len(report.problems)} in the training pairs, "
            f"{len(found) - len(report.problems)} in the validation pairs)"
            if vreport is not None
            else ""
        )
        raise DatasetError(f"{len(found)} problem(s) in the dataset{split}", found)
    channels = next(iter(report.channels))
    if start.info is not None and channels != start.info.in_channels:
        if config.resume:
            raise UsageError(
                f"the training images have {channels} channel(s) but the run was trained on "
                f"{start.info.in_channels} (were the images converted?); start a new run in "
                "another --out",
                config.images,
            )
        raise UsageError(
            f"the model takes {start.info.in_channels}-channel images but the training images "
            f"have {channels} channel(s)",
            start.path,
        )
    if vreport is not None and vreport.channels != report.channels:
        raise UsageError("validation images have other channels than training images")
    weights = load_class_weights(config.class_weights, report.weights, classes.num_classes)
    log("class weights: " + ", ".join(f"{n}={w:.3f}" for n, w in zip(classes.names, weights)))
    if config.resume:
        mean, std = start.state["mean"], start.state["std"]
    elif start.info is not None:  # --init: the model's weights expect the model's scaling
        mean, std = list(start.info.scaling.mean), list(start.info.scaling.std)
    else:
        mean, std = channel_stats(pairs, channels)
    val_items = [
        (
            to_model_input(read_image(p.image), channels, p.image),
            load_mask(p.mask, classes, config.rgb_masks),
        )
        for p in val_pairs
    ]
    return _Data(classes, pairs, channels, weights, mean, std, val_items, teachers=teachers)


def _teacher_records(
    config: TrainConfig, start: _Start, classes: ClassTable, pairs: list[Pair]
) -> list[dict]:
    """What the run records about each ``--teacher`` (path, sha256), once each is checked.

    From the model files' metadata and the first training image alone, so a wrong teacher
    is refused before the minutes of verifying the data.

    Raises:
        ModelFileError: a teacher that is missing, broken or not a segnet model.
        UsageError: teachers that segment other classes than the run's, or take other
            channels than each other or the resumed run's model; on ``--resume``, other
            teachers than the run began with (another count, or a file whose content
            changed); targets estimated larger than ``--cache-mb``.
    """
    records = []
    channels: dict[int, Path] = {}
    for path in config.teachers:
        if config.resume and not Path(path).exists():
            raise ModelFileError(
                "the run's teacher model is not there any more: give --teacher with where "
                "it is now (once for each of the run's teachers)",
                path,
            )
        info = read_info(path)
        if list(info.class_names) != list(classes.names):
            raise UsageError(
                f"--teacher segments other classes ({', '.join(info.class_names)}) than the "
                f"run's ({', '.join(classes.names)})",
                path,
            )
        channels.setdefault(info.in_channels, Path(path))
        records.append({"path": str(Path(path).absolute()), "sha256": file_digest(path, None)})
    if len(channels) > 1:
        shown = ", ".join(f"{p.name}: {c}" for c, p in channels.items())
        raise UsageError(f"the --teacher models take different numbers of channels ({shown})")
    if start.info is not None and start.info.in_channels not in channels:
        c, path = next(iter(channels.items()))
        raise UsageError(
            f"--teacher takes {c}-channel images, the model this run trains takes "
            f"{start.info.in_channels}",
            path,
        )
    if config.resume:
        began = start.state.get("teachers") or []
        if len(began) != len(records):
            raise UsageError(
                f"the run has {len(began)} teacher(s), not {len(records)}: give --teacher "
                "once for each of them, or leave it out"
            )
        # Averaged probabilities do not depend on the teachers' order: compare contents,
        # naming first a file whose content changed at the run's own path.
        was = {b["path"]: b["sha256"] for b in began}
        left = [b["sha256"] for b in began]
        odd = [r for r in records if was.get(r["path"], r["sha256"]) != r["sha256"]]
        for r in records:
            if r["sha256"] in left:
                left.remove(r["sha256"])
            else:
                odd.append(r)
        if odd:
            names = ", ".join(f"{Path(b['path']).name} ({b['sha256'][:12]})" for b in began)
            raise UsageError(
                f"--teacher: not one of the models the run began with ({names}): it changed "
                "or is another, so its targets would differ; give the run's teachers, or "
                "start a new run in another --out",
                odd[0]["path"],
            )
    try:
        # The first image's size stands for all, as the image cache estimates its size.
        x0 = read_image(pairs[0].image) if pairs else None
    except SegnetError:
        x0 = None  # verification reports it, with every other problem of the data
    if x0 is not None:
        mb = len(pairs) * x0.shape[0] * x0.shape[1] * classes.num_classes / 2**20
        if mb > config.cache_mb:
            raise _targets_too_big(config, len(pairs), mb)
    return records


def _targets_too_big(config: TrainConfig, n: int, mb: float) -> UsageError:
    return UsageError(
        f"the teachers' targets for {n} training images need about {mb:,.0f} MB of memory, "
        f"more than --cache-mb {config.cache_mb:g}: raise it"
    )


def _teacher_targets(config: TrainConfig, data: _Data, guard: SignalGuard, log) -> _Data:
    """The teachers' soft targets for every training pair, computed once before training.

    Each teacher segments each training image as ``segnet predict --tta flip`` does (the
    default grid and stitching: whole up to 1024 pixels a side, tiles beyond; the mirrored
    view averaged in: a better teacher for the cost of one pass over the data, paid once);
    the teachers' probabilities are then averaged. Computing them once, rather than running
    the teachers on every crop, keeps the teachers out of the training steps; the
    augmentation scales, crops, flips and mixes the targets with their image. Kept in
    memory as bytes (K per pixel); every invocation, ``--resume`` included, computes them
    again, so nothing is stored that could go stale.

    Raises:
        ModelFileError: a teacher that cannot be loaded.
        UsageError: teachers that take other channels than the training images; targets
            larger than ``--cache-mb``.
        Interrupted: a signal came while the targets were computed (checked after every
            batch of tiles).
    """
    from segnet_cli.config import TTA, TilingConfig
    from segnet_cli.model.segmenter import open_segmenter
    from segnet_cli.pipeline import image_probabilities

    k = data.classes.num_classes
    for path in config.teachers:
        channels = read_info(path).in_channels
        if channels != data.channels:
            raise UsageError(
                f"--teacher takes {channels}-channel images, the training images have "
                f"{data.channels}",
                path,
            )
    tiling = TilingConfig()
    segmenters = [open_segmenter(path) for path in config.teachers]
    log(f"teacher targets: {len(data.pairs)} images x {len(segmenters)} teacher(s) ...")
    targets: list[np.ndarray] = []
    used = 0.0
    t0 = last = time.time()
    for i, pair in enumerate(data.pairs):
        guard.check()
        if time.time() - last > 60:  # a line a minute: unattended logs show it advancing
            last = time.time()
            log(f"teacher targets: {i} of {len(data.pairs)} images ...")
        x = to_model_input(read_image(pair.image), data.channels, pair.image)
        used += x.shape[0] * x.shape[1] * k / 2**20
        if used > config.cache_mb:  # images larger than the first one estimated
            raise _targets_too_big(config, len(data.pairs), used / (i + 1) * len(data.pairs))
        p = sum(
            image_probabilities(s, x, tiling, TTA.FLIP, should_stop=lambda: guard.stop)
            for s in segmenters
        )
        guard.check()  # an interrupted image's probabilities are incomplete
        targets.append(np.round(p * (255.0 / len(segmenters))).astype(np.uint8))
    log(f"teacher targets: {len(targets)} images in {time.time() - t0:.0f} s")
    return replace(data, targets=targets)


def _held_out(
    config: TrainConfig, pairs: list[Pair], start: _Start, log
) -> tuple[list[Pair], list[Pair]]:
    """``(train, validation)``: the pairs ``--hold-out`` leaves to train on, and those it takes.

    With ``--init``, a held-out image that the starting model trained on is validated on all
    the same, with a warning: its figures then overstate how the model does on unseen ones.

    Raises:
        UsageError: the globs match none of the pairs, or all of them.
    """
    images = Path(config.images)
    train, held = split_held_out(pairs, config.hold_out, images)
    shown = _shown(config.hold_out, "hold_out")
    if not held:
        raise UsageError(
            f"--hold-out {shown} matches none of the {len(pairs)} training images (a glob "
            "matches a file name, or the path under the images folder with '/' between folders)",
            images,
        )
    if not train:
        raise UsageError(
            f"--hold-out {shown} matches all {len(pairs)} training images: none is left to "
            "train on",
            images,
        )
    log(f"holding out {len(held)} of {len(pairs)} pairs ({shown}) to validate on")
    if config.init is not None and not config.resume and start.info is not None:
        seen = _trained_on(start.info) & {p.image.resolve() for p in held}
        if seen:
            log(
                f"warning: the --init model trained on {len(seen)} of the {len(held)} held-out "
                f"images (e.g. {min(seen)}), so validation overstates how it does on unseen ones"
            )
    return train, held


def _trained_on(info: ModelInfo) -> set[Path]:
    """The images a model's run trained on, as far as its recorded settings still find them.

    Best effort: a run records its images folder and held-out globs, not its file list, and
    the folder may have moved or be on another machine (then: an empty set).
    """
    config = info.training.get("config") or {}
    if not config.get("images"):
        return set()
    try:
        pairs, _ = find_pairs(config["images"], config.get("masks"))
    except SegnetError:
        return set()
    trained, _ = split_held_out(pairs, tuple(config.get("hold_out") or ()), Path(config["images"]))
    return {p.image.resolve() for p in trained}


def _architecture(config: TrainConfig, data: _Data) -> dict:
    """The ``network.Architecture`` fields of this run, as its model files record them."""
    return dict(
        width=config.width,
        stages=config.stages,
        in_channels=data.channels,
        num_classes=data.classes.num_classes,
        dropout=config.dropout,
    )


def _build_model(config: TrainConfig, start: _Start, data: _Data, steps: int, log):
    """The compiled model to train: the checkpoint's (``--resume``) or a new one.

    Raises:
        ModelFileError: the checkpoint cannot be loaded.
    """
    with _strategy_scope():
        if config.resume:
            return _load_checkpoint(start, config.epochs, log)
        model = build_segnet(Architecture(**_architecture(config, data)), data.mean, data.std)
        if start.init is not None:
            _copy_weights(start, model, log)
        # --init too: a new run, so a fresh optimizer and schedule (warm-up included).
        distill = config.distill if config.teachers else None
        model.compile(optimizer=_optimizer(config, steps), loss=make_loss(config.loss, distill))
        return model


def _copy_weights(start: _Start, model, log) -> None:
    """Give ``model`` the ``--init`` model's weights, layer by layer.

    Every layer is copied, except the classifier when the class counts differ: it then
    keeps its fresh initialisation (a 1x1 convolution to the new classes' logits).

    Raises:
        ModelFileError: the model cannot be loaded or its layers do not match its metadata.
    """
    from segnet_cli.model.network import load_model

    source, info = load_model(start.path)
    log(
        f"starting from the weights of {start.path} (width {info.architecture['width']}, "
        f"{info.architecture['stages']} stages and input scaling taken from it)"
    )
    k = model.output_shape[-1]
    fresh = set()
    if info.num_classes != k:
        fresh.add("classifier")
        log(
            f"the model has {info.num_classes} classes and the training data {k}: every layer "
            "keeps the model's weights except the classifier, which starts afresh"
        )
    names = {layer.name for layer in source.layers}
    for layer in model.layers:
        if not layer.weights or layer.name in fresh:
            continue
        values = source.get_layer(layer.name).get_weights() if layer.name in names else None
        if values is None or [v.shape for v in values] != [tuple(w.shape) for w in layer.weights]:
            raise ModelFileError(
                f"its layer {layer.name} does not match the architecture in its metadata",
                start.path,
            )
        layer.set_weights(values)


def _load_checkpoint(start: _Start, epochs: int, log):
    """The checkpoint's model with its optimizer state (the schedule continues from its step).

    Raises:
        ModelFileError: the checkpoint cannot be loaded or has no optimizer state.
    """
    from segnet_cli.model import layers  # noqa: F401  (registers the custom layers)

    ckpt = start.path
    try:
        model = keras.saving.load_model(str(ckpt), compile=True, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a broken archive
        raise ModelFileError(f"cannot load the checkpoint: {exc}", ckpt) from None
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or int(optimizer.iterations.numpy()) == 0:
        raise _no_optimizer_state(ckpt)
    step = int(optimizer.iterations.numpy())
    log(f"resuming after epoch {start.state['epoch']} (optimizer step {step})")
    planned = _planned_epochs(start.state)
    if epochs > planned > 0:
        # The schedule is part of the optimizer state; rebuilding it would jump the rate.
        log(
            f"the learning-rate schedule was planned for {planned} epochs; "
            f"epochs {planned + 1}-{epochs} run at its final rate"
        )
    return model


def _planned_epochs(state: dict) -> int:
    """The epochs a run's learning-rate schedule was built for (0 for a new run).

    The schedule lives in the optimizer, so a resumed run keeps it, whatever --epochs says.
    """
    return int(state.get("schedule_epochs") or state.get("config", {}).get("epochs") or 0)


def _optimizer(config: TrainConfig, steps: int):
    """AdamW with a linear warm-up and a cosine decay over the whole run."""
    total = steps * config.epochs
    warm = min(steps * config.warmup_epochs, max(total - 1, 0))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate / 10 if warm else config.learning_rate,
        decay_steps=max(total - warm, 1),
        alpha=0.01,
        warmup_target=config.learning_rate if warm else None,
        warmup_steps=warm,
    )
    return keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)


@dataclass
class _Run:
    """One invocation's settings and the run's record so far (``EpochEnd`` updates it)."""

    config: TrainConfig
    out: Path
    data: _Data
    arch: dict  # Architecture fields, also recorded in the model files
    params: int
    planned: int  # epochs the learning-rate schedule was built for
    history: list[dict]
    best: float  # best validation mIoU so far, -1 before any
    seconds: float  # training time of every invocation of the run
    t0: float  # this invocation's start (time.time())
    init: dict | None = None  # the --init model the run started from: path, sha256

    def training_state(self, epoch: int) -> dict:
        """What the model files record about the run after ``epoch`` (``--resume`` reads it)."""
        return {
            "epoch": epoch,
            "epochs": self.config.epochs,
            "schedule_epochs": self.planned,
            "history": self.history,
            "best_miou": self.best,
            "seconds": round(self.seconds, 1),
            "mean": self.data.mean,
            "std": self.data.std,
            "config": _config_json(self.config),
            "class_weights": [float(w) for w in self.data.weights],
            **({"init": self.init} if self.init else {}),
            **({"teachers": self.data.teachers} if self.data.teachers else {}),
        }

    def model_info(self, training: dict) -> ModelInfo:
        arch = Architecture(**self.arch)
        return ModelInfo(
            class_names=self.data.classes.names,
            palette=self.data.classes.palette(),
            in_channels=self.data.channels,
            scaling=InputScaling(mean=tuple(self.data.mean), std=tuple(self.data.std)),
            stride=arch.stride,
            receptive_field=arch.receptive_field,
            architecture={**self.arch, "params": self.params, "decoder": "argmax-unpooling"},
            training=training,
            void_class=self.data.classes.void,
        )

    def export_copy(self, model):
        """A float32, optimizer-free copy of ``model`` for shipping and prediction."""
        return _export_copy(model, self.arch, self.data.mean, self.data.std)


def _config_json(config: TrainConfig) -> dict:
    """``config`` as the checkpoint records it; absolute paths, so --resume works from anywhere."""
    out = {}
    for key, value in asdict(config).items():
        if key == "given":
            continue  # about one invocation's command line, not the run
        if isinstance(value, Path):
            value = str(value.absolute())
        elif key == "teachers":
            value = [str(Path(v).absolute()) for v in value]
        elif isinstance(value, Enum):
            value = value.value
        out[key] = value
    return out


class EpochEnd(keras.callbacks.Callback):
    """After each epoch: validate, record the history, save best model and checkpoint.

    Also feeds the progress bar per step and stops the run when its time budget is spent or
    a signal came (``guard``): after the step under way, and without saving a cut-short
    epoch, so the checkpoint keeps the last finished one and --resume redoes the rest.
    """

    def __init__(self, run: _Run, guard: SignalGuard, progress=None, log=print) -> None:
        super().__init__()
        self.run = run
        self.guard = guard
        self.progress = progress
        self.log = log
        self.epoch_start = time.time()
        self.stop_reason: str | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.time()

    def on_train_batch_end(self, batch, logs=None):
        if self.guard.stop:
            self.model.stop_training = True
        if self.progress is not None:
            self.progress.step(float((logs or {}).get("loss", float("nan"))))

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.stop:
            return  # Keras ends a stopped epoch early and still calls this: save nothing
        run, config = self.run, self.run.config
        ep = epoch + 1
        row = {"epoch": ep, "loss": round(float((logs or {}).get("loss", float("nan"))), 5)}
        # Keras 3's ``learning_rate`` is the schedule's value at the current step.
        row["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        is_best = False
        if run.data.val_items and (ep % config.val_every == 0 or ep == config.epochs):
            miou, figures = self._validate()
            row.update(figures)
            if miou > run.best:
                run.best, is_best = miou, True
        elapsed = time.time() - self.epoch_start
        run.seconds += elapsed
        row["seconds"] = round(elapsed, 1)
        run.history.append(row)
        info = run.model_info(run.training_state(ep))
        # Best first, checkpoint last: a kill between them loses at most the epoch.
        if is_best:
            save_model(run.export_copy(self.model), info, run.out / BEST)
        save_model(self.model, info, run.out / CHECKPOINT)
        _write_history(run.out, run.history)
        self.log(_epoch_line(row, config.epochs, is_best))
        if self.guard.stop:  # came while validating or saving: both finished, stop now
            self.model.stop_training = True
        elif config.max_minutes is not None and (time.time() - run.t0) / 60 > config.max_minutes:
            self.stop_reason = f"time budget of {config.max_minutes:g} min reached"
            self.model.stop_training = True

    def _validate(self) -> tuple[float, dict]:
        """The validation mIoU and the figures the history records (rounded)."""
        data = self.run.data
        k, void = data.classes.num_classes, data.classes.void
        cm = evaluate_arrays(self.model, data.val_items, k, void)
        sc = scores(cm, ignore=void if void is not None and void < k else None)
        return sc.mean_iou, {
            "val_miou": round(sc.mean_iou, 5),
            "val_g": round(sc.global_accuracy, 5),
            "val_c": round(sc.class_accuracy, 5),
            "val_iou": [None if math.isnan(v) else round(v, 4) for v in sc.per_class_iou],
        }


def _epoch_line(row: dict, epochs: int, is_best: bool) -> str:
    msg = f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f}"
    if "val_miou" in row:
        msg += (
            f"  val mIoU {row['val_miou'] * 100:.1f}  G {row['val_g'] * 100:.1f}"
            f"  C {row['val_c'] * 100:.1f}" + ("  (best)" if is_best else "")
        )
    return msg + f"  [{row['seconds']:.0f}s]"


def _fit(model, run: _Run, steps: int, start_epoch: int, epoch_end: EpochEnd, progress, log):
    """Train from ``start_epoch`` to ``run.config.epochs``; ``epoch_end`` saves each epoch."""
    config = run.config
    log(
        f"training SegNet ({run.params:,} parameters, width {config.width}, {config.stages} "
        f"stages) on {len(run.data.pairs)} pairs, {steps} steps/epoch, epochs {start_epoch + 1}-"
        f"{config.epochs}, {config.precision}"
    )
    data = run.data
    train_ds = make_dataset(
        data.pairs, data.classes, data.channels, data.weights, config, start_epoch, data.targets
    )
    if progress is not None:
        progress.start(steps * config.epochs, steps * start_epoch)
    try:
        model.fit(
            train_ds,
            epochs=config.epochs,
            initial_epoch=start_epoch,
            steps_per_epoch=steps,
            callbacks=[epoch_end],
            shuffle=False,  # the dataset shuffles itself
            verbose=0,
        )
    finally:
        if progress is not None:
            progress.stop()
    if epoch_end.stop_reason:
        log(f"stopped early: {epoch_end.stop_reason}; continue with --resume")


def _final_model(model, run: _Run) -> dict:
    """Write ``model.keras``: the best on validation if there was one, else the last epoch.

    Returns:
        The training state of the last finished epoch (empty before any).
    """
    ckpt = run.out / CHECKPOINT
    final_state = read_info(ckpt).training if ckpt.exists() else {}
    if (run.out / BEST).exists():
        with atomic_path(run.out / FINAL) as tmp:
            shutil.copyfile(run.out / BEST, tmp)
    elif ckpt.exists():
        save_model(run.export_copy(model), run.model_info(final_state), run.out / FINAL)
    return final_state


def _strategy_scope():
    """``MirroredStrategy`` when more than one GPU is visible; otherwise a no-op scope."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy().scope()
    return contextlib.nullcontext()
