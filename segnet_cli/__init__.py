"""segnet: segment images of any size with a Keras SegNet, from the command line or Python.

``import segnet_cli`` is light (no TensorFlow until a model is loaded)::

    import segnet_cli
    model = segnet_cli.load_model()      # the bundled CamVid model, or a path
    mask = model.segment(image)          # (H, W) uint8 class indices, tiled when large

See ``segnet_cli.api`` and ``ARCHITECTURE.md``.
"""

__version__ = "0.1.0"


def load_model(path=None, **options):
    """Load a segnet model for inference; see ``segnet_cli.api.load_model``."""
    from segnet_cli.api import load_model as _load

    return _load(path, **options)


def custom_objects() -> dict:
    """SegNet's Keras layers for plain ``keras.saving.load_model``; see ``segnet_cli.api``."""
    from segnet_cli.api import custom_objects as _objects

    return _objects()


__all__ = ["__version__", "load_model", "custom_objects"]
