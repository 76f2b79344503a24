"""segnet_cli.geo.vector: masks to polygons strip by strip, and polygons to vector files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rasterio")
fiona = pytest.importorskip("fiona")
shapely = pytest.importorskip("shapely")

from fiona.crs import CRS  # noqa: E402
from rasterio.features import shapes  # noqa: E402
from rasterio.transform import Affine  # noqa: E402
from shapely.geometry import shape  # noqa: E402

from segnet_cli.errors import OutputError, UsageError  # noqa: E402
from segnet_cli.geo.vector import (  # noqa: E402
    VECTOR_DRIVERS,
    check_vector_path,
    polygonize_strips,
    write_vector,
)

NAMES = ("background", "road", "building", "water")
UTM = (500000.0, 0.5, 0.0, 5000000.0, 0.0, -0.5)  # GDAL order: 0.5 m pixels, north up
UTM_WKT = CRS.from_epsg(32633).to_wkt()


# ---------------------------------------------------------------------------- helpers


def strips(mask: np.ndarray, h: int):
    for y in range(0, mask.shape[0], h):
        yield y, mask[y : y + h]


def whole(mask: np.ndarray, skip=None) -> list[tuple[int, object]]:
    """The reference: GDAL polygonizing the whole mask at once."""
    keep = None if skip is None else ~np.isin(mask, skip)
    return [(int(v), shape(g)) for g, v in shapes(mask, mask=keep, connectivity=4)]


def canon(pairs) -> Counter:
    """Polygons per class as a multiset of normalized geometries (exact coordinates)."""
    return Counter((int(c), shapely.normalize(p).wkb) for c, p in pairs)


def stitched(mask: np.ndarray, h: int, **kw) -> list[tuple[int, object]]:
    return list(polygonize_strips(strips(mask, h), mask.shape[1], **kw))


def blobs(seed: int, h: int, w: int, classes: int = 3, noise: float = 0.05) -> np.ndarray:
    """Blocks of random classes, upsampled, with a few random pixels: blobs with holes."""
    rng = np.random.default_rng(seed)
    s = int(rng.integers(2, 6))
    coarse = rng.integers(0, classes, (h // s + 1, w // s + 1))
    mask = np.kron(coarse, np.ones((s, s), np.int64))[:h, :w].astype(np.uint8)
    flip = rng.random(mask.shape) < noise
    mask[flip] = rng.integers(0, classes, int(flip.sum()))
    return mask


def assert_same_as_whole(mask: np.ndarray, h: int, skip=None) -> list:
    got = stitched(mask, h, skip=skip)
    assert all(p.geom_type == "Polygon" and p.is_valid for _, p in got)
    assert canon(got) == canon(whole(mask, skip=skip))
    return got


def spiral(n: int) -> np.ndarray:
    """A one-pixel-wide square spiral of class 1 on class 0 (each class one region)."""
    mask = np.zeros((n, n), np.uint8)
    y = x = 0
    mask[0, 0] = 1
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    lengths = [n - 1, n - 1, n - 1] + [n - k for k in range(3, n, 2) for _ in (0, 1)]
    for i, length in enumerate(lengths):
        dy, dx = steps[i % 4]
        for _ in range(length):
            y, x = y + dy, x + dx
            mask[y, x] = 1
    return mask


# ----------------------------------------------------------------- polygonize_strips


@pytest.mark.parametrize(
    "mask",
    [
        blobs(0, 37, 53),
        blobs(1, 37, 53, classes=2),
        blobs(2, 37, 53, classes=4, noise=0.3),
        blobs(3, 1, 300),
        blobs(4, 300, 1),
        np.random.default_rng(5).integers(0, 3, (20, 23)).astype(np.uint8),  # pure noise
        np.zeros((9, 11), np.uint8),
    ],
    ids=["blobs3", "blobs2", "noisy4", "1x300", "300x1", "noise", "constant"],
)
@pytest.mark.parametrize("h", [1, 2, 7, None])
def test_strips_equal_whole_image(mask, h):
    got = assert_same_as_whole(mask, h or mask.shape[0])
    # The polygons cover every pixel once: per class, areas sum to the pixel counts.
    areas = np.zeros(256)
    for c, p in got:
        areas[c] += p.area
    assert np.array_equal(areas[: mask.max() + 1], np.bincount(mask.ravel()))


def test_vertices_and_orientation_are_gdals():
    """Merged polygons carry no seam vertices and keep GDAL's ring orientation."""
    mask = blobs(6, 40, 40)
    for _, p in stitched(mask, 3):
        assert not p.exterior.is_ccw and all(r.is_ccw for r in p.interiors)
    ref = {shapely.normalize(p).wkb: len(p.exterior.coords) for _, p in whole(mask)}
    for _, p in stitched(mask, 3):
        assert len(p.exterior.coords) == ref[shapely.normalize(p).wkb]


def test_varying_strip_heights():
    mask = blobs(7, 50, 31)
    cuts = [0, 1, 4, 5, 12, 13, 14, 30, 50]
    parts = ((a, mask[a:b]) for a, b in zip(cuts, cuts[1:]))
    assert canon(polygonize_strips(parts, 31)) == canon(whole(mask))


def test_u_open_at_the_top_joined_in_the_bottom_strip():
    mask = np.array(
        [[1, 0, 0, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]], np.uint8
    )  # two arms open above, joined by the last row
    for h in (1, 2, 3):
        got = assert_same_as_whole(mask, h)
        ones = [p for c, p in got if c == 1]
        assert len(ones) == 1 and ones[0].area == 10


def test_inverted_u_one_above_two_below():
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 0, 0, 1]], np.uint8)
    for h in (1, 2):
        got = assert_same_as_whole(mask, h)
        assert [p.area for c, p in got if c == 1] == [10]


def test_ring_whose_hole_spans_strips():
    mask = np.zeros((9, 9), np.uint8)
    mask[1:8, 1:8] = 1
    mask[3:6, 2:7] = 2  # hole of class 2, three rows tall
    for h in (1, 2, 4):
        got = assert_same_as_whole(mask, h)
        (ring,) = [p for c, p in got if c == 1]
        assert len(ring.interiors) == 1 and shapely.Polygon(ring.interiors[0]).area == 15
        assert [p.area for c, p in got if c == 2] == [15]


def test_w_shape_many_arms_joined_below_and_split_again():
    mask = np.array(
        [
            [1, 0, 1, 0, 1, 0, 1],
            [1, 0, 1, 0, 1, 0, 1],
            [1, 1, 1, 1, 1, 1, 1],
            [0, 1, 0, 0, 0, 1, 0],
            [0, 1, 1, 1, 1, 1, 0],
        ],
        np.uint8,
    )
    for h in (1, 2, 3):
        got = assert_same_as_whole(mask, h)
        assert len([p for c, p in got if c == 1]) == 1


def test_diagonal_contact_stays_separate():
    mask = np.array([[1, 0], [0, 1]], np.uint8)
    got = assert_same_as_whole(mask, 1)
    assert sorted(c for c, _ in got) == [0, 0, 1, 1]
    board = (np.indices((6, 6)).sum(axis=0) % 2).astype(np.uint8)
    assert len(assert_same_as_whole(board, 1)) == 36
    assert len(assert_same_as_whole(board, 4)) == 36


def test_spiral():
    mask = spiral(17)
    for h in (1, 2, 3, 5):
        got = assert_same_as_whole(mask, h)
        assert Counter(c for c, _ in got) == {0: 1, 1: 1}


def test_skip_leaves_pixels_out():
    mask = blobs(8, 30, 30, classes=4)
    got = assert_same_as_whole(mask, 4, skip=0)
    assert all(c != 0 for c, _ in got)
    got = assert_same_as_whole(mask, 4, skip=[0, 2])
    assert {c for c, _ in got} == {1, 3}
    assert sum(p.area for _, p in got) == np.isin(mask, [1, 3]).sum()


def test_memory_depends_on_open_regions_not_height():
    """Horizontal bands: polygons come out as they complete and few are ever open."""
    mask = np.repeat(np.arange(600) // 3 % 2, 20).reshape(600, 20).astype(np.uint8)
    consumed = []

    def counted():
        for y0, rows in strips(mask, 7):
            consumed.append(y0)
            yield y0, rows

    it = polygonize_strips(counted(), 20)
    next(it)
    assert len(consumed) <= 2  # the first polygon before the second strip is done with
    rest = list(it)
    assert len(rest) + 1 == 200
    assert it.max_open <= 2 and it.rows == 600


def test_bad_arguments():
    mask = blobs(9, 10, 10)
    with pytest.raises(UsageError):
        polygonize_strips(strips(mask, 2), 10, connectivity=8)
    with pytest.raises(ValueError, match="contiguous"):
        list(polygonize_strips([(0, mask[:2]), (3, mask[3:5])], 10))
    with pytest.raises(ValueError, match="strip must be"):
        list(polygonize_strips([(0, mask[:2])], 11))
    with pytest.raises(ValueError, match="uint8"):
        list(polygonize_strips([(0, mask[:2].astype(np.float64))], 10))


# ----------------------------------------------------------------------- write_vector


def read(path: Path):
    with fiona.open(path, driver=VECTOR_DRIVERS[path.suffix.lower()]) as src:
        return src.crs, dict(src.schema["properties"]), src.schema["geometry"], list(src)


@pytest.mark.parametrize("suffix", sorted(VECTOR_DRIVERS))
def test_round_trip_pixel_coordinates(tmp_path, suffix):
    mask = blobs(10, 37, 53)
    out = tmp_path / f"classes{suffix}"
    stats = write_vector(
        out,
        polygonize_strips(strips(mask, 7), 53),
        transform=(0, 1, 0, 0, 0, 1),
        crs_wkt=None,
        class_names=NAMES,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    crs, fields, geometry, features = read(out)
    if suffix in (".gpkg", ".fgb"):
        assert not crs
    else:  # GeoJSON has no "no CRS": the file simply has no crs member
        text = out.read_text()
        assert '"crs"' not in text
        if suffix == ".geojsons":
            assert text.startswith("\x1e")  # RFC 8142 record separators
    assert list(fields) == ["class", "name", "pixels", "area"]
    assert geometry == "Polygon"
    assert len(features) == stats.features == len(whole(mask))
    got = [(f.properties["class"], shape(f.geometry)) for f in features]
    assert canon(got) == canon(whole(mask))
    counts = np.bincount(mask.ravel())
    for c in range(3):
        in_class = [f.properties["pixels"] for f in features if f.properties["class"] == c]
        assert sum(in_class) == counts[c]
        assert stats.pixels[c] == counts[c] and stats.areas[c] == counts[c]
    assert all(f.properties["name"] == NAMES[f.properties["class"]] for f in features)
    assert stats.driver == VECTOR_DRIVERS[suffix] and stats.max_open is not None


@pytest.mark.parametrize("suffix", [".gpkg", ".fgb", ".geojson"])
@pytest.mark.parametrize("as_affine", [False, True])
def test_round_trip_georeferenced(tmp_path, suffix, as_affine):
    mask = blobs(11, 20, 30)
    out = tmp_path / f"m{suffix}"
    transform = Affine.from_gdal(*UTM) if as_affine else UTM
    stats = write_vector(out, whole(mask), transform=transform, crs_wkt=UTM_WKT, class_names=NAMES)
    crs, _, _, features = read(out)
    assert crs == CRS.from_wkt(UTM_WKT)
    for f in features:
        g = shape(f.geometry)
        assert f.properties["area"] == f.properties["pixels"] * 0.25
        assert g.area == pytest.approx(f.properties["area"], rel=1e-9)
        x0, y0, x1, y1 = g.bounds
        assert 500000 <= x0 < x1 <= 500015 and 4999990 <= y0 < y1 <= 5000000
    assert sum(stats.areas.values()) == pytest.approx(mask.size * 0.25)


def test_geojson_sequence_is_wgs84(tmp_path):
    out = tmp_path / "m.geojsonl"
    write_vector(out, whole(blobs(12, 8, 8)), transform=UTM, crs_wkt=UTM_WKT, class_names=NAMES)
    for line in out.read_text().splitlines():
        feature = json.loads(line)
        lon, lat = feature["geometry"]["coordinates"][0][0]
        assert 14 < lon < 16 and 45 < lat < 46  # reprojected by GDAL
        assert feature["properties"]["area"] == feature["properties"]["pixels"] * 0.25


def test_min_area_drops_small_polygons(tmp_path):
    mask = blobs(13, 37, 53, noise=0.1)
    small = sum(1 for _, p in whole(mask) if p.area < 3)
    assert small > 0
    stats = write_vector(
        tmp_path / "m.gpkg",
        whole(mask),
        transform=UTM,
        crs_wkt=UTM_WKT,
        class_names=NAMES,
        min_area=3 * 0.25,
    )
    assert stats.dropped == small
    *_, features = read(tmp_path / "m.gpkg")
    assert len(features) == len(whole(mask)) - small
    assert min(f.properties["pixels"] for f in features) >= 3
    # Exactly min_area is kept: only smaller polygons go.
    edge = [(1, shapely.box(0, 0, 3, 1)), (1, shapely.box(0, 1, 2, 2))]
    stats = write_vector(
        tmp_path / "e.gpkg", edge, transform=UTM, crs_wkt=None, class_names=NAMES, min_area=0.75
    )
    assert stats.polygons == {1: 1} and stats.pixels == {1: 3} and stats.dropped == 1


def test_simplify_reduces_vertices_and_stays_valid(tmp_path):
    yy, xx = np.mgrid[:60, :60]
    mask = (((yy - 30) ** 2 + (xx - 30) ** 2) < 25**2).astype(np.uint8)  # staircase disc
    mask[28:33, 28:33] = 0  # and a hole
    ref = {c: p for c, p in whole(mask) if c == 1}
    out = tmp_path / "m.fgb"
    stats = write_vector(
        out, whole(mask), transform=UTM, crs_wkt=UTM_WKT, class_names=NAMES, simplify=1.0
    )
    *_, features = read(out)
    disc = next(shape(f.geometry) for f in features if f.properties["class"] == 1)
    assert disc.is_valid and len(disc.interiors) == 1
    assert len(disc.exterior.coords) < len(ref[1].exterior.coords) / 2
    f1 = next(f for f in features if f.properties["class"] == 1)
    assert f1.properties["pixels"] == int(ref[1].area)
    assert f1.properties["area"] == pytest.approx(disc.area)
    assert stats.areas[1] == pytest.approx(disc.area)


def test_multipolygon_input_is_written_per_part(tmp_path):
    two = shapely.MultiPolygon([shapely.box(0, 0, 2, 2), shapely.box(5, 5, 6, 6)])
    out = tmp_path / "m.gpkg"
    stats = write_vector(out, [(2, two)], transform=UTM, crs_wkt=None, class_names=NAMES)
    _, _, geometry, features = read(out)
    assert geometry == "Polygon" and stats.polygons == {2: 2}
    assert sorted(f.properties["pixels"] for f in features) == [1, 4]


def test_replaces_an_existing_file(tmp_path):
    out = tmp_path / "m.gpkg"
    write_vector(out, whole(blobs(14, 9, 9)), transform=UTM, crs_wkt=None, class_names=NAMES)
    write_vector(
        out, [(1, shapely.box(0, 0, 1, 1))], transform=UTM, crs_wkt=None, class_names=NAMES
    )
    assert len(read(out)[3]) == 1


@pytest.mark.parametrize("name", ["m.shp", "m.txt", "m", "m.gpkg.tmp"])
def test_bad_suffix_is_refused_before_any_work(tmp_path, name):
    def never():
        raise AssertionError("consumed")
        yield

    with pytest.raises(UsageError, match=r"\.gpkg"):
        check_vector_path(tmp_path / name)
    with pytest.raises(UsageError, match="atomically" if name.endswith(".shp") else "unsupported"):
        write_vector(tmp_path / name, never(), transform=UTM, crs_wkt=None, class_names=NAMES)
    assert list(tmp_path.iterdir()) == []


def test_check_vector_path_drivers():
    assert check_vector_path("a/b.GPKG") == "GPKG"
    assert check_vector_path("b.json") == "GeoJSON"
    assert check_vector_path("b.geojsons") == "GeoJSONSeq"


def test_bad_transform_is_a_usage_error(tmp_path):
    for bad in [(1, 2, 3), (0, 1, 0, 0, 0, 0), "abc"]:
        with pytest.raises(UsageError):
            write_vector(tmp_path / "m.gpkg", [], transform=bad, crs_wkt=None, class_names=NAMES)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", sorted(VECTOR_DRIVERS))
def test_failure_in_the_middle_leaves_nothing(tmp_path, suffix):
    def failing():
        for i in range(3000):  # more than one batch: some features are already written
            yield 1, shapely.box(i, 0, i + 1, 1)
        raise RuntimeError("segmentation failed")

    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(RuntimeError, match="segmentation failed"):
        write_vector(
            tmp_path / f"m{suffix}", failing(), transform=UTM, crs_wkt=None, class_names=NAMES
        )
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_gdal_failure_is_an_output_error_naming_the_file(tmp_path):
    local = 'LOCAL_CS["grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
    out = tmp_path / "m.geojsonl"
    with pytest.raises(OutputError, match="WGS 84") as info:
        write_vector(out, whole(blobs(15, 5, 5)), transform=UTM, crs_wkt=local, class_names=NAMES)
    assert info.value.path == out and ".segnet-tmp" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError):
        write_vector(
            tmp_path / "file" / "m.gpkg", [], transform=UTM, crs_wkt=None, class_names=NAMES
        )


def test_a_region_over_the_vertex_budget_is_cut_at_a_strip_edge():
    """A background around many islands holds many vertices: past the budget it is cut along
    the strip edge it has reached; the pieces still add up to its pixels exactly."""
    from segnet_cli.geo.vector import polygonize_strips

    mask = np.zeros((60, 40), np.uint8)
    mask[1::4, 1::4] = 1  # islands: holes of the background
    strips = [(y, mask[y : y + 5]) for y in range(0, 60, 5)]
    whole = list(polygonize_strips(strips, 40))
    cut = polygonize_strips(strips, 40, max_vertices=200)
    pieces = list(cut)
    assert cut.cuts > 0
    assert len([c for c, _ in pieces if c == 0]) > len([c for c, _ in whole if c == 0]) == 1
    for k in (0, 1):
        assert sum(p.area for c, p in pieces if c == k) == (mask == k).sum()
    assert all(p.is_valid for _, p in pieces)
