"""The inference engine: a loaded model that turns tiles into logits, in batches.

``Segmenter`` is the one place where pixels meet the model. ``predict``, ``tile`` and
``eval`` all go through it, so the same image gives the same mask whichever command runs it:
same input scaling (stored in the model file), same tile grid, same batching, same blending.

What runs is the model's inference form: the same weights with every batch norm folded into
its convolution (``model.fold_batch_norm``), built under the requested precision policy.

It runs through one ``tf.function`` per output form (logits, classes, classes with
confidence) with a shape-polymorphic signature ``(None, None, None, C)``, so every tile shape
shares one trace. The convolutions are never XLA-compiled; the pooling and unpooling can be
(see ``layers``), and XLA compiles those once per shape. A run-time flag inside the trace
sends a shape's first batch down the uncompiled path and only a shape that comes back down
the compiled one: a folder of same-size photos pays one compilation, a folder of
all-different sizes none. TensorFlow places the model on a GPU when one is visible.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from segnet_cli.config import TilingConfig, default_model_path
from segnet_cli.errors import ModelFileError, UsageError
from segnet_cli.modelfile import ModelInfo, read_info
from segnet_cli.tiling import Stitcher, Tile, TileGrid, stitch_all

PRECISIONS = ("float32", "bfloat16", "float16")
OUTPUTS = ("logits", "classes", "confidence")


def resolve_model_path(model: str | Path | None) -> Path:
    """The model to use: the given path, or the bundled one (with advice when missing)."""
    if model is not None:
        return Path(model)
    path = default_model_path()
    if not path.exists():
        raise ModelFileError(
            "no bundled model found; train one with `segnet train IMAGES --val VAL --out RUN` "
            "and pass --model RUN/model.keras",
            path,
        )
    return path


def validate_tiling(tiling: TilingConfig, stride: int) -> None:
    """Reject impossible tiling options up front (a usage error, not a per-image failure)."""
    if tiling.blend not in ("center", "gaussian"):
        raise UsageError(f"--blend must be 'center' or 'gaussian', not {tiling.blend!r}")
    if tiling.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    TileGrid.make(1 << 20, 1 << 20, tiling.tile, tiling.halo, stride)


def select_devices(device: str | None) -> list[str | None]:
    """The devices a Segmenter runs on.

    ``None``/``auto``: every visible GPU when there are several (batches are split across
    them), otherwise TensorFlow's own placement (``[None]``). ``cpu``, ``gpu`` or ``gpu:N``:
    that one device.
    """
    import tensorflow as tf

    if device is None or device == "auto":
        gpus = tf.config.list_logical_devices("GPU")
        return [g.name for g in gpus] if len(gpus) > 1 else [None]
    return [select_device(device)]


def select_device(device: str | None) -> str | None:
    """Validate ``--device`` (``cpu``, ``gpu``, ``gpu:N``) and return a TF device string."""
    if device is None or device == "auto":
        return None
    import tensorflow as tf

    d = device.lower()
    if d == "cpu":
        return "/CPU:0"
    if d.startswith("gpu"):
        idx = int(d.split(":")[1]) if ":" in d else 0
        gpus = tf.config.list_logical_devices("GPU")
        if idx >= len(gpus):
            raise UsageError(f"--device {device}: {len(gpus)} GPU(s) visible")
        return f"/GPU:{idx}"
    raise UsageError(f"--device must be cpu, gpu or gpu:N, not {device!r}")


class Segmenter:
    """A model ready for inference, with its metadata.

    Args:
        model_path: the ``.keras`` model file (``None``: the bundled model).
        precision: ``float32``, ``bfloat16`` (mixed) or ``float16`` (mixed, for GPUs).
        device: ``None`` (TensorFlow's choice), ``cpu``, ``gpu`` or ``gpu:N``.
    """

    #: Batches of one shape run without XLA before that shape is compiled.
    compile_after = 1

    def __init__(
        self,
        model_path: str | Path | None = None,
        precision: str = "float32",
        device: str | None = None,
    ) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}")
        self.path = resolve_model_path(model_path)
        self.info: ModelInfo = read_info(self.path)
        import tensorflow as tf

        from segnet_cli.model import load_model

        self.precision = precision
        self.devices = select_devices(device)
        model, _ = load_model(self.path)
        model = self._inference_form(model, precision)
        self.model = model
        c = self.info.in_channels
        if model.input_shape[-1] != c:
            raise ModelFileError(
                f"model takes {model.input_shape[-1]} channels but its metadata says {c}",
                self.path,
            )
        self._spec = tf.TensorSpec((None, None, None, c), tf.float32)
        self._traces: dict[str, object] = {}
        self._shapes: Counter[tuple[int, ...]] = Counter()
        # The common case, traced and run once now on a tiny input: the first run of a trace
        # builds its pooling branches' kernels, a fixed cost that belongs to loading.
        s = self.stride
        self._trace("classes")(tf.zeros((1, s, s, c)), tf.constant(False))

    def _inference_form(self, model, precision: str):
        """The same weights with batch norm folded in, built under the precision policy."""
        from segnet_cli.model import inference_form

        try:
            return inference_form(model, self.info, precision)
        except ValueError as exc:
            raise ModelFileError(str(exc), self.path) from None

    def _trace(self, output: str):
        """The ``tf.function`` for one output form.

        Its signature is shape-polymorphic, so one trace serves every tile shape; a scalar
        ``compiled`` input picks the XLA or the plain pooling at run time, inside the one
        graph, so both share its convolution kernels (each pays a warm-up per shape).
        """
        fn = self._traces.get(output)
        if fn is not None:
            return fn
        import tensorflow as tf

        from segnet_cli.layers import compiled_windows

        model = self.model

        @tf.function(
            input_signature=[self._spec, tf.TensorSpec((), tf.bool)], jit_compile=False
        )
        def infer(x, compiled):
            with compiled_windows(compiled):
                logits = tf.cast(model(x, training=False), tf.float32)
            if output == "logits":
                return logits
            classes = tf.cast(tf.argmax(logits, axis=-1, output_type=tf.int32), tf.uint8)
            if output == "classes":
                return classes
            return classes, tf.reduce_max(tf.nn.softmax(logits, axis=-1), axis=-1)

        infer.get_concrete_function()
        self._traces[output] = infer
        return infer

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def stride(self) -> int:
        return self.info.stride

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``(B, H, W, K)`` float32 for a batch of same-sized float32 tiles in [0, 1]."""
        return self.run(batch, "logits")

    def run(self, batch: np.ndarray, output: str = "logits"):
        """Run a batch of same-sized float32 tiles in [0, 1] through the model.

        Args:
            batch: ``(B, H, W, C)`` float32.
            output: ``"logits"`` (``(B, H, W, K)`` float32), ``"classes"`` (``(B, H, W)``
                uint8 class indices, the argmax taken where the model runs) or
                ``"confidence"`` (a ``(classes, winning probability)`` pair).

        On several devices the batch is split into one chunk per device; each chunk is
        dispatched before any result is read back, so the devices compute concurrently.
        A shape's first batch runs without XLA, later ones with it (see the module notes).
        """
        import tensorflow as tf

        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}")
        if output != "logits" and self.num_classes > 256:
            output = "logits"  # class indices beyond uint8: leave the argmax to NumPy
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self._shapes[batch.shape] += 1
        infer = self._trace(output)
        compiled = tf.constant(self._shapes[batch.shape] > self.compile_after)
        devices = self.devices[: max(1, len(batch))]
        if len(devices) == 1 and devices[0] is None:
            outs = [infer(tf.convert_to_tensor(batch), compiled)]
        else:
            outs = []
            for dev, chunk in zip(devices, np.array_split(batch, len(devices))):
                with tf.device(dev):
                    outs.append(infer(tf.convert_to_tensor(chunk), compiled))
        if isinstance(outs[0], tuple):
            return tuple(np.concatenate([o[i].numpy() for o in outs]) for i in range(2))
        return np.concatenate([o.numpy() for o in outs], axis=0)

    def grid(self, height: int, width: int, tiling: TilingConfig) -> TileGrid:
        return TileGrid.make(height, width, tiling.tile, tiling.halo, self.stride)

    def segment(
        self, image: np.ndarray, tiling: TilingConfig, confidence: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Segment one ``(H, W, C)`` float32 image in memory; returns ``(mask, confidence)``."""
        h, w = image.shape[:2]
        grid = self.grid(h, w, tiling)
        stitcher = Stitcher(grid, self.num_classes, tiling.blend, confidence=confidence)
        for tiles, outputs in self.run_tiles(
            ((t, crop(image, t)) for t in grid.tiles()), tiling.batch_size, stitcher.needs
        ):
            for t, out in zip(tiles, outputs):
                stitcher.add(t, out)
        return stitch_all(stitcher, h, w, confidence)

    def batch_tiles(self, batch_size: int) -> int:
        """Tiles per model call: ``batch_size`` for each device, so every GPU gets work."""
        return max(1, batch_size) * len(self.devices)

    def run_tiles(
        self, tiles: Iterable[tuple[Tile, np.ndarray]], batch_size: int, output: str = "logits"
    ) -> Iterator[tuple[list[Tile], list]]:
        """Run ``(tile, pixels)`` pairs through the model, batching tiles of equal shape.

        ``batch_size`` is per device (see ``batch_tiles``).

        Yields ``(tiles, outputs)``: one output per tile in the form ``output`` names (see
        ``run``; a ``"confidence"`` output is a ``(classes, confidence)`` pair per tile).

        Tiles come back in batches, each batch one shape; a shape's partial batch is flushed
        when a tile of another shape would otherwise wait behind it for long (at the end, or
        once ``batch_size`` tiles of any shape are pending), so memory stays bounded.
        """
        batch_size = self.batch_tiles(batch_size)
        pending: dict[tuple, list[tuple[Tile, np.ndarray]]] = {}
        count = 0
        for tile, pixels in tiles:
            key = pixels.shape
            pending.setdefault(key, []).append((tile, pixels))
            count += 1
            if len(pending[key]) >= batch_size:
                yield self._run(pending.pop(key), output)
                count = sum(len(v) for v in pending.values())
            elif count >= 2 * batch_size:
                # Many shapes pending: flush the oldest so a band can finish.
                oldest = next(iter(pending))
                yield self._run(pending.pop(oldest), output)
                count = sum(len(v) for v in pending.values())
        for group in pending.values():
            yield self._run(group, output)

    def _run(self, group: list[tuple[Tile, np.ndarray]], output: str) -> tuple[list[Tile], list]:
        batch = np.stack([p for _, p in group])
        return [t for t, _ in group], split_outputs(self.run(batch, output))


def split_outputs(outputs) -> list:
    """One entry per tile from a batch output of ``Segmenter.run``."""
    if isinstance(outputs, tuple):
        return list(zip(*outputs))
    return list(outputs)


def crop(image: np.ndarray, tile: Tile) -> np.ndarray:
    y0, x0, y1, x1 = tile.window
    return image[y0:y1, x0:x1]


def model_fingerprint(path: Path) -> str:
    """A short content hash of a model file: masks record which model made them."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


__all__ = ["Segmenter", "resolve_model_path", "model_fingerprint", "crop", "read_info"]
