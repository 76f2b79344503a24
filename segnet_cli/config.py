"""Every default in one place: a frozen dataclass per job.

The CLI builds one of these from its options and never repeats a number: an option the user
did not give takes the dataclass's default. Library functions take the config and nothing
else, so a script or a test can call them exactly as the CLI does.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field
from enum import Enum
from pathlib import Path
from typing import ClassVar

from segnet_cli.errors import UsageError

#: The model bundled in ``weights/`` (used when ``--model`` is not given).
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "weights" / "segnet-camvid.keras"


def default_model_path() -> Path:
    """The bundled model: beside the package in a checkout, or inside it when installed."""
    inside = Path(__file__).resolve().parent / "weights" / BUNDLED_MODEL.name
    return BUNDLED_MODEL if BUNDLED_MODEL.exists() else inside


#: Without --max-memory, `segnet tile` lowers the batch to stay under this many MiB (a soft
#: budget: 1.5 GB machines run a 20000-px-wide image at the defaults).
MEMORY_BUDGET_MB = 1400.0


@dataclass(frozen=True)
class TilingConfig:
    """How an image is split into tiles (see ``segnet_cli.tiling``).

    ``predict``, ``tile`` and ``eval`` share these defaults, so they produce the same masks.
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
    blend: str = "center"  # "center" (overlap-tile) or "gaussian"


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``segnet predict``."""

    inputs: tuple[str, ...]
    out: Path
    model: Path | None = None
    tiling: TilingConfig = TilingConfig()
    overlay: bool = False
    overlay_alpha: float = 0.5
    max_pixels: int | None = None
    overwrite: bool = False
    dry_run: bool = False
    precision: str = "float32"
    device: str | None = None
    engine: str = "local"  # "local" or "ray"
    address: str | None = None  # Ray cluster for engine "ray" (default: RAY_ADDRESS or local)
    queue_depth: int = 4
    json: bool = False


@dataclass(frozen=True)
class TileConfig:
    """Options of ``segnet tile`` (gigapixel TIFFs, streamed)."""

    input: Path
    out: Path | None = None
    model: Path | None = None
    tiling: TilingConfig = TilingConfig()
    probabilities: str | None = None  # None, "confidence" or "classes"
    probability_dtype: str = "float16"  # or "uint8" (probability x 255)
    compression: str = "zlib"
    out_tile: int = 256
    max_memory_mb: float | None = None
    plan_only: bool = False
    overwrite: bool = False
    precision: str = "float32"
    device: str | None = None
    nodata_class: int = 255
    max_pixels: int | None = None
    engine: str = "local"  # "local" or "ray"
    address: str | None = None  # Ray cluster for engine "ray" (default: RAY_ADDRESS or local)


class Loss(str, Enum):
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

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TrainConfig:
    """Options of ``segnet train``.

    The defaults follow the SegNet paper where it is explicit (median-frequency weights at
    full strength, void ignored) and a slim CPU-sized model otherwise. The bundled model's
    exact command, which departs from some of these, is in ``weights/README.md``.

    Every value is checked when the config is made (``UsageError`` naming the option), so a
    bad option is refused before any data is read. Strings and lists, as a saved run's JSON
    holds them, are converted to the fields' types.
    """

    images: Path | None
    masks: Path | None = None
    val_images: Path | None = None
    val_masks: Path | None = None
    out: Path = Path("runs/segnet")
    classes: str = "camvid"
    void: int | None = None
    rgb_masks: bool = False
    width: float = 0.25
    stages: int = 5
    crop: tuple[int, int] = (224, 224)
    batch_size: int = 8
    epochs: int | None = None  # None: 60 for a new run, the run's own total with --resume
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    class_weights: str = "auto"  # "auto", "none" or a file
    weight_power: float = 1.0
    scale: tuple[float, float] = (0.75, 1.25)
    flip: bool = True
    jitter: float = 0.1
    precision: str = "float32"
    loss: Loss = Loss.CE
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
        put(self, "given", frozenset(self.given))
        if self.loss in {v.value for v in Loss}:
            put(self, "loss", Loss(self.loss))
        problems = self.problems()
        if problems:
            raise UsageError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every bad value or combination, each naming its option."""
        from segnet_cli.model import POLICIES

        problems = []

        def need(ok: bool, name: str, rule: str, shown=None) -> None:
            if not ok:
                value = getattr(self, name) if shown is None else shown
                problems.append(f"{self.option(name)} {rule}, not {value}")

        if self.images is None and not self.resume:
            problems.append("give the training IMAGES folder (it is optional only with --resume)")
        if self.resume and self.init is not None:
            problems.append("--init starts a new run and --resume continues one: give only one")
        for name in ("width", "learning_rate", "weight_decay", "weight_power", "jitter",
                     "max_minutes", "cache_mb"):  # fmt: skip
            value = getattr(self, name)
            need(value is None or math.isfinite(value), name, "must be a finite number")
        if problems:
            return problems  # the comparisons below assume finite numbers
        need(isinstance(self.loss, Loss), "loss", f"must be one of {', '.join(Loss)}")
        need(self.precision in POLICIES, "precision", f"must be one of {', '.join(POLICIES)}")
        need(self.width > 0, "width", "must be above 0 (1.0 = VGG16's channels)")
        need(1 <= self.stages <= 5, "stages", "must be 1-5 (VGG16 has 5 blocks)")
        need(
            len(self.crop) == 2 and min(self.crop) >= 1,
            "crop", "must be at least 1x1 pixels", "x".join(map(str, self.crop)),
        )  # fmt: skip
        need(self.batch_size >= 1, "batch_size", "must be at least 1")
        need(self.epochs is None or self.epochs >= 1, "epochs", "must be at least 1")
        need(self.learning_rate > 0, "learning_rate", "must be above 0")
        need(self.weight_decay >= 0, "weight_decay", "must be 0 or more")
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
class EvalConfig:
    """Options of ``segnet eval``.

    ``masks`` defaults to ``<images>annot``; ``pred`` scores a folder of saved masks instead
    of running the model; ``classes`` defaults to the model's (or CamVid with ``pred``).
    """

    images: Path | None
    masks: Path | None = None
    model: Path | None = None
    pred: Path | None = None
    classes: str | None = None
    void: int | None = None
    tiling: TilingConfig = TilingConfig()
    json: bool = False
    plot: Path | None = None
    precision: str = "float32"
    rgb_masks: bool = False
    save_masks: Path | None = None
    device: str | None = None
    max_pixels: int | None = None


@dataclass(frozen=True)
class Report:
    """What a command did, for the CLI to print; ``return_code`` is the exit code."""

    return_code: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
