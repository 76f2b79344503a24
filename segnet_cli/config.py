"""Every default in one place: a frozen dataclass per job.

The CLI builds one of these from its options and never repeats a number: an option the user
did not give takes the dataclass's default. Library functions take the config and nothing
else, so a script or a test can call them exactly as the CLI does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass(frozen=True)
class TrainConfig:
    """Options of ``segnet train``.

    The defaults follow the SegNet paper where it is explicit (median-frequency weights at
    full strength, void ignored) and a slim CPU-sized model otherwise. The bundled model's
    exact command, which departs from some of these, is in ``weights/README.md``.
    """

    images: Path
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
    val_every: int = 1
    resume: bool = False
    seed: int = 0
    max_minutes: float | None = None
    cache_mb: float = 2048.0
    workers: int | None = None  # decoding threads; None: tf.data's choice (AUTOTUNE)


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
