"""Choose the default tile and halo by measurement: agreement of tiled with whole-image masks.

Builds large scenes by tiling real photos into a mosaic (default: 3x3 CamVid val images,
1080x1440 px, so the content is real street scenes rather than noise), segments each scene
once whole and then with every (tile, halo) setting, and prints the share of pixels where the
tiled mask equals the whole-image mask, with the compute overhead of the overlap.

Usage:
    python bench/tiling_agreement.py [--model PATH] [--images DIR] [--scenes 3]
                                     [--tiles 512,1024] [--halos 0,32,64,96,128,160,192]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DEFAULT_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid" / "val"


def mosaics(folder: Path, n: int, grid: int = 3):
    """``n`` mosaics of ``grid`` x ``grid`` images each, as float32 arrays in [0, 1]."""
    from segnet_cli.io.images import read_image, to_model_input

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    rng = np.random.default_rng(0)
    for _ in range(n):
        pick = rng.choice(len(paths), grid * grid, replace=False)
        imgs = [to_model_input(read_image(paths[i]), 3) for i in pick]
        rows = [np.concatenate(imgs[r * grid : (r + 1) * grid], axis=1) for r in range(grid)]
        yield np.concatenate(rows, axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--tiles", default="512,1024")
    ap.add_argument("--halos", default="0,32,64,96,128,160,192")
    args = ap.parse_args()

    from segnet_cli.model.tfload import import_tf

    import_tf()
    from segnet_cli.config import TilingConfig
    from segnet_cli.model.segmenter import Segmenter
    from segnet_cli.pipeline import segment_image
    from segnet_cli.tiling import TileGrid

    seg = Segmenter(args.model)
    print(f"model {seg.path.name}: stride {seg.stride}, receptive field {seg.info.receptive_field} px")
    scenes = list(mosaics(args.images, args.scenes))
    print(f"{len(scenes)} scenes of {scenes[0].shape[1]}x{scenes[0].shape[0]} px (3x3 mosaics of {args.images.name}/)")
    wholes = []
    t = time.perf_counter()
    for s in scenes:
        wholes.append(np.argmax(seg.logits(s[None])[0], -1))
    whole_s = (time.perf_counter() - t) / len(scenes)
    print(f"whole-image inference: {whole_s:.2f} s per scene\n")
    print(f"{'tile':>5} {'halo':>5} {'tiles':>6} {'overhead':>9} {'agreement %':>12} {'min %':>8} {'s/scene':>8}")
    for tile in (int(v) for v in args.tiles.split(",")):
        for halo in (int(v) for v in args.halos.split(",")):
            tiling = TilingConfig(tile=tile, halo=halo)
            try:
                grid = TileGrid.make(*scenes[0].shape[:2], tiling.tile, tiling.halo, seg.stride)
            except Exception as exc:  # a halo too large for the tile
                print(f"{tile:>5} {halo:>5}  skipped: {exc}")
                continue
            agree = []
            t = time.perf_counter()
            for s, ref in zip(scenes, wholes):
                mask, _ = segment_image(seg, s, tiling)
                agree.append(float((mask == ref).mean()))
            dt = (time.perf_counter() - t) / len(scenes)
            print(
                f"{grid.tile:>5} {grid.halo:>5} {len(grid):>6} {grid.overhead():>9.2f} "
                f"{100 * np.mean(agree):>12.4f} {100 * min(agree):>8.4f} {dt:>8.2f}"
            )


if __name__ == "__main__":
    main()
