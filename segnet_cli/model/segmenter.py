"""The inference engine: a loaded model that turns tiles into logits, in batches.

``Segmenter`` is the one place where pixels meet the model. ``segnet_cli.pipeline`` feeds it
the tiles of every command (``predict``, ``tile``, ``eval``, the Python API, on this machine
or on Ray actors), so the same image gives the same mask whichever runs it: same input
scaling (stored in the model file), same tile grid, same batching, same blending.

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
from pathlib import Path

import numpy as np

from segnet_cli.config import Precision
from segnet_cli.errors import ModelFileError, UsageError
from segnet_cli.model.modelfile import (
    OUTPUTS,
    ModelInfo,
    is_onnx,
    read_info,
    resolve_model_path,
)
from segnet_cli.model.runner import Runner


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
    kind, _, number = d.partition(":")
    if kind == "gpu" and (not number or number.isdigit()):
        idx = int(number or 0)
        gpus = tf.config.list_logical_devices("GPU")
        if idx >= len(gpus):
            raise UsageError(f"--device {device}: {len(gpus)} GPU(s) visible")
        return f"/GPU:{idx}"
    raise UsageError(f"--device must be cpu, gpu or gpu:N, not {device!r}")


class Segmenter(Runner):
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
        precision: Precision | str = Precision.FLOAT32,
        device: str | None = None,
    ) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        precision = Precision.parse(precision, "--precision")
        self.path = resolve_model_path(model_path)
        self.info: ModelInfo = read_info(self.path)
        import tensorflow as tf

        from segnet_cli.model.network import load_model

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
        from segnet_cli.model.network import inference_form

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

        from segnet_cli.model.layers import compiled_windows

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



def open_segmenter(
    model_path: str | Path | None = None,
    precision: Precision | str = Precision.FLOAT32,
    device: str | None = None,
):
    """The model ready for inference, chosen by its file: every command loads models here.

    A ``.onnx`` file (made by ``segnet export``) runs with ONNX Runtime
    (``model.onnxmodel.OnnxSegmenter``); anything else is a ``.keras`` model run by
    TensorFlow (``Segmenter``). Both have the same interface and give the same masks.
    """
    if is_onnx(model_path):
        from segnet_cli.model.onnxmodel import OnnxSegmenter

        return OnnxSegmenter(model_path, precision, device)
    return Segmenter(model_path, precision, device)


__all__ = ["Segmenter", "open_segmenter", "select_devices", "select_device"]
