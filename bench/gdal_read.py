"""Is the tifffile reader still leaner than GDAL's for TIFFs? Both timed on the same file.

``segnet tile`` reads TIFFs with its own tifffile reader (layout ``chunked``) and everything
else through GDAL (layout ``gdal``, ``io.gdal.GdalReader``); ``io/gdal.py`` justifies that
choice with this benchmark. It generates a tiled RGB TIFF (streamed, never whole in memory;
``tile_memory.generate``), then reads it band by band (``--rows`` full-width rows at a time,
top to bottom) through ``io.sources.open_reader`` twice, each in its own subprocess so that
peak RSS is the reader's own:

* ``tifffile``: the ``inspect_source`` result, as ``segnet tile`` reads a TIFF;
* ``gdal``: forced through GDAL (``io.gdal.inspect_gdal``; its 64 MiB block cache).

Prints, per reader, the read seconds, MB/s of decoded pixels, peak RSS (polled VmHWM and the
child's ``ru_maxrss``) and its growth during the reads (peak minus the resident set after
the imports and the opening), then the ratios GDAL / tifffile; and checks that both readers
return identical pixels (a checksum of every band). Times are printed, never asserted.

Usage::

    python bench/gdal_read.py                 # 8000 x 8000, bands of 576 rows
    python bench/gdal_read.py --size 2000
    python bench/gdal_read.py --size 20000 --rows 1280 --compression zstd --dir /data/bench
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gis_scene import run_measured  # noqa: E402
from tile_memory import MiB, generate  # noqa: E402

READERS = ("tifffile", "gdal")


def worker(reader_name: str, path: Path, rows: int) -> None:
    """Read ``path`` band by band with one reader; print a JSON line of figures."""
    import numpy as np

    from segnet_cli.io.gdal import inspect_gdal
    from segnet_cli.io.sources import inspect_source, open_reader

    info = inspect_gdal(path) if reader_name == "gdal" else inspect_source(path)
    expected = "gdal" if reader_name == "gdal" else "chunked"
    if info.layout != expected:
        raise SystemExit(f"{reader_name}: layout {info.layout!r}, expected {expected!r}")
    reader = open_reader(info)
    opened = _status_self()
    sums, decoded, hash_seconds = [], 0, 0.0
    t0 = time.perf_counter()
    try:
        for y0 in range(0, info.height, rows):
            band = reader.read_rows(y0, min(info.height, y0 + rows))
            decoded += band.nbytes
            th = time.perf_counter()
            sums.append(hashlib.blake2b(np.ascontiguousarray(band), digest_size=8).hexdigest())
            hash_seconds += time.perf_counter() - th
            del band
    finally:
        reader.close()
    seconds = time.perf_counter() - t0 - hash_seconds
    print(json.dumps({
        "reader": reader_name, "layout": info.layout, "compression": info.compression,
        "chunk_shape": info.chunk_shape, "seconds": seconds, "hash_seconds": hash_seconds,
        "decoded_bytes": decoded, "rss_opened": opened.get("VmRSS", 0),
        "hwm_opened": opened.get("VmHWM", 0), "hwm_end": _status_self().get("VmHWM", 0),
        "checksums": sums,
    }))


def _status_self() -> dict[str, int]:
    """This process's VmRSS and VmHWM in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8000, help="image side in pixels (default 8000)")
    ap.add_argument("--rows", type=int, default=576, help="rows per band read (default 576)")
    ap.add_argument("--tile", type=int, default=256, help="TIFF tile size (default 256)")
    ap.add_argument("--compression", default="zlib", choices=("zlib", "zstd", "none"))
    ap.add_argument("--dir", type=Path, default=None, help="where to write the image (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated image")
    ap.add_argument("--worker", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), args.rows)
        return

    work = args.dir or Path(tempfile.mkdtemp(prefix="segnet-gdalread-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"read-{args.size}-t{args.tile}-{args.compression}.tif"
    made = not src.exists()
    try:
        if made:
            comp = None if args.compression == "none" else args.compression
            gen = generate(src, args.size, comp, tile=args.tile)
            print(f"generated {src} ({args.size} x {args.size} RGB, tiles {args.tile}, "
                  f"{args.compression}, {src.stat().st_size / MiB:,.0f} MiB) in {gen:.1f}s")
        print(f"reading bands of {args.rows} full-width rows, top to bottom; each reader in "
              f"its own process")
        res = {}
        for name in READERS:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(src),
                   "--rows", str(args.rows)]
            wall, hwm, rusage, r = run_measured(cmd)
            peak = max(hwm, rusage, r["hwm_end"])
            r.update(wall=wall, peak=peak, growth=peak - r["rss_opened"])
            res[name] = r
            mbs = r["decoded_bytes"] / r["seconds"] / 1e6
            print(f"{name:>8} ({r['layout']}, {r['compression']}, chunks {r['chunk_shape']}): "
                  f"{r['seconds']:.2f}s reading, {mbs:,.0f} MB/s decoded ({wall:.1f}s process "
                  f"wall); peak RSS {peak / MiB:,.0f} MiB (VmHWM polled {hwm / MiB:,.0f}, "
                  f"ru_maxrss {rusage / MiB:,.0f}; {r['rss_opened'] / MiB:,.0f} MiB after "
                  f"imports and opening, +{r['growth'] / MiB:,.0f} MiB while reading)")
        t, g = res["tifffile"], res["gdal"]
        print(f"GDAL / tifffile: time {g['seconds'] / t['seconds']:.2f}x, peak RSS "
              f"{g['peak'] / t['peak']:.2f}x ({(g['peak'] - t['peak']) / MiB:+,.0f} MiB), "
              f"growth while reading {g['growth'] / MiB:,.0f} vs {t['growth'] / MiB:,.0f} MiB")
        same = t["checksums"] == g["checksums"]
        diff = [i for i, (a, b) in enumerate(zip(t["checksums"], g["checksums"])) if a != b]
        print(f"pixels: {'identical' if same else 'DIFFERENT'} over {len(t['checksums'])} bands"
              + ("" if same else f" (bands differing: {diff[:10]}"
                 f"{', band counts differ' if len(t['checksums']) != len(g['checksums']) else ''})"))
    finally:
        if not args.keep:
            if made:
                src.unlink(missing_ok=True)
            if args.dir is None:
                shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
