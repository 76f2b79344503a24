"""Class masks to polygons per class, strip by strip, in bounded memory; polygons to files.

``polygonize_strips`` takes a mask as horizontal strips of full-width rows, top to bottom,
polygonizes each strip with GDAL (``rasterio.features.shapes``) in pixel coordinates of the
whole image, and stitches regions that cross the seams between strips. Memory depends on
the width and on the regions still open (those that touch the last row seen), never on the
height: a 20000 x 20000 mask is never held at once. What it yields is exactly what
polygonizing the whole mask at once gives (the same polygons, holes included; only where
each ring starts may differ).

``write_vector`` streams ``(class, polygon)`` pairs to a GeoPackage, GeoJSON, FlatGeobuf or
GeoJSON Sequence file, mapping pixel coordinates to map coordinates, through
``atomic_path``: a failure leaves no file, no temporary and no sidecar.

rasterio, fiona and shapely are imported inside the functions, so importing this module
never fails; the functions raise ``MissingExtraError`` when the extra is missing.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segnet_cli.errors import OutputError, UsageError
from segnet_cli.geo import require
from segnet_cli.io.files import atomic_path
from segnet_cli.io.gdal import gdal_path

if TYPE_CHECKING:
    from shapely import Polygon

#: OGR driver for each supported suffix (lower case). Only single-file formats: the file is
#: written under a temporary name and renamed, which a Shapefile's several files defeat.
VECTOR_DRIVERS: dict[str, str] = {
    ".gpkg": "GPKG",
    ".geojson": "GeoJSON",
    ".json": "GeoJSON",
    ".fgb": "FlatGeobuf",
    ".geojsonl": "GeoJSONSeq",
    ".geojsons": "GeoJSONSeq",
}

#: Fields of every written feature, in this order.
VECTOR_FIELDS: dict[str, str] = {"class": "int", "name": "str", "pixels": "int", "area": "float"}

#: Mask dtypes GDAL polygonizes without a conversion (rasterio.features.shapes).
_MASK_DTYPES = (np.uint8, np.uint16, np.int16, np.int32)

#: GDAL builds a GeoPackage's spatial index in memory up to this many bytes, then spills it
#: to a temporary database beside the file (its own default grows with the machine's RAM).
GPKG_LIMITS = {"OGR_GPKG_MAX_RAM_USAGE_RTREE": str(32 * 1024 * 1024)}

#: Features prepared together (transform, areas, simplification: vectorised) and handed to
#: fiona in one ``writerecords`` call (one transaction in a GeoPackage): large enough to
#: amortise the calls, small enough that a batch never matters for memory.
_BATCH = 4096


# --------------------------------------------------------------------------------------
# Polygonizing strips
# --------------------------------------------------------------------------------------


class _Region:
    """An open region: the strip polygons it is made of so far, unioned only when complete.

    Uniting at every seam would rebuild a tall region (a background spanning the image) once
    per strip, quadratic in its height; keeping the pieces and uniting them once costs the
    same memory (the pieces hold about the vertices of their union) and one union.
    """

    __slots__ = ("cls", "pieces", "bottom", "vertices")

    def __init__(
        self, cls: int, pieces: list[Polygon], bottom: list[Polygon], vertices: int
    ) -> None:
        self.cls = cls
        self.pieces = pieces
        #: The pieces from the last strip that touch its bottom: the only ones on the seam.
        self.bottom = bottom
        #: Vertices of all its pieces: what it costs to hold (see ``MAX_OPEN_VERTICES``).
        self.vertices = vertices


#: An open region holding more vertices than this is cut at the strip edge it has reached:
#: it is yielded as it is, and what continues below starts a new polygon of the same class.
#: Without a cut, memory would follow the largest region, and a fragmented scene's
#: background (one region around millions of islands, each a hole of it) is as large as
#: the scene. Half a million vertices hold about 40 MB as strip pieces, and about as much
#: again while one is written (GeoJSON-like coordinates for fiona).
MAX_OPEN_VERTICES = 500_000


class StripPolygons(Iterator[tuple[int, "Polygon"]]):
    """The iterator ``polygonize_strips`` returns: ``(class, polygon)`` pairs, plus counters.

    Attributes:
        max_open: the largest number of regions open at once (after any strip). Memory
            beyond one strip is bounded by these regions, so this shows it stayed bounded.
        max_open_pieces: the largest number of strip polygons those open regions held.
        rows: rows consumed so far.
    """

    def __init__(
        self,
        strips: Iterable[tuple[int, np.ndarray]],
        width: int,
        skip: int | Iterable[int] | None,
        max_vertices: int = MAX_OPEN_VERTICES,
    ) -> None:
        self.max_open = 0
        self.max_open_pieces = 0
        self.rows = 0
        self.cuts = 0
        self._max_vertices = int(max_vertices)
        self._gen = self._run(iter(strips), int(width), skip)

    def __iter__(self) -> StripPolygons:
        return self

    def __next__(self) -> tuple[int, Polygon]:
        return next(self._gen)

    def _run(
        self, strips: Iterator[tuple[int, np.ndarray]], width: int, skip: Any
    ) -> Iterator[tuple[int, Polygon]]:
        import shapely
        from rasterio.features import shapes
        from rasterio.transform import Affine

        skip_values = None if skip is None else np.atleast_1d(np.asarray(skip)).ravel()
        open_regions: list[_Region] = []
        # bottom_owner[x]: index in open_regions of the region holding pixel x of the last
        # row seen, -1 for none (skipped pixels). Width-sized: the only state besides the
        # open regions.
        bottom_owner = np.full(width, -1, np.int64)
        next_y = 0
        for y0, rows in strips:
            rows = _check_strip(y0, rows, width, next_y)
            y0 = next_y  # a plain int, checked equal
            h = rows.shape[0]
            if h == 0:
                continue
            y1 = y0 + h
            mask = None if skip_values is None else ~np.isin(rows, skip_values)
            # A piece can join a region from above only if one is open.
            above = bool(open_regions)
            pieces: list[tuple[int, Polygon, bool, bool]] = []  # (class, polygon, top, bottom)
            found = shapes(rows, mask=mask, connectivity=4, transform=Affine.translation(0, y0))
            while chunk := list(islice(found, _SHAPES_CHUNK)):
                polys = _polygons([geom["coordinates"] for geom, _ in chunk])
                values = [int(value) for _, value in chunk]
                del chunk
                bounds = shapely.bounds(polys)
                top = (bounds[:, 1] == y0) & above
                bottom = bounds[:, 3] == y1
                for i in range(len(polys)):
                    if top[i] or bottom[i]:
                        pieces.append((values[i], polys[i], bool(top[i]), bool(bottom[i])))
                    else:
                        # Touches neither seam: the whole region, exactly as GDAL made it.
                        yield values[i], polys[i]

            # Which new piece holds each pixel of the strip's first row.
            top_owner = _owners(
                width,
                ((k, p) for k, (_, p, top, _) in enumerate(pieces) if top),
                float(y0),
            )
            # Nodes: the open regions (0..R-1), then the new pieces (R..R+N-1).
            n_old, n_new = len(open_regions), len(pieces)
            links = np.zeros(0, np.int64)
            both = (bottom_owner >= 0) & (top_owner >= 0)
            if both.any():
                old_cls = np.fromiter((r.cls for r in open_regions), np.int64, n_old)
                new_cls = np.fromiter((c for c, *_ in pieces), np.int64, n_new)
                a, b = bottom_owner[both], top_owner[both]
                # A column where the pixel above and the pixel below are in regions of the
                # same class is a seam edge both rings share with positive length: one
                # region (4-connectivity). Corners alone never share a column.
                same = old_cls[a] == new_cls[b]
                links = np.unique(a[same] * n_new + b[same])
            groups = _components(
                n_old + n_new, ((k // n_new, n_old + k % n_new) for k in links.tolist())
            )
            still_open: list[_Region] = []
            for members in groups:
                old = [open_regions[i] for i in members if i < n_old]
                new = [pieces[i - n_old] for i in members if i >= n_old]
                cls = old[0].cls if old else new[0][0]
                # Grow the longest list in place: copying a tall region's pieces at every
                # seam would cost its height squared with one-row strips.
                old.sort(key=lambda r: len(r.pieces), reverse=True)
                parts = old[0].pieces if old else []
                for r in old[1:]:
                    parts.extend(r.pieces)
                parts.extend(p for _, p, _, _ in new)
                vertices = sum(r.vertices for r in old) + sum(
                    int(shapely.get_num_coordinates(p)) for _, p, _, _ in new
                )
                bottom = [p for _, p, _, at_bottom in new if at_bottom]
                if bottom and vertices > self._max_vertices:
                    # Too large to hold on: cut here (see MAX_OPEN_VERTICES).
                    self.cuts += 1
                    for poly in _unite(parts):
                        yield cls, poly
                elif bottom:
                    still_open.append(_Region(cls, parts, bottom, vertices))
                else:
                    # Nothing below the seam continues it: complete.
                    for poly in _unite(parts):
                        yield cls, poly
            open_regions = still_open
            bottom_owner = _owners(
                width, ((i, p) for i, r in enumerate(open_regions) for p in r.bottom), float(y1)
            )
            next_y = y1
            self.rows = y1
            self.max_open = max(self.max_open, len(open_regions))
            self.max_open_pieces = max(
                self.max_open_pieces, sum(len(r.pieces) for r in open_regions)
            )
        for region in open_regions:
            for poly in _unite(region.pieces):
                yield region.cls, poly


def polygonize_strips(
    strips: Iterable[tuple[int, np.ndarray]],
    width: int,
    *,
    skip: int | Iterable[int] | None = None,
    connectivity: int = 4,
    max_vertices: int = MAX_OPEN_VERTICES,
) -> StripPolygons:
    """Polygons per class of a mask that arrives as strips of rows, in bounded memory.

    Each strip is polygonized by GDAL on its own; regions that touch a strip's bottom stay
    open, and are joined with the next strip's regions of the same class that share a seam
    edge of positive length (union-find, so a U open at the top whose arms meet below, or a
    region that splits below, come out as one polygon). A region is united (shapely) and
    yielded as soon as nothing below continues it, so memory depends on the width and on
    the open regions, not on the height. The result is exactly what polygonizing the whole
    mask at once gives: the same polygons, holes included, with the same vertices and ring
    orientation as GDAL's (the start vertex of a ring may differ).

    Every strip costs a GDAL call and every seam a union, so tall strips are faster: on a
    4000 x 4000 mask of the bundled model's output (383,968 polygons), 256-row strips took
    18 s against 14 s for GDAL and shapely on the whole mask at once, and 512- or 1024-row
    strips were no faster.

    Args:
        strips: ``(y0, rows)`` pairs, ``rows`` a ``(h, width)`` array of class indices
            (uint8; uint16, int16 and int32 work too), contiguous, top to bottom; ``h`` may
            vary and may be 1.
        width: the mask's width.
        skip: a class index (or several) left out: no polygons for those pixels (nodata).
        connectivity: 4 only, as GDAL's polygonize by default. Under 8-connectivity GDAL
            makes rings that touch themselves (invalid for GEOS, so they could not be
            stitched into the same polygons), so it is refused.
        max_vertices: a region still open with more vertices than this is cut along the
            strip edge it has reached (``MAX_OPEN_VERTICES``): the only exception to "the
            same polygons as the whole mask", which keeps memory bounded when one region
            (a background around millions of islands) is as large as the scene. The
            pieces of a cut region still add up to its pixels; ``cuts`` counts the cuts.

    Returns:
        An iterator of ``(class, polygon)`` with the polygon in pixel coordinates of the
        whole image (x = column, y = row, y down; vertices on integers), in no particular
        order; its ``max_open`` attribute tells the most regions that were open at once.

    Raises:
        UsageError: ``connectivity`` is not 4, or ``width`` is not positive.
        MissingExtraError: rasterio, fiona or shapely is missing.
        ValueError: (while iterating) a strip that is not the next rows, or has the wrong
            width or dtype: a bug in the caller.
    """
    require("--vector")
    if connectivity != 4:
        raise UsageError(f"only 4-connectivity is supported, not {connectivity}")
    if int(width) <= 0:
        raise UsageError(f"the width must be positive, not {width}")
    return StripPolygons(strips, width, skip, max_vertices)


#: GDAL's polygons of a strip are turned into shapely polygons this many at a time: the
#: GeoJSON-like rings rasterio hands over cost about 100 bytes a vertex as Python objects.
_SHAPES_CHUNK = 4096


def _polygons(rings: list[list[Any]]) -> np.ndarray:
    """Shapely polygons from GeoJSON-like polygon coordinates, built in one call.

    ``shapely.geometry.shape`` builds each ring through Python; flattening all the
    coordinates into one array and building from offsets (``from_ragged_array``) makes the
    conversion about 20 times cheaper, which was a fifth of the polygon step's time.
    """
    import shapely

    ring_sizes = [len(r) for poly in rings for r in poly]
    flat = np.fromiter(
        chain.from_iterable(chain.from_iterable(chain.from_iterable(rings))),
        np.float64,
        count=2 * sum(ring_sizes),
    )
    ring_offsets = np.zeros(len(ring_sizes) + 1, np.int64)
    np.cumsum(ring_sizes, out=ring_offsets[1:])
    poly_offsets = np.zeros(len(rings) + 1, np.int64)
    np.cumsum([len(poly) for poly in rings], out=poly_offsets[1:])
    return shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, flat.reshape(-1, 2), (ring_offsets, poly_offsets)
    )


def _components(n: int, links: Iterable[tuple[int, int]]) -> list[list[int]]:
    """The connected components of nodes ``0..n-1`` joined by ``links`` (union-find)."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving: near-constant time per lookup
            i = parent[i]
        return i

    for a, b in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _check_strip(y0: int, rows: np.ndarray, width: int, next_y: int) -> np.ndarray:
    """``rows`` as a C-contiguous 2-D array GDAL takes, or ValueError."""
    rows = np.asarray(rows)
    if int(y0) != next_y:
        raise ValueError(f"strips must be contiguous and in order: expected row {next_y}, got {y0}")
    if rows.ndim != 2 or rows.shape[1] != width:
        raise ValueError(f"a strip must be (rows, {width}), not {rows.shape}")
    if rows.dtype == np.bool_:
        rows = rows.astype(np.uint8)
    if rows.dtype.type not in _MASK_DTYPES:
        raise ValueError(f"a mask strip must be uint8 (or uint16, int16, int32), not {rows.dtype}")
    return np.ascontiguousarray(rows)


def _seam_edges(poly: Polygon, y: float) -> tuple[np.ndarray, np.ndarray]:
    """Column ranges ``[lo, hi)`` of the exterior ring's edges that lie on the line ``y``.

    Holes cannot touch a strip's outer edge (they are enclosed), so the exterior suffices.
    """
    c = np.asarray(poly.exterior.coords)
    on = (c[:-1, 1] == y) & (c[1:, 1] == y)
    x0, x1 = c[:-1, 0][on], c[1:, 0][on]
    return np.minimum(x0, x1).astype(np.int64), np.maximum(x0, x1).astype(np.int64)


def _owners(width: int, owned: Iterable[tuple[int, Polygon]], y: float) -> np.ndarray:
    """Per column, which owner's polygon has a seam edge on ``y`` over it (-1: none).

    The edges of different polygons of one strip on one line never overlap (they border
    different pixels), so a running sum of +id at each start and -id at each end paints them.
    """
    delta = np.zeros(width + 1, np.int64)
    for owner, poly in owned:
        lo, hi = _seam_edges(poly, y)
        # Starts are distinct among themselves, and so are ends: no lost updates.
        delta[lo] += owner + 1
        delta[hi] -= owner + 1
    return np.cumsum(delta[:width]) - 1


def _unite(parts: list[Polygon]) -> list[Polygon]:
    """The polygon the pieces of one region make, with GDAL's vertices and orientation.

    Only the pieces' exteriors are united; their holes are carried over as they are. A
    hole of a piece is enclosed within its strip, so no other piece of the region can
    cover it or touch it along an edge: it is a hole of the union too. Uniting the
    exteriors alone keeps the union's cost to the seam outlines, where uniting whole
    pieces cost the holes as well: 13 s for one background region of 334 pieces and
    40,000 holes in a 4000 x 4000 mask, under 1 s this way.

    The exteriors tile the region without overlapping, so GEOS's coverage union does the
    job (linear, where a general union sorts out overlaps). It needs shared edges made of
    the same vertices, so every exterior gets a vertex at each integer point first
    (``segmentize`` to 1 pixel, rounded back onto the grid); ``_tidy`` removes them again.
    """
    import shapely

    if len(parts) == 1:
        return parts  # never crossed a seam: GDAL's own polygon
    pieces = np.asarray(parts, dtype=object)
    exteriors = shapely.polygons(shapely.get_exterior_ring(pieces))
    noded = shapely.transform(shapely.segmentize(exteriors, 1.0), np.rint)
    merged = shapely.coverage_union_all(noded)
    # A 4-connected region's union is one Polygon; explode defensively all the same.
    polys = list(merged.geoms) if merged.geom_type == "MultiPolygon" else [merged]
    polys = [_tidy(p) for p in polys if not p.is_empty]
    counts = shapely.get_num_interior_rings(pieces)
    if not counts.any():
        return polys
    holes = np.concatenate(
        [shapely.get_interior_ring(p, np.arange(n)) for p, n in zip(pieces, counts) if n]
    )
    if len(polys) == 1:
        owners = np.zeros(len(holes), np.int64)
    else:
        # Never seen; each hole goes to the part whose exterior contains it.
        probe = shapely.point_on_surface(shapely.polygons(holes))
        owners = np.array([next(i for i, q in enumerate(polys) if q.contains(pt)) for pt in probe])
    return [
        shapely.polygons(
            p.exterior, holes=np.concatenate([np.asarray(p.interiors, object), holes[owners == i]])
        )
        for i, p in enumerate(polys)
    ]


def _tidy(poly: Polygon) -> Polygon:
    """``poly`` without the collinear vertices a union leaves on the seams, oriented as GDAL.

    Rings on the pixel grid have only horizontal and vertical edges, so a vertex between two
    edges on the same row or column is redundant; GDAL never emits one. GDAL's exterior rings
    are clockwise, its holes counter-clockwise (in x, y as numbers).
    """
    import shapely

    def ring(coords: Any) -> np.ndarray:
        p = np.asarray(coords)[:-1]
        prev, nxt = np.roll(p, 1, axis=0), np.roll(p, -1, axis=0)
        straight = ((prev[:, 0] == p[:, 0]) & (p[:, 0] == nxt[:, 0])) | (
            (prev[:, 1] == p[:, 1]) & (p[:, 1] == nxt[:, 1])
        )
        return p[~straight]

    tidy = shapely.Polygon(ring(poly.exterior.coords), [ring(r.coords) for r in poly.interiors])
    return shapely.orient_polygons(tidy, exterior_cw=True)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorStats:
    """What ``write_vector`` wrote.

    Attributes:
        path: the file written.
        driver: the OGR driver used.
        polygons: per class, the number of features written.
        pixels: per class, the pixels those features cover (before simplification).
        areas: per class, the written geometries' area in map units squared.
        dropped: polygons left out by ``min_area``.
        max_open: the most regions ``polygonize_strips`` held open at once (memory beyond
            one strip is bounded by them), or None when the polygons came from elsewhere.
    """

    path: Path
    driver: str
    polygons: dict[int, int]
    pixels: dict[int, int]
    areas: dict[int, float]
    dropped: int = 0
    max_open: int | None = None

    @property
    def features(self) -> int:
        """The number of features written."""
        return sum(self.polygons.values())


def check_vector_path(path: str | Path) -> str:
    """The OGR driver for ``path``'s suffix, or UsageError: call it before any work.

    Args:
        path: the vector file to write.

    Returns:
        The driver name (``GPKG``, ``GeoJSON``, ``FlatGeobuf`` or ``GeoJSONSeq``).

    Raises:
        UsageError: an unsupported suffix. A Shapefile (``.shp``) is several files, which
            cannot be renamed into place at once, so it is refused too.
    """
    suffix = Path(path).suffix.lower()
    driver = VECTOR_DRIVERS.get(suffix)
    if driver is None:
        why = " (a Shapefile is several files: it cannot be written atomically)"
        raise UsageError(
            f"unsupported vector format {suffix or '(no suffix)'!r}"
            f"{why if suffix == '.shp' else ''}: use one of {', '.join(VECTOR_DRIVERS)}",
            path,
        )
    return driver


def write_vector(
    path: str | Path,
    polygons: Iterable[tuple[int, Any]],
    *,
    transform: Any,
    crs_wkt: str | None,
    class_names: Sequence[str],
    min_area: float = 0.0,
    simplify: float = 0.0,
    layer: str = "classes",
) -> VectorStats:
    """Stream ``(class, polygon)`` pairs to a vector file, one feature per polygon.

    Features are handed to fiona in small batches as the polygons arrive, so a file of any
    size is written in bounded memory (a FlatGeobuf's spatial index keeps a few tens of
    bytes per feature until the end). The file is written under a temporary name and
    renamed into place: a failure, including one raised by ``polygons`` itself, leaves no
    file, no temporary and no sidecar (``-journal``, ``-wal``).

    Every feature has the fields ``class`` (int), ``name`` (the class name), ``pixels``
    (the polygon's pixels, counted before simplification) and ``area`` (the written
    geometry's area in map units squared).

    The layer is declared ``Polygon``. A 4-connected region is always one polygon and a
    topology-preserving simplification never splits one, so a ``MultiPolygon`` can only come
    from a caller's own geometries: it is written as one feature per part (each with its own
    ``pixels``), which keeps the declared type true and every feature one region.

    Formats: ``.gpkg`` (GeoPackage), ``.geojson``/``.json`` (GeoJSON; a CRS is stored only
    as an EPSG code, other CRSs are lost), ``.fgb`` (FlatGeobuf, with a spatial index),
    ``.geojsonl``/``.geojsons`` (GeoJSON Sequence, RFC 8142, ``.geojsons`` with the record
    separator: always WGS 84 longitude/latitude, so GDAL reprojects when a CRS is given, and
    ``area`` stays in the source CRS's units).

    Args:
        path: the file to write; its suffix chooses the format.
        polygons: ``(class, polygon)`` pairs, polygons in pixel coordinates (x = column,
            y = row), e.g. from ``polygonize_strips``.
        transform: pixel (column, row) to map coordinates: a rasterio ``Affine`` or a GDAL
            geotransform ``(x0, dx, rx, y0, ry, dy)``. The identity keeps pixel coordinates,
            as GDAL does for rasters without georeferencing.
        crs_wkt: the map coordinates' CRS as WKT, or None for none.
        class_names: names by class index; a class beyond them is named ``class<i>``.
        min_area: polygons smaller than this (map units squared) are left out, before
            simplification.
        simplify: tolerance in map units for simplifying each polygon (topology-preserving,
            so each stays valid). Polygons are simplified one by one, so edges that
            neighbours share may no longer coincide: slivers and gaps between classes.
        layer: the layer's name (in a GeoPackage; GeoJSON and FlatGeobuf carry it as a name).

    Returns:
        What was written, per class.

    Raises:
        UsageError: an unsupported suffix, a degenerate transform, a negative ``min_area``
            or ``simplify``.
        MissingExtraError: rasterio, fiona or shapely is missing.
        OutputError: the file cannot be written (naming ``path``).
    """
    final = Path(path)
    driver = check_vector_path(final)
    require("--vector")
    if min_area < 0 or simplify < 0:
        raise UsageError(f"min_area and simplify must not be negative ({min_area}, {simplify})")
    matrix = _shapely_matrix(transform)
    scale = abs(matrix[0] * matrix[3] - matrix[1] * matrix[2])  # map units² per pixel
    if scale == 0:
        raise UsageError(f"the transform is degenerate (it maps pixels to no area): {transform}")

    import fiona

    counts: dict[int, int] = {}
    pixels: dict[int, int] = {}
    areas: dict[int, float] = {}
    dropped = 0

    def batches() -> Iterator[list[dict[str, Any]]]:
        nonlocal dropped
        for cls, geoms in _chunks(polygons, _BATCH):
            cls, geoms, n, area = _prepare(cls, geoms, matrix, scale, simplify)
            keep = n * scale >= min_area
            dropped += int(np.count_nonzero(~keep))
            cls, geoms, n, area = cls[keep], geoms[keep], n[keep], area[keep]
            for c in np.unique(cls).tolist():
                sel = cls == c
                counts[c] = counts.get(c, 0) + int(np.count_nonzero(sel))
                pixels[c] = pixels.get(c, 0) + int(n[sel].sum())
                areas[c] = areas.get(c, 0.0) + float(area[sel].sum())
            names = [
                str(class_names[c]) if 0 <= c < len(class_names) else f"class{c}"
                for c in range(int(cls.max()) + 1 if len(cls) else 0)
            ]
            yield [
                {
                    "geometry": g.__geo_interface__,
                    "properties": {"class": c, "name": names[c], "pixels": k, "area": a},
                }
                for g, c, k, a in zip(geoms, cls.tolist(), n.tolist(), area.tolist())
            ]

    schema = {"geometry": "Polygon", "properties": dict(VECTOR_FIELDS)}
    options: dict[str, str] = {}
    if final.suffix.lower() == ".geojsons":
        # GDAL picks the record separator from the suffix, and the temporary's is .tmp.
        options["RS"] = "YES"
    # GeoJSON Sequence is WGS 84 only: GDAL fails (tersely) on a CRS it cannot reproject
    # from, so say why.
    hint = " (GeoJSON Sequence needs a CRS that can be reprojected to WGS 84)"
    hint = hint if driver == "GeoJSONSeq" and crs_wkt else ""
    with (
        atomic_path(final) as tmp,
        _no_extension_warning(),
        gdal_path(tmp) as tmp_name,
        fiona.Env(**GPKG_LIMITS),
    ):
        done = False
        try:
            # GDAL creates the file itself; an empty file already there is not a dataset.
            tmp.unlink()
            with _ogr_errors(tmp, hint):
                dst = fiona.open(
                    tmp_name,  # text, as GDAL needs it (see io.gdal.gdal_path)
                    "w",
                    driver=driver,
                    schema=schema,
                    crs_wkt=crs_wkt or None,
                    layer=layer,
                    **options,
                )
            try:
                for batch in batches():
                    with _ogr_errors(tmp, hint):
                        dst.writerecords(batch)
            except BaseException:
                # The file is removed anyway; the first error is the one to report.
                with suppress(Exception):
                    dst.close()
                raise
            with _ogr_errors(tmp, hint):
                dst.close()
            if tmp.is_dir():
                # FlatGeobuf makes a folder of layers for a name that does not end in .fgb,
                # as the temporary's does not: keep only the layer's file.
                _flatten_fgb(tmp)
            done = True
        finally:
            _remove_leftovers(tmp, keep=done)
    max_open = getattr(polygons, "max_open", None)
    return VectorStats(final, driver, counts, pixels, areas, dropped, max_open)


def _chunks(
    polygons: Iterable[tuple[int, Any]], size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(class, polygon)`` pairs as arrays of up to ``size`` classes and polygons."""
    cls: list[int] = []
    geoms: list[Any] = []
    for value, geom in polygons:
        cls.append(int(value))
        geoms.append(geom)
        if len(geoms) >= size:
            yield np.asarray(cls, np.int64), _objects(geoms)
            cls, geoms = [], []
    if geoms:
        yield np.asarray(cls, np.int64), _objects(geoms)


def _objects(items: list[Any]) -> np.ndarray:
    out = np.empty(len(items), object)
    out[:] = items  # never let NumPy look inside the geometries
    return out


def _prepare(
    cls: np.ndarray,
    geoms: np.ndarray,
    matrix: tuple[float, float, float, float, float, float],
    scale: float,
    simplify: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One batch of pixel polygons as the features' geometries and numbers, vectorised.

    Returns:
        ``(class, geometry in map coordinates, pixels, area)`` per polygon, MultiPolygons
        split into their parts (each with its own class and pixels), empty ones left out.
        Pixels are exact (pixel polygons have integer vertices); the area is pixels times
        the pixel area, or the simplified geometry's own area.
    """
    import shapely

    parts, index = shapely.get_parts(geoms, return_index=True)
    full = ~shapely.is_empty(parts)
    parts, cls = parts[full], cls[index[full]]
    n = np.rint(shapely.area(parts)).astype(np.int64)
    if matrix != (1.0, 0.0, 0.0, 1.0, 0.0, 0.0):
        a, b, d, e, xoff, yoff = matrix

        def affine(xy: np.ndarray) -> np.ndarray:
            x, y = xy[:, 0], xy[:, 1]
            return np.column_stack([a * x + b * y + xoff, d * x + e * y + yoff])

        parts = shapely.transform(parts, affine)
    area = n * scale
    if simplify > 0:
        simple = shapely.simplify(parts, simplify, preserve_topology=True)
        # Topology-preserving simplification keeps a polygon one polygon; if it ever did
        # not, the unsimplified one keeps the layer's type true.
        ok = (shapely.get_type_id(simple) == shapely.GeometryType.POLYGON) & ~shapely.is_empty(
            simple
        )
        parts = np.where(ok, simple, parts)
        area = shapely.area(parts)
    return cls, parts, n, area


def _shapely_matrix(transform: Any) -> tuple[float, float, float, float, float, float]:
    """``transform`` as shapely's ``[a, b, d, e, xoff, yoff]``."""
    from affine import Affine

    if isinstance(transform, Affine):
        t = transform
        return (float(t.a), float(t.b), float(t.d), float(t.e), float(t.c), float(t.f))
    try:
        x0, dx, rx, y0, ry, dy = (float(v) for v in transform)
    except (TypeError, ValueError):
        raise UsageError(
            f"the transform must be an Affine or a GDAL geotransform of 6 numbers: {transform!r}"
        ) from None
    return (dx, rx, ry, dy, x0, y0)


@contextmanager
def _ogr_errors(tmp: Path, hint: str = "") -> Iterator[None]:
    """GDAL and fiona failures as ``OutputError`` on ``tmp`` (``atomic_path`` renames it)."""
    from fiona._err import CPLE_BaseError
    from fiona.errors import FionaError

    try:
        yield
    except (FionaError, CPLE_BaseError, OSError) as exc:
        # Name the temporary, not a file inside FlatGeobuf's folder: atomic_path then puts
        # the output's name in its place.
        message = re.sub(re.escape(str(tmp)) + r"/[^\s'`\"]*", str(tmp), str(exc))
        raise OutputError(f"cannot write the vector file: {message}{hint}", tmp) from None


class _DropExtensionWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "extension should be" not in record.getMessage()


@contextmanager
def _no_extension_warning() -> Iterator[None]:
    """Silence GDAL's GeoPackage warning that the temporary's suffix is not ``.gpkg``.

    The final file has the right suffix; the warning is about a name nobody sees.
    """
    logger = logging.getLogger("fiona._env")
    quiet = _DropExtensionWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _flatten_fgb(folder: Path) -> None:
    """Replace FlatGeobuf's folder of one layer by that layer's file, under the same name."""
    (layer_file,) = [p for p in folder.iterdir() if p.suffix == ".fgb"]
    aside = folder.with_name(folder.name + "-fgb")
    os.replace(layer_file, aside)
    os.rmdir(folder)
    os.replace(aside, folder)


def _remove_leftovers(tmp: Path, keep: bool) -> None:
    """Remove everything GDAL made beside or in place of ``tmp``; ``tmp`` too unless ``keep``.

    SQLite's ``-journal``/``-wal``/``-shm`` files and FlatGeobuf's folder all start with the
    temporary's name, which ``mkstemp`` made unique: nothing else can match.
    """
    for p in tmp.parent.glob(glob.escape(tmp.name) + "*"):
        if keep and p == tmp:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                pass


__all__ = [
    "VECTOR_DRIVERS",
    "VECTOR_FIELDS",
    "StripPolygons",
    "VectorStats",
    "check_vector_path",
    "polygonize_strips",
    "write_vector",
]
