"""The memory and time model of ``segnet tile``: pure arithmetic, before any pixel moves.

Peak memory of a streaming run depends on the image *width*, the tile and the batch, never
on the height (``memory_model``); ``fit_tiling`` lowers the batch, then stops reading ahead,
then lowers the tile, to stay under a limit. The constants were measured
(``bench/tile_memory.py`` measures them again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from segnet_cli.config import (
    MEMORY_BUDGET_MB,
    TTA,
    Blend,
    Precision,
    ProbabilityDtype,
    ProbabilityMode,
    TileConfig,
    TilingConfig,
)
from segnet_cli.errors import UsageError
from segnet_cli.gigapixel.isolated import runs_model_apart
from segnet_cli.io.gdal import GDAL_CACHE_MB
from segnet_cli.io.tiff import SourceInfo
from segnet_cli.model.modelfile import ModelInfo
from segnet_cli.tiling import Span, TileGrid, band_bytes

MiB = 1024 * 1024

# ---- The memory model's constants (measured; bench/tile_memory.py measures them again).
#: Resident size before any model runs: Python with TensorFlow 2.21 and Keras 3.15 imported
#: (553-654 MiB measured on Linux x86-64, of which ~420 MiB are pages of TensorFlow's shared
#: libraries: the file-backed part varies with the page cache), plus typer, rich, Pillow and
#: tifffile.
RUNTIME_BYTES = 680 * MiB
#: A loaded model costs about this many times its file size (weights, Keras objects).
MODEL_FILE_FACTOR = 4
#: GDAL's libraries as rasterio, fiona and shapely bring them (48 MiB measured by importing
#: them in a fresh Python): counted when the run uses them (a COG, polygons, an area of
#: interest, an input read through GDAL).
GIS_LIBRARY_BYTES = 50 * MiB
#: The process beside ``tile --vector``'s model process (``gigapixel.isolated``): Python,
#: NumPy, tifffile and GDAL's libraries (92 MiB measured while the stream runs), plus
#: ``RECEIVED_BANDS`` bands of the rows it receives. The model process itself counts as
#: ``runtime`` and the rest.
MODEL_PROCESS_PARENT_BYTES = 100 * MiB
#: Bands of finished rows alive at once in that process: the one being received and the one
#: being written. With the ``output`` part (rows waiting to be encoded) that is 150 MiB at
#: 20000 px wide, where a band of 768 mask rows is 15 MB; 147 MiB was measured.
RECEIVED_BANDS = 2
#: How the planner's notes say that reading ahead was given up (``TilingConfig.read_ahead``).
NO_READ_AHEAD = "input read band by band, not ahead of the model"
#: Fixed cost of the first inference (traced graph, oneDNN primitives).
ACTIVATION_FIXED_BYTES = 20 * MiB
#: Bytes per input pixel per channel at full resolution (a channel at stage s counts 4**-s)
#: that one model batch adds to the resident set, *including what stays resident after it*:
#: TensorFlow's oneDNN allocator keeps its pools, and each new window shape (the grid's last
#: row and column) grows them. Fitted on a width-0.25, 5-stage SegNet over a grid's four
#: window shapes: batch 1 of ~1.05 Mpx grew the peak by 400 MiB, batch 2 by 760-870 MiB,
#: i.e. ~380 bytes per pixel (``activation_bytes_per_pixel``: 391 for that model).
ACTIVATION_BYTES_PER_CHANNEL_PIXEL = 11.0
#: Float32 copies of one window's logits the stitcher holds at once when it takes logits on
#: the host (``tiling.Stitcher.add``): the softmax and, blending, its Gaussian-weighted copy.
LOGIT_COPIES = 2
#: ``segnet tile``'s memory target when ``--max-memory`` is not given: the batch (whose size
#: barely changes CPU speed) is lowered to fit it; the tile only under an explicit limit.
DEFAULT_MEMORY_BUDGET_MB = MEMORY_BUDGET_MB  # a module attribute, so a test can lower it

# ---- The time model's constant.
#: Effective float32 throughput of SegNet inference, in GFLOP/s: measured 0.71 Mpx/s for the
#: width-0.25, 5-stage SegNet (81.9 kFLOP/pixel) on a 2-core AVX-512 EPYC with a training job
#: sharing the CPU. A constant, not a measurement of the machine the plan runs on.
CPU_EFFECTIVE_GFLOPS = 58.0
#: bfloat16 inference was 1.55x faster than float32 on the same CPU (AVX512-BF16).
PRECISION_SPEEDUP = {Precision.FLOAT32: 1.0, Precision.BFLOAT16: 1.55, Precision.FLOAT16: 1.0}


def activation_bytes_per_pixel(arch) -> float:
    """Peak bytes of one inference per input pixel (inputs, activations, logits)."""
    weighted = sum(w / 4**s for s, w in enumerate(arch.widths()))
    return 4 * (arch.in_channels + arch.num_classes) + ACTIVATION_BYTES_PER_CHANNEL_PIXEL * weighted


def worst_row_grid(grid: TileGrid) -> TileGrid:
    """A one-row grid with the largest grid row any image *height* can give this grid.

    Interior windows are ``tile`` rows; the last one is pulled back to the stride grid and can
    be up to ``tile + stride - 1`` rows, with a core of at most that minus the halo. Sizing
    memory on this row makes the estimate the same for every height (above one tile), so
    it depends on the width and the tile size only.
    """
    if len(grid.rows) == 1:
        rows = grid.rows
    else:
        window = grid.tile + grid.stride - 1
        rows = (Span(0, window, 0, window - grid.halo),)
    return replace(grid, height=rows[0].window_end, rows=rows)


def batch_pixels(grid: TileGrid, batch_size: int) -> int:
    """Most input pixels in one model batch when each grid row is batched on its own.

    Tiles of one grid row are grouped by shape, ``batch_size`` at a time (the row's last
    column is usually a different shape, so it rarely shares a batch).
    """
    widths: dict[int, int] = {}
    for c in grid.cols:
        widths[c.window] = widths.get(c.window, 0) + 1
    heights = {r.window for r in grid.rows}
    return max(min(batch_size, n) * h * w for h in heights for w, n in widths.items())


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak resident memory, by component (bytes)."""

    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(v for _, v in self.parts)

    def as_dict(self) -> dict[str, int]:
        return {**dict(self.parts), "total": self.total}

    def line(self) -> str:
        inner = ", ".join(f"{k} {v / MiB:,.0f}" for k, v in self.parts)
        return f"{self.total / MiB:,.0f} MiB ({inner})"


def memory_model(
    *,
    width: int,
    band_rows: int,
    core_rows: int,
    batch_pixels: int,
    file_channels: int,
    file_itemsize: int,
    chunk_rows: int,
    model_channels: int,
    activation_per_pixel: float,
    stitch_bytes: int,
    out_tile: int,
    prob_bands: int = 0,
    prob_itemsize: int = 0,
    model_file_bytes: int = 0,
    whole_image_bytes: int = 0,
    nodata: bool = False,
    runtime_bytes: int = RUNTIME_BYTES,
    window_pixels: int = 0,
    num_classes: int = 0,
    host_logits: bool = False,
    prob_encode_bytes: float = 0.0,
    gis: bool = False,
    isolated: bool = False,
    read_ahead: int = 1,
) -> MemoryEstimate:
    """Peak resident memory of a streaming run: a pure function of widths and tile sizes.

    Nothing here grows with the image height (except ``whole_image_bytes``, for formats that
    cannot be windowed and are decoded whole).

    Components:
        runtime: Python + TensorFlow + Keras, and the loaded model.
        model: one batch through the model (inputs, activations, logits).
        tiles: per-tile scaling temporaries and the stitcher's argmax scratch; when the
            stitcher takes logits on the host (``host_logits``: gaussian blending, a
            probability raster of every class, test-time augmentation), also the batch's
            float32 logits handed to the host (``Segmenter.run``'s copy, alive while its
            tiles are stitched) and the softmax of one window and its Gaussian-weighted copy
            (``LOGIT_COPIES`` float32 copies of a window's logits) while the band is full.
        input: the band of input rows the model uses and the ``read_ahead`` bands being
            read (``TilingConfig.read_ahead``), plus the row of decoded TIFF segments the
            reader keeps for the next band.
        stitch: the stitcher's band (class indices, or float sums when blending), and, when
            the input declares nodata, the per-band comparison's scratch.
        encode: a finished band's probabilities on their way to the raster
            (``prob_encode_bytes`` per pixel of a band of core rows: the float16 copy, or
            uint8's float temporaries, and the nodata masking copy).
        output: finished rows waiting to be encoded (a few rows of output tiles per raster).
        gis: GDAL's libraries (``gis``), or, when the model runs in its own process
            (``isolated``), the process that writes the rows beside it, libraries included.
    """
    row_px = width * file_channels * file_itemsize
    window_side = math.isqrt(max(1, batch_pixels))
    logit_copies = (
        4 * num_classes * (batch_pixels + LOGIT_COPIES * window_pixels) if host_logits else 0
    )
    parts = (
        ("runtime", int(runtime_bytes + MODEL_FILE_FACTOR * model_file_bytes)),
        ("model", int(ACTIVATION_FIXED_BYTES + batch_pixels * activation_per_pixel)),
        (
            "tiles",
            int(window_side * window_side * 4 * model_channels * 2 + batch_pixels * 8 + logit_copies),
        ),
        (
            "input",
            int((1 + read_ahead) * band_rows * row_px + chunk_rows * row_px + whole_image_bytes),
        ),
        ("stitch", int(stitch_bytes + (core_rows * width * (file_channels + 2) if nodata else 0))),
        ("encode", int(core_rows * width * prob_encode_bytes)),
        ("output", int(4 * out_tile * width * (1 + prob_bands * prob_itemsize))),
    )
    if isolated:
        received = RECEIVED_BANDS * core_rows * width * (1 + prob_bands * prob_itemsize)
        parts += (("writer", MODEL_PROCESS_PARENT_BYTES + received),)
    elif gis:
        parts += (("gis", GIS_LIBRARY_BYTES),)
    return MemoryEstimate(parts)


def encode_bytes_per_pixel(bands: int, dtype: ProbabilityDtype | None, nodata: bool) -> float:
    """Transient bytes per pixel of a finished band while its probabilities are encoded.

    float16: the converted copy (2 bytes a band). uint8: ``rint(p * 255)`` and ``clip`` make
    float32 temporaries, two alive at once, then the uint8 copy (9 bytes a band). With
    nodata, the masked copy of the float32 probabilities (4 bytes a band, and the mask's 1).
    """
    if not bands or dtype is None:
        return 0.0
    per = 2 * bands if ProbabilityDtype.parse(dtype, "--prob-dtype") is ProbabilityDtype.FLOAT16 else 9 * bands
    return per + (4 * bands + 1 if nodata else 0)


def estimate(
    source: SourceInfo,
    info: ModelInfo,
    arch,
    config: TileConfig,
    tiling: TilingConfig,
    model_file_bytes: int,
    gis: bool = False,
) -> tuple[TileGrid, MemoryEstimate]:
    grid = TileGrid.make(source.height, source.width, tiling.tile, tiling.halo, info.stride)
    worst = worst_row_grid(grid)
    prob = config.probabilities
    bands = probability_bands(prob, info.num_classes)
    item = 0 if prob is None else np.dtype(str(config.probability_dtype)).itemsize
    # An area of interest is burnt into a mask per band, as nodata is found per band.
    nodata = source.nodata is not None or config.aoi is not None
    # What ``Stitcher.needs`` asks of the model: anything but center-mode classes (or
    # classes and confidence) brings every window's logits to the host.
    host_logits = (
        Blend.parse(tiling.blend, "--blend") is Blend.GAUSSIAN
        or prob is ProbabilityMode.CLASSES
        or config.inference.tta is TTA.FLIP
    )
    whole = 0
    if source.layout == "whole":
        whole = source.pixels * source.band_channels * source.band_itemsize
    elif source.layout == "gdal":
        whole = GDAL_CACHE_MB * MiB  # GDAL's block cache, which it fills up to its limit
    mem = memory_model(
        width=source.width,
        band_rows=worst.band_rows() if source.layout != "whole" else 0,
        core_rows=worst.rows[0].core_end,
        batch_pixels=batch_pixels(worst, tiling.batch_size),
        file_channels=source.band_channels,
        file_itemsize=source.band_itemsize,
        chunk_rows=source.chunk_rows,
        model_channels=info.in_channels,
        activation_per_pixel=activation_bytes_per_pixel(arch),
        stitch_bytes=band_bytes(
            worst,
            info.num_classes,
            tiling.blend,
            prob is ProbabilityMode.CONFIDENCE,
            prob is ProbabilityMode.CLASSES,
            config.inference.tta is TTA.FLIP,
        ),
        out_tile=config.out_tile,
        prob_bands=bands,
        prob_itemsize=item,
        model_file_bytes=model_file_bytes,
        whole_image_bytes=whole,
        nodata=nodata,
        window_pixels=max(h * w for h, w in worst.shapes()),
        num_classes=info.num_classes,
        host_logits=host_logits,
        prob_encode_bytes=encode_bytes_per_pixel(
            bands, config.probability_dtype if prob is not None else None, nodata
        ),
        gis=gis or source.layout == "gdal" or config.aoi is not None,
        isolated=runs_model_apart(config),
        read_ahead=tiling.read_ahead,
    )
    return grid, mem


def fit_tiling(
    tiling: TilingConfig, limit: int, estimate, stride: int
) -> tuple[TilingConfig, str | None]:
    """The largest batch, then read-ahead, then tile whose estimated peak stays under ``limit``.

    The batch goes first (on a CPU it barely changes speed), then reading ahead (a band of
    input rows less, for reading no longer hidden behind the model: little for a TIFF);
    then the tile shrinks by the model's stride, which raises the overlap overhead but keeps
    results identical as long as the halo is unchanged.

    Args:
        tiling: what was asked for.
        limit: the memory limit in bytes.
        estimate: ``TilingConfig -> int`` (estimated peak bytes).
        stride: the model's total stride.

    Raises:
        UsageError: even batch 1 with the smallest tile the halo allows is over the limit.
    """
    if estimate(tiling) <= limit:
        return tiling, None
    t = replace(tiling, batch_size=1)
    if estimate(t) <= limit:
        return t, f"--max-memory: batch size {tiling.batch_size} -> 1"
    t = replace(t, read_ahead=0)
    if estimate(t) <= limit:
        return t, f"--max-memory: batch size {tiling.batch_size} -> 1, {NO_READ_AHEAD}"
    halo = math.ceil(tiling.halo / stride) * stride
    smallest = 2 * halo + stride
    size = (tiling.tile // stride) * stride - stride
    while size >= smallest:
        t = replace(tiling, tile=size, batch_size=1, read_ahead=0)
        if estimate(t) <= limit:
            return t, (
                f"--max-memory: batch size {tiling.batch_size} -> 1, {NO_READ_AHEAD}, "
                f"tile {tiling.tile} -> {size}"
            )
        size -= stride
    need = estimate(replace(tiling, tile=smallest, batch_size=1, read_ahead=0))
    raise UsageError(
        f"--max-memory {limit / MiB:,.0f} MiB is too small: even tile {smallest} (the least a "
        f"halo of {halo} allows) with batch 1 needs about {need / MiB:,.0f} MiB, of which the "
        f"TensorFlow runtime alone is about {RUNTIME_BYTES / MiB:,.0f} MiB; raise the limit "
        "or lower --halo"
    )

def probability_bands(mode: ProbabilityMode | None, num_classes: int) -> int:
    """Bands of the probability raster: none, one (confidence) or one per class."""
    if mode is None:
        return 0
    return 1 if mode is ProbabilityMode.CONFIDENCE else num_classes


def seconds_estimate(
    grid: TileGrid, arch, precision: Precision, tta: TTA = TTA.NONE
) -> tuple[float, str]:
    """Estimated model time of a grid on a CPU, and the basis of the estimate (a sentence)."""
    rate = CPU_EFFECTIVE_GFLOPS * 1e9 * PRECISION_SPEEDUP.get(precision, 1.0)
    fpp = arch.flops_per_pixel()
    views = 2 if tta is TTA.FLIP else 1
    computed = grid.computed_pixels() * views
    seconds = computed * fpp / rate
    basis = (
        f"model compute only: {computed / 1e6:,.0f} Mpx x "
        f"{fpp / 1e3:,.1f} kFLOP/px at an assumed {rate / 1e9:,.0f} GFLOP/s, "
        "a constant measured on a 2-core CPU, not on this machine; a GPU is much faster"
    )
    return seconds, basis


__all__ = [
    "MiB",
    "MemoryEstimate",
    "memory_model",
    "estimate",
    "fit_tiling",
    "batch_pixels",
    "worst_row_grid",
    "activation_bytes_per_pixel",
    "encode_bytes_per_pixel",
    "probability_bands",
    "seconds_estimate",
]
