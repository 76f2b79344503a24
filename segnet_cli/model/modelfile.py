"""What a model file carries besides its weights, read without importing TensorFlow.

A segnet model file is a plain Keras ``.keras`` archive (a zip) with one extra member,
``segnet.json``, holding what inference needs: class names, display palette, input channels,
input scaling and the architecture's total stride and receptive field. Keras ignores the
extra member, so ``keras.saving.load_model`` loads the file as it is; segnet reads the member
with ``zipfile`` alone, so ``segnet info`` and the error for a foreign file are instant.

A model exported by ``segnet export --format onnx`` carries the same metadata in its ONNX
``metadata_props``; ``read_info`` reads either, by file suffix (``.onnx`` with the ``onnx``
package, still without TensorFlow).
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from segnet_cli.config import default_model_path
from segnet_cli.errors import MissingExtraError, ModelFileError
from segnet_cli.io.files import atomic_path, file_digest

MEMBER = "segnet.json"
#: What a segmenter's ``run`` returns per pixel (see ``tiling.Stitcher.needs``).
OUTPUTS = ("logits", "classes", "confidence")
FORMAT = "segnet-model"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class InputScaling:
    """How pixels become model inputs; fixed per model, never per image or tile.

    Integer images are divided by their dtype's maximum (uint8 by 255, uint16 by 65535),
    float images are taken as already in [0, 1]. The model itself then subtracts ``mean`` and
    divides by ``std`` (a fixed layer inside it), so the file is the single source of truth.
    """

    mode: str = "dtype_max"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class ModelInfo:
    """The metadata stored in ``segnet.json`` inside a model file."""

    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    in_channels: int
    scaling: InputScaling = InputScaling()
    stride: int = 32
    receptive_field: int = 404
    architecture: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    void_class: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def validation(self) -> dict | None:
        """Validation figures of this model: ``training["val"]`` if recorded, else the best
        epoch of the training history (mean_iou, global_accuracy, class_accuracy,
        per_class_iou, epoch, and the split when the run's config names it)."""
        val = self.training.get("val")
        if val:
            return dict(val)
        rows = [r for r in self.training.get("history", []) if r.get("val_miou") is not None]
        if not rows:
            return None
        best = max(rows, key=lambda r: r["val_miou"])
        figures = {
            "mean_iou": best["val_miou"],
            "global_accuracy": best.get("val_g"),
            "class_accuracy": best.get("val_c"),
            "per_class_iou": best.get("val_iou"),
            "epoch": best.get("epoch"),
        }
        config = self.training.get("config") or {}
        if config.get("hold_out"):
            globs = " ".join(repr(g) for g in config["hold_out"])
            figures["split"] = f"held-out images matching {globs}"
        elif config.get("val_images"):
            # The folder's name only: exports carry these figures to other machines.
            figures["split"] = Path(config["val_images"]).name
        return figures

    def headline(self) -> tuple[str, dict] | None:
        """The figures to quote for this model and what they are, or None if it records none.

        Returns ``("val", figures)`` when it has validation figures (see `validation`), else
        ``("held-out", figures)`` from ``training["held_out"]``. A model whose final fit saw its
        validation split records only held-out figures, so a figure on data it trained on is
        never quoted as validation. A run validated on groups held out of its training images
        (``segnet train --hold-out``) is "held-out" as well.
        """
        val = self.validation()
        if val:
            config = self.training.get("config") or {}
            held_out_run = not self.training.get("val") and config.get("hold_out")
            return ("held-out" if held_out_run else "val"), val
        held = self.training.get("held_out")
        return ("held-out", dict(held)) if held else None

    def to_json(self) -> str:
        data = asdict(self)
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, **data}
        return json.dumps(data, indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> ModelInfo:
        """Metadata from ``segnet.json``'s content, every value checked.

        Raises:
            ValueError, KeyError, TypeError: a value is missing, of the wrong type or out of
                range (the message says which); ``read_info`` names the file.
        """
        scaling = _mapping(data.get("scaling") or {}, "scaling")
        names = data["class_names"]
        if not isinstance(names, list) or not 1 <= len(names) <= 256:
            raise ValueError("class_names must be a list of 1 to 256 names")
        if not all(isinstance(n, str) for n in names):
            raise ValueError("class_names must be strings")
        palette = data["palette"]
        if not isinstance(palette, list) or not all(
            isinstance(c, list) and len(c) == 3 and all(_integer(v, 0, 255) for v in c)
            for c in palette
        ):
            raise ValueError("palette must be a list of [r, g, b] integers 0-255")
        in_channels = _int_field(data["in_channels"], "in_channels", 1)
        stride = _int_field(data.get("stride", 32), "stride", 1)
        if stride & (stride - 1):
            raise ValueError(f"stride must be a power of two (2 ** stages), not {stride}")
        mean = _numbers(scaling.get("mean", list(InputScaling.mean)), "scaling.mean", in_channels)
        std = _numbers(scaling.get("std", list(InputScaling.std)), "scaling.std", in_channels)
        if not all(v > 0 for v in std):
            raise ValueError("scaling.std must be positive")
        mode = scaling.get("mode", "dtype_max")
        if mode != "dtype_max":
            raise ValueError(f"scaling.mode {mode!r} is not one this segnet knows (dtype_max)")
        architecture = _mapping(data.get("architecture") or {}, "architecture")
        for key, value in (("in_channels", in_channels), ("num_classes", len(names))):
            if key in architecture and architecture[key] != value:
                raise ValueError(f"architecture.{key} {architecture[key]!r} contradicts {value}")
        if "stages" in architecture:
            stages = _int_field(architecture["stages"], "architecture.stages", 1)
            if 2**stages != stride:
                raise ValueError(f"stride {stride} contradicts architecture.stages {stages}")
        if "width" in architecture and not (
            _number(architecture["width"]) and architecture["width"] > 0
        ):
            raise ValueError("architecture.width must be a positive number")
        if "dropout" in architecture and not (
            _number(architecture["dropout"]) and 0 <= architecture["dropout"] < 1
        ):
            raise ValueError("architecture.dropout must be a number at least 0 and below 1")
        void = data.get("void_class")
        if void is not None and not _integer(void, 0, 255):
            raise ValueError("void_class must be an integer 0-255 (or absent)")
        return cls(
            class_names=tuple(names),
            palette=tuple(tuple(int(v) for v in c) for c in palette),
            in_channels=in_channels,
            scaling=InputScaling(mode=mode, mean=mean, std=std),
            stride=stride,
            receptive_field=_int_field(data.get("receptive_field", 404), "receptive_field", 1),
            architecture=dict(architecture),
            training=dict(_mapping(data.get("training") or {}, "training")),
            void_class=void,
        )


def _number(v) -> bool:
    """A finite JSON number (``true``/``false`` are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _int_field(v, name: str, lo: int) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool)) or v < lo:
        raise ValueError(f"{name} must be an integer of at least {lo}, not {v!r}")
    return v


def _numbers(v, name: str, channels: int) -> tuple[float, ...]:
    if not isinstance(v, list) or len(v) not in (1, channels) or not all(map(_number, v)):
        raise ValueError(
            f"{name} must be a list of {channels} finite numbers (one per input channel), "
            f"not {v!r}"
        )
    return tuple(float(x) for x in v)


def _mapping(v, name: str) -> dict:
    if not isinstance(v, dict):
        raise ValueError(f"{name} must be an object, not {v!r}")
    return v


def is_onnx(path: str | Path | None) -> bool:
    """An exported ONNX model (by file suffix), run with ONNX Runtime instead of TensorFlow."""
    return path is not None and Path(path).suffix.lower() == ".onnx"


def check_format(data, path: Path) -> None:
    """Refuse metadata that is not segnet's, or newer than this segnet understands."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelFileError("segnet.json is not segnet model metadata", path)
    version = data.get("format_version", 0)
    if not _integer(version, 0, 2**31):
        raise ModelFileError(f"segnet.json's format_version {version!r} is not a number", path)
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"model format {data.get('format_version')} is newer than this segnet understands",
            path,
        )


def read_info(path: str | Path) -> ModelInfo:
    """Read a model file's metadata without loading its weights (or TensorFlow).

    A ``.keras`` file's ``segnet.json`` member, or an exported ``.onnx`` file's
    ``metadata_props`` (``model.onnxmodel.read_onnx_info``; needs the ``onnx`` extra).

    Raises:
        ModelFileError: the file is missing, not a zip, or has no segnet metadata.
        MissingExtraError: an ``.onnx`` file without the ``onnx`` extra installed.
    """
    path = Path(path)
    if is_onnx(path):
        return read_onnx_info(path)
    if not path.exists():
        raise ModelFileError("model file not found", path)
    export = _export_kind(path)
    if export:
        # ``segnet export`` writes these for other runtimes; segnet itself runs the two
        # formats that keep its metadata and its tiling.
        raise ModelFileError(
            f"a {export} export, which segnet does not read: give the .keras model it was "
            "exported from, or an .onnx export",
            path,
        )
    if path.is_dir():
        raise ModelFileError("is a folder, not a .keras model file", path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if MEMBER not in names:
                if "config.json" in names:
                    raise ModelFileError(
                        "a Keras model without segnet metadata (not made by segnet train)", path
                    )
                raise ModelFileError("not a Keras model file", path)
            data = json.loads(zf.read(MEMBER).decode("utf-8"))
    except ModelFileError:
        raise
    except zipfile.BadZipFile:
        raise ModelFileError("not a .keras model file (corrupt or foreign)", path) from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"cannot read model metadata: {exc}", path) from None
    check_format(data, path)
    try:
        return ModelInfo.from_dict(data)
    except KeyError as exc:
        raise ModelFileError(f"segnet.json lacks {exc}", path) from None
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"segnet.json is invalid: {exc}", path) from None


def _export_kind(path: Path) -> str | None:
    """``"SavedModel"`` or ``"LiteRT"`` for those exports, else None (by layout and magic)."""
    if path.is_dir():
        return "SavedModel" if (path / "saved_model.pb").is_file() else None
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    return "LiteRT" if head[4:8] == b"TFL3" else None


def add_info(path: str | Path, info: ModelInfo) -> None:
    """Append (or replace) the metadata member of a ``.keras`` archive in place."""
    path = Path(path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        if MEMBER in zf.namelist():
            raise ModelFileError("already has segnet metadata", path)
        zf.writestr(MEMBER, info.to_json())


def replace_info(path: str | Path, info: ModelInfo) -> None:
    """Rewrite a model file with new metadata, atomically; the weights are copied unchanged.

    Used to record figures measured after training (e.g. ``segnet eval`` on a validation
    split) in the file that ``segnet info`` describes.
    """
    import os

    path = Path(path)
    read_info(path)  # must already be a segnet model file
    mode = os.stat(path).st_mode & 0o777
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                if item.filename != MEMBER:
                    dst.writestr(item, src.read(item.filename))
            dst.writestr(MEMBER, info.to_json())
    os.chmod(path, mode)


# --------------------------------------------------------------------------- ONNX files
#
# An exported ``.onnx`` file carries the same metadata in its ``metadata_props`` (key
# ``segnet.json``), read with the ``onnx`` package alone (no TensorFlow, no ONNX Runtime).

#: The install command named by every "missing extra" error of the ONNX path.
ONNX_INSTALL = "pip install 'segnet-cli[onnx]'"
#: The ``metadata_props`` key holding the full metadata (the source's segnet.json + export).
META_KEY = MEMBER


def import_onnx():
    """``onnx``, or a ``MissingExtraError`` naming the install command."""
    try:
        import onnx
    except ImportError as exc:
        raise MissingExtraError(f"ONNX models need the onnx extra: {ONNX_INSTALL} ({exc})") from None
    return onnx


def load_onnx_proto(path: Path):
    """An ``.onnx`` file's ``ModelProto`` (weights included: they are inside the file).

    Raises:
        ModelFileError: missing, a folder, or not ONNX.
        MissingExtraError: the ``onnx`` package is not installed.
    """
    onnx = import_onnx()
    if not path.exists():
        raise ModelFileError("model file not found", path)
    if path.is_dir():
        raise ModelFileError("is a folder, not an .onnx model file", path)
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends for a foreign file
        raise ModelFileError(f"not an ONNX model file ({type(exc).__name__})", path) from None


def read_metadata(path: str | Path, proto=None) -> dict:
    """The full metadata dictionary of an exported ONNX file (``segnet.json`` + ``export``).

    Raises:
        ModelFileError: missing file, not ONNX, or an ONNX model not made by segnet export.
        MissingExtraError: the ``onnx`` package is not installed.
    """
    path = Path(path)
    proto = load_onnx_proto(path) if proto is None else proto
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise ModelFileError("an ONNX model without segnet metadata (not made by segnet export)",
                             path)
    try:
        data = json.loads(props[META_KEY])
    except ValueError as exc:
        raise ModelFileError(f"cannot read the segnet metadata: {exc}", path) from None
    if not isinstance(data, dict):
        raise ModelFileError("the segnet metadata is not a JSON object", path)
    return data


def read_onnx_info(path: str | Path) -> ModelInfo:
    """The ``ModelInfo`` of an exported ONNX file (what ``read_info`` returns for one).

    Raises:
        ModelFileError: see ``read_metadata``; or incomplete metadata.
    """
    data = read_metadata(path)
    check_format(data, Path(path))
    try:
        return ModelInfo.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"model metadata incomplete: {exc}", path) from None


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


def model_fingerprint(path: Path) -> str:
    """A short content hash of a model file: outputs record which model made them."""
    try:
        return file_digest(path)
    except OSError as exc:
        raise ModelFileError(f"cannot read the model file: {exc.strerror or exc}", path) from None
