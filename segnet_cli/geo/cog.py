"""Cloud-Optimized GeoTIFFs: the streamed raster re-laid out by GDAL's COG driver.

``segnet tile`` streams its mask row by row into a plain tiled TIFF (tifffile, bounded
memory); a COG needs every IFD before the pixel data and overviews stored smallest first,
which cannot be written while rows are still arriving. So the streamed file is a hidden
scratch file and GDAL's COG driver copies it into the output: tiled, compressed, with
internal overviews (``MODE`` for class masks, never an average of class indices;
``AVERAGE`` for probabilities), keeping the colour map, nodata, georeferencing and the
ImageDescription/Software tags that carry segnet's provenance. GDAL's block cache is set
small (``io.gdal.GDAL_CACHE_MB``) so its memory does not grow with the machine's RAM.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from segnet_cli.config import Compression
from segnet_cli.errors import OutputError, UsageError
from segnet_cli.io.gdal import Georef, gdal_env, gdal_path

#: segnet's compression names as the COG driver spells them (it has no PackBits).
COG_COMPRESS = {
    Compression.ZLIB: "DEFLATE",
    Compression.ZSTD: "ZSTD",
    Compression.LZW: "LZW",
    Compression.LZMA: "LZMA",
    Compression.NONE: "NONE",
}


class Overviews(str, Enum):
    """How overview pixels are made from the full-resolution ones."""

    MODE = "MODE"  # class masks: the most frequent class of each block
    AVERAGE = "AVERAGE"  # probabilities


def check_compression(compression: Compression) -> None:
    """Refuse a compression the COG driver cannot write, before any work."""
    if compression not in COG_COMPRESS:
        raise UsageError(
            f"--compression {compression} cannot be written as a COG "
            f"({', '.join(str(c) for c in COG_COMPRESS)}); or use --no-cog"
        )


def georeference(path: Path, georef: Georef) -> None:
    """Write a CRS and geotransform into a TIFF that has none (inputs read through GDAL).

    TIFF inputs carry their GeoTIFF tags into the mask byte for byte; rasters GDAL reads
    (VRT, JPEG 2000, ...) have no tags to copy, so GDAL writes its own here.
    """
    if georef.crs_wkt is None and georef.transform == (0.0, 1.0, 0.0, 0.0, 0.0, 1.0):
        return
    import warnings

    import rasterio
    from affine import Affine
    from rasterio.errors import NotGeoreferencedWarning

    with gdal_env(), gdal_path(path) as name:
        with warnings.catch_warnings():
            # It has no georeferencing yet: that is what this adds.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(name, "r+", driver="GTiff")
        with ds:
            if georef.crs_wkt is not None:
                ds.crs = rasterio.crs.CRS.from_wkt(georef.crs_wkt)
            ds.transform = Affine.from_gdal(*georef.transform)


def to_cog(
    src: Path,
    dst: Path,
    *,
    compression: Compression,
    blocksize: int,
    overviews: Overviews,
    name: Path,
) -> None:
    """Copy the streamed TIFF ``src`` into ``dst`` as a Cloud-Optimized GeoTIFF.

    Args:
        src: the complete scratch TIFF.
        dst: the output's temporary (renamed into place by the caller).
        compression: as ``--compression`` (see ``COG_COMPRESS``).
        blocksize: the COG's tile size (``--out-tile``).
        overviews: how overview levels are resampled.
        name: the output the user knows (for error messages).

    Raises:
        OutputError: GDAL could not write it (disk full, ...).
    """
    import rasterio.shutil

    try:
        with (
            gdal_env(GDAL_NUM_THREADS="ALL_CPUS"),
            gdal_path(src) as src_name,
            gdal_path(dst) as dst_name,
        ):
            # GDAL refuses to create over the (empty) temporary that reserved the name.
            Path(dst).unlink(missing_ok=True)
            rasterio.shutil.copy(
                src_name,
                dst_name,
                driver="COG",
                COMPRESS=COG_COMPRESS[compression],
                BLOCKSIZE=blocksize,
                OVERVIEW_RESAMPLING=overviews.value,
                BIGTIFF="IF_SAFER",
                NUM_THREADS="ALL_CPUS",
            )
    except Exception as exc:
        raise OutputError(f"cannot write the Cloud-Optimized GeoTIFF ({exc})", name) from None


__all__ = ["COG_COMPRESS", "Overviews", "check_compression", "georeference", "to_cog"]
