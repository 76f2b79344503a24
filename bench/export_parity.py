"""Do exported models segment like `segnet predict`? Prints the README's parity table.

Exports a model (default: the bundled one) to ONNX, SavedModel and LiteRT, runs each file
with its own runtime (ONNX Runtime, ``tf.saved_model.load``, the LiteRT interpreter) on
whole images, and compares the argmax of its probabilities with the masks `segnet predict`
writes for the same images. Images: real photos (default: the shipped examples) and sizes
cut or resized from the first of them: 37x53, 1x300, and one large enough that predict
tiles it (1100x1500 at the default 1024 tile). Predict runs with a halo of half the
receptive field, which makes a tiled mask equal to the whole-image mask, so the comparison
measures the export and nothing else. One more row runs `segnet predict --model x.onnx`
(ONNX Runtime inside segnet's own tiling) against the .keras masks.

Usage:
    python bench/export_parity.py [--model PATH] [--photos DIR] [--large 1100x1500]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FORMATS = {"onnx": "model.onnx", "saved_model": "model_savedmodel", "litert": "model.tflite"}


def make_inputs(photos: list[Path], folder: Path, large: tuple[int, int]) -> list[Path]:
    """The photos as PNGs, plus odd sizes cut or resized from the first one."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in photos:
        dst = folder / f"{p.stem}.png"
        Image.open(p).convert("RGB").save(dst)
        out.append(dst)
    base = np.asarray(Image.open(photos[0]).convert("RGB"))
    h0, w0 = base.shape[:2]
    cuts = {
        "crop-37x53": base[h0 // 3 : h0 // 3 + 37, w0 // 4 : w0 // 4 + 53],
        "row-1x300": base[h0 // 2 : h0 // 2 + 1, 40:340],
    }
    for name, arr in cuts.items():
        Image.fromarray(np.ascontiguousarray(arr)).save(folder / f"{name}.png")
        out.append(folder / f"{name}.png")
    lh, lw = large
    big = Image.fromarray(base).resize((lw, lh), Image.BILINEAR)
    big.save(folder / f"resized-{lh}x{lw}.png")
    out.append(folder / f"resized-{lh}x{lw}.png")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model file (default: bundled)")
    ap.add_argument("--photos", type=Path, default=Path(__file__).resolve().parents[1] / "examples")
    ap.add_argument("--large", default="1100x1500", help="HxW of the image predict tiles")
    args = ap.parse_args()

    from PIL import Image

    from segnet_cli.config import (
        ExportConfig,
        ExportFormat,
        InferenceConfig,
        PredictConfig,
        TilingConfig,
    )
    from segnet_cli.export import export_model, runner
    from segnet_cli.model.modelfile import read_info, resolve_model_path
    from segnet_cli.model.tfload import import_tf
    from segnet_cli.predict import run_predict
    from segnet_cli.tiling import TileGrid

    import_tf()
    source = resolve_model_path(args.model)
    info = read_info(source)
    tmp = Path(tempfile.mkdtemp(prefix="segnet-export-parity-"))
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    large = tuple(int(v) for v in args.large.lower().split("x"))
    images = make_inputs(photos, tmp / "in", large)

    halo = info.receptive_field // 2
    tiling = TilingConfig(halo=halo)
    report = run_predict(PredictConfig(
        inputs=(str(tmp / "in"),), out=tmp / "masks-keras",
        inference=InferenceConfig(model=source, tiling=tiling)))
    assert report.failed == 0, report

    print(f"model: {source.name} (receptive field {info.receptive_field} px; predict: tile "
          f"{tiling.tile}, halo {halo})")
    rows: dict[str, dict[str, tuple[int, int]]] = {}
    for fmt, file_name in FORMATS.items():
        out = tmp / file_name
        export_model(ExportConfig(out=out, format=fmt, model=source))
        run = runner(ExportFormat(fmt), out)
        for img in images:
            x = (np.asarray(Image.open(img).convert("RGB"), np.float32) / 255.0)[None]
            mask = np.asarray(Image.open(tmp / "masks-keras" / f"{img.stem}.png"))
            got = np.asarray(run(x))[0].argmax(-1)
            rows.setdefault(img.stem, {})[fmt] = (int((got == mask).sum()), mask.size)
    # segnet itself running the .onnx file: its tiling, its stitching.
    report = run_predict(PredictConfig(
        inputs=(str(tmp / "in"),), out=tmp / "masks-onnx",
        inference=InferenceConfig(model=tmp / FORMATS["onnx"], tiling=tiling)))
    assert report.failed == 0, report
    for img in images:
        a = np.asarray(Image.open(tmp / "masks-keras" / f"{img.stem}.png"))
        b = np.asarray(Image.open(tmp / "masks-onnx" / f"{img.stem}.png"))
        rows[img.stem]["predict --model .onnx"] = (int((a == b).sum()), a.size)

    columns = list(FORMATS) + ["predict --model .onnx"]
    print("\n| image | size | predict tiles | " + " | ".join(columns) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |")
    totals = {c: [0, 0] for c in columns}
    for img in images:
        h, w = Image.open(img).size[::-1]
        tiles = len(TileGrid.make(h, w, tiling.tile, halo, info.stride))
        cells = []
        for c in columns:
            agree, n = rows[img.stem][c]
            totals[c][0] += agree
            totals[c][1] += n
            cells.append(f"{100 * agree / n:.3f}%" + ("" if agree == n else f" ({n - agree} px)"))
        print(f"| {img.stem} | {h}x{w} | {tiles} | " + " | ".join(cells) + " |")
    print("| **all pixels** | | | " + " | ".join(
        f"**{100 * a / n:.4f}%** of {n:,}" for a, n in totals.values()) + " |")


if __name__ == "__main__":
    main()
