"""GIS outputs and inputs through GDAL: the optional ``segnet-cli[geo]`` extra.

* ``vector``: masks to polygons per class, strip by strip, in bounded memory;
* ``cog``: the finished mask or probability raster laid out as a Cloud-Optimized GeoTIFF;
* ``areas``: pixels, shares and areas per class;
* ``aoi``: areas of interest, burnt into bands of rows.

Everything here imports rasterio, fiona and shapely lazily (``require``), so the core
install never needs them; a missing extra is a ``MissingExtraError`` naming the command
that installs it.
"""

from __future__ import annotations

from segnet_cli.errors import MissingExtraError

#: The pip command that installs what this package needs.
GEO_INSTALL = "pip install 'segnet-cli[geo]'"


def available() -> bool:
    """Whether rasterio, fiona and shapely can be imported (without importing them)."""
    from importlib.util import find_spec

    return all(find_spec(m) is not None for m in ("rasterio", "fiona", "shapely"))


def require(what: str) -> None:
    """Raise ``MissingExtraError`` naming ``what`` needs the extra, unless it is installed.

    Args:
        what: the feature, as the user asked for it (e.g. ``"--vector"``).
    """
    if not available():
        raise MissingExtraError(f"{what} needs rasterio, fiona and shapely: {GEO_INSTALL}")


def load_before_tensorflow() -> None:
    """Load GDAL's vector side (fiona) now, before TensorFlow is imported.

    TensorFlow's shared library exports its own SQLite, built without the R*Tree module; a
    GDAL loaded after it binds to that SQLite and cannot write a GeoPackage's spatial index
    ("no such module: rtree"). Loaded first, GDAL keeps the SQLite it ships with. A process
    that imported TensorFlow already can still write GeoJSON and FlatGeobuf.
    """
    if available():
        import fiona  # noqa: F401


__all__ = ["GEO_INSTALL", "available", "load_before_tensorflow", "require"]
