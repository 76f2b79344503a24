"""``segnet tile`` for GIS users: COG, class names, areas, GDAL inputs, bands, nodata, AOI.

Small generated GeoTIFFs and a tiny model; outputs are judged by GDAL itself where it is
installed (its COG and GeoPackage validators, ``gdalinfo``), and by rasterio and fiona.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model_file, shapes_image
from typer.testing import CliRunner

rasterio = pytest.importorskip("rasterio")
fiona = pytest.importorskip("fiona")
pytest.importorskip("shapely")

from rasterio.transform import from_origin  # noqa: E402

from segnet_cli.cli import app  # noqa: E402
from segnet_cli.io.files import TMP_PREFIX  # noqa: E402

runner = CliRunner()
CRS = "EPSG:32633"
ORIGIN = (500000.0, 4000000.0)
PIXEL = 0.5  # metres: a pixel is 0.25 m²
TILING = ["--tile", "96", "--halo", "16", "--batch-size", "4"]

#: GDAL's own validators (Debian's python3-gdal), run with the system Python.
SYSTEM_PYTHON = "/usr/bin/python3"


def gdal_sample(name: str) -> list[str] | None:
    """The command that runs one of GDAL's sample validators, if GDAL's Python is there."""
    if not Path(SYSTEM_PYTHON).exists():
        return None
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", f"import osgeo_utils.samples.{name}"], capture_output=True
    )
    return None if probe.returncode else [SYSTEM_PYTHON, "-m", f"osgeo_utils.samples.{name}"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model_file(tmp_path_factory.mktemp("model") / "m.keras")


def write_scene(
    path: Path, h: int = 300, w: int = 360, nodata_cols: int = 0, bands: int = 3,
    nodata: float | None = 0, crs: str | None = CRS, seed: int = 0,
) -> np.ndarray:
    """A tiled GeoTIFF of ``bands`` bands; its first ``nodata_cols`` columns are nodata."""
    img = shapes_image(h, w, seed)[0]  # (h, w, 3) uint8
    img = np.maximum(img, 1)  # no accidental nodata inside the valid part
    if bands > 3:
        extra = np.random.default_rng(seed).integers(1, 255, (h, w, bands - 3), dtype=np.uint8)
        img = np.concatenate([img, extra], axis=-1)
    img = img[..., :bands]
    if nodata_cols:
        img[:, :nodata_cols] = 0
    profile = dict(
        driver="GTiff", width=w, height=h, count=bands, dtype="uint8", tiled=True,
        blockxsize=64, blockysize=64,
    )
    if crs is not None:
        profile.update(crs=crs, transform=from_origin(*ORIGIN, PIXEL, PIXEL))
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.moveaxis(img, -1, 0))
    return img


def tile(src: Path, model: Path, *args: str) -> dict:
    r = runner.invoke(app, ["tile", str(src), "--model", str(model), *TILING, "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]


# --------------------------------------------------------------------------- COG


def test_mask_is_a_valid_cog_with_mode_overviews_names_and_nodata(tmp_path, model):
    src = tmp_path / "scene.tif"
    write_scene(src, h=520, w=600, nodata_cols=150)
    rep = tile(src, model, "--out-tile", "128")
    out = tmp_path / "scene.mask.tif"
    validate = gdal_sample("validate_cloud_optimized_geotiff")
    if validate is not None:
        v = subprocess.run([*validate, str(out)], capture_output=True, text=True)
        assert v.returncode == 0 and "is a valid cloud optimized GeoTIFF" in v.stdout, v.stdout + v.stderr
    with rasterio.open(out) as ds, rasterio.open(src) as s:
        assert ds.crs == s.crs and ds.transform == s.transform
        assert ds.nodata == 255
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        # 600x520 -> 300x260 -> 150x130 -> 75x65: until a level fits one 128 block.
        assert ds.overviews(1) == [2, 4, 8]
        assert ds.colormap(1)[1][:3] != (0, 0, 0)
        full = ds.read(1)
        # Mode, never an average of class indices: only classes and nodata appear (an
        # average across the nodata edge would give values between 2 and 255).
        for level in (1, 2, 3):
            ov = ds.read(1, out_shape=(ds.height // 2**level, ds.width // 2**level))
            assert set(np.unique(ov)) <= {0, 1, 2, 255}
        assert "segnet" in ds.tags()["TIFFTAG_SOFTWARE"]
        assert json.loads(ds.tags()["TIFFTAG_IMAGEDESCRIPTION"])["model_sha256"]
    assert (full[:, :150] == 255).all() and (full[:, 160:] != 255).all()
    # Class names: GDAL reads them from the sidecar.
    if shutil.which("gdalinfo"):
        info = json.loads(subprocess.run(["gdalinfo", "-json", str(out)], capture_output=True, text=True).stdout)
        assert info["bands"][0]["categories"] == ["background", "disc", "square"]
        assert info["bands"][0]["overviews"]
    assert "<Category>disc</Category>" in (tmp_path / "scene.mask.tif.aux.xml").read_text()
    assert rep["plan"]["cog"] is True
    no_temporaries(tmp_path)


def test_cog_pixels_equal_the_streamed_tiff(tmp_path, model):
    src = tmp_path / "s.tif"
    write_scene(src, nodata=None)
    tile(src, model, "--out", str(tmp_path / "a.tif"))
    tile(src, model, "--out", str(tmp_path / "b.tif"), "--no-cog")
    assert np.array_equal(read(tmp_path / "a.tif"), read(tmp_path / "b.tif"))
    with rasterio.open(tmp_path / "b.tif") as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG"


def test_probability_raster_is_a_cog_too(tmp_path, model):
    src = tmp_path / "s.tif"
    write_scene(src, h=400, w=450, nodata=None)
    tile(src, model, "--probabilities", "confidence", "--prob-dtype", "uint8", "--out-tile", "128")
    with rasterio.open(tmp_path / "s.prob.tif") as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.overviews(1)
        assert ds.crs.to_epsg() == 32633


def test_packbits_cannot_be_a_cog(tmp_path, model):
    src = tmp_path / "s.tif"
    write_scene(src)
    r = runner.invoke(app, ["tile", str(src), "--model", str(model), "--compression", "packbits"])
    assert r.exit_code == 2 and "--no-cog" in r.output
    r = runner.invoke(app, ["tile", str(src), "--model", str(model), "--compression", "packbits", "--no-cog", *TILING])
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------- areas


def test_class_areas_in_report_json_and_summary(tmp_path, model):
    src = tmp_path / "scene.tif"
    write_scene(src, nodata_cols=100)
    rep = tile(src, model)
    mask = read(tmp_path / "scene.mask.tif")
    counts = np.bincount(mask.ravel(), minlength=256)
    areas = json.loads((tmp_path / "scene.areas.json").read_text())
    assert areas == json.loads(json.dumps(rep["areas"]))
    assert areas["nodata_pixels"] == counts[255] == 300 * 100
    assert areas["crs"] == "WGS 84 / UTM zone 33N"
    for c in areas["classes"]:
        assert c["pixels"] == counts[c["class"]]
        assert c["area_m2"] == pytest.approx(counts[c["class"]] * 0.25)
        assert c["area_ha"] == pytest.approx(counts[c["class"]] * 0.25 / 1e4)
    assert sum(c["share"] for c in areas["classes"]) == pytest.approx(1.0, abs=1e-5)
    r = runner.invoke(app, ["tile", str(src), "--model", str(model), *TILING, "--overwrite"])
    assert "m²" in r.output and "disc" in r.output


def test_areas_without_crs_are_pixels_and_geographic_rows_differ(tmp_path, model):
    src = tmp_path / "plain.tif"
    write_scene(src, crs=None, nodata=None)
    areas = tile(src, model)["areas"]
    assert areas["crs"] is None and "area_m2" not in areas["classes"][0]
    # Degrees: each row's area follows its latitude (sphere), summed per class.
    geo = tmp_path / "geo.tif"
    write_scene(geo, nodata=None, crs=None)
    with rasterio.open(geo, "r+") as ds:
        ds.crs = "EPSG:4326"
        ds.transform = from_origin(10.0, 60.0, 0.001, 0.001)
    areas = tile(geo, model)["areas"]
    total = sum(c["area_m2"] for c in areas["classes"])
    r = 6_371_007.2
    lat0, lat1 = np.radians(60.0), np.radians(60.0 - 0.3)
    expected = r * r * np.radians(0.36) * (np.sin(lat0) - np.sin(lat1))
    assert total == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- inputs


def test_vrt_input_equals_tiff_and_keeps_the_crs(tmp_path, model):
    src = tmp_path / "s.tif"
    write_scene(src)
    vrt = tmp_path / "s.vrt"
    if shutil.which("gdalbuildvrt"):
        subprocess.run(["gdalbuildvrt", "-q", str(vrt), str(src)], check=True)
    else:
        rasterio.shutil.copy(src, vrt, driver="VRT")
    tile(src, model)
    rep = tile(vrt, model, "--out", str(tmp_path / "v.mask.tif"))
    assert rep["plan"]["layout"] == "gdal"
    assert np.array_equal(read(tmp_path / "s.mask.tif"), read(tmp_path / "v.mask.tif"))
    with rasterio.open(tmp_path / "v.mask.tif") as ds, rasterio.open(src) as s:
        assert ds.crs == s.crs and ds.transform == s.transform and ds.nodata == 255


def test_bands_pick_and_order_in_tiff_and_gdal_inputs(tmp_path, model):
    four = tmp_path / "four.tif"
    img = write_scene(four, bands=4, nodata=None)
    three = tmp_path / "three.tif"
    with rasterio.open(three, "w", driver="GTiff", width=img.shape[1], height=img.shape[0], count=3,
                       dtype="uint8", crs=CRS, transform=from_origin(*ORIGIN, PIXEL, PIXEL)) as ds:
        ds.write(np.moveaxis(img[..., [3, 1, 0]], -1, 0))
    tile(three, model, "--out", str(tmp_path / "ref.tif"))
    tile(four, model, "--bands", "4,2,1", "--out", str(tmp_path / "tiff.tif"))
    vrt = tmp_path / "four.vrt"
    rasterio.shutil.copy(four, vrt, driver="VRT")
    tile(vrt, model, "--bands", "4,2,1", "--out", str(tmp_path / "gdal.tif"))
    ref = read(tmp_path / "ref.tif")
    assert np.array_equal(ref, read(tmp_path / "tiff.tif"))
    assert np.array_equal(ref, read(tmp_path / "gdal.tif"))
    r = runner.invoke(app, ["tile", str(four), "--model", str(model), "--bands", "5,2,1"])
    assert r.exit_code == 2 and "4 band(s)" in r.output
    r = runner.invoke(app, ["tile", str(four), "--model", str(model), "--bands", "0,1"])
    assert r.exit_code == 2
    # Bands that exist but do not make the model's input: an option to change, exit 2.
    r = runner.invoke(app, ["tile", str(four), "--model", str(model), "--bands", "1,2"])
    assert r.exit_code == 2 and "--bands 1,2" in r.output, r.output


# --------------------------------------------------------------------------- nodata, AOI


@pytest.mark.parametrize("blend", ["center", "gaussian"])
def test_all_nodata_tiles_are_not_run_and_the_rest_is_exact(tmp_path, model, blend):
    src = tmp_path / "half.tif"
    write_scene(src, h=300, w=400, nodata_cols=220)
    rep = tile(src, model, "--blend", blend)
    assert rep["skipped_tiles"] > 0
    same = tmp_path / "same.tif"  # the same pixels, no nodata declared: every tile runs
    write_scene(same, h=300, w=400, nodata_cols=220, nodata=None)
    full = tile(same, model, "--blend", blend)
    assert "skipped_tiles" not in full
    a, b = read(tmp_path / "half.mask.tif"), read(tmp_path / "same.mask.tif")
    valid = a != 255
    assert (~valid[:, :220]).all() and valid[:, 220:].all()
    assert np.array_equal(a[valid], b[valid])


def aoi_file(path: Path, coords, crs: str | None = CRS, driver: str = "GeoJSON") -> Path:
    schema = {"geometry": "Polygon", "properties": {"id": "int"}}
    with fiona.open(path, "w", driver=driver, schema=schema, crs=crs) as dst:
        dst.write({"geometry": {"type": "Polygon", "coordinates": [coords]}, "properties": {"id": 1}})
    return path


def test_aoi_runs_only_touching_tiles_and_marks_the_rest_nodata(tmp_path, model):
    src = tmp_path / "s.tif"
    write_scene(src, h=300, w=400, nodata=None)
    x0, y0 = ORIGIN
    # The right half in map coordinates (x from column 200, all rows).
    right = [(x0 + 100, y0), (x0 + 200, y0), (x0 + 200, y0 - 150), (x0 + 100, y0 - 150), (x0 + 100, y0)]
    aoi = aoi_file(tmp_path / "aoi.gpkg", right, driver="GPKG")
    rep = tile(src, model, "--aoi", str(aoi), "--out", str(tmp_path / "aoi.tif"))
    assert rep["skipped_tiles"] > 0 and rep["plan"]["aoi_pixels"] == 300 * 200
    tile(src, model, "--out", str(tmp_path / "whole.tif"))
    a, b = read(tmp_path / "aoi.tif"), read(tmp_path / "whole.tif")
    assert (a[:, :200] == 255).all()
    assert np.array_equal(a[:, 200:], b[:, 200:])
    with rasterio.open(tmp_path / "aoi.tif") as ds:
        assert ds.nodata == 255
    # The same area in WGS 84 (GeoJSON's CRS) is reprojected to the image's CRS.
    from rasterio.warp import transform as warp

    lons, lats = warp(CRS, "EPSG:4326", [p[0] for p in right], [p[1] for p in right])
    wgs = aoi_file(tmp_path / "aoi.geojson", list(zip(lons, lats)), crs="EPSG:4326")
    tile(src, model, "--aoi", str(wgs), "--out", str(tmp_path / "wgs.tif"))
    c = read(tmp_path / "wgs.tif")
    assert (c != a).mean() < 0.01  # the reprojected edge may move by a pixel


def test_aoi_errors_and_pixel_coordinates(tmp_path, model):
    src = tmp_path / "s.tif"
    write_scene(src, crs=None, nodata=None)
    away = aoi_file(tmp_path / "away.gpkg", [(1e6, 1e6), (1e6 + 5, 1e6), (1e6 + 5, 1e6 + 5), (1e6, 1e6)], crs=None, driver="GPKG")
    r = runner.invoke(app, ["tile", str(src), "--model", str(model), "--aoi", str(away)])
    assert r.exit_code == 2 and "does not overlap" in r.output
    r = runner.invoke(app, ["tile", str(src), "--model", str(model), "--aoi", str(tmp_path / "none.gpkg")])
    assert r.exit_code == 2 and "not found" in r.output
    # No CRS: the polygon is in pixel coordinates (x = column, y = row).
    top = aoi_file(tmp_path / "top.gpkg", [(0, 0), (360, 0), (360, 100), (0, 100), (0, 0)], crs=None, driver="GPKG")
    rep = tile(src, model, "--aoi", str(top))
    assert rep["plan"]["aoi_pixels"] == 100 * 360
    mask = read(tmp_path / "s.mask.tif")
    assert (mask[100:] == 255).all() and (mask[:100] != 255).all()
    # The polygons never replace the area of interest they were asked to cover.
    before = top.read_bytes()
    r = runner.invoke(app, ["tile", str(src), "--model", str(model), "--aoi", str(top),
                            "--vector", str(top), "--out", str(tmp_path / "again.tif")])
    assert r.exit_code == 2 and "would overwrite" in r.output, r.output
    assert top.read_bytes() == before and not (tmp_path / "again.tif").exists()
    # Nor the run's own class-area report, which would then overwrite the polygons.
    r = runner.invoke(app, ["tile", str(src), "--model", str(model), "--out",
                            str(tmp_path / "c.tif"), "--vector", str(tmp_path / "c.areas.json")])
    assert r.exit_code == 2 and "would overwrite" in r.output, r.output
    assert not (tmp_path / "c.tif").exists()
    # Nor someone's polygons: an existing file is replaced only when this mask's report
    # lists it (a re-run), or with --overwrite.
    roads = aoi_file(tmp_path / "roads.geojson", [(0, 0), (9, 0), (9, 9), (0, 0)], crs=None)
    before = roads.read_bytes()
    args = ["tile", str(src), "--model", str(model), "--vector", str(roads),
            "--out", str(tmp_path / "v.tif")]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "segnet did not write it" in r.output, r.output
    assert roads.read_bytes() == before and not (tmp_path / "v.tif").exists()
    r = runner.invoke(app, [*args, "--overwrite"])
    assert r.exit_code == 0 and roads.read_bytes() != before, r.output
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "up to date" in r.output, r.output


# --------------------------------------------------------------------------- polygons


def test_vector_polygons_match_the_raster_and_gdal_validates(tmp_path, model):
    src = tmp_path / "scene.tif"
    write_scene(src, nodata_cols=80)
    gpkg = tmp_path / "polys.gpkg"
    rep = tile(src, model, "--vector", str(gpkg))
    mask = read(tmp_path / "scene.mask.tif")
    counts = np.bincount(mask.ravel(), minlength=256)
    per_class_pixels = np.zeros(256, np.int64)
    per_class_area = np.zeros(256)
    with fiona.open(gpkg) as src_v:
        with rasterio.open(src) as ds:
            assert rasterio.crs.CRS.from_wkt(src_v.crs_wkt) == ds.crs
        names = set()
        from shapely.geometry import shape

        for f in src_v:
            c = f.properties["class"]
            names.add((c, f.properties["name"]))
            per_class_pixels[c] += f.properties["pixels"]
            per_class_area[c] += shape(f.geometry).area
    assert per_class_pixels[255] == 0  # nodata is not a class
    assert np.array_equal(per_class_pixels[:3], counts[:3])
    np.testing.assert_allclose(per_class_area[:3], counts[:3] * 0.25)
    assert names <= {(0, "background"), (1, "disc"), (2, "square")}
    validate = gdal_sample("validate_gpkg")
    if validate is not None:
        v = subprocess.run([*validate, str(gpkg)], capture_output=True, text=True)
        assert v.returncode == 0, v.stdout + v.stderr
    assert rep["areas"]["vector"]
    no_temporaries(tmp_path)
    # Up to date: nothing runs again; a missing polygon file is redone.
    again = tile(src, model, "--vector", str(gpkg))
    assert again["skipped"] == 1
    gpkg.unlink()
    redo = tile(src, model, "--vector", str(gpkg))
    assert redo["done"] == 1 and gpkg.exists()


def test_vector_min_area_and_formats(tmp_path, model):
    src = tmp_path / "s.tif"
    write_scene(src, nodata=None)
    out = tmp_path / "p.geojson"
    tile(src, model, "--vector", str(out), "--min-area", "50")
    with fiona.open(out) as v:
        assert all(f.properties["area"] >= 50 for f in v)
    r = runner.invoke(app, ["tile", str(src), "--model", str(model), "--vector", str(tmp_path / "p.shp")])
    assert r.exit_code == 2
    r = runner.invoke(app, ["tile", str(src), "--model", str(model), "--min-area", "5"])
    assert r.exit_code == 2 and "--vector" in r.output


def test_without_the_geo_extra(tmp_path, model, monkeypatch):
    import segnet_cli.geo as geo

    monkeypatch.setattr(geo, "available", lambda: False)
    src = tmp_path / "s.tif"
    write_scene(src, nodata=None)
    r = runner.invoke(app, ["tile", str(src), "--model", str(model), "--plan"])
    assert r.exit_code == 0 and "without overviews" in r.output
    r = runner.invoke(app, ["tile", str(src), "--model", str(model), "--vector", str(tmp_path / "v.gpkg")])
    assert r.exit_code == 2 and "segnet-cli[geo]" in r.output
    rep = tile(src, model)
    assert rep["plan"]["cog"] is False and (tmp_path / "s.areas.json").exists()


def test_ray_actor_skips_and_masks_like_the_local_engine(tmp_path, model):
    """A Ray work unit (run in-process: no cluster) gives the local engine's rows, with an
    area of interest and input nodata: same skipped tiles, same nodata, same classes."""
    pytest.importorskip("ray")
    from segnet_cli.config import InferenceConfig, TileConfig, TilingConfig
    from segnet_cli.gigapixel import plan_tile, run_tile
    from segnet_cli.gigapixel.ray import TileActor, make_job, plan_units

    src = tmp_path / "s.tif"
    write_scene(src, h=300, w=400, nodata_cols=120)
    x0, y0 = ORIGIN
    top = [(x0, y0), (x0 + 200, y0), (x0 + 200, y0 - 100), (x0, y0 - 100), (x0, y0)]
    aoi = aoi_file(tmp_path / "top.geojson", top)
    config = TileConfig(
        input=src, out=tmp_path / "local.tif", aoi=aoi,
        inference=InferenceConfig(model=model, tiling=TilingConfig(tile=64, halo=8, batch_size=3)),
    )
    assert run_tile(config).done == 1
    expect = read(tmp_path / "local.tif")
    assert (expect[200:] == 255).all() and (expect[:, :120] == 255).all()
    assert (expect[:200, 120:] != 255).all()
    plan = plan_tile(config)
    units = plan_units(plan.grid, "center")
    parts = tmp_path / "parts"
    parts.mkdir()
    job = make_job(plan, plan.config, parts, 0.0, "run1")
    actor = TileActor(job)
    batch = {k: np.array([u.row()[k] for u in units]) for k in units[0].row()}
    rows = actor(batch)
    assert set(rows["status"]) == {"done"}, rows["error"]
    for u in units:
        (path, _, _), = job.part_files(u)
        np.testing.assert_array_equal(np.load(path), expect[u.y0 : u.y1])


def test_real_process_writes_a_geopackage(tmp_path, model):
    """A real ``segnet tile --vector x.gpkg`` process writes a GeoPackage with its R*Tree
    index (TensorFlow's own SQLite lacks R*Tree: the model runs in a child process)."""
    import os
    import sys

    src = tmp_path / "s.tif"
    write_scene(src, h=120, w=150)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "NO_COLOR": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "segnet_cli", "tile", str(src), "--model", str(model),
         "--vector", str(tmp_path / "p.gpkg"), "--json", "-q"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["areas"]["vector"]["polygons"] > 0
    with fiona.open(tmp_path / "p.gpkg") as v:
        assert len(v) > 0


def test_a_signal_while_polygons_are_made_leaves_nothing(tmp_path, model, monkeypatch):
    import signal

    from segnet_cli.config import InferenceConfig, TileConfig, TilingConfig
    from segnet_cli.gigapixel import outputs, run_tile

    src = tmp_path / "s.tif"
    write_scene(src, h=200, w=160)
    real = outputs._strips

    def strips_then_ctrl_c(*args):
        for i, strip in enumerate(real(*args)):
            if i == 1:
                signal.raise_signal(signal.SIGINT)  # as Ctrl-C would, mid-polygons
            yield strip

    monkeypatch.setattr(outputs, "VECTOR_STRIP_ROWS", 16)
    monkeypatch.setattr(outputs, "_strips", strips_then_ctrl_c)
    config = TileConfig(
        input=src, vector=tmp_path / "p.gpkg",
        inference=InferenceConfig(model=model, tiling=TilingConfig(tile=96, halo=16, batch_size=4)),
    )
    report = run_tile(config)
    assert report.return_code == 130
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".segnet-locks") == ["s.tif"]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_vector_runs_the_model_in_a_child_and_never_loads_tensorflow_here(tmp_path, model):
    """With --vector the rows come from a model process: this process writes them, then
    makes the COG and the polygons without TensorFlow (what it would keep stays there),
    unless this process already holds TensorFlow."""
    import os
    import sys

    src = tmp_path / "s.tif"
    write_scene(src, h=150, w=170)
    script = f"""
import json, sys
from pathlib import Path
from segnet_cli.config import InferenceConfig, TileConfig, TilingConfig
from segnet_cli.gigapixel import run_tile
tiling = TilingConfig(tile=96, halo=16, batch_size=4)
runs = (("iso", Path({str(tmp_path)!r}) / "p.gpkg"), ("in", None),
        ("after", Path({str(tmp_path)!r}) / "q.gpkg"))
for name, vector in runs:
    config = TileConfig(
        input=Path({str(src)!r}), out=Path({str(tmp_path)!r}) / (name + ".mask.tif"),
        vector=vector, inference=InferenceConfig(model=Path({str(model)!r}), tiling=tiling),
    )
    r = run_tile(config)
    print(json.dumps({{"name": name, "code": r.return_code, "tf": "tensorflow" in sys.modules,
                      "child": r.details.get("model_process_peak_rss_bytes"),
                      "model_seconds": r.details["model_seconds"]}}))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    iso, inproc, after = (json.loads(line) for line in out.stdout.splitlines()[-3:])
    assert iso["code"] == 0 and iso["tf"] is False  # the model ran elsewhere
    assert iso["child"] > 100 * 2**20 and iso["model_seconds"] > 0
    assert inproc["code"] == 0 and inproc["tf"] is True and inproc["child"] is None
    # Once this process holds TensorFlow, a second one would only add to it: no child.
    assert after["code"] == 0 and after["child"] is None
    # The same pixels either way.
    np.testing.assert_array_equal(read(tmp_path / "iso.mask.tif"), read(tmp_path / "in.mask.tif"))


def test_an_error_in_the_model_process_comes_back_as_itself(tmp_path, model):
    from dataclasses import replace

    from segnet_cli.config import InferenceConfig, TileConfig, TilingConfig
    from segnet_cli.errors import ModelFileError
    from segnet_cli.gigapixel.isolated import isolated_rows
    from segnet_cli.gigapixel.plan import plan_tile

    src = tmp_path / "s.tif"
    write_scene(src, h=100, w=100)
    copy = tmp_path / "m.keras"
    shutil.copy(model, copy)
    config = TileConfig(
        input=src, vector=tmp_path / "p.gpkg",
        inference=InferenceConfig(model=copy, tiling=TilingConfig(tile=96, halo=16)),
    )
    plan = plan_tile(config)
    copy.write_bytes(b"not a model any more")  # changed between the plan and the run
    rows = isolated_rows(plan, config, {}, lambda n, px: None, lambda: None)
    with pytest.raises(ModelFileError) as err:
        next(rows)
    assert err.value.path == copy  # the named exception, with its path, crossed over
    stub = replace(plan, model_path=tmp_path / "gone.keras")
    with pytest.raises(ModelFileError):
        next(isolated_rows(stub, config, {}, lambda n, px: None, lambda: None))


def test_sigterm_mid_stream_ends_the_model_process_and_leaves_nothing(tmp_path, model):
    """cron's ``kill`` reaches only the parent: it ends its model process and cleans up."""
    import os
    import signal
    import sys
    import time

    src = tmp_path / "s.tif"
    write_scene(src, h=900, w=900)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "segnet_cli", "tile", str(src), "--model", str(model),
         "--tile", "96", "--halo", "16", "--batch-size", "1", "--vector",
         str(tmp_path / "p.gpkg")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "no output started"
            time.sleep(0.1)
        while not (kids := _children(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, "no model process"
            time.sleep(0.1)
        time.sleep(3)  # the model process is loading or running tiles
        assert proc.poll() is None, "finished before the signal: make the scene larger"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    for pid in kids:  # the parent waited for its model process before exiting
        assert not Path(f"/proc/{pid}").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".segnet-locks") == ["s.tif"]


def test_probabilities_cross_from_the_model_process_unchanged(tmp_path, model):
    """With --vector the rows arrive as raw bytes: the probability raster of every class
    (float16, a 3-D band) equals the one written by the in-process run."""
    src = tmp_path / "s.tif"
    write_scene(src, h=130, w=150)
    args = ["--probabilities", "classes", "--no-cog"]
    tile(src, model, *args, "--out", str(tmp_path / "a.mask.tif"))
    tile(src, model, *args, "--out", str(tmp_path / "b.mask.tif"),
         "--vector", str(tmp_path / "b.gpkg"))
    for name in ("mask.tif", "prob.tif"):
        with rasterio.open(tmp_path / f"a.{name}") as a, rasterio.open(tmp_path / f"b.{name}") as b:
            assert a.count == b.count and a.dtypes == b.dtypes
            np.testing.assert_array_equal(a.read(), b.read())
    assert b.count == 3  # every class of the tiny model
