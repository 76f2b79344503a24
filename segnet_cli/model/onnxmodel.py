"""ONNX models made by ``segnet export``: their metadata, and running them with ONNX Runtime.

An exported ``.onnx`` file carries the source model's ``segnet.json`` (class names, palette,
input channels and scaling, stride, receptive field, architecture) in the ONNX
``metadata_props`` under the key ``segnet.json``, plus an ``export`` block (input and output
contract, the source model's sha256, the name of the logits tensor). ``modelfile.read_info``
turns that back into the ``ModelInfo`` every command uses, so ``segnet info``, ``predict``,
``tile`` and ``eval`` take ``--model model.onnx`` like a ``.keras`` file.

``OnnxSegmenter`` has the interface of ``model.segmenter.Segmenter`` (``run(batch, output)``,
``batch_tiles``, ``info``, ``stride``, ``num_classes``, ``path``), so the pipeline, tiling,
stitching and outputs are the same code whichever runs the model. It asks ONNX Runtime for
the graph's *logits* (named in the metadata; the graph is cut down to them when the session
is made), not for the exported probabilities: the argmax of the logits is what ``Segmenter``
takes, and a softmax can round two close classes to the same probability.

Neither ``onnx`` nor ``onnxruntime`` is imported until a ``.onnx`` model is used; without the
``onnx`` extra the error names the command that installs it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segnet_cli.config import Precision
from segnet_cli.errors import MissingExtraError, ModelFileError, UsageError
from segnet_cli.model.modelfile import (
    ONNX_INSTALL,
    OUTPUTS,
    ModelInfo,
    import_onnx,
    load_onnx_proto,
    read_metadata,
    read_onnx_info,
)
from segnet_cli.model.runner import Runner


def import_onnxruntime():
    """``onnxruntime``, or a ``MissingExtraError`` naming the install command."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingExtraError(
            f"running an ONNX model needs ONNX Runtime: {ONNX_INSTALL} ({exc})"
        ) from None
    return onnxruntime


def _providers(device: str | None, available: list[str]) -> list[str]:
    """ONNX Runtime execution providers for ``--device`` (``None``/``auto``: the best)."""
    d = (device or "auto").lower()
    if d == "cpu":
        return ["CPUExecutionProvider"]
    if d == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    kind, _, number = d.partition(":")
    if kind == "gpu" and (not number or number.isdigit()):
        if "CUDAExecutionProvider" not in available:
            raise UsageError(
                f"--device {device}: this ONNX Runtime has no CUDA provider "
                "(pip install onnxruntime-gpu)"
            )
        return ["CUDAExecutionProvider"]
    raise UsageError(f"--device must be cpu, gpu or gpu:N, not {device!r}")


def _keep_only(proto, output: str, onnx) -> None:
    """Make ``output`` the graph's one output and drop the nodes it does not depend on."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    needed, stack, seen = set(), [output], set()
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        needed.add(id(node))
        stack.extend(i for i in node.input if i)
    keep = [n for n in proto.graph.node if id(n) in needed]
    used = {i for n in keep for i in n.input}
    initializers = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(initializers)
    del proto.graph.output[:]
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)
    )


class OnnxSegmenter(Runner):
    """An exported ONNX SegNet ready for inference: ``Segmenter``'s interface, ONNX Runtime.

    Args:
        model_path: the ``.onnx`` file (made by ``segnet export --format onnx``).
        precision: must be ``float32`` (the exported graph is float32).
        device: ``None``/``auto`` (CUDA when this ONNX Runtime has it, else CPU), ``cpu``,
            ``gpu`` or ``gpu:N``.

    Raises:
        ModelFileError: not an exported segnet ONNX file, or one whose graph lacks its logits.
        MissingExtraError: ``onnx`` or ``onnxruntime`` is not installed.
        UsageError: another precision, or a device this ONNX Runtime cannot use.
    """

    def __init__(
        self,
        model_path: str | Path,
        precision: Precision | str = Precision.FLOAT32,
        device: str | None = None,
    ) -> None:
        precision = Precision.parse(precision, "--precision")
        if precision is not Precision.FLOAT32:
            raise UsageError(f"an ONNX model runs in float32, not {precision}; drop --precision")
        self.path = Path(model_path)
        self.precision = precision
        ort = import_onnxruntime()
        proto = load_onnx_proto(self.path)
        data = read_metadata(self.path, proto)
        self.info: ModelInfo = read_onnx_info(self.path)
        export = data.get("export") or {}
        self._logits = export.get("logits")
        names = {o for n in proto.graph.node for o in n.output}
        if not self._logits or self._logits not in names:
            raise ModelFileError("the ONNX graph does not name its logits tensor", self.path)
        # Run the logits alone (see the module notes): the graph's only output, and every
        # node they do not need removed. ONNX Runtime runs every node of a graph whatever
        # outputs a call asks for; the exported softmax alone took 155 ms of a 360x480 run.
        _keep_only(proto, self._logits, import_onnx())
        self._input = proto.graph.input[0].name
        providers = _providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers are not ours
        try:
            self.session = ort.InferenceSession(
                proto.SerializeToString(), options, providers=providers
            )
        except Exception as exc:  # ORT raises its own exception types for a bad graph
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"ONNX Runtime cannot load the model: {first}", self.path) from None
        self.devices: list[str | None] = [None]
        self.providers = self.session.get_providers()

    def run(self, batch: np.ndarray, output: str = "logits"):
        """Run a batch through the model; the same contract as ``Segmenter.run``.

        Args:
            batch: ``(B, H, W, C)`` float32 in [0, 1].
            output: ``"logits"``, ``"classes"`` (``(B, H, W)`` uint8) or ``"confidence"``
                (a ``(classes, winning probability)`` pair).
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        (logits,) = self.session.run([self._logits], {self._input: batch})
        if logits.shape[-1] != self.num_classes or logits.shape[:3] != batch.shape[:3]:
            raise ModelFileError(
                f"the ONNX graph gave logits of shape {logits.shape} for input {batch.shape}",
                self.path,
            )
        if output == "logits" or self.num_classes > 256:
            return logits
        classes = np.argmax(logits, axis=-1).astype(np.uint8)
        if output == "classes":
            return classes
        # The winning class's softmax probability: 1 / sum(exp(logit - max logit)).
        top = np.max(logits, axis=-1, keepdims=True)
        confidence = 1.0 / np.sum(np.exp(logits - top), axis=-1)
        return classes, confidence.astype(np.float32)



__all__ = ["ONNX_INSTALL", "OnnxSegmenter", "import_onnx", "import_onnxruntime", "read_metadata",
           "read_onnx_info"]
