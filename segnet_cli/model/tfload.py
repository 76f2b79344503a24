"""Import TensorFlow once, quietly.

TensorFlow's C++ runtime prints start-up notes (oneDNN, CUDA probing) straight to file
descriptor 2 before its logging is configured, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them.
For a command-line tool they are noise on every run, and they break the promise that stderr
holds only segnet's own messages. ``import_tf`` points fd 2 at /dev/null during the import
and the first device query, then restores it; Python errors raised meanwhile are re-raised
after the restore, so nothing real is lost. ``SEGNET_TF_LOGS=1`` shows everything.
"""

from __future__ import annotations

import os
import sys

_done = False


def import_tf():
    """Import and return ``tensorflow`` with its start-up chatter silenced."""
    global _done
    if _done or os.environ.get("SEGNET_TF_LOGS") == "1":
        import tensorflow as tf

        _done = True
        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = None
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        saved = None
    try:
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the CUDA probe prints here
        import keras  # noqa: F401

        # Python-side TF warnings (e.g. "retracing" when a process builds several models)
        # are for TF developers; segnet reports its own errors.
        tf.get_logger().setLevel("ERROR")
    finally:
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
    _done = True
    return tf


def release_memory() -> None:
    """Give back what a dropped model held: Python's garbage, then the C heap's free pages
    (``malloc_trim``), so work after the model (``tile``'s COG and polygons) does not stack
    on top of it. TensorFlow's libraries stay loaded."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the pages stay with the process until it exits
