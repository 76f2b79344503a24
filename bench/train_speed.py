"""Training speed of a SegNet per precision: crops per second for a few steps of ``fit``.

Used to decide whether mixed bfloat16 speeds up training on a CPU with AVX512-BF16.

Usage:
    python bench/train_speed.py float32 0.25 224 8
    python bench/train_speed.py bfloat16 0.25 224 8     # precision width crop batch
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    prec, width, crop, bs = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    from segnet_cli.model.tfload import import_tf

    import_tf()
    import keras

    from segnet_cli.model.network import Architecture, build_segnet

    if prec == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_segnet(Architecture(width=width, num_classes=11))
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    n = bs * 6
    rng = np.random.default_rng(0)
    x = rng.random((n, crop, crop, 3)).astype("float32")
    y = rng.integers(0, 11, (n, crop, crop)).astype("int32")
    w = np.ones((n, crop, crop), "float32")
    model.fit(x, y, sample_weight=w, batch_size=bs, epochs=1, verbose=0)  # warm-up
    t = time.time()
    model.fit(x, y, sample_weight=w, batch_size=bs, epochs=2, verbose=0)
    dt = time.time() - t
    print(f"{prec} width {width} crop {crop} batch {bs}: {2 * n / dt:.2f} crops/s, {model.count_params():,} params")


if __name__ == "__main__":
    main()
