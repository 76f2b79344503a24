"""Every default and every choice in one place: enums, and a frozen dataclass per job.

The CLI builds one of these from its options and never repeats a number: an option the user
did not give takes the dataclass's default. Library functions take the config and nothing
else, so a script or a test can call them exactly as the CLI does. Values are checked here,
when a config is made (``__post_init__``), so a bad option is a ``UsageError`` naming the
option before any file is touched.

``predict``, ``tile`` and ``eval`` share one ``InferenceConfig`` (model, tiling, precision,
device, pixel limit): the same settings give the same masks whichever command runs them.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import ClassVar

from segnet_cli.errors import UsageError

#: The model bundled in ``weights/`` (used when ``--model`` is not given).
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "weights" / "segnet-camvid.keras"

#: Epochs of a new ``segnet train`` run when ``--epochs`` is not given: the cross-drive
#: study's choice. On CamVid's 266 frames of two drives, mean IoU on the held-out third drive
#: went 22.6, 31.2, 35.8 and 38.9 after 26, 70, 130 and 300 epochs (weights/README.md).
DEFAULT_EPOCHS = 300


def default_model_path() -> Path:
    """The bundled model: beside the package in a checkout, or inside it when installed."""
    inside = Path(__file__).resolve().parent / "weights" / BUNDLED_MODEL.name
    return BUNDLED_MODEL if BUNDLED_MODEL.exists() else inside


#: Without --max-memory, `segnet tile` lowers the batch, then stops reading ahead, to stay
#: under this many MiB (a soft budget: 1.5 GB machines run a 20000-px-wide image at the
#: defaults, polygons included: 1,339 MiB measured with --vector).
MEMORY_BUDGET_MB = 1400.0


# --------------------------------------------------------------------------- enums


class Choice(str, Enum):
    """An option with a fixed set of values; a ``str``, so it prints and serialises as one.

    ``parse`` turns user text into a member or raises a ``UsageError`` naming the option and
    the values it takes.
    """

    def __str__(self) -> str:
        return self.value

    # Hash as the value: a member and its text are the same dict key (Enum's own hash is
    # its name's, which would make ``table["float32"]`` and ``table[Precision.FLOAT32]``
    # different entries).
    __hash__ = str.__hash__

    @classmethod
    def parse(cls, value, option: str):
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise UsageError(f"{option} must be one of {allowed}, not {value!r}") from None

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Blend(Choice):
    """How overlapping tiles become one mask (``segnet_cli.tiling.Stitcher``)."""

    CENTER = "center"  # overlap-tile: each pixel from the one tile whose core owns it
    GAUSSIAN = "gaussian"  # softmax of every covering window, Gaussian-weighted


class Precision(Choice):
    """The model's compute precision (the last two are Keras mixed policies)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class TTA(Choice):
    """Test-time augmentation: which views of the image the model sees."""

    NONE = "none"
    FLIP = "flip"  # the image and its left-right mirror; their probabilities averaged


class Engine(Choice):
    """Where a run's work happens."""

    LOCAL = "local"  # this machine
    RAY = "ray"  # the actors of a Ray cluster


class ProbabilityMode(Choice):
    """What ``segnet tile --probabilities`` writes beside the mask."""

    CONFIDENCE = "confidence"  # the winning class's probability
    CLASSES = "classes"  # one band per class


class ProbabilityDtype(Choice):
    FLOAT16 = "float16"
    UINT8 = "uint8"  # probability x 255


class Compression(Choice):
    """Lossless TIFF compressions (JPEG is lossy: class indices must stay exact)."""

    ZLIB = "zlib"
    ZSTD = "zstd"
    LZW = "lzw"
    PACKBITS = "packbits"
    LZMA = "lzma"
    NONE = "none"


class ExportFormat(Choice):
    """What ``segnet export`` writes (``segnet_cli.export``)."""

    ONNX = "onnx"  # one .onnx file, for ONNX Runtime (and `segnet predict --model x.onnx`)
    SAVED_MODEL = "saved_model"  # a TensorFlow SavedModel folder, for TF Serving
    LITERT = "litert"  # one .tflite flatbuffer, for the LiteRT (TFLite) interpreter

    @property
    def suffix(self) -> str | None:
        """The file name ending an output must have (a SavedModel is a folder: any name)."""
        return {"onnx": ".onnx", "saved_model": None, "litert": ".tflite"}[self.value]


class Status(Choice):
    """What happened to one input of a run."""

    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    PLANNED = "planned"  # a dry run's "would do"


# --------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class TilingConfig:
    """How an image is split into tiles (see ``segnet_cli.tiling``).

    Measured with the bundled model on real street scenes (README, "Tiling"): 1024/128
    agrees with whole-image inference on 99.994% of pixels at 1.78x compute on large images;
    a halo of half the receptive field (192 here) makes the result identical, at 2.56x.

    A batch of one tile: on a CPU it runs as fast per tile as two (README, "Throughput"), and
    every distinct batch shape costs a one-off XLA compilation of the pooling layers, which
    a batch of one keeps to one per tile shape (no partial batches). Raise it on a GPU
    when tiles are small.
    """

    tile: int = 1024
    halo: int = 128
    batch_size: int = 1
    blend: Blend = Blend.CENTER
    #: Bands of input rows read while the model works on the current one (``segnet tile``):
    #: 1 hides the reading behind the model; 0 holds one band (tile rows x image width) less,
    #: which ``tile``'s planner chooses when the memory budget needs it. Reading a band of a
    #: 20000-px-wide deflate TIFF took 0.2 s against 18 s of model, so that costs little.
    read_ahead: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "blend", Blend.parse(self.blend, "--blend"))
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.read_ahead not in (0, 1):
            raise UsageError("read_ahead must be 0 or 1")
        if self.tile < 1:
            raise UsageError("--tile must be positive")
        if self.halo < 0:
            raise UsageError("--halo must not be negative")


@dataclass(frozen=True)
class InferenceConfig:
    """What turns pixels into a mask; shared by ``predict``, ``tile`` and ``eval``."""

    model: Path | None = None  # None: the bundled model
    tiling: TilingConfig = TilingConfig()
    precision: Precision = Precision.FLOAT32
    device: str | None = None  # None: TensorFlow's choice; cpu, gpu or gpu:N
    max_pixels: int | None = None  # decompression-bomb limit; None: Pillow's default
    tta: TTA = TTA.NONE

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision, "--precision"))
        object.__setattr__(self, "tta", TTA.parse(self.tta, "--tta"))
        check_device(self.device)
        if self.max_pixels is not None and self.max_pixels < 1:
            raise UsageError("--max-pixels must be positive")

    def output_settings(self) -> dict:
        """The settings that change a mask (outputs record them in their provenance).

        Batch size, device and pixel limit do not change a mask. TTA appears only when on,
        so masks made before it existed stay up to date.
        """
        t = self.tiling
        settings = {"tile": t.tile, "halo": t.halo, "blend": t.blend, "precision": self.precision}
        if self.tta is not TTA.NONE:
            settings["tta"] = self.tta
        return settings


def check_device(device: str | None) -> None:
    """Check ``--device``'s spelling: ``auto``, ``cpu``, ``gpu`` or ``gpu:N`` (N >= 0).

    Checked when the config is made, so a typo is a usage error before any input is read;
    whether GPU N exists is asked of TensorFlow only when a model is loaded.

    Raises:
        UsageError: any other value (``gpu:x``, ``gpu:-1``, ``tpu``, ...).
    """
    if device is None:
        return
    kind, sep, number = device.lower().partition(":")
    if kind in ("auto", "cpu") and not sep:
        return
    if kind == "gpu" and (not sep or (number.isascii() and number.isdigit())):
        return
    raise UsageError(f"--device must be cpu, gpu or gpu:N (N = 0, 1, ...), not {device!r}")


def _engine(config) -> None:
    object.__setattr__(config, "engine", Engine.parse(config.engine, "--engine"))
    if config.address is not None and config.engine is not Engine.RAY:
        raise UsageError("--address needs --engine ray")


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``segnet predict``."""

    inputs: tuple[str, ...]
    out: Path
    inference: InferenceConfig = InferenceConfig()
    overlay: bool = False
    overlay_alpha: float = 0.5
    overwrite: bool = False
    dry_run: bool = False
    engine: Engine = Engine.LOCAL
    address: str | None = None  # Ray cluster for engine "ray" (default: RAY_ADDRESS or local)
    queue_depth: int = 4
    #: The run's ``--log-file``: never taken as an input, never written as an output.
    log_file: Path | None = None

    def __post_init__(self) -> None:
        _engine(self)
        if self.queue_depth < 1:
            raise UsageError("--queue-depth must be at least 1")


@dataclass(frozen=True)
class TileConfig:
    """Options of ``segnet tile`` (gigapixel images, streamed)."""

    input: Path
    out: Path | None = None  # None: <stem>.mask.tif beside the input
    inference: InferenceConfig = InferenceConfig()
    probabilities: ProbabilityMode | None = None
    probability_dtype: ProbabilityDtype = ProbabilityDtype.FLOAT16
    compression: Compression = Compression.ZLIB
    out_tile: int = 256
    max_memory_mb: float | None = None  # None: the soft MEMORY_BUDGET_MB; inf: no limit
    plan_only: bool = False
    overwrite: bool = False
    nodata_class: int = 255
    engine: Engine = Engine.LOCAL
    address: str | None = None
    # GIS (the ``geo`` extra): see ``segnet_cli.geo``.
    bands: tuple[int, ...] | None = None  # 1-based bands of the input, in order
    cog: bool | None = None  # None: a Cloud-Optimized GeoTIFF when the geo extra is installed
    vector: Path | None = None  # polygons per class (.gpkg, .geojson, .fgb, ...)
    min_area: float = 0.0  # polygons smaller than this (map units²) are left out
    simplify: float = 0.0  # polygon simplification tolerance (map units)
    aoi: Path | None = None  # area of interest: only tiles touching it run

    def __post_init__(self) -> None:
        _engine(self)
        if self.bands is not None:
            if not self.bands or any(b < 1 for b in self.bands):
                raise UsageError("--bands counts from 1 (the first band is 1)")
        if not (self.min_area >= 0) or math.isinf(self.min_area):
            raise UsageError("--min-area must be zero or a positive number (map units²)")
        if not (self.simplify >= 0) or math.isinf(self.simplify):
            raise UsageError("--simplify must be zero or a positive number (map units)")
        if self.vector is None and (self.min_area or self.simplify):
            raise UsageError("--min-area and --simplify shape the polygons of --vector")
        if self.probabilities is not None:
            object.__setattr__(
                self, "probabilities", ProbabilityMode.parse(self.probabilities, "--probabilities")
            )
        object.__setattr__(
            self, "probability_dtype", ProbabilityDtype.parse(self.probability_dtype, "--prob-dtype")
        )
        object.__setattr__(self, "compression", Compression.parse(self.compression, "--compression"))
        if self.out_tile < 16 or self.out_tile % 16:
            raise UsageError("--out-tile must be a multiple of 16")
        if self.max_memory_mb is not None and not (self.max_memory_mb > 0):
            raise UsageError("--max-memory must be positive (MiB)")
        if not 0 <= self.nodata_class <= 255:
            raise UsageError("--nodata-class must be between 0 and 255")

    @property
    def memory_limited(self) -> bool:
        """An explicit, finite ``--max-memory``."""
        return self.max_memory_mb is not None and not math.isinf(self.max_memory_mb)


@dataclass(frozen=True)
class EvalConfig:
    """Options of ``segnet eval``.

    ``masks`` defaults to ``<images>annot``; ``pred`` scores a folder of saved masks instead
    of running the model; ``classes`` defaults to the model's (or CamVid with ``pred``).
    """

    images: Path | None
    masks: Path | None = None
    inference: InferenceConfig = InferenceConfig()
    pred: Path | None = None
    classes: str | None = None
    void: int | None = None
    plot: Path | None = None
    rgb_masks: bool = False
    save_masks: Path | None = None
    #: Let ``save_masks`` and ``plot`` replace images segnet did not write.
    overwrite: bool = False


class Loss(Choice):
    """The training loss of ``segnet train`` (``--loss``).

    Every choice ignores void and crop-padding pixels (those whose pixel weight is 0).
    """

    #: Cross-entropy weighted per pixel by its class weight (the SegNet paper's loss).
    CE = "ce"
    #: ``ce`` plus the Lovász-softmax loss (Berman, Triki & Blaschko, 2018), which optimises
    #: the per-image Jaccard index (IoU) of the classes present; not class-weighted.
    CE_LOVASZ = "ce+lovasz"
    #: The Lovász-softmax loss alone.
    LOVASZ = "lovasz"


class Mix(Choice):
    """How ``segnet train`` mixes two crops of a batch into one (``--mix``).

    Each crop is mixed with the next crop of its batch with probability ``--mix-prob``;
    pasted pixels bring their labels and class weights along, so the loss stays exact.
    """

    #: No mixing.
    NONE = "none"
    #: CutMix (Yun et al., 2019): a random rectangle of the other crop is pasted in.
    CUTMIX = "cutmix"
    #: ClassMix (Olsson et al., 2021): the pixels of about half the classes of the other
    #: crop are pasted in, each object keeping its shape, in a scene it was not taken in.
    CLASSMIX = "classmix"



@dataclass(frozen=True)
class TrainConfig:
    """Options of ``segnet train``.

    The defaults are the recipe a cross-drive study chose (``weights/README.md``): the
    paper's median-frequency weights tempered to ``w ** 0.5``, void ignored, a slim
    CPU-sized model, 224x288 crops and a long cosine schedule.

    Every value is checked when the config is made (``UsageError`` naming the option), so a
    bad option is refused before any data is read. Strings and lists, as a saved run's JSON
    holds them, are converted to the fields' types.
    """

    images: Path | None
    masks: Path | None = None
    val_images: Path | None = None
    val_masks: Path | None = None
    #: Globs naming training images to validate on instead of training (a drive, a site).
    hold_out: tuple[str, ...] = ()
    out: Path = Path("runs/segnet")
    classes: str = "camvid"
    void: int | None = None
    rgb_masks: bool = False
    width: float = 0.25
    stages: int = 5
    #: Dropout rate after the central encoder and decoder stages (Bayesian SegNet's
    #: placement, ``network.Architecture.dropout_stages``); 0 is none.
    dropout: float = 0.0
    # The recipe the cross-drive study chose (weights/README.md): 224x288 crops, weights
    # tempered to w**0.5 (the paper's untempered weights lost the largest classes), and a
    # long schedule (DEFAULT_EPOCHS).
    crop: tuple[int, int] = (224, 288)
    batch_size: int = 8
    epochs: int | None = None  # None: DEFAULT_EPOCHS for a new run, the run's own total with --resume
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    class_weights: str = "auto"  # "auto", "none" or a file
    weight_power: float = 0.5
    scale: tuple[float, float] = (0.75, 1.25)
    flip: bool = True
    jitter: float = 0.1
    mix: Mix = Mix.NONE
    #: Chance that a crop is mixed with another (``mix``).
    mix_prob: float = 0.5
    precision: str = "float32"
    loss: Loss = Loss.CE
    #: Models whose averaged class probabilities on each training image (mirrored view
    #: included) become soft targets beside the masks: knowledge distillation.
    teachers: tuple[Path, ...] = ()
    #: The distillation term's share of the loss with ``teachers`` (the masks' cross-entropy
    #: keeps the rest): 0 is the masks alone, 1 the teachers alone.
    distill: float = 0.5
    val_every: int = 1
    resume: bool = False
    init: Path | None = None  # a segnet model file whose weights start a new run
    seed: int = 0
    max_minutes: float | None = None
    cache_mb: float = 2048.0
    workers: int | None = None  # decoding threads; None: tf.data's choice (AUTOTUNE)
    #: Options the user set explicitly, even to their default value (the CLI fills it in).
    #: A field whose value differs from its default counts as set whether listed or not.
    #: ``--resume`` and ``--init`` refuse set options that contradict the run or the model.
    given: frozenset[str] = frozenset()

    #: Command-line spelling of the fields whose option is not ``--field-name``.
    OPTIONS: ClassVar[dict[str, str]] = {
        "images": "IMAGES", "val_images": "--val", "learning_rate": "--lr",
        "teachers": "--teacher",
    }  # fmt: skip
    #: Fields about one invocation rather than the run: ``--resume`` takes them as given.
    PER_INVOCATION: ClassVar[tuple[str, ...]] = (
        "out", "epochs", "max_minutes", "workers", "cache_mb", "resume", "given",
    )  # fmt: skip
    PATHS: ClassVar[tuple[str, ...]] = ("images", "masks", "val_images", "val_masks", "out", "init")

    @classmethod
    def option(cls, name: str) -> str:
        """The command-line option of a field (``learning_rate`` -> ``--lr``)."""
        return cls.OPTIONS.get(name, "--" + name.replace("_", "-"))

    def was_given(self, name: str) -> bool:
        """True if the option was set explicitly or differs from its default."""
        if name in self.given:
            return True
        default = self.__dataclass_fields__[name].default
        if default is MISSING:
            return getattr(self, name) is not None
        return getattr(self, name) != default

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalise once, here
        for name in self.PATHS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                put(self, name, Path(value))
        put(self, "crop", tuple(self.crop))
        put(self, "scale", tuple(self.scale))
        put(self, "hold_out", tuple(self.hold_out))
        put(self, "teachers", tuple(Path(t) for t in self.teachers))
        put(self, "given", frozenset(self.given))
        if self.loss in {v.value for v in Loss}:
            put(self, "loss", Loss(self.loss))
        if self.mix in {v.value for v in Mix}:
            put(self, "mix", Mix(self.mix))
        problems = self.problems()
        if problems:
            raise UsageError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every bad value or combination, each naming its option."""
        problems = []

        def need(ok: bool, name: str, rule: str, shown=None) -> None:
            if not ok:
                value = getattr(self, name) if shown is None else shown
                problems.append(f"{self.option(name)} {rule}, not {value}")

        if self.images is None and not self.resume:
            problems.append("give the training IMAGES folder (it is optional only with --resume)")
        if self.resume and self.init is not None:
            problems.append("--init starts a new run and --resume continues one: give only one")
        if self.hold_out and self.val_images is not None:
            problems.append(
                "--hold-out and --val both name the validation split: give only one"
            )
        if any(not p.strip() for p in self.hold_out):
            problems.append("--hold-out needs a glob such as '0006R0_*', not an empty one")
        for name in ("width", "dropout", "learning_rate", "weight_decay", "weight_power",
                     "jitter", "mix_prob", "distill", "max_minutes", "cache_mb"):  # fmt: skip
            value = getattr(self, name)
            need(value is None or math.isfinite(value), name, "must be a finite number")
        if problems:
            return problems  # the comparisons below assume finite numbers
        need(isinstance(self.loss, Loss), "loss", f"must be one of {', '.join(Loss)}")
        need(isinstance(self.mix, Mix), "mix", f"must be one of {', '.join(Mix)}")
        need(0 <= self.mix_prob <= 1, "mix_prob", "must be from 0 to 1")
        if self.mix is not Mix.NONE and self.batch_size == 1:
            # A crop is mixed with the next crop of its batch: alone, with itself.
            problems.append(f"--mix {self.mix} needs a --batch-size of 2 or more, not 1")
        if self.mix is Mix.NONE and self.was_given("mix_prob") and not self.resume:
            problems.append("--mix-prob needs --mix cutmix or --mix classmix")
        need(0 <= self.distill <= 1, "distill", "must be from 0 to 1")
        if not self.teachers and self.was_given("distill") and not self.resume:
            problems.append("--distill needs at least one --teacher model")
        if self.teachers and self.loss is not Loss.CE:
            # The distillation loss is the cross-entropy's soft-target counterpart; the
            # Lovász term has none.
            problems.append(f"--teacher trains with --loss ce, not {self.loss}")
        need(
            self.precision in Precision.values(),
            "precision",
            f"must be one of {', '.join(Precision.values())}",
        )
        need(self.width > 0, "width", "must be above 0 (1.0 = VGG16's channels)")
        need(1 <= self.stages <= 5, "stages", "must be 1-5 (VGG16 has 5 blocks)")
        need(0 <= self.dropout < 1, "dropout", "must be at least 0 and below 1")
        need(
            len(self.crop) == 2 and min(self.crop) >= 1,
            "crop", "must be at least 1x1 pixels", "x".join(map(str, self.crop)),
        )  # fmt: skip
        need(self.batch_size >= 1, "batch_size", "must be at least 1")
        need(self.epochs is None or self.epochs >= 1, "epochs", "must be at least 1")
        need(self.learning_rate > 0, "learning_rate", "must be above 0")
        need(self.weight_decay >= 0, "weight_decay", "must be 0 or more")
        # A negative power would invert the balancing: the rarest class weighed least.
        need(self.weight_power >= 0, "weight_power", "must be 0 or more")
        need(self.warmup_epochs >= 0, "warmup_epochs", "must be 0 or more")
        need(
            len(self.scale) == 2 and all(map(math.isfinite, self.scale))
            and 0 < self.scale[0] <= self.scale[1],
            "scale", "must be LOW,HIGH with 0 < LOW <= HIGH", ",".join(map(str, self.scale)),
        )  # fmt: skip
        # The colour jitter's gain, 1 - 2 * jitter, must stay positive.
        need(0 <= self.jitter < 0.5, "jitter", "must be at least 0 and below 0.5")
        need(self.val_every >= 1, "val_every", "must be at least 1")
        need(self.max_minutes is None or self.max_minutes >= 0, "max_minutes", "must be 0 or more")
        need(self.cache_mb >= 0, "cache_mb", "must be 0 or more")
        need(
            self.workers is None or self.workers >= 1,
            "workers", "must be at least 1 (leave it out for tf.data's choice)",
        )  # fmt: skip
        need(self.void is None or self.void >= 0, "void", "must be 0 or more")
        unknown = sorted(self.given - set(self.__dataclass_fields__))
        if unknown:
            problems.append(f"unknown option fields: {', '.join(unknown)}")
        return problems


@dataclass(frozen=True)
class ExportConfig:
    """Options of ``segnet export``.

    The exported model takes ``(N, H, W, C)`` float32 pixels in [0, 1] (any N, H, W) and
    returns float32 class probabilities ``(N, H, W, K)``, or class indices ``(N, H, W)``
    with ``classes_output`` (uint8; int32 for more than 256 classes).
    """

    out: Path
    format: ExportFormat
    model: Path | None = None  # None: the bundled model
    classes_output: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        fmt = ExportFormat.parse(self.format, "--format")
        object.__setattr__(self, "format", fmt)
        object.__setattr__(self, "out", Path(self.out))
        if fmt.suffix and self.out.suffix.lower() != fmt.suffix:
            raise UsageError(f"--out must end in {fmt.suffix} for --format {fmt}", self.out)
        if fmt is ExportFormat.SAVED_MODEL and self.out.suffix.lower() in (".onnx", ".tflite"):
            raise UsageError("a SavedModel is a folder: --out must not end in a file extension",
                             self.out)
        if self.model is not None and Path(self.model).suffix.lower() == ".onnx":
            raise UsageError("export takes a .keras model (this one is already exported)",
                             self.model)


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class Report:
    """What a command did, for the CLI to print; ``return_code`` is the exit code."""

    return_code: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


def given(config_class, **options) -> dict:
    """The options the user gave (not ``None``) that ``config_class`` has: the CLI's filter."""
    names = {f.name for f in fields(config_class)}
    return {k: v for k, v in options.items() if v is not None and k in names}
