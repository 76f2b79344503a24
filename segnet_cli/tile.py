"""``segnet tile``: one gigapixel image through SegNet in bounded memory, georeferencing kept.

The run streams the tile grid row by row (``segnet_cli.tiling``):

1. a reader thread assembles the band of input rows that one grid row of windows needs
   (``segnet_cli.tiff``), reusing the rows it shares with the previous band, one band ahead
   of the model;
2. the main thread cuts the band into windows, scales them exactly as ``predict`` does
   (``imageio.to_model_input``), runs them through the same ``Segmenter`` in batches of
   equal shape and feeds the same ``Stitcher``;
3. rows the stitcher has finished become class indices and go to a writer thread that
   encodes them as 256 x 256 compressed tiles of the output TIFF.

So the whole image, the whole mask and the whole probability map are never in memory: peak
memory depends on the image *width* and the tile size, never on the height
(``memory_model``; ``segnet tile --plan`` prints it before anything runs, and
``--max-memory`` shrinks the batch, then the tile, to fit).

Outputs are written to a temporary file beside the target and renamed only when complete;
the mask records its provenance (input hash, model hash, settings) in its ImageDescription,
so a re-run skips it when up to date; a ``Claim`` keeps two runs off the same output; SIGINT
and SIGTERM stop between batches and leave nothing partial.

``--engine ray`` (``segnet_cli.ray_tile``) spreads the grid's rows over the actors of a Ray
cluster: they run the same ``stitch_rows`` and the driver writes the same ``open_outputs``.
"""

from __future__ import annotations

import math
import queue
import resource
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from segnet_cli import __version__
from segnet_cli.batch import Claim, Provenance, SignalGuard, file_digest, settings_key
from segnet_cli.config import MEMORY_BUDGET_MB, Report, TileConfig, TilingConfig
from segnet_cli.errors import (
    EXIT_OK,
    ImageTooLargeError,
    Interrupted,
    LockedError,
    OutputError,
    UsageError,
)
from segnet_cli.imageio import atomic_path, match_channels, pixel_limit, to_model_input
from segnet_cli.modelfile import ModelInfo, read_info
from segnet_cli.tiff import (
    OUTPUT_COMPRESSIONS,
    RegionReader,
    RowBlocks,
    SourceInfo,
    TiledTiffWriter,
    colormap,
    inspect_source,
    iter_bands,
    needs_bigtiff,
    open_reader,
    output_extratags,
    read_description,
)
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
#: Fixed cost of the first inference (traced graph, oneDNN primitives).
ACTIVATION_FIXED_BYTES = 20 * MiB
#: Bytes per input pixel per channel at full resolution (a channel at stage s counts 4**-s)
#: that one model batch adds to the resident set, *including what stays resident after it*:
#: TensorFlow's oneDNN allocator keeps its pools, and each new window shape (the grid's last
#: row and column) grows them. Fitted on a width-0.25, 5-stage SegNet over a grid's four
#: window shapes: batch 1 of ~1.05 Mpx grew the peak by 400 MiB, batch 2 by 760-870 MiB,
#: i.e. ~380 bytes per pixel (``activation_bytes_per_pixel``: 391 for that model).
ACTIVATION_BYTES_PER_CHANNEL_PIXEL = 11.0
#: ``segnet tile``'s memory target when ``--max-memory`` is not given: the batch (whose size
#: barely changes CPU speed) is lowered to fit it; the tile only under an explicit limit.
DEFAULT_MEMORY_BUDGET_MB = MEMORY_BUDGET_MB  # a module attribute, so a test can lower it

# ---- The time model's constant.
#: Effective float32 throughput of SegNet inference, in GFLOP/s: measured 0.71 Mpx/s for the
#: width-0.25, 5-stage SegNet (81.9 kFLOP/pixel) on a 2-core AVX-512 EPYC with a training job
#: sharing the CPU. A constant, not a measurement of the machine the plan runs on.
CPU_EFFECTIVE_GFLOPS = 58.0
#: bfloat16 inference was 1.55x faster than float32 on the same CPU (AVX512-BF16).
PRECISION_SPEEDUP = {"float32": 1.0, "bfloat16": 1.55, "float16": 1.0}

PROBABILITY_MODES = ("confidence", "classes")
PROBABILITY_DTYPES = ("float16", "uint8")


# --------------------------------------------------------------------------- pure arithmetic


def architecture_of(info: ModelInfo):
    """The model's ``Architecture`` from its metadata (the full VGG width when unknown)."""
    from segnet_cli.model import Architecture

    arch = info.architecture or {}
    stages = int(arch.get("stages") or max(1, round(math.log2(max(2, info.stride)))))
    return Architecture(
        width=float(arch.get("width") or 1.0),
        stages=stages,
        in_channels=info.in_channels,
        num_classes=info.num_classes,
    )


def activation_bytes_per_pixel(arch) -> float:
    """Peak bytes of one inference per input pixel (inputs, activations, logits)."""
    weighted = sum(w / 4**s for s, w in enumerate(arch.widths()))
    return 4 * (arch.in_channels + arch.num_classes) + ACTIVATION_BYTES_PER_CHANNEL_PIXEL * weighted


def flops_per_pixel(arch) -> float:
    """Floating-point operations of one forward pass per input pixel (3x3 and 1x1 convs)."""
    k2 = arch.kernel * arch.kernel
    widths, convs = arch.widths(), arch.convs()
    total, cin = 0.0, arch.in_channels
    for s, (w, n) in enumerate(zip(widths, convs)):
        for _ in range(n):
            total += 2 * k2 * cin * w / 4**s
            cin = w
    for s in range(len(widths) - 1, -1, -1):
        w, n = widths[s], convs[s]
        out_w = widths[s - 1] if s > 0 else widths[0]
        for i in range(n, 0, -1):
            co = out_w if i == 1 else w
            total += 2 * k2 * cin * co / 4**s
            cin = co
    return total + 2 * cin * arch.num_classes


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
) -> MemoryEstimate:
    """Peak resident memory of a streaming run: a pure function of widths and tile sizes.

    Nothing here grows with the image height (except ``whole_image_bytes``, for formats that
    cannot be windowed and are decoded whole).

    Components:
        runtime: Python + TensorFlow + Keras, and the loaded model.
        model: one batch through the model (inputs, activations, logits).
        tiles: per-tile scaling temporaries and the stitcher's argmax/softmax scratch.
        input: two bands of input rows (the one the model uses and the one being read),
            plus the row of decoded TIFF segments the reader keeps for the next band.
        stitch: the stitcher's band (class indices, or float sums when blending), and, when
            the input declares nodata, the per-band comparison's scratch.
        output: finished rows waiting to be encoded (a few rows of output tiles per raster).
    """
    row_px = width * file_channels * file_itemsize
    window_side = math.isqrt(max(1, batch_pixels))
    parts = (
        ("runtime", int(runtime_bytes + MODEL_FILE_FACTOR * model_file_bytes)),
        ("model", int(ACTIVATION_FIXED_BYTES + batch_pixels * activation_per_pixel)),
        ("tiles", int(window_side * window_side * 4 * model_channels * 2 + batch_pixels * 8)),
        ("input", int(2 * band_rows * row_px + chunk_rows * row_px + whole_image_bytes)),
        ("stitch", int(stitch_bytes + (core_rows * width * (file_channels + 2) if nodata else 0))),
        ("output", int(4 * out_tile * width * (1 + prob_bands * prob_itemsize))),
    )
    return MemoryEstimate(parts)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class TilePlan:
    """Everything decided before the model runs: grid, outputs, memory and time estimates."""

    source: SourceInfo
    model_path: Path
    model: ModelInfo
    output: Path
    prob_output: Path | None
    tiling: TilingConfig
    grid: TileGrid
    memory: MemoryEstimate
    seconds: float
    seconds_basis: str
    mask_bytes: int
    prob_bytes: int
    bigtiff: bool
    prob_bigtiff: bool
    prob_bands: int
    prob_dtype: str | None
    notes: tuple[str, ...] = field(default_factory=tuple)
    config: TileConfig | None = None

    @property
    def computed_pixels(self) -> int:
        return self.grid.computed_pixels()

    def lines(self) -> list[str]:
        """The plan as human-readable lines."""
        s, g, t = self.source, self.grid, self.tiling
        rows, cols = len(g.rows), len(g.cols)
        core = g.tile - 2 * g.halo
        shapes = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(g.shapes().items(), reverse=True))
        out = [
            f"input:   {s.path}",
            f"         {s.describe()}",
            f"model:   {self.model_path} ({self.model.num_classes} classes, stride "
            f"{self.model.stride}, receptive field {self.model.receptive_field} px)",
            f"grid:    {len(g):,} tiles = {rows} rows x {cols} cols; tile {g.tile}, halo {g.halo} "
            f"(core {core}), batch {t.batch_size}, blend {t.blend}"
            + (" (the image fits in one tile)" if g.single else ""),
            f"         overlap overhead {g.overhead():.2f}x ({self.computed_pixels / 1e6:,.1f} Mpx "
            f"computed for {s.pixels / 1e6:,.1f} Mpx); window shapes: {shapes}",
            f"output:  {self.output}",
            f"         {s.width} x {s.height} uint8 class indices with colour map, tiled "
            f"{self.config.out_tile}, {self.config.compression}, "
            f"{'BigTIFF' if self.bigtiff else 'classic TIFF'}, {self.mask_bytes / MiB:,.0f} MiB "
            "uncompressed",
        ]
        if self.prob_output is not None:
            out.append(
                f"         {self.prob_output}: {self.prob_bands} band(s) {self.prob_dtype}, "
                f"{'BigTIFF' if self.prob_bigtiff else 'classic TIFF'}, "
                f"{self.prob_bytes / MiB:,.0f} MiB uncompressed"
            )
        if s.nodata is not None:
            out.append(f"         input nodata {s.nodata_text!r} -> class {self.config.nodata_class}")
        out.append(f"memory:  estimated peak {self.memory.line()}")
        out.append(
            f"         grows with image width and tile size, not height (band of "
            f"{g.band_rows()} input rows)"
        )
        out.append(f"time:    ~{_fmt_duration(self.seconds)} ({self.seconds_basis})")
        out.extend(f"note:    {n}" for n in self.notes)
        return out


    def as_dict(self) -> dict:
        """The plan as JSON-ready data."""
        s, g = self.source, self.grid
        return {
            "input": str(s.path),
            "width": s.width,
            "height": s.height,
            "channels": s.channels,
            "dtype": s.dtype.name,
            "layout": s.layout,
            "compression": s.compression,
            "bigtiff_input": s.bigtiff,
            "model": str(self.model_path),
            "classes": list(self.model.class_names),
            "tiling": asdict(self.tiling),
            "grid": {
                "tiles": len(g),
                "rows": len(g.rows),
                "cols": len(g.cols),
                "tile": g.tile,
                "halo": g.halo,
                "stride": g.stride,
                "overhead": round(g.overhead(), 4),
                "computed_pixels": self.computed_pixels,
                "band_rows": g.band_rows(),
                "shapes": {f"{h}x{w}": n for (h, w), n in g.shapes().items()},
            },
            "output": str(self.output),
            "prob_output": None if self.prob_output is None else str(self.prob_output),
            "bigtiff": self.bigtiff,
            "mask_bytes": self.mask_bytes,
            "prob_bytes": self.prob_bytes,
            "memory_bytes": self.memory.as_dict(),
            "seconds_estimate": round(self.seconds, 1),
            "seconds_basis": self.seconds_basis,
            "nodata": s.nodata_text,
            "notes": list(self.notes),
        }


def _fmt_duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def default_output(path: Path) -> Path:
    """``<stem>.mask.tif`` beside the input."""
    return path.with_name(f"{path.stem}.mask.tif")


def prob_output_path(mask: Path) -> Path:
    """The probability raster beside a mask: ``x.mask.tif`` -> ``x.prob.tif``."""
    name = mask.name
    for suffix in (".mask.tif", ".mask.tiff"):
        if name.lower().endswith(suffix):
            return mask.with_name(name[: -len(suffix)] + ".prob.tif")
    return mask.with_name(f"{mask.stem}.prob{mask.suffix or '.tif'}")


def _validate(config: TileConfig, info: ModelInfo) -> None:
    if config.probabilities not in (None, *PROBABILITY_MODES):
        raise UsageError(f"--probabilities must be one of {', '.join(PROBABILITY_MODES)}")
    if config.probability_dtype not in PROBABILITY_DTYPES:
        raise UsageError(f"--prob-dtype must be one of {', '.join(PROBABILITY_DTYPES)}")
    if config.compression not in OUTPUT_COMPRESSIONS:
        raise UsageError(
            f"--compression must be one of {', '.join(OUTPUT_COMPRESSIONS)} (masks must stay exact)"
        )
    if config.out_tile < 16 or config.out_tile % 16:
        raise UsageError("--out-tile must be a multiple of 16")
    if config.tiling.blend not in ("center", "gaussian"):
        raise UsageError(f"--blend must be 'center' or 'gaussian', not {config.tiling.blend!r}")
    if config.tiling.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if not info.num_classes <= config.nodata_class <= 255:
        raise UsageError(
            f"--nodata-class must be between {info.num_classes} (past the model's classes) and 255"
        )
    if config.max_memory_mb is not None and config.max_memory_mb <= 0:
        raise UsageError("--max-memory must be positive (MiB)")


def _estimate(
    source: SourceInfo,
    info: ModelInfo,
    arch,
    config: TileConfig,
    tiling: TilingConfig,
    model_file_bytes: int,
) -> tuple[TileGrid, MemoryEstimate]:
    grid = TileGrid.make(source.height, source.width, tiling.tile, tiling.halo, info.stride)
    worst = worst_row_grid(grid)
    prob = config.probabilities
    bands = 0 if prob is None else (1 if prob == "confidence" else info.num_classes)
    item = 0 if prob is None else np.dtype(config.probability_dtype).itemsize
    whole = 0
    if source.layout == "whole":
        whole = source.pixels * source.band_channels * source.band_itemsize
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
            worst, info.num_classes, tiling.blend, prob == "confidence", prob == "classes"
        ),
        out_tile=config.out_tile,
        prob_bands=bands,
        prob_itemsize=item,
        model_file_bytes=model_file_bytes,
        whole_image_bytes=whole,
        nodata=source.nodata is not None,
    )
    return grid, mem


def fit_tiling(
    tiling: TilingConfig, limit: int, estimate, stride: int
) -> tuple[TilingConfig, str | None]:
    """The largest batch, then tile, whose estimated peak stays under ``limit`` bytes.

    The batch goes first (on a CPU it barely changes speed); then the tile shrinks by the
    model's stride, which raises the overlap overhead but keeps results identical as long as
    the halo is unchanged.

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
    halo = math.ceil(tiling.halo / stride) * stride
    smallest = 2 * halo + stride
    size = (tiling.tile // stride) * stride - stride
    while size >= smallest:
        t = replace(tiling, tile=size, batch_size=1)
        if estimate(t) <= limit:
            return t, f"--max-memory: batch size {tiling.batch_size} -> 1, tile {tiling.tile} -> {size}"
        size -= stride
    need = estimate(replace(tiling, tile=smallest, batch_size=1))
    raise UsageError(
        f"--max-memory {limit / MiB:,.0f} MiB is too small: even tile {smallest} (the least a "
        f"halo of {halo} allows) with batch 1 needs about {need / MiB:,.0f} MiB, of which the "
        f"TensorFlow runtime alone is about {RUNTIME_BYTES / MiB:,.0f} MiB; raise the limit "
        "or lower --halo"
    )


def plan_tile(config: TileConfig) -> TilePlan:
    """Decide the grid, outputs and estimates for ``config`` without loading the model.

    Raises:
        ImageReadError, TiffLayoutError: the input cannot be read (window by window).
        ModelFileError: the model file is missing or not a segnet model.
        UsageError: bad options, or ``--max-memory`` cannot be met.
    """
    from segnet_cli.engine import resolve_model_path

    source = inspect_source(config.input)
    model_path = resolve_model_path(config.model)
    info = read_info(model_path)
    _validate(config, info)
    # Fail now, not after loading the model, if the bands cannot become the model's input.
    match_channels(np.zeros((1, 1, source.band_channels), np.uint8), info.in_channels, source.path)
    if source.layout == "whole":
        limit = pixel_limit(config.max_pixels)
        if limit is not None and source.pixels > limit:
            raise ImageTooLargeError(
                f"{source.width}x{source.height} cannot be read window by window "
                f"({source.fmt}) and is over the pixel limit of {limit}; convert it to a tiled "
                "TIFF or raise the limit with --max-pixels",
                source.path,
            )
    output = Path(config.out) if config.out is not None else default_output(source.path)
    if output.exists() and output.is_dir():
        raise UsageError(f"--out {output} is a folder; give a file name")
    if output.resolve() == source.path.resolve():
        raise UsageError("the output would overwrite the input; give another --out")
    prob_out = prob_output_path(output) if config.probabilities else None
    arch = architecture_of(info)
    model_bytes = model_path.stat().st_size
    notes: list[str] = []

    def peak(t: TilingConfig) -> int:
        return _estimate(source, info, arch, config, t, model_bytes)[1].total

    tiling = config.tiling
    if config.max_memory_mb is not None and math.isinf(config.max_memory_mb):
        pass  # no limit: the batch and tile were chosen explicitly
    elif config.max_memory_mb is not None:
        tiling, note = fit_tiling(tiling, int(config.max_memory_mb * MiB), peak, info.stride)
        if note:
            notes.append(note)
    else:
        # A soft default: lower the batch (free on a CPU), never the tile (that costs speed:
        # an explicit --max-memory asks for it) and never refuse.
        budget = int(DEFAULT_MEMORY_BUDGET_MB * MiB)
        if peak(tiling) > budget and tiling.batch_size > 1:
            tiling = replace(tiling, batch_size=1)
            notes.append(
                f"batch size {config.tiling.batch_size} -> 1 to stay under the default memory "
                f"budget of {DEFAULT_MEMORY_BUDGET_MB:,.0f} MiB (on a CPU the batch size barely "
                "changes speed; --max-memory sets another limit)"
            )
        if peak(tiling) > budget:
            notes.append(
                f"the estimated peak is over the default budget of "
                f"{DEFAULT_MEMORY_BUDGET_MB:,.0f} MiB; --max-memory MB makes it a hard limit "
                "(smaller tiles)"
            )
    grid, mem = _estimate(source, info, arch, config, tiling, model_bytes)
    if grid.tile != tiling.tile or grid.halo != tiling.halo:
        notes.append(
            f"tile {tiling.tile} / halo {tiling.halo} aligned to the model's stride "
            f"{info.stride}: {grid.tile} / {grid.halo}"
        )
    if source.layout == "whole":
        notes.append(
            f"{source.fmt} cannot be read window by window: it is decoded whole "
            f"({source.pixels * source.band_channels * source.band_itemsize / MiB:,.0f} MiB)"
        )
    rate = CPU_EFFECTIVE_GFLOPS * 1e9 * PRECISION_SPEEDUP.get(config.precision, 1.0)
    seconds = grid.computed_pixels() * flops_per_pixel(arch) / rate
    basis = (
        f"model compute only: {grid.computed_pixels() / 1e6:,.0f} Mpx x "
        f"{flops_per_pixel(arch) / 1e3:,.1f} kFLOP/px at an assumed {rate / 1e9:,.0f} GFLOP/s, "
        "a constant measured on a 2-core CPU, not on this machine; a GPU is much faster"
    )
    mask_bytes = source.pixels
    bands = 0 if prob_out is None else (1 if config.probabilities == "confidence" else info.num_classes)
    prob_dtype = config.probability_dtype if prob_out is not None else None
    prob_bytes = source.pixels * bands * (np.dtype(prob_dtype).itemsize if prob_dtype else 0)
    return TilePlan(
        source=source,
        model_path=model_path,
        model=info,
        output=output,
        prob_output=prob_out,
        tiling=tiling,
        grid=grid,
        memory=mem,
        seconds=seconds,
        seconds_basis=basis,
        mask_bytes=mask_bytes,
        prob_bytes=prob_bytes,
        bigtiff=needs_bigtiff(mask_bytes),
        prob_bigtiff=needs_bigtiff(prob_bytes),
        prob_bands=bands,
        prob_dtype=prob_dtype,
        notes=tuple(notes),
        config=config,
    )


# --------------------------------------------------------------------------- running


def input_digest(path: Path) -> str:
    """The input's content hash for provenance: SHA-256 of the whole file.

    Hashing reads the file once more (about 1-2 GB/s from a warm cache, a few seconds for a
    compressed gigapixel mosaic, small next to the model's minutes), and unlike size + mtime
    it survives copies and catches edits that keep the size.
    """
    return file_digest(path)


def provenance_settings(plan: TilePlan, config: TileConfig) -> str:
    """The settings that change the outputs (batch size and memory limit do not)."""
    g = plan.grid
    return settings_key(
        command="tile",
        tile=g.tile,
        halo=g.halo,
        blend=plan.tiling.blend,
        precision=config.precision,
        probabilities=config.probabilities,
        probability_dtype=plan.prob_dtype,
        nodata_class=config.nodata_class,
        out_tile=config.out_tile,
        compression=config.compression,
        version=1,
    )


def up_to_date(plan: TilePlan, prov: Provenance) -> bool:
    """The outputs exist and record the same provenance."""
    outs = [plan.output] + ([plan.prob_output] if plan.prob_output is not None else [])
    return all(p.is_file() and Provenance.from_json(read_description(p)) == prov for p in outs)


def remove_dead_temporaries_of(final: Path) -> int:
    """Remove temporaries of ``final`` left by dead runs (only this output's, not the folder's).

    Predict cleans its whole output folder; the folder a gigapixel input sits in may hold
    other things, so only this output's names are touched.
    """
    from segnet_cli.batch import remove_dead_temporaries

    return remove_dead_temporaries(final.parent, f"*-{final.name}.*", recursive=False)


def run_tile(config: TileConfig, progress=None, log=None) -> Report:
    """Segment one (huge) image into a tiled, georeferenced mask TIFF, streaming.

    Args:
        config: the options; ``config.engine`` picks this machine (``local``) or a Ray
            cluster (``ray``, see ``segnet_cli.ray_tile``).
        progress: optional ``ui.Progress``-like object (``start``, ``advance``).
        log: optional callable for one-line human messages.

    Returns:
        A report: ``return_code`` 0 (done or up to date) or 130/143 (interrupted, nothing
        written); ``details`` holds the plan, outputs, timings and the measured peak RSS.

    Raises:
        SegnetError: the input, model, options or output are unusable (see ``plan_tile``),
            ``LockedError`` when another run is writing the same output.
    """
    if config.engine == "ray":
        from segnet_cli.ray_tile import run_tile_ray

        return run_tile_ray(config, progress, log)
    if config.engine != "local":
        raise UsageError(f"--engine must be 'local' or 'ray', not {config.engine!r}")
    return run_planned(
        config, _stream, progress, log, "interrupted: no output written (temporary files removed)"
    )


def run_planned(config: TileConfig, stream, progress=None, log=None, interrupted_note: str = "") -> Report:
    """What every engine does around its run: plan, claim, skip if up to date, stop on signals.

    Args:
        config: the options.
        stream: ``(plan, config, provenance, guard, progress, log) -> stats`` computes and
            writes the outputs (atomically) and returns timing figures for the report; it
            raises ``Interrupted`` (``guard.check()``) to stop.
        progress: optional ``ui.Progress``-like object.
        log: optional callable for one-line human messages.
        interrupted_note: logged when a signal stopped the run.

    Returns:
        The report (see ``run_tile``).
    """
    from segnet_cli.engine import model_fingerprint

    t0 = time.perf_counter()
    plan = plan_tile(config)
    details: dict = {"plan": plan.as_dict(), "output": str(plan.output)}
    if config.plan_only:
        return Report(return_code=EXIT_OK, seconds=time.perf_counter() - t0, details=details)
    out = plan.output
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror or exc}", out.parent) from None
    removed = sum(remove_dead_temporaries_of(p) for p in (out, plan.prob_output) if p is not None)
    if removed and log:
        log(f"removed {removed} temporary file(s) left by an interrupted run")
    claim = Claim(out.parent, out)
    try:
        got = claim.acquire()
    except OSError as exc:
        raise OutputError(f"cannot write to the output folder: {exc.strerror or exc}", out.parent) from None
    if not got:
        raise LockedError("another segnet run is writing this output", out)
    try:
        with SignalGuard() as guard:
            prov = Provenance(
                input_digest(plan.source.path),
                model_fingerprint(plan.model_path),
                provenance_settings(plan, config),
            )
            if not config.overwrite and up_to_date(plan, prov):
                details["reason"] = "up to date"
                return Report(skipped=1, seconds=time.perf_counter() - t0, details=details)
            guard.check()
            stats = stream(plan, config, prov, guard, progress, log)
    except Interrupted as exc:
        if log and interrupted_note:
            log(interrupted_note)
        details["interrupted"] = exc.signum
        return Report(
            return_code=exc.exit_code, seconds=time.perf_counter() - t0, details=details
        )
    finally:
        claim.release()
    details.update(stats)
    details["peak_rss_bytes"] = _peak_rss()
    return Report(done=1, seconds=time.perf_counter() - t0, details=details)


def _peak_rss() -> int:
    """This process's peak resident set size (bytes; Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _BandPrefetcher:
    """Reads the next band in a thread while the model works on the current one.

    A semaphore bounds the bands alive at once to two: the one the model uses and the one
    being read. ``release`` is called when the model is done with a band.
    """

    def __init__(self, reader: RegionReader, ranges: list[tuple[int, int]]) -> None:
        self._reader = reader
        self._ranges = ranges
        self._slots = threading.Semaphore(2)
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="segnet-band-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            bands = iter_bands(self._reader, self._ranges)
            for _ in self._ranges:
                self._slots.acquire()
                if self._stop.is_set():
                    return
                self._queue.put(("band", next(bands)))
        except BaseException as exc:  # handed to the main thread
            self._queue.put(("error", exc))

    def next(self) -> tuple[int, np.ndarray]:
        t = time.perf_counter()
        kind, value = self._queue.get()
        self.wait_seconds += time.perf_counter() - t
        if kind == "error":
            raise value
        return value

    def release(self) -> None:
        self._slots.release()

    def close(self) -> None:
        self._stop.set()
        self._slots.release()
        self._slots.release()
        self._thread.join()


def _nodata_mask(band: np.ndarray, value: float) -> np.ndarray | None:
    """Pixels whose every band equals the nodata value (``None`` when it cannot occur)."""
    if math.isnan(value):
        if not np.issubdtype(band.dtype, np.floating):
            return None
        return np.isnan(band).all(axis=-1)
    if np.issubdtype(band.dtype, np.integer):
        info = np.iinfo(band.dtype)
        if value != int(value) or not info.min <= value <= info.max:
            return None
        value = int(value)
    return (band == np.asarray(value, band.dtype)).all(axis=-1)


def _prob_block(conf: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.clip(np.rint(conf * 255.0), 0, 255).astype(np.uint8)
    return conf.astype(np.float16)


def effective_nodata(source: SourceInfo, log=None) -> float | None:
    """The input's nodata value as the bands show it (``None``: no pixel is nodata)."""
    nodata = source.nodata
    if nodata is not None and source.palette:
        # A palette image's nodata is a colour-map index, gone once bands are expanded to RGB.
        if log:
            log("input nodata ignored: it names a palette index, not a colour")
        return None
    return nodata


def stitch_rows(
    seg,
    grid: TileGrid,
    bands,
    *,
    blend: str,
    batch_size: int,
    source_path: Path,
    probabilities: str | None,
    probability_dtype: str,
    nodata: float | None,
    nodata_class: int,
    stats: dict | None = None,
    on_batch=None,
):
    """Run every grid row through the model and yield finished output rows, top to bottom.

    This is the one place where ``segnet tile`` turns pixels into mask rows, whichever engine
    runs it (``ray_tile`` runs it on a slice of the grid), so both give the same bytes:
    same windows, same batches (each grid row batched on its own), same stitching, same
    nodata rule, same probability encoding.

    Args:
        seg: a ``Segmenter``.
        grid: the tiles to run, row by row.
        bands: ``next() -> (y0, band)`` for each grid row in order, in the grid's row
            coordinates, and ``release()`` once a band is no longer used (``_BandPrefetcher``).
        blend: the stitcher's mode.
        batch_size: tiles per model batch.
        source_path: the input (for error messages).
        probabilities: ``None``, ``confidence`` or ``classes``.
        probability_dtype: ``float16`` or ``uint8``.
        nodata: the input's nodata value (``effective_nodata``), or ``None``.
        nodata_class: the mask value of nodata pixels.
        stats: when given, ``model_seconds`` is added to it.
        on_batch: called with each batch's tiles once they are stitched (progress, signals).

    Yields:
        ``(y0, mask, prob)``: rows ``[y0, y0 + len(mask))`` as uint8 class indices, and their
        probability raster in ``probability_dtype`` (``None`` without ``probabilities``).

    Raises:
        OutputError: the stitcher did not finish (an internal error).
    """
    from segnet_cli.tiling import Stitcher

    prob = probabilities
    stitcher = Stitcher(
        grid, seg.num_classes, blend, confidence=prob == "confidence", probabilities=prob == "classes"
    )
    channels = seg.info.in_channels
    bs = max(1, batch_size)
    for r in range(len(grid.rows)):
        b0, band = bands.next()

        def pixels(tile, band=band, b0=b0):
            y0, x0, y1, x1 = tile.window
            return to_model_input(band[y0 - b0 : y1 - b0, x0:x1], channels, source_path)

        t_model = time.perf_counter()
        for tiles, outputs in seg.run_tiles(
            ((t, pixels(t)) for t in grid.row_tiles(r)), bs, stitcher.needs
        ):
            if stats is not None:
                stats["model_seconds"] += time.perf_counter() - t_model
            for tile, out in zip(tiles, outputs):
                stitcher.add(tile, out)
            del outputs
            if on_batch is not None:
                on_batch(tiles)
            t_model = time.perf_counter()
        for y0, mask, conf, probs in stitcher.pop():
            if nodata is not None:
                nod = _nodata_mask(band[y0 - b0 : y0 - b0 + mask.shape[0]], nodata)
                if nod is not None and nod.any():
                    mask = np.where(nod, np.uint8(nodata_class), mask)
                    if conf is not None:
                        conf = np.where(nod, 0.0, conf)
                    if probs is not None:
                        probs = np.where(nod[..., None], 0.0, probs)
            p = None
            if prob is not None:
                p = _prob_block(probs if prob == "classes" else conf, probability_dtype)
            yield y0, mask, p
        # Drop every reference to the band (the closure's too) before the reader may start
        # the next one: two bands alive at most.
        del band, pixels
        bands.release()
    if not stitcher.finished:
        raise OutputError("internal error: the stitcher did not finish", source_path)


class OutputRows:
    """The rows of the output rasters, written in order (see ``open_outputs``)."""

    def __init__(self, mask_rows: RowBlocks, prob_rows: RowBlocks | None) -> None:
        self._mask = mask_rows
        self._prob = prob_rows
        self._finished = False

    def add(self, mask: np.ndarray, prob: np.ndarray | None = None) -> None:
        """The next rows: class indices, and their probabilities when a raster is written."""
        self._mask.add(mask)
        if self._prob is not None:
            self._prob.add(prob)

    def finish(self) -> None:
        """Flush the last partial row of tiles and close the files (idempotent)."""
        if not self._finished:
            self._finished = True
            self._mask.finish()
            if self._prob is not None:
                self._prob.finish()


@contextmanager
def open_outputs(plan: TilePlan, config: TileConfig, prov: Provenance, palette, nodata: bool):
    """Open the output TIFF(s) as temporaries; rename them into place when the body succeeds.

    The mask is uint8 with the model's colour map, the probability raster (if asked for)
    float16 or uint8; both tiled and compressed as configured, with the input's resolution
    and georeferencing, ``Software`` and the provenance in ``ImageDescription``.

    Args:
        plan: the plan (output paths, sizes, BigTIFF decisions).
        config: the options.
        prov: recorded in each file's ImageDescription.
        palette: the model's class colours.
        nodata: the input declares nodata: the mask then declares ``nodata_class`` as its own.

    Yields:
        An ``OutputRows`` to feed rows to; it is finished on leaving the block. On an
        exception the writers are stopped and the temporaries deleted.
    """
    source, k = plan.source, plan.model.num_classes
    prob = config.probabilities
    common = {"software": f"segnet {__version__}", "description": prov.to_json()}
    if source.resolution is not None:
        common["resolution"] = source.resolution
        common["resolutionunit"] = source.resolution_unit or 1
    nodata_out = str(config.nodata_class) if nodata else None
    with ExitStack() as stack:
        tmp_mask = stack.enter_context(atomic_path(plan.output))
        tmp_prob = stack.enter_context(atomic_path(plan.prob_output)) if plan.prob_output else None
        writers: list[TiledTiffWriter] = []
        try:
            mask_writer = TiledTiffWriter(
                tmp_mask,
                (source.height, source.width),
                np.uint8,
                config.out_tile,
                config.compression,
                plan.bigtiff,
                photometric="palette",
                colormap=colormap(palette),
                **{**common, "extratags": output_extratags(source, nodata_out)},
            )
            writers.append(mask_writer)
            prob_rows = None
            if tmp_prob is not None:
                shape = (source.height, source.width) + ((k,) if prob == "classes" else ())
                prob_writer = TiledTiffWriter(
                    tmp_prob,
                    shape,
                    np.dtype(config.probability_dtype),
                    config.out_tile,
                    config.compression,
                    plan.prob_bigtiff,
                    photometric="minisblack",
                    planarconfig="contig" if prob == "classes" else None,
                    **{**common, "extratags": output_extratags(source, None)},
                )
                writers.append(prob_writer)
                prob_rows = RowBlocks(prob_writer, config.out_tile)
            rows = OutputRows(RowBlocks(mask_writer, config.out_tile), prob_rows)
            yield rows
            rows.finish()
        except BaseException:
            for w in writers:
                w.abort()
            raise


def _stream(plan: TilePlan, config: TileConfig, prov: Provenance, guard, progress, log) -> dict:
    """The streaming run itself; returns timing figures."""
    from segnet_cli.engine import Segmenter

    source, grid, tiling = plan.source, plan.grid, plan.tiling
    if log:
        log(f"loading model {plan.model_path}")
    seg = Segmenter(plan.model_path, config.precision, config.device)
    if seg.stride != grid.stride or seg.num_classes != plan.model.num_classes:
        raise UsageError("the model changed since it was planned")
    guard.check()
    nodata = effective_nodata(source, log)
    stats = {"model_seconds": 0.0, "read_wait_seconds": 0.0, "write_wait_seconds": 0.0}
    total_px = source.pixels
    done_px = 0
    if progress is not None:
        progress.start(len(grid), 0)
    t_start = time.perf_counter()

    def on_batch(tiles) -> None:
        nonlocal done_px
        for tile in tiles:
            cy0, cx0, cy1, cx1 = tile.core
            done_px += (cy1 - cy0) * (cx1 - cx0)
        if progress is not None:
            rate = done_px / max(1e-9, time.perf_counter() - t_start) / 1e6
            progress.advance(len(tiles), extra=f"{rate:.2f} Mpx/s")
        guard.check()

    reader = open_reader(source, config.max_pixels)
    prefetch = None
    try:
        with open_outputs(plan, config, prov, seg.info.palette, nodata is not None) as outputs:
            prefetch = _BandPrefetcher(reader, [(r.window_start, r.window_end) for r in grid.rows])
            rows = stitch_rows(
                seg,
                grid,
                prefetch,
                blend=tiling.blend,
                batch_size=tiling.batch_size,
                source_path=source.path,
                probabilities=config.probabilities,
                probability_dtype=config.probability_dtype,
                nodata=nodata,
                nodata_class=config.nodata_class,
                stats=stats,
                on_batch=on_batch,
            )
            for _y0, mask, prob in rows:
                tw = time.perf_counter()
                outputs.add(mask, prob)
                stats["write_wait_seconds"] += time.perf_counter() - tw
            tw = time.perf_counter()
            outputs.finish()
            stats["write_wait_seconds"] += time.perf_counter() - tw
    finally:
        if prefetch is not None:
            stats["read_wait_seconds"] = prefetch.wait_seconds
            prefetch.close()
        reader.close()
    wall = time.perf_counter() - t_start
    stats.update(
        {
            "stream_seconds": wall,
            "tiles": len(grid),
            "mpx_per_s": total_px / wall / 1e6 if wall > 0 else 0.0,
            "prob_output": None if plan.prob_output is None else str(plan.prob_output),
        }
    )
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()}


def summary_lines(report: Report) -> list[str]:
    """Human lines for a finished run (used by the CLI)."""
    d = report.details or {}
    if d.get("interrupted"):
        return [f"interrupted after {report.seconds:.1f}s: nothing written"]
    if report.skipped:
        return [f"{d.get('output')}: up to date, skipped (use --overwrite to redo)"]
    plan = d.get("plan", {})
    lines = [
        f"wrote {d.get('output')} ({plan.get('width')} x {plan.get('height')}, "
        f"{d.get('tiles')} tiles) in {report.seconds:.1f}s: {d.get('mpx_per_s', 0):.2f} Mpx/s"
    ]
    if d.get("prob_output"):
        lines.append(f"wrote {d['prob_output']}")
    if d.get("engine") == "ray":
        from segnet_cli.ray_tile import summary_line

        lines.append(summary_line(d))
        return lines
    est = plan.get("memory_bytes", {}).get("total")
    if d.get("peak_rss_bytes"):
        lines.append(
            f"peak memory (RSS) {d['peak_rss_bytes'] / MiB:,.0f} MiB"
            + (f" (estimated {est / MiB:,.0f} MiB)" if est else "")
            + f"; model {d.get('model_seconds', 0):.1f}s, waiting for input "
            f"{d.get('read_wait_seconds', 0):.1f}s, output {d.get('write_wait_seconds', 0):.1f}s"
        )
    return lines


__all__ = [
    "run_tile",
    "run_planned",
    "stitch_rows",
    "open_outputs",
    "OutputRows",
    "effective_nodata",
    "plan_tile",
    "TilePlan",
    "MemoryEstimate",
    "memory_model",
    "fit_tiling",
    "batch_pixels",
    "activation_bytes_per_pixel",
    "flops_per_pixel",
    "default_output",
    "prob_output_path",
    "summary_lines",
]
