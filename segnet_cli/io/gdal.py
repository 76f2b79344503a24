"""Any raster GDAL reads (VRT mosaics, JPEG 2000, ERDAS, NetCDF, ...), window by window.

Needs the ``segnet-cli[geo]`` extra (rasterio). ``segnet tile`` reads TIFFs with tifffile and
photos (PNG, JPEG, ...) with Pillow, as before; everything else goes through GDAL when the
extra is installed. Why TIFFs stay with tifffile: reading the same tiled RGB TIFF band by
band (``python bench/gdal_read.py``, identical pixels), GDAL took 1.98x tifffile's time on
an 8000x8000 deflate TIFF (3.52 s vs 1.77 s) with 40 MiB more resident (its libraries; both
grew by about 28 MiB while reading), and 1.96x on zstd and 4.0x uncompressed (3000x3000);
and the tifffile path carries the GeoTIFF tags byte for byte into the streamed mask.

Also here: the georeferencing of any input (CRS, transform, units), read with GDAL when the
extra is installed, for areas, polygons and areas of interest.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segnet_cli.errors import ImageReadError, UsageError
from segnet_cli.geo import GEO_INSTALL
from segnet_cli.geo import available as installed
from segnet_cli.io.tiff import RegionReader, SourceInfo

#: Formats Pillow reads as photos (EXIF orientation applied); GDAL does not take these over.
PHOTO_FORMATS = frozenset({"jpeg", "png", "bmp", "gif", "webp", "ppm", "tga", "mpo"})

#: GDAL's block cache for windowed reads (MiB): GDAL's default is 5% of the machine's RAM,
#: which would make the resident set depend on the machine rather than on the plan.
GDAL_CACHE_MB = 64


@contextmanager
def gdal_path(path: Path) -> Iterator[str]:
    """``path`` as GDAL can take it: text.

    GDAL (and rasterio, fiona) take only text paths, but a Linux name may hold bytes that
    are not UTF-8 (Python decodes them with surrogate escapes). Such a path goes through
    ``/proc/self/fd``: its folder held open when the file's own name is text (so GDAL can
    also create the file and files beside it), else the existing file itself.
    """
    path = Path(path)
    if _is_text(str(path)):
        yield str(path)
        return
    if _is_text(path.name):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        target = f"/proc/self/fd/{fd}/{path.name}"
    else:
        fd = os.open(path, os.O_RDONLY)
        target = f"/proc/self/fd/{fd}"
    try:
        yield target
    finally:
        os.close(fd)


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def gdal_env(**options):
    """A ``rasterio.Env`` with segnet's limits (a small block cache).

    Sidecars (``.aux.xml``, world files) are read as usual: many formats keep their nodata
    and CRS there.
    """
    import rasterio

    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB, **options)


def gdal_opens(path: Path) -> str | None:
    """The GDAL driver's short name if GDAL can open ``path`` as a raster, else ``None``."""
    try:
        import rasterio
    except ImportError:
        return None
    try:
        with gdal_env(), gdal_path(path) as name, rasterio.open(name) as ds:
            return ds.driver
    except Exception:
        return None


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """``"4,3,2"`` -> ``(4, 3, 2)`` (1-based band numbers, as GDAL counts them).

    Raises:
        UsageError: not a comma-separated list of positive integers.
    """
    if text is None or not str(text).strip():
        return None
    try:
        bands = tuple(int(b) for b in str(text).split(","))
    except ValueError:
        raise UsageError(f"--bands must be band numbers like 4,3,2 (got {text!r})") from None
    if any(b < 1 for b in bands):
        raise UsageError("--bands counts from 1 (the first band is 1)")
    return bands


def check_bands(bands: tuple[int, ...] | None, count: int, path: Path) -> None:
    """Every selected band exists."""
    if bands and max(bands) > count:
        raise UsageError(
            f"--bands {','.join(map(str, bands))}: the image has {count} band(s)", path
        )


def inspect_gdal(path: Path, bands: tuple[int, ...] | None = None):
    """A ``tiff.SourceInfo`` for a raster read through GDAL (layout ``gdal``).

    Raises:
        ImageReadError: GDAL cannot open it, or its bands have different data types.
        UsageError: ``bands`` names a band the image does not have.
    """
    import rasterio
    from rasterio.enums import ColorInterp

    try:
        with gdal_env(), gdal_path(path) as name, rasterio.open(name) as ds:
            count = ds.count
            check_bands(bands, count, path)
            chosen = bands or tuple(range(1, count + 1))
            dtypes = {ds.dtypes[b - 1] for b in chosen}
            if len(dtypes) > 1:
                raise ImageReadError(
                    f"bands of different data types ({', '.join(sorted(dtypes))}); "
                    "choose bands of one type with --bands",
                    path,
                )
            interp = [ds.colorinterp[b - 1] for b in chosen]
            palette = len(chosen) == 1 and interp[0] == ColorInterp.palette
            nodatas = {ds.nodatavals[b - 1] for b in chosen}
            nodata = nodatas.pop() if len(nodatas) == 1 else None
            block = ds.block_shapes[0] if ds.block_shapes else (1, ds.width)
            return SourceInfo(
                path=path,
                height=ds.height,
                width=ds.width,
                channels=len(chosen),
                dtype=np.dtype(dtypes.pop()),
                layout="gdal",
                fmt=ds.driver.lower(),
                compression=str(ds.compression.value).lower() if ds.compression else "none",
                tiled=block[1] < ds.width,
                chunk_shape=(int(block[0]), int(block[1])),
                palette=palette,
                alpha=len(chosen) in (2, 4) and interp[-1] == ColorInterp.alpha,
                nodata_text=None if nodata is None else repr(float(nodata)),
                bands=tuple(chosen) if bands else None,
            )
    except (ImageReadError, UsageError):
        raise
    except Exception as exc:
        raise ImageReadError(f"GDAL cannot read it ({exc})", path) from None


class GdalReader(RegionReader):
    """Bands of rows read through GDAL: one ``ds.read`` of a full-width window per band.

    Palette images are expanded to RGB by their colour table, as ``read_image`` does.
    """

    def __init__(self, info: SourceInfo) -> None:
        import rasterio

        super().__init__(info)
        self._stack = ExitStack()
        try:
            self._stack.enter_context(gdal_env())
            name = self._stack.enter_context(gdal_path(info.path))
            self._ds = self._stack.enter_context(rasterio.open(name))
        except Exception:
            self._stack.close()
            raise
        self._indexes = list(info.bands or range(1, self._ds.count + 1))
        self._lut = None
        if info.palette:
            lut = np.zeros((256, 3), np.uint8)
            for i, rgba in self._ds.colormap(self._indexes[0]).items():
                if 0 <= i < 256:
                    lut[i] = rgba[:3]
            self._lut = lut

    def _read(self, y0: int, y1: int) -> np.ndarray:
        from rasterio.windows import Window

        try:
            data = self._ds.read(self._indexes, window=Window(0, y0, self.info.width, y1 - y0))
        except Exception as exc:
            raise ImageReadError(f"GDAL cannot read rows {y0}-{y1} ({exc})", self.info.path) from None
        band = np.ascontiguousarray(np.moveaxis(data, 0, -1))
        if self._lut is not None:
            band = self._lut[band[..., 0]]
        return band

    def close(self) -> None:
        if self._ds is not None:
            self._ds = None
            self._stack.close()


@dataclass(frozen=True)
class Georef:
    """Where an image's pixels are on the ground.

    Attributes:
        crs_wkt: the CRS as WKT, or ``None`` when the image has none.
        transform: GDAL's geotransform ``(x0, dx, rx, y0, ry, dy)``: pixel (col, row) to map
            coordinates. The identity for images without georeferencing (pixel coordinates,
            y down, as GDAL gives them).
        linear_unit: the CRS's linear unit name (``metre``, ``US survey foot``, ...), or
            ``None`` for geographic CRSs and images without a CRS.
        metres_per_unit: the length of that unit in metres (``None`` when unknown).
        geographic: the CRS is in degrees of latitude and longitude.
    """

    crs_wkt: str | None
    transform: tuple[float, float, float, float, float, float]
    linear_unit: str | None = None
    metres_per_unit: float | None = None
    geographic: bool = False

    @property
    def georeferenced(self) -> bool:
        return self.crs_wkt is not None

    @property
    def rotated(self) -> bool:
        return self.transform[2] != 0 or self.transform[4] != 0

    @property
    def pixel_area(self) -> float:
        """One pixel's area in map units squared (|det| of the transform)."""
        _, a, b, _, d, e = self.transform
        return abs(a * e - b * d)

    def pixel_area_m2(self) -> float | None:
        """One pixel's area in m² for a projected CRS, else ``None``."""
        if self.crs_wkt is None or self.geographic or self.metres_per_unit is None:
            return None
        return self.pixel_area * self.metres_per_unit**2

    def row_areas_m2(self, y0: int, y1: int) -> np.ndarray | None:
        """Each row's pixel area in m² for a geographic, unrotated CRS, else ``None``.

        On a sphere of GRS80's authalic radius, a cell between latitudes p0 and p1 and
        dlon wide covers R² · dlon · |sin p1 − sin p0|: within 0.3% of the ellipsoid.
        """
        if not self.geographic or self.rotated:
            return None
        x0, dx, _, top, _, dy = self.transform
        del x0
        r = 6_371_007.2
        rows = np.arange(y0, y1 + 1, dtype=np.float64)
        lat = np.radians(np.clip(top + rows * dy, -90.0, 90.0))
        return r * r * abs(math.radians(dx)) * np.abs(np.diff(np.sin(lat)))


#: Without a CRS or transform: pixel coordinates.
PIXELS = Georef(None, (0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def read_georef(path: Path) -> Georef:
    """The georeferencing of ``path`` as GDAL reads it (``PIXELS`` without the extra)."""
    try:
        import rasterio
    except ImportError:
        return PIXELS
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    try:
        with warnings.catch_warnings(), gdal_env(), gdal_path(path) as name:
            # No georeferencing is an answer here (pixel coordinates), not a problem.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(name)
        with ds:
            crs = ds.crs
            gt = tuple(float(v) for v in ds.transform.to_gdal())
            if crs is None:
                return Georef(None, gt)
            unit, factor = None, None
            geographic = bool(crs.is_geographic)
            if not geographic:
                try:
                    unit, factor = crs.linear_units_factor
                except Exception:
                    unit, factor = None, None
            return Georef(crs.to_wkt(), gt, unit, factor, geographic)
    except Exception:
        return PIXELS


__all__ = [
    "GEO_INSTALL",
    "GdalReader",
    "Georef",
    "PIXELS",
    "PHOTO_FORMATS",
    "check_bands",
    "gdal_env",
    "gdal_opens",
    "gdal_path",
    "installed",
    "inspect_gdal",
    "parse_bands",
    "read_georef",
]
