"""segnet: segment images of any size with a Keras SegNet, from the command line."""

__version__ = "0.1.0"
