"""Which reader an input gets: the one place that chooses between tifffile, Pillow and GDAL.

* TIFFs (by suffix or signature): tifffile, window by window (``tiff``);
* photos Pillow reads (PNG, JPEG, ...; ``gdal.PHOTO_FORMATS``): decoded whole, EXIF
  orientation applied, under the pixel limit, as ``predict`` reads them;
* anything else GDAL opens (VRT mosaics, JPEG 2000, ERDAS Imagine, ...), when the
  ``segnet-cli[geo]`` extra is installed: window by window through rasterio (``gdal``);
  without the extra, what Pillow can decode whole.

``--bands`` picks bands of any of them: GDAL reads only those; the other readers decode a
few rows of every band at a time and keep the chosen ones.
"""

from __future__ import annotations

import errno
from dataclasses import replace
from pathlib import Path

import numpy as np

from segnet_cli.errors import (
    ImageReadError,
    ImageTooLargeError,
    MissingExtraError,
    NoInputError,
    TiffLayoutError,
    UsageError,
)
from segnet_cli.io import gdal
from segnet_cli.io.images import TIFF_SUFFIXES, check_decoded_size, read_image
from segnet_cli.io.tiff import (
    ArrayReader,
    ChunkedTiffReader,
    MemmapTiffReader,
    RegionReader,
    SourceInfo,
    inspect_pillow,
    inspect_tiff,
    is_tiff,
)

#: Rows the band-picking wrapper decodes at once (bounds its temporary of all bands).
PICK_ROWS = 256

#: Photos: Pillow reads them (EXIF orientation) under the pixel limits, never GDAL.
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def inspect_source(
    path: str | Path, max_pixels: int | None = None, bands: tuple[int, ...] | None = None
) -> SourceInfo:
    """Read an input's header and decide how it will be read.

    Sizes are as the reader will return them (a JPEG's EXIF orientation applied). An image
    that must be decoded whole (``layout == "whole"``) is checked against the run's pixel and
    byte limits here, before anything else is planned.

    Args:
        path: the input.
        max_pixels: the run's ``--max-pixels`` (``None``: the default limit).
        bands: ``--bands``: 1-based band numbers to read, in this order.

    Raises:
        NoInputError: the file does not exist.
        ImageReadError: unreadable, not an image, or a TIFF of several images.
        ImageTooLargeError: an image decoded whole that is over a limit.
        TiffLayoutError: a TIFF stored as one huge compressed strip (or huge segments).
        UsageError: ``bands`` names a band the image does not have, or picks from a palette.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in TIFF_SUFFIXES or is_tiff(path):
        info = inspect_tiff(path)
    else:
        info = _inspect_other(path, max_pixels, bands)
    if bands is not None and info.layout != "gdal":
        if info.palette:
            raise UsageError("--bands cannot pick from a palette image (it has one band)", path)
        gdal.check_bands(bands, info.channels, path)
        # The file's alpha survives only when it is still the last band picked.
        alpha = info.alpha and bands[-1] == info.channels
        info = replace(info, bands=bands, alpha=alpha)
    if info.layout == "whole":
        check_decoded_size(
            info.width, info.height,
            (info.channels if info.bands else info.band_channels) * info.band_itemsize,
            max_pixels, path,
            f"{info.fmt} cannot be read window by window: convert it to a tiled TIFF, install "
            f"the GDAL reader ({gdal.GEO_INSTALL}) or raise the limit with --max-pixels",
        )
    return info


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise ImageReadError("is a folder, not an image", path)
    if not path.exists():
        if path.is_symlink():
            try:
                path.stat()
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ImageReadError("a symbolic link loop", path) from None
        raise NoInputError("file not found (or a broken link)", path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError("empty file (0 bytes)", path)
    except PermissionError:
        raise ImageReadError("permission denied", path) from None


def _inspect_other(path: Path, max_pixels: int | None, bands) -> SourceInfo:
    """Not a TIFF: a photo for Pillow, or a raster for GDAL."""
    pillow_error: ImageReadError | None = None
    try:
        info = inspect_pillow(path, max_pixels)
    except ImageTooLargeError:
        if path.suffix.lower() in PHOTO_SUFFIXES:
            raise  # a photo over the limits is refused, as predict refuses it
        info, pillow_error = None, None  # e.g. a huge JPEG 2000: GDAL windows it
    except ImageReadError as exc:
        info, pillow_error = None, exc
    if info is not None and info.fmt in gdal.PHOTO_FORMATS:
        return info
    driver = gdal.gdal_opens(path)
    if driver is not None:
        return gdal.inspect_gdal(path, bands)
    if pillow_error is not None:
        if not gdal.installed() and path.suffix.lower() not in PHOTO_SUFFIXES:
            raise MissingExtraError(
                f"{pillow_error.message}; rasters such as VRT or JPEG 2000 are read through "
                f"GDAL: {gdal.GEO_INSTALL}",
                path,
            ) from None
        raise pillow_error
    if info is None:  # too large for Pillow, and GDAL cannot open it either
        return inspect_pillow(path, max_pixels)  # raises the limit's own message
    return info


def open_reader(info: SourceInfo, max_pixels: int | None = None) -> RegionReader:
    """A reader for ``info``'s layout (picking ``info.bands`` when given).

    Raises:
        ImageReadError: the file cannot be opened or (for ``whole``) decoded.
        ImageTooLargeError: a ``whole`` image over the pixel limit.
    """
    reader = _open(info, max_pixels)
    if info.bands is not None and info.layout != "gdal":
        return PickBands(reader, info)
    return reader


def _open(info: SourceInfo, max_pixels: int | None) -> RegionReader:
    full = replace(info, bands=None)
    try:
        if info.layout == "chunked":
            return ChunkedTiffReader(full)
        if info.layout == "contiguous":
            return MemmapTiffReader(full)
        if info.layout == "gdal":
            return gdal.GdalReader(info)
    except (ImageReadError, TiffLayoutError):
        raise
    except Exception as exc:
        raise ImageReadError(f"cannot open ({type(exc).__name__}: {exc})", info.path) from None
    array = read_image(info.path, max_pixels)
    # What the decoder returned is the truth (Pillow modes and odd TIFF bit depths map to
    # dtypes and band counts the header alone does not tell).
    info = replace(
        full, channels=array.shape[2], dtype=array.dtype, palette=False, alpha=array.alpha
    )
    return ArrayReader(info, array)


class PickBands(RegionReader):
    """``--bands`` for readers that decode every band: a few rows at a time, chosen bands kept."""

    def __init__(self, inner: RegionReader, info: SourceInfo) -> None:
        super().__init__(info)
        self._inner = inner
        self._pick = np.asarray(info.bands, np.intp) - 1

    def read_rows(self, y0: int, y1: int, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((y1 - y0, self.info.width, len(self._pick)), self._inner.info.dtype)
        for a in range(y0, y1, PICK_ROWS):
            b = min(y1, a + PICK_ROWS)
            block = self._inner.read_rows(a, b)
            out[a - y0 : b - y0] = block[..., self._pick]
            del block
        return out

    def close(self) -> None:
        self._inner.close()


__all__ = ["inspect_source", "open_reader", "PickBands"]
