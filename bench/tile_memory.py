"""Benchmark `segnet tile`: peak memory measured from outside, speed next to the model's own.

Generates a tiled RGB TIFF (streamed, never whole in memory), runs ``segnet tile`` on it as a
subprocess while polling the child's ``VmHWM`` (peak resident set) from ``/proc``, then
measures the model alone on tiles of the run's own shapes already in memory. Prints:

* peak RSS (polled VmHWM and ``getrusage(RUSAGE_CHILDREN).ru_maxrss``) next to the planner's
  estimate, so the memory model is checked against reality;
* wall time and Mpixel/s of the whole run;
* the model's compute time for the same tiles, and the ratio wall / model compute.

Targets (issue #5): peak RSS under 1.5 GB on a 20000 x 20000 image with the bundled model,
and the whole run within 1.3x of the model's compute.

Usage::

    python bench/tile_memory.py                      # 20000 x 20000, bundled model
    python bench/tile_memory.py --size 3000 --model /tmp/r1/model.keras
    python bench/tile_memory.py --dir /data/bench --keep   # keep the image and the mask
    python bench/tile_memory.py --size 4000 --blend gaussian --memory-only
    python bench/tile_memory.py --size 4000 --probabilities classes --memory-only
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

GB = 1e9
MiB = 1024 * 1024
TARGET_RSS = 1.5 * GB
TARGET_RATIO = 1.3


def generate(path: Path, size: int, compression: str, tile: int = 256, height: int | None = None) -> float:
    """Write a ``size`` wide, ``height`` (default ``size``) tall RGB tiled TIFF tile by tile;
    returns seconds taken.

    The content is a smooth colour field with texture (compressible like an aerial photo,
    not like noise), with GeoTIFF tags so the georeferencing path is exercised.
    """
    import tifffile

    rng = np.random.default_rng(0)
    texture = (rng.normal(0, 12, (tile, tile, 3))).astype(np.float32)
    yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32)

    rows = size if height is None else height

    def tiles():
        for ty in range(0, rows, tile):
            for tx in range(0, size, tile):
                y, x = (yy + ty) / 900.0, (xx + tx) / 1300.0
                r = 120 + 70 * np.sin(y) * np.cos(x)
                g = 110 + 60 * np.sin(0.7 * x + 1.3)
                b = 100 + 50 * np.cos(0.5 * y + 0.8 * x)
                base = np.stack([r, g, b], -1) + np.roll(texture, (ty // 7) % tile, axis=0)
                yield np.clip(base, 0, 255).astype(np.uint8)

    t0 = time.perf_counter()
    tifffile.imwrite(
        path,
        data=tiles(),
        shape=(rows, size, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression=compression,
        bigtiff=rows * size * 3 > 2**31,
        metadata=None,
        extratags=[
            (33550, 12, 3, (0.3, 0.3, 0.0), True),
            (33922, 12, 6, (0.0, 0.0, 0.0, 600000.0, 5000000.0, 0.0), True),
            (34735, 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), True),
        ],
    )
    return time.perf_counter() - t0


def _status(pid: int) -> dict[str, int]:
    """VmHWM, RssAnon and RssFile of a process, in bytes (empty once it has exited)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def run_tile(cmd: list[str]) -> tuple[float, dict[str, int], int, dict]:
    """Run ``cmd``, polling its memory from outside.

    Returns ``(seconds, peaks, rusage_peak, report)``: ``peaks`` holds the largest VmHWM,
    RssAnon (private memory) and RssFile (mapped files: mostly TensorFlow's shared
    libraries) seen while polling every 0.1 s.
    """
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for k, v in _status(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rusage = after.ru_maxrss * 1024
    peaks["cpu_seconds"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        sys.stderr.write(err)
        raise SystemExit(f"segnet tile failed with exit code {proc.returncode}")
    report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return wall, peaks, rusage, report


def model_compute(model: Path, grid, batch_size: int, precision: str, min_seconds: float = 6.0):
    """Seconds the model alone needs for every tile of ``grid`` (tiles already in memory).

    Each window shape is timed on a full batch after two warm-up runs; the total is the
    per-pixel cost of each shape times its pixels. Returns (seconds, CPU seconds, Mpx/s,
    per-shape info).
    """
    from segnet_cli.model.tfload import import_tf

    import_tf()
    from segnet_cli.model.segmenter import Segmenter

    seg = Segmenter(model, precision)
    rng = np.random.default_rng(0)
    total, cpu_total, detail = 0.0, 0.0, []
    shapes = sorted(grid.shapes().items(), key=lambda kv: -kv[1] * kv[0][0] * kv[0][1])
    for (h, w), count in shapes:
        n = min(batch_size, count)
        batch = rng.random((n, h, w, seg.info.in_channels), dtype=np.float32)
        # Warm-up: a shape's first batch runs uncompiled, the second compiles the pooling.
        seg.run(batch, "classes")
        seg.run(batch, "classes")
        runs, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            seg.run(batch, "classes")  # what `segnet tile` runs for a mask
            runs += 1
            # The dominant shape gets a few seconds; rare edge shapes one timed batch.
            if time.perf_counter() - t0 >= (min_seconds if not detail else 0) or runs >= 50:
                break
        per_px = (time.perf_counter() - t0) / (runs * n * h * w)
        cpu_total += (time.process_time() - c0) / (runs * n * h * w) * count * h * w
        total += per_px * count * h * w
        detail.append({"shape": f"{h}x{w}", "tiles": count, "mpx_per_s": 1e-6 / per_px})
    mpx = grid.computed_pixels() / total / 1e6
    return total, cpu_total, mpx, detail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="image side in pixels (default 20000)")
    ap.add_argument("--height", type=int, default=None,
                    help="image height (default: --size); peak memory depends on the width only")
    ap.add_argument("--model", type=Path, default=None, help="model file (default: bundled)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the image (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated image and the mask")
    ap.add_argument("--compression", default="zlib", choices=("zlib", "zstd"), help="input compression")
    ap.add_argument("--tile", type=int, default=None)
    ap.add_argument("--halo", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--blend", default=None, choices=("center", "gaussian"))
    ap.add_argument("--probabilities", default=None, choices=("confidence", "classes"))
    ap.add_argument("--prob-dtype", default=None, choices=("float16", "uint8"))
    ap.add_argument("--memory-only", action="store_true",
                    help="check the memory estimate only; skip timing the model alone")
    args = ap.parse_args()

    from segnet_cli.config import InferenceConfig, TileConfig, TilingConfig, default_model_path
    from segnet_cli.gigapixel import plan_tile

    model = args.model or default_model_path()
    if not model.exists():
        raise SystemExit(f"model not found: {model} (pass --model)")
    work = args.dir or Path(tempfile.mkdtemp(prefix="segnet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    height = args.height or args.size
    name = f"bench-{args.size}" + (f"x{height}" if height != args.size else "")
    src = work / f"{name}.tif"
    out = work / f"{name}.mask.tif"
    try:
        if not src.exists():
            gen = generate(src, args.size, args.compression, height=height)
            print(f"generated {src} ({args.size} x {height} RGB, {args.compression}, "
                  f"{src.stat().st_size / MiB:,.0f} MiB) in {gen:.1f}s")
        given = {"tile": args.tile, "halo": args.halo, "batch_size": args.batch_size,
                 "blend": args.blend}
        tiling = replace(TilingConfig(), **{k: v for k, v in given.items() if v is not None})
        inference = InferenceConfig(model=model, tiling=tiling, precision=args.precision)
        outputs = {"probabilities": args.probabilities}
        if args.prob_dtype:
            outputs["probability_dtype"] = args.prob_dtype
        plan = plan_tile(TileConfig(input=src, out=out, inference=inference,
                                    max_memory_mb=math.inf if args.batch_size else None,
                                    **outputs))
        g = plan.grid
        print(f"grid: {len(g)} tiles ({len(g.rows)} x {len(g.cols)}), tile {g.tile}, halo {g.halo}, "
              f"batch {plan.tiling.batch_size}, blend {plan.tiling.blend}, probabilities "
              f"{args.probabilities or 'none'}, overhead {g.overhead():.2f}x")
        print(f"planner: estimated peak {plan.memory.line()}")

        cmd = [sys.executable, "-m", "segnet_cli", "tile", str(src), "--out", str(out),
               "--model", str(model), "--json", "--overwrite", "--quiet",
               "--tile", str(g.tile), "--halo", str(g.halo), "--blend", str(plan.tiling.blend),
               "--batch-size", str(plan.tiling.batch_size), "--precision", args.precision]
        if args.probabilities:
            cmd += ["--probabilities", args.probabilities]
        if args.prob_dtype:
            cmd += ["--prob-dtype", args.prob_dtype]
        wall, peaks, rusage, report = run_tile(cmd)
        px = args.size * height
        peak_rss = max(peaks["VmHWM"], rusage)
        print(f"segnet tile: {wall:.1f}s wall, {px / wall / 1e6:.3f} Mpx/s "
              f"(in-process: model {report.get('model_seconds', 0):.1f}s, waiting for input "
              f"{report.get('read_wait_seconds', 0):.1f}s, output "
              f"{report.get('write_wait_seconds', 0):.1f}s)")
        print(f"peak RSS: {peak_rss / MiB:,.0f} MiB = {peak_rss / GB:.2f} GB (VmHWM polled "
              f"{peaks['VmHWM'] / MiB:,.0f} MiB, ru_maxrss {rusage / MiB:,.0f} MiB; of it at most "
              f"{peaks['RssFile'] / MiB:,.0f} MiB file-backed, mostly TensorFlow's shared "
              f"libraries; private peak seen {peaks['RssAnon'] / MiB:,.0f} MiB); planner "
              f"estimated {plan.memory.total / MiB:,.0f} MiB "
              f"({(plan.memory.total - peak_rss) / MiB:+,.0f} MiB)")
        print(f"mask: {out} ({out.stat().st_size / MiB:,.1f} MiB)")
        margin = plan.memory.total - peak_rss
        print(f"memory estimate {'covers' if margin >= 0 else 'UNDERESTIMATES'} the measured "
              f"peak: estimated {plan.memory.total / MiB:,.0f} MiB, measured "
              f"{peak_rss / MiB:,.0f} MiB ({margin / peak_rss:+.1%})")
        if args.memory_only:
            return

        compute, cpu, mpx, detail = model_compute(model, g, plan.tiling.batch_size, args.precision)
        shapes = ", ".join(f"{d['shape']} x{d['tiles']}: {d['mpx_per_s']:.3f}" for d in detail)
        print(f"model alone (tiles in memory): {compute:.1f}s for {g.computed_pixels() / 1e6:,.1f} "
              f"Mpx computed, {mpx:.3f} Mpx/s ({shapes})")
        ratio = wall / compute
        stream = report.get("stream_seconds", wall)
        print(f"ratio wall / model compute: {ratio:.2f} (includes process start, TensorFlow "
              f"import, model load and input hashing); streaming part alone "
              f"{stream / compute:.2f} ({stream:.1f}s); CPU time {peaks['cpu_seconds']:.1f}s / "
              f"{cpu:.1f}s = {peaks['cpu_seconds'] / cpu:.2f}")
        ok_rss = peak_rss < TARGET_RSS
        ok_ratio = ratio <= TARGET_RATIO
        print(f"targets: peak RSS < {TARGET_RSS / GB:.1f} GB: {'PASS' if ok_rss else 'FAIL'}; "
              f"wall <= {TARGET_RATIO}x model: {'PASS' if ok_ratio else 'FAIL'}"
              + ("" if args.size >= 20000 else f" (at {args.size} px, not the 20000 px target size)"))
    finally:
        if not args.keep:
            for p in (src, out, out.with_name(out.name.replace(".mask.tif", ".prob.tif"))):
                p.unlink(missing_ok=True)
            if args.dir is None:
                shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
