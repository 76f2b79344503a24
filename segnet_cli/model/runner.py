"""What every model runner shares: the interface the pipeline calls.

``segmenter.Segmenter`` (TensorFlow) and ``onnxmodel.OnnxSegmenter`` (ONNX Runtime) both
subclass ``Runner``: the pipeline needs only ``run``, ``batch_tiles``, ``info``,
``num_classes`` and ``stride``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segnet_cli.model.modelfile import ModelInfo


class Runner:
    """A model ready for inference, with its metadata (``info``) and file (``path``)."""

    info: ModelInfo
    path: Path
    devices: list[str | None] = [None]

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def stride(self) -> int:
        return self.info.stride

    def run(self, batch: np.ndarray, output: str = "logits"):
        """Run a batch of same-sized float32 tiles in [0, 1] (see the subclasses)."""
        raise NotImplementedError

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``(B, H, W, K)`` float32 for a batch of same-sized float32 tiles in [0, 1]."""
        return self.run(batch, "logits")

    def batch_tiles(self, batch_size: int) -> int:
        """Tiles per model call: ``batch_size`` for each device, so every device gets work."""
        return max(1, batch_size) * len(self.devices)
