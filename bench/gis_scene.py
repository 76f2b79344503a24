"""Benchmark `segnet tile` for GIS end to end: COG mask, class areas and polygons of a scene.

Generates a georeferenced scene (EPSG:32633, 0.5 m pixels; a tiled, deflate-compressed RGB
GeoTIFF written window by window with rasterio, never whole in memory) whose content
segments into realistic regions: a few land-cover colours in large smooth blobs with mild
texture, all low-frequency value noise computed from global pixel coordinates (seamless
across windows, deterministic by ``--seed``), never per-pixel noise, which would give
millions of one-pixel polygons. Runs ``segnet tile IMAGE --vector IMAGE.gpkg --json`` as a
subprocess while polling its peak resident set from ``/proc``, and prints:

* wall time and Mpx/s, and the run's own figures: model, COG (``finish_rasters_seconds``)
  and polygon (``vector_seconds``) seconds, polygon count;
* peak RSS (polled: the largest of segnet's VmHWM and the sum of VmRSS over segnet and its
  model process, which ``--vector`` starts; and segnet's ``ru_maxrss``) next to the planner's estimate and
  the 1.5 GB target;
* the sizes of the mask, the GeoPackage, ``<stem>.areas.json`` and ``<mask>.aux.xml``;
* checks with GDAL's own tools when they are installed (each says "skipped" otherwise):
  GDAL's COG validator on the mask, ``gdalinfo`` (CRS, pixel size, overviews, nodata),
  ``validate_gpkg`` on the GeoPackage, and the per-class sums of the polygons' pixels
  (``ogrinfo -sql``) against the report's per-class pixels.

``--half-nodata`` makes the left half of the scene nodata (0 in every band, GDAL nodata 0
declared) and runs twice in one invocation, so the times are comparable: on the scene as
written (all-nodata tiles are not run) and on an identical copy whose nodata tag is removed
(every tile runs); it prints both wall times, the skipped tiles and the time saved.

Targets (the GIS issue): peak RSS under 1.5 GB on a 20000 x 20000 scene with the bundled
model, COG and polygons included; a valid COG and GeoPackage whose polygons add up to the
report's pixels exactly. Times are printed, never asserted.

Usage::

    python bench/gis_scene.py                        # 20000 x 20000, bundled model
    python bench/gis_scene.py --half-nodata          # also: time saved by declared nodata
    python bench/gis_scene.py --size 1500 --model /tmp/tiny.keras
    python bench/gis_scene.py --dir /data/bench --keep   # keep the scene and the outputs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tile_memory import GB, TARGET_RSS, MiB, _status  # noqa: E402

#: The system Python that has GDAL's own Python utilities (osgeo_utils).
GDAL_PYTHON = "/usr/bin/python3"
CRS = "EPSG:32633"
PIXEL_M = 0.5
ORIGIN = (400000.0, 5300000.0)  # UTM 33N, central Europe
BLOCK = 512

#: Land-cover colours (RGB) the scene is painted with.
COVER = {
    "water": (38, 68, 112),
    "forest": (40, 84, 44),
    "grass": (118, 152, 72),
    "soil": (152, 122, 88),
    "built": (142, 140, 138),
}


# --------------------------------------------------------------------------------------
# The scene
# --------------------------------------------------------------------------------------


def _lattice(iy: np.ndarray, ix: np.ndarray, seed: int, octave: int) -> np.ndarray:
    """Uniform [0, 1) values at integer lattice points, a hash of (point, seed, octave).

    No state: any window computes the same values for the same points, so the noise is
    seamless across windows and never held for the whole image.
    """
    y = iy.astype(np.uint64)[:, None]
    x = ix.astype(np.uint64)[None, :]
    h = (y * np.uint64(0x9E3779B1) + x * np.uint64(0x85EBCA77)
         + np.uint64((seed * 0x27D4EB2F + octave * 0x165667B1) & 0xFFFFFFFF))
    h &= np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x2C1B3C6D)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(12)
    h = (h * np.uint64(0x297A2D39)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(15)
    return (h.astype(np.float64) / 2.0**32).astype(np.float32)


def value_noise(y0: int, y1: int, x0: int, x1: int, spacing: int, seed: int, octave: int):
    """Value noise of one lattice ``spacing`` on the window rows [y0, y1), cols [x0, x1).

    Lattice values interpolated with a smoothstep, separably (rows, then columns): a
    function of global coordinates only, in [0, 1].
    """
    ys = np.arange(y0, y1, dtype=np.float64) / spacing
    xs = np.arange(x0, x1, dtype=np.float64) / spacing
    iy0, ix0 = int(ys[0]), int(xs[0])
    ly = np.arange(iy0, int(ys[-1]) + 2)
    lx = np.arange(ix0, int(xs[-1]) + 2)
    lat = _lattice(ly, lx, seed, octave)  # (lattice rows, lattice cols)
    fy, fx = ys - np.floor(ys), xs - np.floor(xs)
    fy = (fy * fy * (3 - 2 * fy)).astype(np.float32)[:, None]
    fx = (fx * fx * (3 - 2 * fx)).astype(np.float32)[None, :]
    ry = np.floor(ys).astype(np.intp) - iy0
    rx = np.floor(xs).astype(np.intp) - ix0
    rows = lat[ry] * (1 - fy) + lat[ry + 1] * fy  # (h, lattice cols)
    return rows[:, rx] * (1 - fx) + rows[:, rx + 1] * fx


def fbm(y0, y1, x0, x1, spacings, seed: int, base_octave: int) -> np.ndarray:
    """Octaves of value noise (amplitude halving with each), normalised to about [0, 1]."""
    total = np.zeros((y1 - y0, x1 - x0), np.float32)
    amp, norm = 1.0, 0.0
    for i, s in enumerate(spacings):
        total += amp * value_noise(y0, y1, x0, x1, s, seed, base_octave + i)
        norm += amp
        amp *= 0.5
    total /= norm
    return total


def scene_window(y0: int, y1: int, x0: int, x1: int, size: int, seed: int,
                 half_nodata: bool) -> np.ndarray:
    """The scene's pixels on one window, as ``(3, rows, cols)`` uint8 (rasterio's order).

    Land cover by thresholds on two smooth fields ("elevation" for water, "moisture" for
    the rest), colour per cover, then a mild low-frequency brightness texture. Valid pixels
    are never 0 in every band; with ``half_nodata`` the left half is 0 (nodata).
    """
    # Lattice spacings in pixels (0.5 m): lakes and fields of a few hundred metres.
    elev = fbm(y0, y1, x0, x1, (1024, 256, 64), seed, 0)
    moist = fbm(y0, y1, x0, x1, (768, 192, 48), seed, 10)
    cover = np.full(elev.shape, 2, np.uint8)  # grass
    cover[moist > 0.58] = 1  # forest
    cover[moist < 0.40] = 3  # soil
    cover[(moist >= 0.47) & (moist <= 0.51) & (elev > 0.5)] = 4  # built (along a contour)
    cover[elev < 0.36] = 0  # water
    del moist
    colours = np.array(list(COVER.values()), np.float32)  # (5, 3)
    texture = 24 * (fbm(y0, y1, x0, x1, (48, 12), seed, 20) - 0.5)
    out = np.empty((3, y1 - y0, x1 - x0), np.uint8)
    for c in range(3):
        band = colours[cover, c] + texture
        np.clip(band, 1, 255, out=band)
        out[c] = band
    if half_nodata and x0 < size // 2:
        out[:, :, : min(x1, size // 2) - x0] = 0
    return out


def generate(path: Path, size: int, seed: int, half_nodata: bool) -> float:
    """Write the scene as a tiled deflate GeoTIFF, window by window; returns seconds taken."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
        "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK, "compress": "deflate",
        "photometric": "RGB", "interleave": "pixel", "bigtiff": "IF_SAFER",
        "crs": CRS, "transform": from_origin(*ORIGIN, PIXEL_M, PIXEL_M),
        "nodata": 0 if half_nodata else None, "num_threads": "ALL_CPUS",
    }
    cols = 4 * BLOCK  # windows of 512 rows x 2048 cols: a few MB of temporaries
    t0 = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=128), rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, size, BLOCK):
            y1 = min(size, y0 + BLOCK)
            for x0 in range(0, size, cols):
                x1 = min(size, x0 + cols)
                ds.write(scene_window(y0, y1, x0, x1, size, seed, half_nodata),
                         window=Window(x0, y0, x1 - x0, y1 - y0))
    return time.perf_counter() - t0


def copy_without_nodata(src: Path, dst: Path) -> None:
    """``dst``: ``src``'s bytes with the GDAL nodata tag removed (pixels untouched)."""
    import rasterio

    shutil.copyfile(src, dst)
    with rasterio.open(dst, "r+") as ds:
        ds.nodata = None
    with rasterio.open(dst) as ds:
        if any(v is not None for v in ds.nodatavals):
            raise SystemExit(f"could not remove the nodata tag from {dst}")


# --------------------------------------------------------------------------------------
# Running segnet
# --------------------------------------------------------------------------------------


def run_measured(cmd: list[str]) -> tuple[float, int, int, dict]:
    """Run ``cmd``, polling its VmHWM from outside; ``(seconds, polled VmHWM, ru_maxrss,
    report)``.

    ``ru_maxrss`` is this child's own (``os.wait4``), not the maximum over every child so
    far that ``getrusage(RUSAGE_CHILDREN)`` gives, so two runs in one invocation each get
    their own figure.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hwm = [0, 0]  # the process's own VmHWM; the largest sum of VmRSS over it and its children
    texts: dict[str, str] = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            hwm[0] = max(hwm[0], _status(proc.pid).get("VmHWM", 0))
            hwm[1] = max(hwm[1], sum(_rss(pid) for pid in _tree(proc.pid)))
            time.sleep(0.1)

    def drain(name: str, stream) -> None:
        texts[name] = stream.read()

    threads = [threading.Thread(target=poll, daemon=True),
               threading.Thread(target=drain, args=("out", proc.stdout), daemon=True),
               threading.Thread(target=drain, args=("err", proc.stderr), daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    for t in threads:
        t.join()
    if proc.returncode != 0:
        sys.stderr.write(texts.get("err", ""))
        raise SystemExit(f"{' '.join(cmd[1:4])} ... failed with exit code {proc.returncode}")
    out = texts.get("out", "").strip()
    report = json.loads(out.splitlines()[-1]) if out else {}
    # With --vector the model runs in a child process: the tree's sum is the figure.
    return wall, max(hwm), usage.ru_maxrss * 1024, report


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``/proc/PID/task/PID/children``, Linux)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return [pid] + [q for k in kids for q in _tree(int(k))]


def _rss(pid: int) -> int:
    """Current VmRSS of ``pid`` in bytes (0 once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


#: ``segnet`` as installed.
SEGNET = [sys.executable, "-m", "segnet_cli"]
#: ``segnet`` with fiona (its GDAL and SQLite) loaded before TensorFlow. TensorFlow's
#: ``libtensorflow_cc.so.2`` exports a SQLite of its own (``sqlite3_*``, no R*Tree module);
#: loaded first, it is the SQLite fiona's GDAL ends up calling, and writing a GeoPackage fails
#: with "no such module: rtree". Only used when the probe below finds ``segnet tile --vector
#: x.gpkg`` failing that way.
SEGNET_FIONA_FIRST = [sys.executable, "-c",
                      "import sys, fiona; from segnet_cli.cli import main; "
                      "sys.argv[0] = 'segnet'; main()"]


def segnet_cmd(src: Path, mask: Path, gpkg: Path, model: Path | None,
               launcher: list[str], tile: int | None = None) -> list[str]:
    cmd = [*launcher, "tile", str(src), "--out", str(mask), "--vector", str(gpkg), "--json",
           "--overwrite", "--quiet"]
    if model is not None:
        cmd += ["--model", str(model)]
    if tile is not None:
        cmd += ["--tile", str(tile)]
    return cmd


def probe_gpkg(work: Path, model: Path | None, seed: int) -> list[str]:
    """The launcher to benchmark with: ``segnet`` itself, unless a 256 px probe run shows
    ``--vector x.gpkg`` failing on the R*Tree module (then fiona is loaded first, and the
    failure is reported: it would otherwise come only after the whole full-size run)."""
    probe = work / "probe-256.tif"
    outs = [probe, work / "probe-256.mask.tif", work / "probe-256.gpkg",
            work / "probe-256.mask.tif.aux.xml", work / "probe-256.areas.json"]
    try:
        generate(probe, 256, seed, False)
        cmd = segnet_cmd(probe, outs[1], outs[2], model, SEGNET)
        r = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        for p in outs:
            p.unlink(missing_ok=True)
    if r.returncode == 0:
        print("probe: segnet tile --vector x.gpkg works as installed")
        return SEGNET
    if "rtree" in r.stderr:
        msg = " ".join(r.stderr.split())[:300]
        print(f"probe: SEGNET BUG: segnet tile --vector x.gpkg fails here ({msg}): TensorFlow, "
              "imported before fiona, brings its own SQLite without R*Tree; benchmarking with "
              "fiona imported first (WORKAROUND, same code otherwise)")
        return SEGNET_FIONA_FIRST
    sys.stderr.write(r.stderr)
    raise SystemExit(f"probe run of segnet tile failed with exit code {r.returncode}")


def _size(path: Path) -> str:
    return f"{path.stat().st_size / MiB:,.2f} MiB" if path.exists() else "missing"


def print_run(label: str, px: int, wall: float, hwm: int, rusage: int, report: dict,
              mask: Path, gpkg: Path) -> None:
    """The run's figures: time, memory against the plan and the target, sizes."""
    peak = max(hwm, rusage)
    est = report.get("plan", {}).get("memory_bytes", {}).get("total")
    areas = report.get("areas") or {}
    polygons = (areas.get("vector") or {}).get("polygons")

    def sec(key: str) -> str:
        v = report.get(key)
        return "n/a" if v is None else f"{v:.1f}s"

    print(f"[{label}] segnet tile: {wall:.1f}s wall, {px / wall / 1e6:.3f} Mpx/s "
          f"(stream {sec('stream_seconds')}, model {sec('model_seconds')}, COG "
          f"{sec('finish_rasters_seconds')}, polygons {sec('vector_seconds')}; "
          f"{report.get('tiles', '?')} tiles, {report.get('skipped_tiles', 0)} skipped)")
    rss_self = report.get("peak_rss_bytes")
    print(f"[{label}] peak RSS: {peak / MiB:,.0f} MiB = {peak / GB:.2f} GB (polled, the "
          f"process and its model process together "
          f"{hwm / MiB:,.0f} MiB, ru_maxrss {rusage / MiB:,.0f} MiB"
          + (f", segnet's own {rss_self / MiB:,.0f} MiB" if rss_self else "") + ")"
          + ("" if est is None else
             f"; planner estimated {est / MiB:,.0f} MiB ({(est - peak) / MiB:+,.0f} MiB, "
             f"{'covers' if est >= peak else 'UNDERESTIMATES'})")
          + f"; target < {TARGET_RSS / GB:.1f} GB: {'PASS' if peak < TARGET_RSS else 'FAIL'}")
    stem = mask.name[: -len(".mask.tif")] if mask.name.endswith(".mask.tif") else mask.stem
    report_json = mask.with_name(f"{stem}.areas.json")
    aux = mask.with_name(mask.name + ".aux.xml")
    print(f"[{label}] polygons: {polygons if polygons is not None else 'n/a'}; files: mask "
          f"{_size(mask)}, gpkg {_size(gpkg)}, areas.json {_size(report_json)}, "
          f"aux.xml {_size(aux)}")


# --------------------------------------------------------------------------------------
# Checks with GDAL's own tools
# --------------------------------------------------------------------------------------


def _tool(*cmd: str, timeout: float = 1800) -> subprocess.CompletedProcess | None:
    """Run a GDAL tool (under the caller's niceness); ``None`` when it is not installed."""
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, -1, "", f"timed out after {timeout:.0f}s")
    except OSError:
        return None


def _gdal_python_has(module: str) -> bool:
    if not Path(GDAL_PYTHON).exists():
        return False
    probe = _tool(GDAL_PYTHON, "-c", f"import {module}")
    return probe is not None and probe.returncode == 0


def check_cog(mask: Path) -> str:
    module = "osgeo_utils.samples.validate_cloud_optimized_geotiff"
    if not _gdal_python_has(module):
        return "skipped (no osgeo_utils for the system Python)"
    r = _tool(GDAL_PYTHON, "-m", module, "--full-check=yes", str(mask))
    if r is None:
        return "skipped (the system Python could not be run)"
    text = " ".join((r.stdout + r.stderr).split())
    return f"{'PASS' if r.returncode == 0 else 'FAIL'}: {text[:400]}"


def check_gdalinfo(mask: Path, nodata_expected: bool) -> str:
    r = _tool("gdalinfo", "-json", str(mask))
    if r is None:
        return "skipped (gdalinfo not installed)"
    if r.returncode != 0:
        return f"FAIL: {r.stderr.strip()[:300]}"
    info = json.loads(r.stdout)
    band = info["bands"][0]
    epsg = "32633" in json.dumps(info.get("coordinateSystem", {}))
    gt = info.get("geoTransform", [0, 0, 0, 0, 0, 0])
    pixel_ok = abs(gt[1] - PIXEL_M) < 1e-9 and abs(gt[5] + PIXEL_M) < 1e-9
    origin_ok = abs(gt[0] - ORIGIN[0]) < 1e-6 and abs(gt[3] - ORIGIN[1]) < 1e-6
    overviews = len(band.get("overviews", []))
    nodata = band.get("noDataValue")
    cats = len(band.get("categories", []))
    layout = info.get("metadata", {}).get("IMAGE_STRUCTURE", {}).get("LAYOUT")
    ok = epsg and pixel_ok and origin_ok and overviews > 0 and layout == "COG" and cats > 0 and (
        (nodata is not None) == nodata_expected)
    return (f"{'PASS' if ok else 'FAIL'}: EPSG:32633 {epsg}, pixel {gt[1]} x {gt[5]} m, "
            f"origin {'kept' if origin_ok else 'MOVED'}, layout {layout}, {overviews} "
            f"overviews, nodata {nodata}, {cats} category names (aux.xml)")


def check_gpkg(gpkg: Path) -> str:
    module = "osgeo_utils.samples.validate_gpkg"
    if not _gdal_python_has(module):
        return "skipped (no osgeo_utils for the system Python)"
    r = _tool(GDAL_PYTHON, "-m", module, str(gpkg))
    if r is None:
        return "skipped (the system Python could not be run)"
    text = " ".join((r.stdout + r.stderr).split())
    return f"{'PASS' if r.returncode == 0 else 'FAIL'}{': ' + text[:400] if text else ''}"


SUMS_SQL = ('SELECT "class", COUNT(*) AS n, SUM(pixels) AS px, SUM(area) AS area '
            'FROM classes GROUP BY "class" ORDER BY "class"')


def polygon_sums(gpkg: Path) -> tuple[str, dict[int, tuple[int, int, float]]] | None:
    """Per class: (polygons, pixels, area) summed over the GeoPackage's polygons.

    Through ``ogrinfo -sql`` when installed; else SQLite itself (a GeoPackage is one).
    """
    r = _tool("ogrinfo", "-ro", "-q", "-sql", SUMS_SQL, str(gpkg))
    if r is not None and r.returncode == 0:
        sums: dict[int, tuple[int, int, float]] = {}
        for block in r.stdout.split("OGRFeature")[1:]:
            f = dict(re.findall(r"^\s+(\w+) \([^)]*\) = (.*)$", block, re.M))
            sums[int(f["class"])] = (int(f["n"]), int(f["px"]), float(f["area"]))
        return "ogrinfo -sql", sums
    try:
        with sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True) as db:
            rows = db.execute(SUMS_SQL).fetchall()
    except sqlite3.Error:
        return None
    return "sqlite3 (ogrinfo not installed)", {int(c): (n, p, a) for c, n, p, a in rows}


def check_sums(gpkg: Path, report: dict) -> list[str]:
    got = polygon_sums(gpkg)
    if got is None:
        return ["skipped (no ogrinfo, and the GeoPackage could not be read with sqlite3)"]
    how, sums = got
    areas = report.get("areas") or {}
    pixel_m2 = areas.get("pixel_area_m2")
    lines, ok = [], True
    for row in areas.get("classes", []):
        k, want = row["class"], row["pixels"]
        n, px, area = sums.pop(k, (0, 0, 0.0))
        ok &= px == want
        rel = "" if pixel_m2 is None or not want else (
            f", area {area:,.1f} m² vs report {row.get('area_m2', 0):,.1f} m²")
        lines.append(f"  class {k} {row['name']!r}: {n:,} polygons, {px:,} px vs report "
                     f"{want:,} px {'ok' if px == want else 'MISMATCH'}{rel}")
    for k, (n, px, _) in sums.items():
        ok = False
        lines.append(f"  class {k}: {n:,} polygons, {px:,} px not in the report")
    head = f"{'PASS' if ok else 'FAIL'} ({how}): polygons' pixels per class vs the report"
    return [head, *lines]


def run_checks(label: str, mask: Path, gpkg: Path, report: dict, nodata: bool) -> None:
    print(f"[{label}] check COG validator: {check_cog(mask)}")
    print(f"[{label}] check gdalinfo: {check_gdalinfo(mask, nodata)}")
    print(f"[{label}] check validate_gpkg: {check_gpkg(gpkg)}")
    for line in check_sums(gpkg, report):
        print(f"[{label}] check sums: {line}" if not line.startswith("  ") else line)


# --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="scene side in pixels (default 20000)")
    ap.add_argument("--model", type=Path, default=None, help="model file (default: bundled)")
    ap.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    ap.add_argument("--tile", type=int, default=None,
                    help="segnet's --tile (default: segnet's own, 1024)")
    ap.add_argument("--half-nodata", action="store_true",
                    help="left half nodata; run with and without the nodata tag, compare")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where to write the scene and outputs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scene and the outputs")
    args = ap.parse_args()

    if args.model is not None and not args.model.exists():
        raise SystemExit(f"model not found: {args.model}")
    work = args.dir or Path(tempfile.mkdtemp(prefix="segnet-gis-"))
    work.mkdir(parents=True, exist_ok=True)
    name = f"scene-{args.size}-s{args.seed}" + ("-halfnodata" if args.half_nodata else "")
    src = work / f"{name}.tif"
    runs = [("nodata" if args.half_nodata else "scene", src, args.half_nodata)]
    if args.half_nodata:
        runs.append(("no tag", work / f"{name}-notag.tif", False))
    made: list[Path] = []
    px = args.size * args.size
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        if not src.exists():
            made.append(src)
            gen = generate(src, args.size, args.seed, args.half_nodata)
            print(f"generated {src} ({args.size} x {args.size} RGB, deflate, {CRS}, "
                  f"{PIXEL_M} m, {src.stat().st_size / MiB:,.0f} MiB"
                  + (", left half nodata = 0" if args.half_nodata else "") + f") in {gen:.1f}s")
        if args.half_nodata and not runs[1][1].exists():
            made.append(runs[1][1])
            copy_without_nodata(src, runs[1][1])
            print(f"copied to {runs[1][1]} without the nodata tag")

        launcher = probe_gpkg(work, args.model, args.seed)
        results = {}
        for label, image, nodata in runs:
            mask = image.with_name(f"{image.stem}.mask.tif")
            gpkg = image.with_name(f"{image.stem}.gpkg")
            made += [mask, gpkg, mask.with_name(mask.name + ".aux.xml"),
                     image.with_name(f"{image.stem}.areas.json")]
            wall, hwm, rusage, report = run_measured(
                segnet_cmd(image, mask, gpkg, args.model, launcher, args.tile))
            results[label] = (wall, report)
            print_run(label, px, wall, hwm, rusage, report, mask, gpkg)
            run_checks(label, mask, gpkg, report, nodata)

        if args.half_nodata:
            (t_nd, r_nd), (t_all, r_all) = results["nodata"], results["no tag"]
            m_nd, m_all = r_nd.get("model_seconds", 0), r_all.get("model_seconds", 0)
            print(f"half nodata: declared {t_nd:.1f}s ({r_nd.get('skipped_tiles', 0)} of "
                  f"{r_nd.get('tiles', '?')} tiles skipped, model {m_nd:.1f}s) vs no tag "
                  f"{t_all:.1f}s ({r_all.get('skipped_tiles', 0)} skipped, model {m_all:.1f}s): "
                  f"time ratio {t_nd / t_all:.2f}, saved {t_all - t_nd:.1f}s "
                  f"({1 - t_nd / t_all:.0%}); model time ratio "
                  + (f"{m_nd / m_all:.2f}" if m_all else "n/a"))
        if args.size < 20000:
            print(f"(at {args.size} px, not the 20000 px target size)")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"all children's largest ru_maxrss (getrusage RUSAGE_CHILDREN): "
              f"{max(after.ru_maxrss, before.ru_maxrss) * 1024 / MiB:,.0f} MiB")
    finally:
        if not args.keep:
            for p in made:
                p.unlink(missing_ok=True)
            if args.dir is None:
                shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
