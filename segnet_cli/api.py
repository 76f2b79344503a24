"""The Python API: segnet's masks in a notebook or a script, the same as the CLI writes.

    >>> import segnet_cli
    >>> model = segnet_cli.load_model()          # the bundled model, or a path
    >>> mask = model.segment(image)              # (H, W) uint8 class indices
    >>> model.class_names[mask[0, 0]]

``Model.segment`` runs the one pipeline (``pipeline.segment_image``) with the CLI's default
tiling, so an image larger than a tile is tiled and stitched exactly as ``segnet predict``
does: the returned mask equals the PNG that ``segnet predict`` writes for the same file.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from segnet_cli.config import TTA, Blend, Precision, TilingConfig
from segnet_cli.model.modelfile import ModelInfo


class Model:
    """A segnet model loaded for inference (see ``load_model``).

    Attributes:
        info: the model file's metadata (classes, colours, input scaling, training figures).
        path: the model file.
    """

    def __init__(self, segmenter, tiling: TilingConfig, tta: TTA = TTA.NONE) -> None:
        self._seg = segmenter
        self.tiling = tiling
        self.tta = TTA.parse(tta, "tta")

    @property
    def info(self) -> ModelInfo:
        return self._seg.info

    @property
    def path(self) -> Path:
        return self._seg.path

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.info.class_names)

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        """The class colours (RGB), index by index."""
        return [tuple(c) for c in self.info.palette]

    def segment(
        self,
        image: np.ndarray | str | Path,
        *,
        tile: int | None = None,
        halo: int | None = None,
        blend: Blend | str | None = None,
        confidence: bool = False,
    ):
        """Segment one image; returns an ``(H, W)`` uint8 mask of class indices.

        Args:
            image: an ``(H, W)`` or ``(H, W, C)`` array in its stored dtype (uint8, uint16,
                float in [0, 1]: scaled by the same rule as the CLI), or an image file. An
                array's 2nd or 4th band is taken as alpha (dropped for a model that takes 1
                or 3 channels); a file's only when the file marks it as alpha.
            tile, halo, blend: override the tiling (default: the CLI's defaults).
            confidence: also return the winning class's probability per pixel (float32).

        Returns:
            The mask, or ``(mask, confidence)`` with ``confidence=True``.

        Raises:
            ImageReadError: the file cannot be read, or its channels cannot become the
                model's.
        """
        from segnet_cli.io.images import read_image, to_model_input
        from segnet_cli.pipeline import segment_image

        source = None
        # An array's 2nd or 4th band is taken as alpha (the caller knows what it holds); a
        # file's only when the file says so (the CLI's reading rules).
        alpha = None if isinstance(image, (str, Path)) else True
        if isinstance(image, (str, Path)):
            source = Path(image)
            image = read_image(source)
        arr = np.asanyarray(image)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        given = {"tile": tile, "halo": halo, "blend": blend}
        tiling = replace(self.tiling, **{k: v for k, v in given.items() if v is not None})
        x = to_model_input(arr, self.info.in_channels, source, alpha)
        mask, conf = segment_image(self._seg, x, tiling, confidence=confidence, tta=self.tta)
        return (mask, conf) if confidence else mask

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, {len(self.class_names)} classes)"


def load_model(
    path: str | Path | None = None,
    *,
    precision: Precision | str = Precision.FLOAT32,
    device: str | None = None,
    tiling: TilingConfig | None = None,
    tta: TTA | str = TTA.NONE,
) -> Model:
    """Load a segnet model (the bundled CamVid model when ``path`` is None) for inference.

    ``path`` is a ``.keras`` file, or an ``.onnx`` file made by ``segnet export`` (run with
    ONNX Runtime; needs the ``onnx`` extra); both give the same masks.

    Raises:
        ModelFileError: the file is missing, corrupt or not a segnet model.
        UsageError: a bad precision or device.
    """
    from segnet_cli.model.segmenter import open_segmenter
    from segnet_cli.model.tfload import import_tf

    import_tf()
    return Model(open_segmenter(path, precision, device), tiling or TilingConfig(), tta)


def custom_objects() -> dict:
    """SegNet's Keras layers, for ``keras.saving.load_model(path, custom_objects=...)``.

    Importing ``segnet_cli.model.layers`` registers them too; either lets plain Keras load a
    segnet ``.keras`` file (the training form, with batch norm).
    """
    from segnet_cli.model.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D

    return {
        "segnet>MaxPoolingWithArgmax2D": MaxPoolingWithArgmax2D,
        "segnet>MaxUnpooling2D": MaxUnpooling2D,
    }


__all__ = ["Model", "load_model", "custom_objects"]
