"""Streaming TIFF input and output: read bands of rows, write tiles, carry the georeferencing.

Reading. ``inspect_source`` reads only a file's header and decides how it can be read:

* ``chunked``: tiled TIFFs and TIFFs with many strips. Each band of rows is assembled from the
  tiles/strips (tifffile calls both *segments*) that intersect it, decoded one at a time with
  the page's own decoder (``TiffPage.decode``, the same function tifffile's zarr store uses),
  so no zarr is needed and at most one row of segments is ever decoded beyond the band.
* ``contiguous``: uncompressed data stored in one piece (one strip, or strips back to back).
  In tifffile's zarr view this is a single chunk that would be decoded whole, so the band's
  rows are memory-mapped instead (``numpy.memmap`` over exactly those rows, copied, unmapped:
  mapping the whole file would let its pages pile up in the resident set).
* ``whole``: other formats Pillow reads (PNG, JPEG, ...) and TIFFs tifffile cannot window
  (bit depths such as 1 or 12): decoded whole, under the usual pixel limit.

A TIFF whose single segment is huge *and* compressed (one compressed strip) cannot be
windowed at all: ``TiffLayoutError`` says how to convert it.

Writing. ``TiledTiffWriter`` runs ``tifffile.imwrite`` in its own thread with an iterator of
tiles fed from finished blocks of rows, so the output is tiled and compressed as it is made
and nothing but one row of output tiles is buffered (compressed *strips* cannot be streamed).

Metadata. Resolution tags and the GeoTIFF tags (ModelPixelScale, ModelTiepoint,
ModelTransformation, the GeoKey directory and its double/ASCII params, GDAL_METADATA and
GDAL_NODATA) are copied with their TIFF types; photometric, extra samples and compression
belong to the new image.
"""

from __future__ import annotations

import math
import mmap
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segnet_cli.errors import ImageReadError, OutputError, TiffLayoutError
from segnet_cli.io.images import (
    check_single_image,
    open_pillow,
    oriented_size,
    tiff_alpha,
)

#: Largest decoded segment (strip or tile) read as one piece; a compressed segment larger than
#: this is the "one huge compressed strip" layout that cannot be windowed.
MAX_SEGMENT_BYTES = 256 * 1024 * 1024

# TIFF field types (TIFF 6.0 section 2).
ASCII, SHORT, DOUBLE = 2, 3, 12

#: GeoTIFF and GDAL tags copied to the outputs: code -> (name, TIFF type).
GEO_TAGS: dict[int, tuple[str, int]] = {
    33550: ("ModelPixelScaleTag", DOUBLE),
    33922: ("ModelTiepointTag", DOUBLE),
    34264: ("ModelTransformationTag", DOUBLE),
    34735: ("GeoKeyDirectoryTag", SHORT),
    34736: ("GeoDoubleParamsTag", DOUBLE),
    34737: ("GeoAsciiParamsTag", ASCII),
    42112: ("GDAL_METADATA", ASCII),
    42113: ("GDAL_NODATA", ASCII),
}
GDAL_NODATA = 42113
GDAL_METADATA = 42112

#: Compressions the output writer accepts (JPEG is lossy: class indices must stay exact).
OUTPUT_COMPRESSIONS = ("zlib", "zstd", "lzw", "packbits", "lzma", "none")

_CONVERT_HINT = (
    "convert it to a tiled TIFF first, e.g. `gdal_translate -co TILED=YES -co COMPRESS=DEFLATE "
    "-co BIGTIFF=IF_SAFER IN.tif OUT.tif` or `vips tiffsave IN.tif OUT.tif --tile "
    "--compression deflate --bigtiff`; if the image fits in memory, "
    "`python -c \"import tifffile as t; t.imwrite('OUT.tif', t.imread('IN.tif'), "
    "tile=(256, 256), compression='zlib', bigtiff=True)\"` works too"
)


@dataclass(frozen=True)
class SourceInfo:
    """What an input image is, read from its header alone (no pixel is decoded).

    ``chunk_rows`` is the height of one row of segments (what the chunked reader may hold
    beyond the band it returns); ``layout`` is ``chunked``, ``contiguous`` or ``whole``.
    """

    path: Path
    height: int
    width: int
    channels: int
    dtype: np.dtype
    layout: str
    fmt: str = "tiff"  # "tiff" or the Pillow format name
    compression: str = "none"
    bigtiff: bool = False
    tiled: bool = False
    chunk_shape: tuple[int, int] | None = None
    planar_separate: bool = False
    palette: bool = False
    alpha: bool = False  # the file marks the last band as alpha (may be dropped to fit)
    nodata_text: str | None = None
    resolution: tuple | None = None
    resolution_unit: int | None = None
    geo_tags: tuple[tuple[int, int, object], ...] = field(default_factory=tuple)
    bands: tuple[int, ...] | None = None  # --bands: the file's bands (1-based) to read, in order

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def chunk_rows(self) -> int:
        if self.layout != "chunked" or self.chunk_shape is None:
            return 0
        return min(self.chunk_shape[0], self.height)

    @property
    def band_channels(self) -> int:
        """Channels of the bands the reader returns (palette images expand to RGB)."""
        if self.bands is not None:
            return len(self.bands)
        return 3 if self.palette else self.channels

    @property
    def band_itemsize(self) -> int:
        return 1 if self.palette else self.dtype.itemsize

    @property
    def nodata(self) -> float | None:
        """GDAL_NODATA as a number (``nan`` allowed), or ``None`` when absent or unparsable."""
        if self.nodata_text is None:
            return None
        try:
            return float(self.nodata_text.strip().strip("\x00"))
        except ValueError:
            return None

    def describe(self) -> str:
        kind = self.fmt.upper() if self.fmt != "tiff" else ("BigTIFF" if self.bigtiff else "TIFF")
        parts = [f"{self.width} x {self.height} x {self.channels} {self.dtype.name}", kind]
        if self.fmt == "tiff":
            if self.tiled and self.chunk_shape:
                parts.append(f"tiled {self.chunk_shape[0]}x{self.chunk_shape[1]}")
            elif self.chunk_shape:
                parts.append(f"strips of {self.chunk_shape[0]} rows")
            parts.append(self.compression)
            if self.planar_separate:
                parts.append("planar (band-interleaved)")
            if self.palette:
                parts.append("palette")
        elif self.layout == "gdal":
            parts.append("via GDAL")
        if self.bands is not None:
            parts.append("bands " + ",".join(map(str, self.bands)))
        read = {
            "chunked": "read window by window",
            "contiguous": "read through a memory map",
            "whole": "decoded whole",
            "gdal": "read window by window",
        }[self.layout]
        return ", ".join(parts) + f" ({read})"


# --------------------------------------------------------------------------- inspecting


def is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")


def inspect_pillow(path: Path, max_pixels: int | None) -> SourceInfo:
    # Only the header is read, under the run's own limits (Pillow's guard armed as for the
    # read itself: sniffing never switches it off).
    im = open_pillow(path, max_pixels)
    with im:
        (w, h), mode, fmt = oriented_size(im), im.mode, (im.format or "image").lower()
        transparent = "transparency" in im.info
    bands = {"1": 1, "L": 1, "I": 1, "F": 1, "LA": 2, "PA": 4, "RGBA": 4}.get(mode, 3)
    if mode == "P":
        bands = 4 if transparent else 3
    if mode.startswith("I;16"):
        bands = 1
    dtype = np.dtype(
        np.uint16 if mode.startswith("I") else np.float32 if mode == "F" else np.uint8
    )
    alpha = mode in ("LA", "PA", "RGBA") or (mode == "P" and transparent)
    info = SourceInfo(path, h, w, bands, dtype, "whole", fmt=fmt, alpha=alpha)
    return info


def inspect_tiff(path: Path) -> SourceInfo:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) == 0:
                raise ImageReadError("the TIFF holds no image (truncated or empty)", path)
            check_single_image(tif, path)
            return _tiff_info(path, tif, tif.pages[0])
    except (ImageReadError, TiffLayoutError):
        raise
    except PermissionError:
        raise ImageReadError("permission denied", path) from None
    except Exception as exc:  # tifffile raises many types for broken files
        raise ImageReadError(f"cannot read TIFF ({type(exc).__name__}: {exc})", path) from None


def _tiff_info(path: Path, tif, page) -> SourceInfo:
    import tifffile

    h, w = int(page.imagelength), int(page.imagewidth)
    if page.imagedepth > 1:
        raise ImageReadError("volumetric (3-D) TIFFs are not supported", path)
    spp = int(page.samplesperpixel)
    separate = spp > 1 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
    palette = page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None
    compression = _compression_name(page.compression)
    dtype = page.dtype
    tiled = bool(page.is_tiled)
    chunk = (int(page.tilelength), int(page.tilewidth)) if tiled else (
        min(int(page.rowsperstrip), h), w
    )
    windowable = dtype is not None and page.bitspersample in (8, 16, 32, 64)
    if not windowable:
        layout = "whole"
        dtype = np.dtype(np.uint8 if dtype is None else dtype)
    elif page.is_memmappable:
        layout = "contiguous"
    else:
        layout = "chunked"
        seg_bytes = chunk[0] * chunk[1] * (1 if separate else spp) * dtype.itemsize
        if seg_bytes > MAX_SEGMENT_BYTES:
            single = len(page.dataoffsets) <= (spp if separate else 1)
            what = "one strip" if single else f"segments of {chunk[1]} x {chunk[0]} pixels"
            raise TiffLayoutError(
                f"the image ({w} x {h}) is stored as {what} ({compression}, "
                f"{seg_bytes / 2**20:,.0f} MiB per {'strip' if single else 'segment'} decoded), "
                "which cannot be read window by "
                f"window; {_CONVERT_HINT}",
                path,
            )
    geo = []
    for code, (_name, ttype) in GEO_TAGS.items():
        tag = page.tags.get(code)
        if tag is not None and tag.value is not None:
            geo.append((code, ttype, tag.value))
    nodata = page.tags.get(GDAL_NODATA)
    res = None
    xr, yr = page.tags.get(282), page.tags.get(283)
    if xr is not None and yr is not None:
        res = (tuple(xr.value), tuple(yr.value))
    unit = page.tags.get(296)
    return SourceInfo(
        path=path,
        height=h,
        width=w,
        channels=spp,
        dtype=np.dtype(dtype),
        layout=layout,
        compression=compression,
        bigtiff=bool(tif.is_bigtiff),
        tiled=tiled,
        chunk_shape=chunk,
        planar_separate=separate,
        palette=palette,
        alpha=not palette and spp in (2, 4) and tiff_alpha(page),
        nodata_text=None if nodata is None else str(nodata.value),
        resolution=res,
        resolution_unit=None if unit is None else int(unit.value),
        geo_tags=tuple(geo),
    )


def _compression_name(value) -> str:
    name = getattr(value, "name", str(value)).lower()
    return {"adobe_deflate": "deflate", "deflate": "deflate", "none": "none"}.get(name, name)


# --------------------------------------------------------------------------- reading


class RegionReader:
    """Reads full-width bands of rows ``[y0, y1)`` as ``(rows, width, channels)`` arrays.

    Bands are in the stored dtype (palette images expanded to RGB uint8, as ``read_image``
    does); scaling to the model's input happens per tile, by the same rule as ``predict``.
    """

    def __init__(self, info: SourceInfo) -> None:
        self.info = info

    def read_rows(self, y0: int, y1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[y0, y1)``, written into ``out`` when given (saves a copy)."""
        band = self._read(y0, y1)
        if out is None:
            return band
        out[...] = band
        return out

    def _read(self, y0: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> RegionReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArrayReader(RegionReader):
    """An image decoded whole (formats that cannot be windowed)."""

    def __init__(self, info: SourceInfo, array: np.ndarray) -> None:
        super().__init__(info)
        self.array = array

    def _read(self, y0: int, y1: int) -> np.ndarray:
        return self.array[y0:y1]

    def close(self) -> None:
        self.array = None


class ChunkedTiffReader(RegionReader):
    """Bands assembled from the tiles or strips that intersect them, decoded one at a time.

    The segments of the last row of segments a band touched are kept, so the next band (which
    starts inside or right after it) does not decode them again.
    """

    def __init__(self, info: SourceInfo) -> None:
        import tifffile

        super().__init__(info)
        self._tif = tifffile.TiffFile(info.path)
        self._page = self._tif.pages[0]
        self._fh = self._tif.filehandle
        page = self._page
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        self._decode = page.decode
        self._args = {"_fullsize": bool(page.is_tiled)}
        if page.jpegtables is not None:
            self._args["jpegtables"] = page.jpegtables
        if getattr(page, "jpegheader", None) is not None:
            self._args["jpegheader"] = page.jpegheader
        self._seg_h, self._seg_w = info.chunk_shape
        self._nx = math.ceil(info.width / self._seg_w)
        self._ny = math.ceil(info.height / self._seg_h)
        self._planes = info.channels if info.planar_separate else 1
        self._cache: dict[int, np.ndarray | None] = {}
        self._colormap = _colormap_lut(page) if info.palette else None

    def _segment(self, index: int) -> np.ndarray | None:
        """One decoded segment ``(rows, cols, samples)`` (``None``: empty, reads as 0)."""
        if index in self._cache:
            return self._cache[index]
        off, n = int(self._offsets[index]), int(self._counts[index])
        if off <= 0 or n <= 0:
            return None
        with self._fh.lock:
            self._fh.seek(off)
            data = self._fh.read(n)
        try:
            seg, _, _ = self._decode(data, index, **self._args)
        except Exception as exc:  # codec errors come in many types
            raise ImageReadError(
                f"cannot decode TIFF segment {index} ({type(exc).__name__}: {exc})",
                self.info.path,
            ) from None
        return None if seg is None else seg[0]

    def read_rows(self, y0: int, y1: int, out: np.ndarray | None = None) -> np.ndarray:
        info = self.info
        direct = out is not None and self._colormap is None
        if direct:
            band = out
            band[...] = 0  # empty segments read as zeros, as in tifffile
        else:
            band = np.zeros((y1 - y0, info.width, info.channels), info.dtype)
        sy0, sy1 = y0 // self._seg_h, min(self._ny, math.ceil(y1 / self._seg_h))
        keep: dict[int, np.ndarray | None] = {}
        for p in range(self._planes):
            for sy in range(sy0, sy1):
                for sx in range(self._nx):
                    index = (p * self._ny + sy) * self._nx + sx
                    seg = self._segment(index)
                    if sy == sy1 - 1 and (sy + 1) * self._seg_h > y1:
                        keep[index] = seg  # the next band starts in this row of segments
                    if seg is None:
                        continue
                    ty0, tx0 = sy * self._seg_h, sx * self._seg_w
                    a0, a1 = max(y0, ty0), min(y1, ty0 + seg.shape[0], info.height)
                    b1 = min(info.width, tx0 + seg.shape[1])
                    if a1 <= a0:
                        continue
                    part = seg[a0 - ty0 : a1 - ty0, : b1 - tx0]
                    if self._planes > 1:
                        band[a0 - y0 : a1 - y0, tx0:b1, p] = part[..., 0]
                    else:
                        band[a0 - y0 : a1 - y0, tx0:b1] = part
        self._cache = keep
        if self._colormap is not None:
            band = self._colormap[band[..., 0]]
        if out is not None and not direct:
            out[...] = band
            return out
        return band

    def close(self) -> None:
        self._cache = {}
        self._tif.close()


class MemmapTiffReader(RegionReader):
    """Uncompressed contiguous data: each band's rows are memory-mapped, copied, unmapped."""

    def __init__(self, info: SourceInfo) -> None:
        import tifffile

        super().__init__(info)
        with tifffile.TiffFile(info.path) as tif:
            page = tif.pages[0]
            self._offset = int(page.dataoffsets[0])
            self._dtype = page.dtype.newbyteorder(tif.byteorder)
            self._colormap = _colormap_lut(page) if info.palette else None
        self._file = open(info.path, "rb")

    def _read(self, y0: int, y1: int) -> np.ndarray:
        info = self.info
        planes = info.channels if info.planar_separate else 1
        per_pixel = 1 if info.planar_separate else info.channels
        row_bytes = info.width * per_pixel * self._dtype.itemsize
        band = np.empty((y1 - y0, info.width, info.channels), info.dtype)
        for p in range(planes):
            start = self._offset + (p * info.height + y0) * row_bytes
            target = band[..., p : p + 1] if planes > 1 else band
            self._copy_mapped(start, (y1 - y0) * row_bytes, target)
        if self._colormap is not None:
            return self._colormap[band[..., 0]]
        return band

    def _copy_mapped(self, start: int, length: int, target: np.ndarray) -> None:
        """Map ``length`` bytes at ``start``, copy them into ``target``, unmap."""
        # mmap offsets must be aligned: map from the boundary below `start`.
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(self._file.fileno(), length + start - base, access=mmap.ACCESS_READ, offset=base)
        try:
            rows = np.frombuffer(mm, self._dtype, count=length // self._dtype.itemsize, offset=start - base)
            target[...] = rows.reshape(target.shape)
            del rows  # the buffer export must end before the map can close
        finally:
            mm.close()

    def close(self) -> None:
        self._file.close()


def _colormap_lut(page) -> np.ndarray:
    """A palette TIFF's colour map as a (N, 3) uint8 lookup table (as ``read_image`` does)."""
    cmap = np.asarray(page.colormap)
    scale = 257 if cmap.max() > 255 else 1
    return (cmap.T // scale).astype(np.uint8)


def iter_bands(
    reader: RegionReader, ranges: list[tuple[int, int]], dropped: bool = False
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(y0, band)`` for each ``[y0, y1)`` of ``ranges`` (increasing starts and ends).

    Rows a band shares with the previous one are copied from it rather than read again.

    Args:
        reader: the image.
        ranges: the bands' rows.
        dropped: the caller drops each band before asking for the next (no reading
            ahead). The shared rows are then set aside and the previous band freed before
            the next is allocated, so at most one band and its overlap are alive at once;
            otherwise the caller still holds the previous band, and the shared rows are
            copied straight from it.
    """
    info = reader.info
    prev_y0, prev = 0, None
    for y0, y1 in ranges:
        dtype = prev.dtype if prev is not None else _band_dtype(info)
        have = 0
        if prev is not None and prev_y0 <= y0 < prev_y0 + prev.shape[0]:
            have = min(prev_y0 + prev.shape[0] - y0, y1 - y0)
        shared = prev[y0 - prev_y0 : y0 - prev_y0 + have] if have else None
        if dropped and shared is not None:
            shared = shared.copy()  # not a view: the previous band can go now
        prev = None
        band = np.empty((y1 - y0, info.width, info.band_channels), dtype)
        if shared is not None:
            band[:have] = shared
            shared = None
        if have < y1 - y0:
            reader.read_rows(y0 + have, y1, out=band[have:])
        yield y0, band
        prev_y0, prev = y0, band
        del band  # only ``prev`` refers to it here, until the shared rows are taken


def _band_dtype(info: SourceInfo) -> np.dtype:
    return np.dtype(np.uint8) if info.palette else info.dtype


# --------------------------------------------------------------------------- metadata


def colormap(palette, nodata_class: int | None = None) -> np.ndarray:
    """A TIFF colour map ``(3, 256)`` uint16 from a model palette (other entries black)."""
    cmap = np.zeros((3, 256), np.uint16)
    for i, rgb in enumerate(list(palette)[:256]):
        cmap[:, i] = np.asarray(rgb, np.uint16) * 257
    del nodata_class  # nodata stays black; GIS tools hide it through GDAL_NODATA
    return cmap


def _strip_band_items(xml: str) -> str | None:
    """GDAL_METADATA without per-band items (statistics, scale/offset of the *input* bands
    would be wrong on a mask); ``None`` when nothing dataset-wide is left."""
    out = re.sub(r"<Item\b[^>]*\bsample=\"?\d+\"?[^>]*>.*?</Item>\s*", "", xml, flags=re.S)
    return out if "<Item" in out else None


def output_extratags(info: SourceInfo, nodata_value: str | None) -> list[tuple]:
    """``extratags`` for tifffile: the input's georeferencing, and the output's nodata.

    Args:
        info: the input.
        nodata_value: GDAL_NODATA of the output (``None``: none declared).
    """
    tags: list[tuple] = []
    for code, ttype, value in info.geo_tags:
        if code == GDAL_NODATA:
            continue
        if code == GDAL_METADATA:
            value = _strip_band_items(str(value))
            if value is None:
                continue
        if ttype == ASCII:
            tags.append((code, ASCII, 0, str(value), True))
        else:
            seq = tuple(value) if isinstance(value, (tuple, list, np.ndarray)) else (value,)
            if ttype == SHORT:
                seq = tuple(int(v) for v in seq)
            else:
                seq = tuple(float(v) for v in seq)
            tags.append((code, ttype, len(seq), seq, True))
    if nodata_value is not None:
        tags.append((GDAL_NODATA, ASCII, 0, str(nodata_value), True))
    return tags


def read_description(path: str | Path) -> str | None:
    """The first page's ImageDescription of a *complete* TIFF, else ``None``.

    ``None`` also when the file is absent, unreadable, or damaged: every page's every tile or
    strip must lie inside the file. The check reads only the IFDs (no pixels), so a
    truncated output is found in milliseconds and redone instead of counting as up to date.
    """
    try:
        import tifffile

        size = Path(path).stat().st_size
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
                if not ends or max(ends) > size or 0 in page.databytecounts:
                    return None
            tag = tif.pages[0].tags.get(270)
            return None if tag is None else str(tag.value)
    except Exception:
        return None


# --------------------------------------------------------------------------- writing


class _Abort(Exception):
    """Raised inside the tile iterator to stop ``imwrite`` when the run is abandoned."""


class TiledTiffWriter:
    """Write a tiled, compressed TIFF from blocks of full-width rows, in a background thread.

    ``put`` takes blocks of exactly ``tile`` rows (the last may be shorter) in order; the
    thread cuts them into tiles for ``tifffile.imwrite``. At most ``depth`` blocks wait in the
    queue, so memory is bounded by a few rows of tiles whatever the image size.

    Args:
        path: the file to write (a temporary; the caller renames it).
        shape: ``(height, width)`` or ``(height, width, samples)``.
        name: the file errors name (the output the temporary becomes; default ``path``):
            a disk-full message must name the output, not a hidden temporary.
        dtype: the pixel dtype.
        tile: output tile size (a multiple of 16).
        compression: one of ``OUTPUT_COMPRESSIONS``.
        bigtiff: write BigTIFF (64-bit offsets).
        **tiff_kwargs: passed on to ``imwrite`` (photometric, colormap, extratags, ...).
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        dtype,
        tile: int,
        compression: str,
        bigtiff: bool,
        depth: int = 2,
        name: Path | None = None,
        **tiff_kwargs,
    ) -> None:
        if tile % 16 or tile < 16:
            raise ValueError("output tiles must be a multiple of 16")
        self.path = Path(path)
        self.name = Path(name) if name is not None else self.path
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.tile = tile
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._rows_put = 0
        kwargs = dict(tiff_kwargs)
        kwargs.update(
            shape=self.shape,
            dtype=self.dtype,
            tile=(tile, tile),
            compression=None if compression == "none" else compression,
            bigtiff=bigtiff,
            metadata=None,
            # One encoder thread: the model already uses every core.
            maxworkers=1,
        )
        self._kwargs = kwargs
        self._thread = threading.Thread(target=self._run, name="segnet-tiff-writer", daemon=True)
        self._thread.start()

    def _tiles(self) -> Iterator[np.ndarray]:
        width = self.shape[1]
        while True:
            block = self._queue.get()
            if self._abort.is_set():
                raise _Abort()
            if block is None:
                return
            for x in range(0, width, self.tile):
                yield block[:, x : x + self.tile]

    def _run(self) -> None:
        import tifffile

        try:
            tifffile.imwrite(self.path, data=self._tiles(), **self._kwargs)
        except _Abort:
            pass
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc
            # Drain so a producer blocked on put() wakes up and sees the error.
            self._abort.set()

    def _raise(self) -> None:
        exc = self._error
        if exc is not None:
            if isinstance(exc, OSError):
                text = f"cannot write: {exc.strerror or exc}"
            else:
                text = f"cannot write TIFF ({type(exc).__name__}: {exc})"
            text = text.replace(str(self.path), str(self.name))
            raise OutputError(text, self.name) from None

    def put(self, block: np.ndarray) -> None:
        """Queue one block of rows (blocks while the queue is full)."""
        if block.shape[1:] != self.shape[1:] or block.dtype != self.dtype:
            raise ValueError(f"block {block.shape} {block.dtype} does not fit {self.shape} {self.dtype}")
        self._rows_put += block.shape[0]
        while True:
            self._raise()
            if not self._thread.is_alive():
                raise OutputError("the TIFF writer stopped early", self.name)
            try:
                self._queue.put(block, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Finish the file; raises ``OutputError`` if writing failed or rows are missing."""
        if self._rows_put != self.shape[0]:
            self.abort()
            raise OutputError(
                f"internal error: {self._rows_put} of {self.shape[0]} rows written", self.name
            )
        self._put_sentinel()
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop the writer without finishing the file (the caller deletes it)."""
        self._abort.set()
        self._put_sentinel()
        self._thread.join()

    def _put_sentinel(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.2)
                return
            except queue.Full:
                if self._abort.is_set():
                    try:  # make room: the blocks will not be written anyway
                        self._queue.get_nowait()
                    except queue.Empty:
                        pass


class RowBlocks:
    """Collect finished rows into blocks of ``rows`` rows for a ``TiledTiffWriter``.

    Holds at most one partial block: ``rows`` x width values.
    """

    def __init__(self, writer: TiledTiffWriter, rows: int) -> None:
        self.writer = writer
        self.rows = rows
        self._buf: np.ndarray | None = None
        self._fill = 0

    def add(self, block: np.ndarray) -> None:
        i = 0
        n = block.shape[0]
        while i < n:
            if self._buf is None:
                self._buf = np.zeros((self.rows, *block.shape[1:]), block.dtype)
                self._fill = 0
            take = min(self.rows - self._fill, n - i)
            self._buf[self._fill : self._fill + take] = block[i : i + take]
            self._fill += take
            i += take
            if self._fill == self.rows:
                self.writer.put(self._buf)
                self._buf = None

    def finish(self) -> None:
        if self._buf is not None and self._fill:
            self.writer.put(self._buf[: self._fill])
        self._buf = None
        self.writer.close()


def needs_bigtiff(uncompressed_bytes: int) -> bool:
    """Whether an output may pass classic TIFF's limit.

    Decided on the uncompressed size (compression can only help, by an unknown amount), with
    a margin below 2 GiB because some readers treat classic offsets as signed 32-bit.
    """
    return uncompressed_bytes > 2**31 - 2**26


__all__ = [
    "SourceInfo",
    "inspect_tiff",
    "inspect_pillow",
    "is_tiff",
    "iter_bands",
    "output_extratags",
    "colormap",
    "read_description",
    "TiledTiffWriter",
    "RowBlocks",
    "needs_bigtiff",
    "MAX_SEGMENT_BYTES",
    "OUTPUT_COMPRESSIONS",
    "GEO_TAGS",
]
