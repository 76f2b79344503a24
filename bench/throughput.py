"""How close does `segnet predict` get to the model itself? Prints its figures.

In one run, for a folder of CamVid-size images and for one large image:

* raw model throughput: the same tiles, already in memory as float32 batches, through
  ``Segmenter.run`` with the output predict asks for (class indices with the default center
  blend), timed after a warm-up that traces and XLA-compiles every tile shape;
* end-to-end throughput of ``run_predict`` (read, decode, tile, batch, stitch, encode, write
  atomically), in-process so the interpreter and TensorFlow start-up are excluded; the
  one-off start-up of a real ``segnet predict`` process is reported separately;
* their ratio (target: >= 0.9 at default settings on the CPU);
* the model's achieved GFLOP/s (analytic convolution FLOPs / raw time) next to the machine's
  float32 matrix-product GFLOP/s measured with TensorFlow (target: >= 70% of it).

With ``--onnx model.onnx`` (the same model exported by ``segnet export --format onnx``), the
ONNX Runtime segmenter is timed on the same tiles and runs, side by side with TensorFlow: the
raw timings alternate between the two within each repetition, so load from other processes
on a shared machine falls on both alike.

Usage:
    python bench/throughput.py [--model PATH] [--images DIR|N] [--large 4000x3000]
                               [--precision float32] [--batch-size N] [--repeat 1]
                               [--onnx PATH]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def matmul_gflops(tf, n: int = 4096, dtype: str = "float32", reps: int = 5) -> float:
    """Best-of-``reps`` GFLOP/s of an n x n matrix product in TensorFlow."""
    a = tf.random.normal((n, n), dtype=dtype)
    b = tf.random.normal((n, n), dtype=dtype)

    @tf.function
    def mm(a, b):
        return tf.reduce_sum(tf.linalg.matmul(a, b))

    mm(a, b).numpy()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        mm(a, b).numpy()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def make_images(folder: Path, n: int, h: int = 360, w: int = 480) -> list[Path]:
    """Synthetic road-like images when no real folder is given (PNG, like CamVid)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        img[: h // 3] = (128, 128, 128)
        img[h // 3 : 2 * h // 3] = (128, 0, 0)
        img[2 * h // 3 :] = (128, 64, 128)
        img = np.clip(img + rng.integers(-30, 30, img.shape), 0, 255).astype(np.uint8)
        p = folder / f"img{i:04d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def raw_model_seconds(seg, paths, tiling, reps: int = 1) -> tuple[float, int, int, list]:
    """Time the model alone on the tiles predict would make.

    Returns:
        ``(seconds, tiles, flops, one_offs)``; ``one_offs`` holds, per batch shape, the extra
        seconds its first batch (uncompiled) and its second (XLA compilation) took over a
        steady batch of that shape: what a fresh process pays once per shape.
    """
    from segnet_cli.io.images import read_image, to_model_input
    from segnet_cli.model.network import Architecture, conv_flops
    from segnet_cli.pipeline import crop
    from segnet_cli.tiling import TileGrid

    arch = Architecture(**{k: seg.info.architecture[k] for k in ("width", "stages", "in_channels", "num_classes")})
    groups: dict[tuple, list[np.ndarray]] = {}
    for p in paths:
        x = to_model_input(read_image(p), seg.info.in_channels)
        grid = TileGrid.make(x.shape[0], x.shape[1], tiling.tile, tiling.halo, seg.stride)
        for t in grid.tiles():
            px = crop(x, t)
            groups.setdefault(px.shape, []).append(px)
    batches = []
    for tiles in groups.values():
        for i in range(0, len(tiles), tiling.batch_size):
            batches.append(np.stack(tiles[i : i + tiling.batch_size]))
    output = "classes" if tiling.blend == "center" else "logits"
    flops = sum(conv_flops(arch, b.shape[1], b.shape[2]) * b.shape[0] for b in batches)
    ntiles = sum(b.shape[0] for b in batches)

    def timed(b) -> float:
        t = time.perf_counter()
        seg.run(b, output)
        return time.perf_counter() - t

    warm: dict[tuple, tuple[float, float]] = {}
    for b in batches:
        if b.shape not in warm:  # warm-up: every shape through both traces, XLA compiled
            warm[b.shape] = (timed(b), timed(b))
    best, steady = float("inf"), {}
    for _ in range(reps):
        total = 0.0
        for b in batches:
            dt = timed(b)
            steady[b.shape] = min(steady.get(b.shape, dt), dt)
            total += dt
        best = min(best, total)
    one_offs = [(shape, first - steady[shape], second - steady[shape]) for shape, (first, second) in warm.items()]
    return best, ntiles, flops, one_offs


def end_to_end_seconds(model, inputs, out: Path, tiling, precision, reps: int = 1) -> tuple[float, float]:
    """Best (total, model-load) seconds of in-process ``run_predict`` runs."""
    from segnet_cli.config import InferenceConfig, PredictConfig
    from segnet_cli.predict import run_predict

    best, load = float("inf"), 0.0
    for _ in range(reps):
        cfg = PredictConfig(
            inputs=tuple(str(p) for p in inputs), out=out, overwrite=True,
            inference=InferenceConfig(model=model, tiling=tiling, precision=precision),
        )
        t = time.perf_counter()
        report = run_predict(cfg)
        total = time.perf_counter() - t
        if total < best:
            best, load = total, report.details["model_load_seconds"]
        assert report.failed == 0, report
    return best, load


def startup_seconds(model: Path | None, image: Path, out: Path) -> float:
    cmd = [sys.executable, "-m", "segnet_cli", "predict", str(image), "--out", str(out), "--overwrite", "-q"]
    if model:
        cmd += ["--model", str(model)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def side_by_side(seg, onnx_seg, args, inputs, n_img: int, px: int, tiling, out: Path) -> None:
    """TensorFlow and ONNX Runtime on the same tiles, alternating, best of ``--repeat``."""
    best = {"tensorflow": float("inf"), "onnxruntime": float("inf")}
    for _ in range(max(1, args.repeat)):
        for name, s in (("tensorflow", seg), ("onnxruntime", onnx_seg)):
            best[name] = min(best[name], raw_model_seconds(s, inputs, tiling, 1)[0])
    total_s, load_s = end_to_end_seconds(args.onnx, inputs, out, tiling, "float32", args.repeat)
    e2e = total_s - load_s
    for name, raw in best.items():
        print(f"  raw model, {name:11s}: {raw:7.2f} s  {n_img / raw:6.2f} images/s  {px / raw / 1e6:6.2f} Mpixel/s")
    print(f"  end to end, onnxruntime: {e2e:7.2f} s  {n_img / e2e:6.2f} images/s  {px / e2e / 1e6:6.2f} Mpixel/s"
          f"  (+ {load_s:.2f} s loading the model once per run)")
    print(f"  ONNX Runtime / TensorFlow raw speed: {best['tensorflow'] / best['onnxruntime']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model file (default: bundled)")
    ap.add_argument("--images", default="40", help="a folder of images, or a number of synthetic 360x480 ones")
    ap.add_argument("--large", default="4000x3000", help="size of the large image, WxH")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="best of N timings")
    ap.add_argument("--onnx", type=Path, default=None,
                    help="also time this exported .onnx model with ONNX Runtime, side by side")
    args = ap.parse_args()

    from segnet_cli.model.tfload import import_tf

    tf = import_tf()
    from dataclasses import replace

    from segnet_cli.config import TilingConfig
    from segnet_cli.model.segmenter import Segmenter

    tiling = TilingConfig()
    if args.batch_size:
        tiling = replace(tiling, batch_size=args.batch_size)
    seg = Segmenter(args.model, args.precision)
    onnx_seg = None
    if args.onnx:
        from segnet_cli.model.onnxmodel import OnnxSegmenter

        onnx_seg = OnnxSegmenter(args.onnx)
        import onnxruntime

        print(f"ONNX Runtime {onnxruntime.__version__} ({', '.join(onnx_seg.providers)}): {args.onnx}")
    tmp = Path(tempfile.mkdtemp(prefix="segnet-bench-"))
    if args.images.isdigit():
        paths = make_images(tmp / "folder", int(args.images))
        src = f"{args.images} synthetic 360x480 PNGs"
    else:
        folder = Path(args.images)
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        src = f"{len(paths)} images from {folder}"
    w, h = (int(v) for v in args.large.lower().split("x"))
    from PIL import Image

    large = tmp / "large" / "large.png"
    large.parent.mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(large, compress_level=1)

    print(f"model: {seg.path.name}  precision: {args.precision}  tile {tiling.tile} halo {tiling.halo} batch {tiling.batch_size}")
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU(s), GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    ceiling = matmul_gflops(tf)
    bf16 = matmul_gflops(tf, dtype="bfloat16") if args.precision == "bfloat16" else None
    print(f"matrix product ceiling (TF, 4096^2 float32): {ceiling:.0f} GFLOP/s" + (f"; bfloat16 {bf16:.0f}" if bf16 else ""))
    print()
    rows = []
    for name, inputs, n_img in (("folder", paths, len(paths)), ("large image", [large], 1)):
        raw_s, ntiles, flops, one_offs = raw_model_seconds(seg, inputs, tiling, args.repeat)
        total_s, load_s = end_to_end_seconds(
            args.model, inputs, tmp / "out" / name.replace(" ", "_"), tiling, args.precision, args.repeat
        )
        e2e_s = total_s - load_s  # the pipeline; loading the model is a one-off per run
        px = sum(np.prod(Image.open(p).size) for p in inputs)
        gflops = flops / raw_s / 1e9
        rows.append((name, n_img, ntiles, raw_s, e2e_s, px, gflops))
        print(f"{name}: {src if name == 'folder' else f'{w}x{h} PNG'}, {ntiles} tiles")
        print(f"  raw model   : {raw_s:7.2f} s  {n_img / raw_s:6.2f} images/s  {px / raw_s / 1e6:6.2f} Mpixel/s")
        print(f"  end to end  : {e2e_s:7.2f} s  {n_img / e2e_s:6.2f} images/s  {px / e2e_s / 1e6:6.2f} Mpixel/s"
              f"  (+ {load_s:.2f} s loading the model once per run)")
        print(f"  ratio       : {raw_s / e2e_s:.3f} of the raw model (target >= 0.9)")
        print(f"  model GFLOP/s: {gflops:.0f} = {gflops / (bf16 or ceiling):.0%} of the matrix-product ceiling (target >= 70%)")
        for shape, first, second in one_offs:
            print(f"  one-off per process, batch shape {shape}: first batch (uncompiled) +{first:.2f} s, "
                  f"second (XLA compilation) +{second:.2f} s")
        print("  (the end-to-end run reuses this process's compilations, as one long run does)")
        if onnx_seg is not None:
            side_by_side(seg, onnx_seg, args, inputs, n_img, px, tiling, tmp / "out" / f"onnx-{name}")
    st = startup_seconds(args.model, paths[0], tmp / "out" / "startup")
    print(f"\none-off start-up of a `segnet predict` process on one image (interpreter, TensorFlow, model): {st:.1f} s")


if __name__ == "__main__":
    main()
