"""`segnet tile`: streaming reads of every TIFF layout, identity with predict, metadata, memory.

Images are small and tiles tiny (the tiny model's stride is 8), so grids have many tiles, an
odd last row and column, and every edge and corner; the model is loaded once per session.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import make_model_file, shapes_image, write_png
from PIL import Image
from typer.testing import CliRunner

from segnet_cli import gigapixel as tile_mod
from segnet_cli.cli import app
from segnet_cli.config import InferenceConfig, PredictConfig, TileConfig, TilingConfig
from segnet_cli.errors import LockedError, TiffLayoutError, UsageError
from segnet_cli.gigapixel import budget as budget_mod
from segnet_cli.gigapixel import plan as plan_mod
from segnet_cli.io import sources as sources_mod
from segnet_cli.io import tiff as tiff_mod
from segnet_cli.io.files import TMP_PREFIX
from segnet_cli.io.images import read_image
from segnet_cli.jobs import Claim
from segnet_cli.model.modelfile import InputScaling, ModelInfo
from segnet_cli.model.network import Architecture
from segnet_cli.pipeline import segment_image
from segnet_cli.tiling import TileGrid

TILING = TilingConfig(tile=96, halo=16, batch_size=3)
GEO = [
    (33550, 12, 3, (0.5, 0.5, 0.0), True),
    (33922, 12, 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), True),
    (34735, 3, 20, (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633, 3076, 0, 1, 9001), True),
    (34736, 12, 2, (6378137.0, 298.257223563), True),
    (34737, 2, 0, "WGS 84 / UTM zone 33N|", True),
    (42112, 2, 0, '<GDALMetadata><Item name="AREA">x</Item><Item name="SCALE" sample="0">2</Item></GDALMetadata>', True),
]


@pytest.fixture(scope="module", autouse=True)
def one_segmenter():
    """Load each model once: every run_tile/run_predict call here reuses it (speed only)."""
    import segnet_cli.model.segmenter as engine

    real = engine.Segmenter
    cache: dict = {}

    def cached(model_path=None, precision="float32", device=None):
        key = (str(model_path), precision, device)
        if key not in cache:
            cache[key] = real(model_path, precision, device)
        return cache[key]

    engine.Segmenter = cached
    yield
    engine.Segmenter = real


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return shapes_image(h, w, seed)[0]


def mask_of(path: Path) -> np.ndarray:
    return tifffile.imread(path)


def tile_cfg(src: Path, model: Path, tiling: TilingConfig = TILING, **kw) -> TileConfig:
    return TileConfig(input=src, inference=InferenceConfig(model=model, tiling=tiling), **kw)


def with_tiling(cfg: TileConfig, tiling: TilingConfig) -> TileConfig:
    return replace(cfg, inference=replace(cfg.inference, tiling=tiling))


def predict_mask(src: Path, model: Path, tmp: Path, tiling: TilingConfig = TILING) -> np.ndarray:
    from segnet_cli.predict import run_predict

    out = tmp / "pred"
    cfg = PredictConfig(inputs=(str(src),), out=out, inference=InferenceConfig(model=model, tiling=tiling))
    rep = run_predict(cfg)
    assert rep.done == 1, rep
    return np.asarray(Image.open(out / f"{src.stem}.png"))


# --------------------------------------------------------------------------- reading


LAYOUTS = {
    "tiled-zlib": dict(tile=(64, 48), compression="zlib"),
    "tiled-lzw": dict(tile=(32, 32), compression="lzw"),
    "tiled-zstd-bigtiff": dict(tile=(48, 64), compression="zstd", bigtiff=True),
    "tiled-jpeg": dict(tile=(32, 32), compression="jpeg"),
    "tiled-raw": dict(tile=(32, 32)),
    "strips-packbits": dict(rowsperstrip=7, compression="packbits"),
    "strips-deflate-pred": dict(rowsperstrip=16, compression="zlib", predictor=True),
    "one-raw-strip": dict(),
    "raw-strips": dict(rowsperstrip=5),
    "planar-tiled": dict(tile=(32, 32), compression="zlib", planarconfig="separate"),
    "planar-raw": dict(planarconfig="separate"),
    "small-compressed-strip": dict(rowsperstrip=1000, compression="zlib"),
}


CASES = [(n, "rgb8") for n in sorted(LAYOUTS)] + [
    (n, "gray16") for n in sorted(LAYOUTS) if "jpeg" not in n and "planar" not in n
] + [("tiled-zlib", "float32"), ("one-raw-strip", "float32"), ("tiled-zstd-bigtiff", "float32")]


@pytest.mark.parametrize("name,kind", CASES)
def test_reader_bands_equal_whole_read(tmp_path, name, kind):
    """Every layout, read band by band with a grid's overlapping ranges, equals predict's read."""
    kw = dict(LAYOUTS[name])
    if kind == "gray16":
        data = (np.random.default_rng(1).random((83, 101)) * 65535).astype(np.uint16)
    elif kind == "float32":
        data = np.random.default_rng(2).normal(0.5, 0.4, (83, 101, 3)).astype(np.float32)
    else:
        data = image(83, 101)
    if "planar" in name:
        data = np.moveaxis(data, -1, 0)
        kw["photometric"] = "rgb"
    path = tmp_path / f"{name}.tif"
    tifffile.imwrite(path, data, **kw)
    info = sources_mod.inspect_source(path)
    expect_layout = "contiguous" if name.startswith(("one-raw", "raw-", "planar-raw")) else "chunked"
    assert info.layout == expect_layout
    whole = read_image(path)
    grid = TileGrid.make(83, 101, 32, 8, 8)
    ranges = [(r.window_start, r.window_end) for r in grid.rows]
    with sources_mod.open_reader(info) as reader:
        for (y0, y1), (b0, band) in zip(ranges, tiff_mod.iter_bands(reader, ranges)):
            assert b0 == y0 and band.dtype == whole.dtype
            np.testing.assert_array_equal(band, whole[y0:y1])


@pytest.mark.parametrize("ahead", [0, 1])
def test_read_ahead_bands_and_the_bands_they_hold(tmp_path, ahead):
    """``read_bands`` gives the same bands either way; reading ahead holds one band more.

    The peak is measured by tracemalloc, which sees NumPy's buffers: with ``ahead=0`` and a
    caller that drops each band, the previous band is freed once its overlap is copied
    (here half a band: tile 128, halo 32), so a band and an overlap are the most alive.
    """
    import hashlib
    import time
    import tracemalloc

    from segnet_cli.gigapixel.rows import read_bands

    data = image(576, 2000)  # 8 grid rows of 128, the last not pulled back
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, data, tile=(32, 32))  # decoded straight into the band, tile by tile
    grid = TileGrid.make(576, 2000, 128, 32, 32)
    band = grid.rows[0].window_end * 2000 * 3
    info = sources_mod.inspect_source(path)
    with sources_mod.open_reader(info) as reader:
        got = []
        tracemalloc.start()
        try:
            for y0, b in read_bands(reader, grid, ahead=ahead):
                got.append((y0, hashlib.sha1(memoryview(b)).hexdigest()))  # no copy
                # The model's turn: reading ahead allocates and fills the next band now (up
                # to 2 s for a loaded machine to schedule the reader thread).
                deadline = time.monotonic() + 2
                while ahead and tracemalloc.get_traced_memory()[0] < 2 * band:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.005)
                time.sleep(0.02)  # without reading ahead, nothing may grow meanwhile
                del b
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert got == [
        (r.window_start, hashlib.sha1(data[r.window_start : r.window_end].tobytes()).hexdigest())
        for r in grid.rows
    ]
    if ahead == 0:
        assert peak < 1.7 * band  # a band and its overlap (half a band here)
    else:
        assert peak > 2 * band  # the band in use and the next one


def test_palette_tiff_expands_like_predict(tmp_path):
    idx = (np.arange(40 * 50) % 4).astype(np.uint8).reshape(40, 50)
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, :4] = [[0, 65535, 0, 30000], [0, 0, 65535, 30000], [65535, 0, 0, 30000]]
    for kw in (dict(tile=(16, 16), compression="zlib"), dict()):
        path = tmp_path / "pal.tif"
        tifffile.imwrite(path, idx, photometric="palette", colormap=cmap, **kw)
        info = sources_mod.inspect_source(path)
        with sources_mod.open_reader(info) as reader:
            (_, band), = tiff_mod.iter_bands(reader, [(0, 40)])
        np.testing.assert_array_equal(band, read_image(path))


def test_single_huge_compressed_strip_is_refused(tmp_path, tiny_model, monkeypatch):
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, image(64, 80), rowsperstrip=64, compression="zlib")
    monkeypatch.setattr(tiff_mod, "MAX_SEGMENT_BYTES", 4096)
    with pytest.raises(TiffLayoutError) as err:
        tile_mod.plan_tile(tile_cfg(path, tiny_model))
    msg = str(err.value)
    assert "stored as one strip (deflate" in msg and "gdal_translate -co TILED=YES" in msg
    # The same layout uncompressed is memory-mapped, never refused.
    tifffile.imwrite(path, image(64, 80))
    assert sources_mod.inspect_source(path).layout == "contiguous"


# --------------------------------------------------------------------------- identity


def test_tile_equals_predict_odd_size_every_edge(tmp_path, tiny_model):
    """1537 x 2049 tiled zlib: same mask as predict, over a grid with edge and corner tiles."""
    src = tmp_path / "odd.tif"
    tifffile.imwrite(src, image(1537, 2049), tile=(256, 256), compression="zlib")
    tiling = TilingConfig(tile=256, halo=32, batch_size=4)
    rep = tile_mod.run_tile(tile_cfg(src, tiny_model, tiling=tiling))
    assert rep.return_code == 0 and rep.done == 1
    out = tmp_path / "odd.mask.tif"
    got = mask_of(out)
    assert got.shape == (1537, 2049) and got.dtype == np.uint8
    grid = TileGrid.make(1537, 2049, 256, 32, 8)
    # Edge and corner tiles have their own shapes: all of them were run.
    assert len(grid.shapes()) == 4 and rep.details["tiles"] == len(grid)
    np.testing.assert_array_equal(got, predict_mask(src, tiny_model, tmp_path, tiling))


@pytest.mark.parametrize("blend", ["center", "gaussian"])
def test_tile_equals_engine_striped_16bit(tmp_path, tiny_model, blend):
    """A striped 16-bit file: same scaling and blending as the in-memory engine."""
    from segnet_cli.io.images import to_model_input
    from segnet_cli.model.segmenter import Segmenter

    data = (image(203, 157).astype(np.uint16) * 257) ^ np.uint16(0x00FF)
    src = tmp_path / "s16.tif"
    tifffile.imwrite(src, data, rowsperstrip=3, compression="lzw")
    tiling = replace(TILING, blend=blend)
    rep = tile_mod.run_tile(tile_cfg(src, tiny_model, tiling=tiling, out=tmp_path / "m.tif"))
    assert rep.done == 1
    seg = Segmenter(tiny_model)
    expect, _ = segment_image(seg, to_model_input(read_image(src), 3), tiling)
    np.testing.assert_array_equal(mask_of(tmp_path / "m.tif"), expect)


def test_png_input_and_jpeg_tiff_equal_predict(tmp_path, tiny_model):
    png = write_png(tmp_path / "p.png", image(130, 170, 3))
    tile_mod.run_tile(tile_cfg(png, tiny_model))
    np.testing.assert_array_equal(mask_of(tmp_path / "p.mask.tif"), predict_mask(png, tiny_model, tmp_path))
    jpg = tmp_path / "j.tif"
    tifffile.imwrite(jpg, image(130, 170, 4), tile=(32, 32), compression="jpeg")
    tile_mod.run_tile(tile_cfg(jpg, tiny_model))
    np.testing.assert_array_equal(mask_of(tmp_path / "j.mask.tif"), predict_mask(jpg, tiny_model, tmp_path))


# --------------------------------------------------------------------------- metadata and outputs


def test_geotiff_tags_resolution_nodata_and_probabilities(tmp_path, tiny_model):
    data = image(150, 210)
    data[:20, :30] = 0  # nodata block (all bands 0)
    data[40, 50] = (0, 0, 7)  # not nodata: only some bands are 0
    src = tmp_path / "geo.tif"
    tifffile.imwrite(
        src, data, tile=(64, 64), compression="zstd", resolution=(300, 300), resolutionunit=2,
        extratags=GEO + [(42113, 2, 0, "0", True)],
    )
    # The streamed TIFF itself (--no-cog): its GeoTIFF tags are the input's, byte for byte.
    # A COG is GDAL's copy of it, with GDAL's own encoding of the same CRS (test_gis.py).
    rep = tile_mod.run_tile(
        tile_cfg(src, tiny_model, probabilities="classes", probability_dtype="uint8", cog=False)
    )
    assert rep.done == 1
    out = tmp_path / "geo.mask.tif"
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        tags = {t.code: (t.dtype, t.value) for t in page.tags.values()}
        assert page.is_tiled and page.tile == (256, 256) and page.compression == 8
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
        assert tuple(page.colormap[:, 1]) == (230 * 257, 25 * 257, 75 * 257)
        mask = page.asarray()
    for code, ttype, _, value, _ in GEO[:5]:
        dtype, got = tags[code]
        assert dtype == ttype
        assert (got == value) if isinstance(value, str) else tuple(got) == tuple(value)
    # Per-band GDAL metadata (about the input's bands) is dropped; dataset-wide kept.
    assert 'name="AREA"' in tags[42112][1] and "SCALE" not in tags[42112][1]
    assert tags[42113][1] == "255"
    assert tags[282][1] == (300, 1) and tags[296][1] == 2
    assert (mask[:20, :30] == 255).all() and mask[40, 50] < 3
    assert mask[20:, 30:].max() < 3
    expect = predict_mask(src, tiny_model, tmp_path)
    keep = np.ones(mask.shape, bool)
    keep[:20, :30] = False
    np.testing.assert_array_equal(mask[keep], expect[keep])
    with tifffile.TiffFile(tmp_path / "geo.prob.tif") as tif:
        prob = tif.pages[0].asarray()
        assert 33922 in tif.pages[0].tags and 42113 not in tif.pages[0].tags
    assert prob.shape == (150, 210, 3) and prob.dtype == np.uint8
    sums = prob[20:].astype(int).sum(-1)
    assert np.abs(sums - 255).max() <= 2 and (prob[:20, :30] == 0).all()
    assert (np.argmax(prob[30:], -1) == mask[30:]).mean() > 0.99  # uint8 ties aside


def test_rerun_skips_overwrite_redoes_and_claim_blocks(tmp_path, tiny_model):
    src = tmp_path / "a.tif"
    tifffile.imwrite(src, image(100, 120), tile=(32, 32), compression="zlib")
    cfg = tile_cfg(src, tiny_model, out=tmp_path / "out" / "a.tif")
    assert tile_mod.run_tile(cfg).done == 1
    mtime = os.stat(tmp_path / "out" / "a.tif").st_mtime_ns
    again = tile_mod.run_tile(cfg)
    assert again.skipped == 1 and again.details["reason"] == "up to date"
    assert os.stat(tmp_path / "out" / "a.tif").st_mtime_ns == mtime
    assert tile_mod.run_tile(replace(cfg, overwrite=True)).done == 1
    # Other settings are not "up to date".
    assert tile_mod.run_tile(with_tiling(cfg, replace(TILING, halo=24))).done == 1
    claim = Claim(tmp_path / "out", tmp_path / "out" / "a.tif")
    assert claim.acquire()
    try:
        with pytest.raises(LockedError):
            tile_mod.run_tile(replace(cfg, overwrite=True))
    finally:
        claim.release()


def test_interrupt_leaves_nothing(tmp_path, tiny_model):
    """SIGINT between batches: exit 130, no output, no temporary left."""
    src = tmp_path / "big.tif"
    tifffile.imwrite(src, image(300, 300), tile=(64, 64), compression="zlib")

    class Bar:
        def start(self, total, done=0):
            pass

        def advance(self, n=1, extra=None):
            os.kill(os.getpid(), signal.SIGINT)

    rep = tile_mod.run_tile(tile_cfg(src, tiny_model), progress=Bar())
    assert rep.return_code == 130 and rep.details["interrupted"] == signal.SIGINT
    assert not (tmp_path / "big.mask.tif").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_bad_options_fail_before_the_model(tmp_path, tiny_model):
    src = tmp_path / "a.tif"
    tifffile.imwrite(src, image(40, 40), tile=(16, 16))
    for kw in ({"compression": "jpeg"}, {"nodata_class": 1}, {"probabilities": "x"},
               {"out_tile": 100}, {"out": src}):
        with pytest.raises(UsageError):
            tile_mod.plan_tile(tile_cfg(src, tiny_model, **kw))


# --------------------------------------------------------------------------- memory model


def fake_source(height: int, width: int, layout: str = "chunked") -> tiff_mod.SourceInfo:
    return tiff_mod.SourceInfo(
        Path("x.tif"), height, width, 3, np.dtype(np.uint8), layout, chunk_shape=(256, 256), tiled=True
    )


CAMVID = ModelInfo(
    class_names=tuple(f"c{i}" for i in range(11)), palette=((0, 0, 0),) * 11, in_channels=3,
    scaling=InputScaling(), stride=32, receptive_field=392,
    architecture={"width": 0.25, "stages": 5, "in_channels": 3, "num_classes": 11},
)


def estimate(height, width, tiling=TilingConfig(), **kw):
    cfg = TileConfig(input=Path("x.tif"), **kw)
    arch = Architecture.from_info(CAMVID)
    return budget_mod.estimate(fake_source(height, width), CAMVID, arch, cfg, tiling, 8_000_000)[1]


def test_memory_depends_on_width_and_tile_not_height():
    a, b = estimate(5_000, 20_000), estimate(500_000, 20_000)
    assert a.total == b.total
    wide = estimate(5_000, 80_000)
    assert wide.total > a.total
    assert dict(wide.parts)["input"] == 4 * dict(a.parts)["input"]
    small = estimate(5_000, 20_000, TilingConfig(tile=512))
    assert small.total < a.total
    # A 40k x 40k mosaic with 11 classes: the whole probability map would be ~70 GB;
    # the streaming run stays a small, fixed amount above the runtime.
    assert estimate(40_000, 40_000).total < 2 * 1024**3


def test_max_memory_fits_batch_then_tile_or_refuses():
    arch = Architecture.from_info(CAMVID)
    src = fake_source(20_000, 20_000)
    cfg = TileConfig(input=Path("x.tif"))

    def peak(t):
        return budget_mod.estimate(src, CAMVID, arch, cfg, t, 8_000_000)[1].total

    two = replace(TilingConfig(), batch_size=2)
    full = peak(two)
    limit = full - 1
    t, note = budget_mod.fit_tiling(two, limit, peak, 32)
    assert t.batch_size == 1 and t.tile == 1024 and peak(t) <= limit and "batch" in note
    # Next, reading ahead goes: one band of input rows less, sized on the tallest grid row
    # an image can have (1024 + 32 - 1 rows) x 20000 px x 3 bytes (60.4 MiB).
    one = replace(TilingConfig(), batch_size=1)
    assert peak(one) - peak(replace(one, read_ahead=0)) == 1055 * 20_000 * 3
    limit = peak(one) - 50 * 1024**2
    t, note = budget_mod.fit_tiling(two, limit, peak, 32)
    assert (t.batch_size, t.read_ahead, t.tile) == (1, 0, 1024) and peak(t) <= limit
    assert budget_mod.NO_READ_AHEAD in note and "tile" not in note
    limit = peak(replace(one, read_ahead=0)) - 50 * 1024**2
    t, note = budget_mod.fit_tiling(two, limit, peak, 32)
    assert t.tile < 1024 and t.tile % 32 == 0 and peak(t) <= limit and "tile" in note
    assert t.read_ahead == 0
    assert t.halo == 128  # the halo (and so the result) never changes
    with pytest.raises(UsageError, match="too small"):
        budget_mod.fit_tiling(TilingConfig(), 600 * 1024**2, peak, 32)


@pytest.fixture(scope="module")
def k11_model(tmp_path_factory) -> Path:
    """An 11-class model (CamVid's count): probability terms grow with the classes."""
    return make_model_file(tmp_path_factory.mktemp("k11") / "k11.keras", num_classes=11)


class HostOnlySegmenter:
    """Stands in for the model: NumPy outputs of the right shapes, so tracemalloc sees every
    byte a run holds outside TensorFlow (the host side of the memory model)."""

    def __init__(self, info: ModelInfo) -> None:
        self.info, self.num_classes, self.stride = info, info.num_classes, info.stride

    def batch_tiles(self, batch_size: int) -> int:
        return batch_size

    def run(self, batch: np.ndarray, output: str = "logits"):
        if output == "classes":
            return (batch[..., 0] * 2.9).astype(np.uint8)
        logits = np.empty((*batch.shape[:3], self.num_classes), np.float32)
        logits[...] = batch[..., :1] * np.arange(self.num_classes, dtype=np.float32)
        return logits


@pytest.mark.parametrize(
    "kw",
    [{}, {"blend": "gaussian"}, {"probabilities": "classes"},
     {"probabilities": "classes", "probability_dtype": "uint8"},
     {"probabilities": "confidence", "blend": "gaussian"}],
    ids=lambda kw: "-".join(map(str, kw.values())) or "center",
)
def test_memory_model_covers_what_the_host_holds(tmp_path, monkeypatch, k11_model, kw):
    """Everything a run allocates outside TensorFlow stays within the estimate's non-runtime,
    non-model parts (issue 13: --probabilities classes was 26% over, gaussian 8%)."""
    import tracemalloc

    import segnet_cli.model.segmenter as engine

    model = k11_model
    src = tmp_path / "wide.tif"
    tifffile.imwrite(src, np.tile(image(96, 200), (6, 12, 1)), tile=(64, 64))  # 2400 x 576
    blend = kw.pop("blend", "center")
    tiling = TilingConfig(tile=256, halo=32, batch_size=2, blend=blend)
    cfg = tile_cfg(src, model, tiling, out=tmp_path / "wide.mask.tif", overwrite=True, **kw)
    plan = tile_mod.plan_tile(cfg)
    monkeypatch.setattr(engine, "Segmenter", lambda *a, **k: HostOnlySegmenter(plan.model))
    tracemalloc.start()
    try:
        tile_mod.run_tile(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    parts = plan.memory.as_dict()
    host = parts["total"] - parts["runtime"] - parts["model"]
    assert peak <= host, f"host peak {peak / 2**20:.1f} MiB > estimate {host / 2**20:.1f} MiB {parts}"


def test_plan_applies_max_memory(tmp_path, tiny_model):
    src = tmp_path / "a.tif"
    tifffile.imwrite(src, image(400, 600), tile=(32, 32), compression="zlib")
    base = tile_mod.plan_tile(tile_cfg(src, tiny_model, tiling=TilingConfig(tile=256, halo=32, batch_size=4)))
    limit = (base.memory.total - 1) / 1024**2
    plan = tile_mod.plan_tile(replace(base.config, max_memory_mb=limit))
    assert plan.memory.total <= limit * 1024**2 and plan.tiling.batch_size < 4
    assert any("max-memory" in n for n in plan.notes)


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_plan_loads_no_model(tmp_path, tiny_model):
    src = tmp_path / "geo.tif"
    tifffile.imwrite(src, image(1537, 2049), tile=(256, 256), compression="zlib")
    r = runner.invoke(app, ["tile", str(src), "--plan", "--model", str(tiny_model), "--tile", "128", "--halo", "16"])
    assert r.exit_code == 0, r.output
    text = r.output
    assert "grid:" in text and "352 tiles = 16 rows x 22 cols" in text and "memory:  estimated peak" in text
    assert "time:" in text and "not on this machine" in text
    assert not (tmp_path / "geo.mask.tif").exists()
    r = runner.invoke(app, ["tile", str(src), "--plan", "--json", "--model", str(tiny_model),
                            "--batch-size", "3", "--max-memory", "4000"])
    d = json.loads(r.stdout)
    assert d["grid"]["tiles"] == 6 and d["grid"]["tile"] == 1024 and d["memory_bytes"]["total"] > 0
    assert d["tiling"]["batch_size"] == 3 and d["output"].endswith("geo.mask.tif")
    r = runner.invoke(app, ["tile", str(src), "--plan", "--model", str(tiny_model), "--max-memory", "100"])
    assert r.exit_code == 2 and "too small" in r.output


def test_cli_run(tmp_path, tiny_model):
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, image(200, 260), rowsperstrip=8, compression="zlib", extratags=GEO[:2])
    out = tmp_path / "m" / "mask.tif"
    args = ["tile", str(src), "--out", str(out), "--model", str(tiny_model), "--tile", "64",
            "--halo", "8", "--compression", "zstd", "--out-tile", "64", "--probabilities", "confidence"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].tile == (64, 64) and tif.pages[0].compression == 50000
        assert tuple(tif.pages[0].tags[33922].value) == GEO[1][3]
    conf = tifffile.imread(tmp_path / "m" / "mask.prob.tif")
    assert conf.dtype == np.float16 and conf.shape == (200, 260) and 1 / 3 <= conf.min() <= conf.max() <= 1
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "up to date" in r.output


def test_default_budget_lowers_the_batch_then_the_read_ahead(tmp_path, tiny_model, monkeypatch):
    """Without --max-memory the batch, then reading ahead, give way to the default budget;
    never the tile."""
    src = tmp_path / "a.tif"
    tifffile.imwrite(src, image(400, 600), tile=(32, 32), compression="zlib")
    tiling = TilingConfig(tile=128, halo=16, batch_size=4)
    # cog=False: without the geo extra the plan would also note that no COG is written.
    base = tile_mod.plan_tile(
        tile_cfg(src, tiny_model, tiling=tiling, max_memory_mb=float("inf"), cog=False)
    )
    assert base.tiling == tiling and not base.notes
    monkeypatch.setattr(budget_mod, "DEFAULT_MEMORY_BUDGET_MB", (base.memory.total - 1) / 1024**2)
    plan = tile_mod.plan_tile(tile_cfg(src, tiny_model, tiling=tiling, cog=False))
    assert plan.tiling.batch_size == 1 and plan.tiling.tile == 128
    assert plan.tiling.read_ahead == 1 and len(plan.notes) == 1  # the batch was enough
    assert "default memory budget" in plan.notes[0]
    monkeypatch.setattr(budget_mod, "DEFAULT_MEMORY_BUDGET_MB", 1.0)
    plan = tile_mod.plan_tile(tile_cfg(src, tiny_model, tiling=tiling, cog=False))  # soft
    assert plan.tiling.read_ahead == 0 and budget_mod.NO_READ_AHEAD in plan.notes[1]
    assert plan.tiling.tile == 128 and "over the default budget" in plan.notes[-1]


def test_output_names_and_bigtiff_rule():
    assert plan_mod.default_output(Path("/d/scene.tif")) == Path("/d/scene.mask.tif")
    assert plan_mod.prob_output_path(Path("/d/scene.mask.tif")) == Path("/d/scene.prob.tif")
    assert plan_mod.prob_output_path(Path("/d/out.tif")) == Path("/d/out.prob.tif")
    assert not tiff_mod.needs_bigtiff(20_000 * 20_000)  # 400 MB of class indices
    assert tiff_mod.needs_bigtiff(50_000 * 50_000)  # 2.5 GB


def test_class_counts_are_exact_across_count_chunks(monkeypatch):
    from segnet_cli.geo import areas

    rng = np.random.default_rng(3)
    mask = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)
    expected = np.bincount(mask.ravel(), minlength=256)
    # 37 * 53 = 1961 pixels: chunks of 100 leave a partial last chunk.
    monkeypatch.setattr(areas, "COUNT_CHUNK", 100)
    assert np.array_equal(areas.count_values(mask), expected)
    assert areas.count_values(mask[:0]).sum() == 0
