"""Areas of interest: polygons from a vector file, in the image's pixel coordinates.

``load_aoi`` reads the polygons (any OGR format: GeoJSON, GeoPackage, ...), reprojects them
to the image's CRS, maps them to pixel coordinates and clips them to the image, once, before
anything runs. ``Aoi.outside`` then burns them into one band of rows at a time (GDAL's
rasterizer, pixel centres), so memory follows the band, not the image. An ``Aoi`` is plain
bytes (WKB), so it travels to Ray actors as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segnet_cli.errors import ImageReadError, UsageError
from segnet_cli.geo import require
from segnet_cli.io.gdal import Georef, gdal_env, gdal_path


@dataclass(frozen=True)
class Aoi:
    """An area of interest in pixel coordinates (x = column, y = row), as WKB.

    Attributes:
        wkb: the (multi)polygon, clipped to the image.
        pixels: how many pixel centres it covers (how much of the image will run).
    """

    wkb: bytes
    pixels: int

    def outside(self, y0: int, y1: int, width: int) -> np.ndarray:
        """``(y1 - y0, width)`` booleans: True where a pixel's centre is outside the area."""
        import shapely
        from affine import Affine
        from rasterio.features import rasterize

        geom = shapely.from_wkb(self.wkb)
        with gdal_env():
            inside = rasterize(
                [(geom, 1)],
                out_shape=(y1 - y0, width),
                transform=Affine.translation(0, y0),
                fill=0,
                dtype=np.uint8,
            )
        return inside == 0


def load_aoi(path: Path, georef: Georef, height: int, width: int) -> Aoi:
    """Read ``path``'s polygons as an area of interest of an image.

    The polygons are reprojected from their layer's CRS to the image's; an image without a
    CRS takes them as pixel coordinates (x = column, y = row down), as ``--vector`` writes
    them for such images.

    Raises:
        MissingExtraError: the ``geo`` extra is not installed.
        ImageReadError: the file cannot be read as vectors.
        UsageError: no polygons, a CRS that cannot be matched, or no overlap with the image.
    """
    require("--aoi")
    import fiona
    import shapely
    from fiona.transform import transform_geom
    from shapely.affinity import affine_transform
    from shapely.geometry import box, shape

    path = Path(path)
    if not path.exists():
        raise UsageError("area of interest not found", path)
    geoms = []
    try:
        with gdal_env(), gdal_path(path) as name, fiona.open(name) as src:
            layer_crs = src.crs_wkt or None
            for feat in src:
                g = feat.geometry
                if g is None:
                    continue
                if georef.crs_wkt is not None and layer_crs is not None:
                    g = transform_geom(layer_crs, georef.crs_wkt, g)
                geoms.append(shape(g))
    except UsageError:
        raise
    except Exception as exc:
        raise ImageReadError(f"cannot read the area of interest ({exc})", path) from None
    if georef.crs_wkt is None and layer_crs is not None and path.suffix.lower() not in (
        ".geojson", ".json"  # GeoJSON always reports WGS 84, even for pixel coordinates
    ):
        raise UsageError(
            "the area of interest has a CRS but the image has none: give it in pixel "
            "coordinates (x = column, y = row), without a CRS",
            path,
        )
    polys = [g for g in geoms if g.geom_type in ("Polygon", "MultiPolygon") and not g.is_empty]
    if not polys:
        raise UsageError("the area of interest holds no polygons", path)
    area = shapely.union_all([shapely.make_valid(p) for p in polys])
    # Map coordinates -> pixel coordinates: the inverse of the image's geotransform.
    x0, a, b, y0, d, e = georef.transform
    det = a * e - b * d
    if det == 0:
        raise UsageError("the image's geotransform cannot be inverted", path)
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    ix = -(ia * x0 + ib * y0)
    iy = -(id_ * x0 + ie * y0)
    pixel = affine_transform(area, [ia, ib, id_, ie, ix, iy])
    clipped = pixel.intersection(box(0, 0, width, height))
    aoi = Aoi(shapely.to_wkb(clipped), 0)
    if clipped.is_empty:
        raise UsageError("the area of interest does not overlap the image", path)
    covered = 0
    for y in range(0, height, 2048):
        covered += int((~aoi.outside(y, min(height, y + 2048), width)).sum())
    if covered == 0:
        raise UsageError("the area of interest covers no pixel centre of the image", path)
    return Aoi(aoi.wkb, covered)


__all__ = ["Aoi", "load_aoi"]
