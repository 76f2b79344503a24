"""``segnet export``: a trained SegNet as ONNX, a TensorFlow SavedModel or LiteRT.

What every export is, whatever the format:

* **input** ``image``: ``(N, H, W, C)`` float32 pixels in [0, 1], NHWC, any N, H and W. The
  model's own contract: integer images divided by their dtype's maximum (uint8 by 255,
  uint16 by 65535), exactly what ``segnet predict`` feeds the model. Float rather than uint8
  so one graph serves 8- and 16-bit imagery alike, and so ``segnet predict --model x.onnx``
  runs an exported file on the pipeline's own tiles, with no rounding step between them.
  The model's fixed scaling (per-channel mean and std from the model file) is inside the
  graph: callers only divide by the dtype's maximum.
* **output** ``probabilities``: ``(N, H, W, K)`` float32 softmax over the K classes; or, with
  ``classes_output``, ``classes``: ``(N, H, W)`` class indices (uint8; int32 beyond 256
  classes).
* **the network**: the model's inference form (batch norm folded into the convolutions, as
  ``segnet predict`` runs it), traced with the pooling and unpooling in their export form
  (``model.layers.export_windows``): the argmax unpooling exports *as* unpooling, the same
  equal-and-select ops that Keras runs, with no XLA sub-function and no run-time flag.
* **metadata**: the source model's ``segnet.json`` (class names, palette, input channels and
  scaling, stride, receptive field, architecture, validation figures) plus an ``export``
  block (input and output contract, source file name and sha256, segnet version). Where it
  lives: ONNX ``metadata_props`` (key ``segnet.json``, and flat keys such as
  ``class_names``); SavedModel ``assets.extra/segnet.json`` and the string variable
  ``segnet_metadata`` (``tf.saved_model.load(p).segnet_metadata``); LiteRT the flatbuffer's
  ``metadata`` table, entry ``segnet.json`` (the interpreter ignores it; read it with the
  flatbuffer schema, ``read_litert_metadata``).

After writing, each export runs its own file, with the runtime a deployment would use (ONNX
Runtime, ``tf.saved_model.load``, the LiteRT interpreter), on small synthetic inputs of odd
sizes and compares it with the Keras model (``check_parity``). A file that disagrees is
never renamed into place: nothing is left behind, and an ``ExportError`` says by how much.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segnet_cli.config import ExportConfig, ExportFormat, Report
from segnet_cli.errors import ExportError, MissingExtraError, ModelFileError, UsageError
from segnet_cli.io.files import atomic_folder, atomic_path, check_writable, file_digest
from segnet_cli.model.modelfile import MEMBER, ModelInfo, read_info, resolve_model_path
from segnet_cli.model.onnxmodel import ONNX_INSTALL, import_onnx, import_onnxruntime

INPUT = "image"
PROBABILITIES = "probabilities"
CLASSES = "classes"
#: The ONNX graph's NHWC logits tensor (not a graph output; ``OnnxSegmenter`` asks for it).
LOGITS = "logits"
#: ONNX opset: 17 has every op the export form uses (Softmax on the last axis, Pad, Where).
ONNX_OPSET = 17
LITERT_INSTALL = "pip install 'segnet-cli[litert]'"
#: Keras layers the exporters know; anything else is named in an ExportError up front.
SUPPORTED_LAYERS = {
    "InputLayer", "Normalization", "Conv2D", "BatchNormalization", "ReLU",
    "MaxPoolingWithArgmax2D", "MaxUnpooling2D",
}
#: The parity check's synthetic inputs ``(N, H, W)``: odd sizes, and a batch of two.
CHECK_SHAPES = ((1, 37, 53), (2, 19, 45))
#: Pixels whose class must agree in the parity check, and the largest probability gap.
MIN_AGREEMENT = 0.999
MAX_PROBABILITY_GAP = 1e-3


@dataclass(frozen=True)
class Parity:
    """How an exported model compares with the Keras model on the check inputs."""

    pixels: int
    agreeing: int
    max_probability_gap: float  # 0.0 for a classes-output export

    @property
    def agreement(self) -> float:
        return self.agreeing / self.pixels if self.pixels else 1.0

    @property
    def ok(self) -> bool:
        return self.agreement >= MIN_AGREEMENT and self.max_probability_gap <= MAX_PROBABILITY_GAP


# --------------------------------------------------------------------------- metadata


def export_metadata(info: ModelInfo, source: Path, fmt: ExportFormat, classes_output: bool,
                    logits: str | None = None) -> dict:
    """The metadata every export carries: the source's ``segnet.json`` plus an export block.

    Training history is left out (it can be long); the validation and held-out figures stay,
    so ``segnet info --model x.onnx`` shows them.
    """
    from segnet_cli import __version__

    data = json.loads(info.to_json())
    figures = {"val": info.validation(), "held_out": info.training.get("held_out")}
    data["training"] = {k: v for k, v in figures.items() if v}
    out_dtype = "uint8" if info.num_classes <= 256 else "int32"
    data["export"] = {
        "format": str(fmt),
        "segnet_version": __version__,
        "source_model": source.name,
        "source_sha256": file_digest(source, None),
        "input": {
            "name": INPUT, "layout": "NHWC", "dtype": "float32", "range": [0.0, 1.0],
            "channels": info.in_channels,
            "note": "pixels divided by their dtype's maximum (uint8: 255, uint16: 65535); "
                    "the per-channel mean and std are applied inside the graph",
        },
        "output": (
            {"name": CLASSES, "layout": "NHW", "dtype": out_dtype, "meaning": "class index"}
            if classes_output else
            {"name": PROBABILITIES, "layout": "NHWK", "dtype": "float32",
             "meaning": "softmax class probabilities"}
        ),
    }
    if logits is not None:
        data["export"]["logits"] = logits
    return data


def flat_metadata(data: dict) -> dict[str, str]:
    """ONNX ``metadata_props``: the full JSON, and the main fields one key each."""
    export = data["export"]
    flat = {
        MEMBER: json.dumps(data, separators=(",", ":")),
        "class_names": json.dumps(data["class_names"]),
        "palette": json.dumps(data["palette"]),
        "in_channels": str(data["in_channels"]),
        "input_scaling": json.dumps(data["scaling"]),
        "stride": str(data["stride"]),
        "receptive_field": str(data["receptive_field"]),
        "source_sha256": export["source_sha256"],
        "input": json.dumps(export["input"]),
        "output": json.dumps(export["output"]),
    }
    if data.get("void_class") is not None:
        flat["void_class"] = str(data["void_class"])
    return flat


def read_litert_metadata(path: str | Path) -> dict:
    """The segnet metadata of an exported ``.tflite`` file (its ``metadata`` entry).

    Raises:
        ModelFileError: not a LiteRT flatbuffer, or one without segnet metadata.
    """
    schema = _litert_schema()
    buf = Path(path).read_bytes()
    try:
        model = schema.Model.GetRootAsModel(buf, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name().decode() == MEMBER:
                return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    except (ValueError, IndexError, AttributeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"cannot read LiteRT metadata: {exc}", path) from None
    raise ModelFileError("a LiteRT model without segnet metadata", path)


# --------------------------------------------------------------------------- the graph


def _require_extras(fmt: ExportFormat) -> None:
    """Fail before any work when the format's converter or runtime is not installed."""
    if fmt is ExportFormat.ONNX:
        import_onnx()
        import_onnxruntime()
        try:
            import tf2onnx  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError(
                f"ONNX export needs tf2onnx: {ONNX_INSTALL} ({exc})"
            ) from None
    elif fmt is ExportFormat.LITERT:
        try:
            from ai_edge_litert import interpreter  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError(
                f"LiteRT export needs the LiteRT interpreter for its parity check: "
                f"{LITERT_INSTALL} ({exc})"
            ) from None


def check_layers(model, fmt: ExportFormat) -> None:
    """Name the first layer the exporters do not know, before any converter runs."""
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in SUPPORTED_LAYERS:
            raise ExportError(
                f"cannot export layer {layer.name!r} ({kind}) to {fmt}: the exporter handles "
                + ", ".join(sorted(SUPPORTED_LAYERS))
            )


def serving_function(model, info: ModelInfo, classes_output: bool, with_logits: bool = False):
    """The exported computation as a ``tf.function`` with one shape-polymorphic signature.

    Returns a dict ``{"probabilities": (N,H,W,K) float32}`` or ``{"classes": (N,H,W)}``;
    ``with_logits`` adds ``"logits"`` (N,H,W,K), for the ONNX graph to keep a named NHWC
    logits tensor that segnet runs (its graph output is removed after conversion).
    """
    import tensorflow as tf

    from segnet_cli.model.layers import export_windows

    spec = tf.TensorSpec((None, None, None, info.in_channels), tf.float32, name=INPUT)
    out_dtype = tf.uint8 if info.num_classes <= 256 else tf.int32

    @tf.function(input_signature=[spec])
    def serve(image):
        with export_windows():
            logits = tf.cast(model(image, training=False), tf.float32)
        if classes_output:
            out = {CLASSES: tf.cast(tf.argmax(logits, axis=-1, output_type=tf.int32), out_dtype)}
        else:
            out = {PROBABILITIES: tf.nn.softmax(logits, axis=-1)}
        if with_logits:
            out[LOGITS] = logits
        return out

    return serve


def _frozen(serve):
    """``serve`` with every weight a constant, as converters want it (variables and the
    scaling layer's captured tensors both become graph constants)."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    return convert_variables_to_constants_v2(serve.get_concrete_function())


def _layer_of(text: str, layer_names: list[str]) -> str | None:
    """The first layer whose name scope appears in a converter's message or node name.

    Ops traced inside a Keras layer live under its name scope (``segnet_1/unpool3_1/...``,
    the ``_N`` added by TensorFlow for uniqueness).
    """
    import re

    names = set(layer_names)
    for path in re.findall(r"[\w.-]+(?:/[\w.-]+)+", text):
        for part in path.split("/")[:-1]:
            for candidate in (part, re.sub(r"_\d+$", "", part)):
                if candidate in names:
                    return candidate
    return None


def _converter_error(fmt: ExportFormat, exc: Exception, model) -> ExportError:
    """A converter failure as an ExportError naming the layer when its ops say which."""
    import re

    # The LiteRT converter's ConverterError carries each failing op's name scope in its
    # ``errors`` (protobuf records); its message has only the summary.
    text = "\n".join([str(exc)] + [str(e) for e in getattr(exc, "errors", None) or []])
    names = [layer.name for layer in model.layers]
    layer = _layer_of(text, names)
    ops = sorted(set(re.findall(r"'tf\.(\w+)' op is neither", text)))
    ops += sorted(set(re.findall(r"unsupported ONNX op (\w+)", text)))
    for listed in re.findall(r"(?:Custom|TF Select) ops: ([\w, ]+)", text):
        ops += [op.strip() for op in listed.split(",") if op.strip()]
    ops = sorted(set(ops))
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    what = f"layer {layer!r} ({type(model.get_layer(layer)).__name__})" if layer else "the model"
    detail = f"unsupported op(s) {', '.join(ops)}" if ops else first[:300]
    return ExportError(f"the {fmt} converter cannot handle {what}: {detail}")


# --------------------------------------------------------------------------- writers


def _write_onnx(model, info, data: dict, tmp: Path, classes_output: bool) -> dict:
    """Convert with tf2onnx, name the input/output/dims, attach metadata, write ``tmp``."""
    import tf2onnx

    onnx = import_onnx()
    serve = serving_function(model, info, classes_output, with_logits=True)
    frozen = _frozen(serve)
    out_name = CLASSES if classes_output else PROBABILITIES
    # A dict's outputs come out in sorted key order.
    names = dict(zip(sorted(serve.get_concrete_function().structured_outputs),
                     [t.name for t in frozen.outputs]))
    quiet = logging.getLogger("tf2onnx")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # it logs what it cannot convert; we say it once below
    try:
        proto, _ = tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(),
            input_names=[frozen.inputs[0].name],
            output_names=[names[out_name], names[LOGITS]],
            opset=ONNX_OPSET,
        )
    except Exception as exc:  # tf2onnx raises plain exceptions naming the TF ops
        raise _converter_error(ExportFormat.ONNX, exc, model) from None
    finally:
        quiet.setLevel(level)
    # tf2onnx leaves an op it cannot convert in the graph under its TensorFlow name, and
    # the node keeps the op's name scope, hence its layer.
    unknown = [n for n in proto.graph.node if not onnx.defs.has(n.op_type, n.domain or "")]
    if unknown:
        lines = "; ".join(f"{n.name}: unsupported ONNX op {n.op_type}" for n in unknown)
        raise _converter_error(ExportFormat.ONNX, RuntimeError(lines), model)
    _rename(proto, frozen.inputs[0].name, INPUT)
    _rename(proto, names[out_name], out_name)
    _rename(proto, names[LOGITS], LOGITS)
    # The logits stay in the graph under their name but are no graph output: OnnxSegmenter
    # makes them its one output (and cuts away the softmax or argmax).
    keep = [o for o in proto.graph.output if o.name != LOGITS]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    for value in (proto.graph.input[0], proto.graph.output[0]):
        for dim, label in zip(value.type.tensor_type.shape.dim, ("batch", "height", "width")):
            dim.dim_param = label
    data["export"]["logits"] = LOGITS
    proto.producer_name = "segnet"
    proto.doc_string = (
        f"SegNet exported by segnet from {data['export']['source_model']}: input "
        f"'{INPUT}' (N,H,W,{info.in_channels}) float32 in [0,1]; output '{out_name}'. "
        "Class table and scaling: metadata_props (segnet.json)."
    )
    for key, value in flat_metadata(data).items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    return data


def _rename(proto, old: str, new: str) -> None:
    for node in proto.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    for value in list(proto.graph.input) + list(proto.graph.output):
        if value.name == old:
            value.name = new


def _write_saved_model(serve, model, data: dict, folder: Path) -> None:
    """``tf.saved_model.save`` with the signature, plus the metadata two ways."""
    import tensorflow as tf

    module = tf.Module()
    module.model = model  # tracks the weights
    module.serve = serve
    text = json.dumps(data, indent=2)
    module.segnet_metadata = tf.Variable(text, trainable=False, dtype=tf.string,
                                         name="segnet_metadata")
    try:
        tf.saved_model.save(
            module, str(folder), signatures={"serving_default": serve.get_concrete_function()}
        )
    except Exception as exc:
        raise _converter_error(ExportFormat.SAVED_MODEL, exc, model) from None
    # assets.extra/: SavedModel's place for files that travel with a model but are not
    # loaded by its graph; readable without TensorFlow.
    extra = folder / "assets.extra"
    extra.mkdir(exist_ok=True)
    (extra / MEMBER).write_text(text)


def _litert_schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def _write_litert(serve, model, info, data: dict, tmp: Path, classes_output: bool) -> None:
    """Convert to builtin LiteRT ops only (no TF Select), name the output, add metadata."""
    import tensorflow as tf

    frozen = _frozen(serve)
    out_name = CLASSES if classes_output else PROBABILITIES
    spec = tf.TensorSpec((None, None, None, info.in_channels), tf.float32, name=INPUT)

    # The frozen function's outputs are positional; a thin wrapper gives the signature
    # its output name back (the converter inlines the call).
    @tf.function(input_signature=[spec])
    def named(image):
        return {out_name: frozen(image)[0]}

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [named.get_concrete_function()], tf.Module()
    )
    # Builtin ops only: an edge device has no TensorFlow kernels to fall back on.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        with quiet_stderr():  # MLIR prints every failing op's full call stack to fd 2
            flat = converter.convert()
    except Exception as exc:  # ConverterError lists the ops and their name scopes
        raise _converter_error(ExportFormat.LITERT, exc, model) from None
    tmp.write_bytes(_with_litert_metadata(flat, json.dumps(data).encode()))


def _with_litert_metadata(flat: bytes, payload: bytes) -> bytes:
    """The flatbuffer with one more ``metadata`` entry, ``segnet.json``, holding ``payload``."""
    import flatbuffers

    schema = _litert_schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flat, 0))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(payload, np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = MEMBER
    entry.buffer = len(model.buffers) - 1
    model.metadata = (model.metadata or []) + [entry]
    builder = flatbuffers.Builder(len(flat) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# --------------------------------------------------------------------------- parity


def check_inputs(channels: int, seed: int = 15) -> list[np.ndarray]:
    """The parity check's synthetic batches: uniform noise in [0, 1], odd sizes."""
    rng = np.random.default_rng(seed)
    return [rng.random((n, h, w, channels), dtype=np.float32) for n, h, w in CHECK_SHAPES]


def runner(fmt: ExportFormat, path: Path):
    """A function ``batch -> output`` running an exported file with its own runtime.

    What a deployment runs: ONNX Runtime, ``tf.saved_model.load``'s serving signature, or
    the LiteRT interpreter (``ai_edge_litert``), each on a file or folder as written.
    """
    if fmt is ExportFormat.ONNX:
        ort = import_onnxruntime()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: batch})[0]
    if fmt is ExportFormat.SAVED_MODEL:
        import tensorflow as tf

        sig = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda batch: next(iter(sig(**{INPUT: tf.constant(batch)}).values())).numpy()
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    run = interpreter.get_signature_runner("serving_default")
    return lambda batch: next(iter(run(**{INPUT: batch}).values()))


def compare(reference_logits: np.ndarray, output: np.ndarray, classes_output: bool) -> Parity:
    """Class agreement (and probability gap) of one exported output with the Keras logits."""
    ref_classes = np.argmax(reference_logits, axis=-1)
    if classes_output:
        got, gap = output.astype(np.int64), 0.0
    else:
        e = np.exp(reference_logits - reference_logits.max(axis=-1, keepdims=True))
        probs = e / e.sum(axis=-1, keepdims=True)
        gap = float(np.max(np.abs(probs - output))) if output.shape == probs.shape else np.inf
        got = np.argmax(output, axis=-1) if output.ndim == 4 else output
    if got.shape != ref_classes.shape:
        return Parity(ref_classes.size, 0, float("inf"))
    return Parity(ref_classes.size, int((got == ref_classes).sum()), gap)


def check_parity(model, fmt: ExportFormat, path: Path, channels: int,
                 classes_output: bool) -> Parity:
    """Run the exported file on ``check_inputs`` and compare it with the Keras model.

    The reference is the model as ``segnet predict`` runs it (the inference form, default
    pooling path), so this also checks the export form of the layers against Keras.
    """
    with quiet_stderr():  # the LiteRT runtime announces its CPU delegate on stderr
        run = runner(fmt, path)
        seg = None
        if fmt is ExportFormat.ONNX:
            # segnet runs .onnx files through their logits (OnnxSegmenter): check those too.
            from segnet_cli.model.onnxmodel import OnnxSegmenter

            seg = OnnxSegmenter(path)
        total = Parity(0, 0, 0.0)
        for batch in check_inputs(channels):
            ref = np.asarray(model(batch, training=False), np.float32)
            p = compare(ref, np.asarray(run(batch)), classes_output)
            agreeing = p.agreeing
            if seg is not None:
                agree_logits = int((seg.run(batch, "classes") == np.argmax(ref, axis=-1)).sum())
                agreeing = min(agreeing, agree_logits)
            total = Parity(total.pixels + p.pixels, total.agreeing + agreeing,
                           max(total.max_probability_gap, p.max_probability_gap))
    return total


@contextmanager
def quiet_stderr():
    """Point file descriptor 2 at /dev/null meanwhile (C++ runtimes print straight to it)."""
    import os
    import sys

    sys.stderr.flush()
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


# --------------------------------------------------------------------------- the job


def export_model(config: ExportConfig, log=None) -> Report:
    """Export a segnet model file; see the module notes for what the export is.

    Args:
        config: the export's options.
        log: ``str -> None`` for progress lines (the CLI's ``ui.info``), or None.

    Returns:
        A ``Report``: ``details`` holds ``out``, ``format``, ``bytes``, the ``parity``
        figures and the ``metadata`` written.

    Raises:
        UsageError: the output exists (without ``overwrite``); with it, the model itself, a
            file where a SavedModel folder goes, or a folder that is not a SavedModel or holds
            the model; an output folder that cannot be written; or a bad option.
        MissingExtraError: the format's converter or runtime is not installed.
        ModelFileError: the model file is missing or not a segnet model.
        ExportError: a layer or op the converter cannot handle, or a failed parity check
            (nothing is left at ``config.out``).
    """
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    fmt, out = config.format, config.out
    source = resolve_model_path(config.model)
    info = read_info(source)
    if (out.exists() or out.is_symlink()) and not config.overwrite:
        raise UsageError("already exists; pass --overwrite to replace it", out)
    if out.exists() and fmt is not ExportFormat.SAVED_MODEL and out.is_dir():
        raise UsageError("is a folder; give a file name", out)
    if out.exists() and out.resolve() == source.resolve():
        raise UsageError("is the model being exported; give another name", out)
    if fmt is ExportFormat.SAVED_MODEL and out.exists() and not out.is_dir():
        # A SavedModel is a folder: --overwrite must not turn a file (a model, a note) into one.
        raise UsageError("is a file; a SavedModel is a folder, so give a folder name", out)
    if fmt is ExportFormat.SAVED_MODEL and out.is_dir():
        # --overwrite replaces the whole folder: only ever a SavedModel, and never one that
        # holds the model being exported (``--out runs/a`` with ``--model runs/a/model.keras``
        # would otherwise take the run's checkpoints with it).
        if source.resolve().is_relative_to(out.resolve()):
            raise UsageError(f"holds the model being exported ({source}); give another folder", out)
        if not (out / "saved_model.pb").is_file():
            raise UsageError("is a folder but not a SavedModel; --overwrite only replaces a "
                             "SavedModel", out)
    check_writable(out.parent, "--out")  # a folder that cannot be written: exit 2, before the work
    _require_extras(fmt)

    from segnet_cli.model.network import inference_form, load_model
    from segnet_cli.model.tfload import import_tf

    import_tf()
    model, _ = load_model(source)
    try:
        model = inference_form(model, info)
    except ValueError as exc:
        raise ModelFileError(str(exc), source) from None
    check_layers(model, fmt)
    serve = serving_function(model, info, config.classes_output)
    data = export_metadata(info, source, fmt, config.classes_output)
    log(f"exporting {source} to {fmt}")

    def verify(path: Path) -> Parity:
        parity = check_parity(model, fmt, path, info.in_channels, config.classes_output)
        if not parity.ok:
            raise ExportError(
                f"the exported {fmt} model disagrees with the Keras model on its parity check "
                f"({parity.agreement:.4%} of pixels agree, need {MIN_AGREEMENT:.1%}; largest "
                f"probability gap {parity.max_probability_gap:.2g}); nothing was written",
                out,
            )
        return parity

    if fmt is ExportFormat.SAVED_MODEL:
        with atomic_folder(out, replace=config.overwrite) as tmp:
            _write_saved_model(serve, model, data, tmp)
            parity = verify(tmp)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    else:
        with atomic_path(out) as tmp:
            if fmt is ExportFormat.ONNX:
                _write_onnx(model, info, data, tmp, config.classes_output)
            else:
                _write_litert(serve, model, info, data, tmp, config.classes_output)
            parity = verify(tmp)
        size = out.stat().st_size
    return Report(
        return_code=0,
        done=1,
        seconds=time.perf_counter() - start,
        details={
            "out": str(out),
            "format": str(fmt),
            "bytes": size,
            "output": data["export"]["output"]["name"],
            "parity": {
                "shapes": [list(s) for s in CHECK_SHAPES],
                "agreement": parity.agreement,
                "pixels": parity.pixels,
                "max_probability_gap": parity.max_probability_gap,
            },
            "metadata": data,
        },
    )


__all__ = [
    "export_model",
    "export_metadata",
    "serving_function",
    "check_parity",
    "runner",
    "read_litert_metadata",
    "Parity",
    "INPUT",
    "PROBABILITIES",
    "CLASSES",
]
