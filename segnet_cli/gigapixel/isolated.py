"""The model's part of a local ``tile`` run in a child process.

TensorFlow keeps what its last tile used: on a CPU, oneDNN's memory pool (about 400 MiB
after 1280 x 1280 windows, measured with the bundled model: 1169 MiB resident after three
windows, 1126 MiB after dropping the model, ``clear_session`` and ``malloc_trim``; 728 MiB
with oneDNN off, which costs 1.6x the time). Work after the stream, the polygons of
``--vector`` above all, would stack on top of it. So with ``--vector`` the reader, the model
and the stitcher run in a child process (a fresh Python running ``local.serve_rows``) that
sends the finished rows back; this process writes them, and once the child has exited it
makes the COG and the polygons without TensorFlow ever having been loaded here.

The child's side is ``local.serve_rows``. The protocol is pickled ``(kind, payload)``
messages on the child's standard output: ``batch`` ``(tiles, pixels)`` after each batch,
``rows`` ``(y0, [(shape, dtype), ...])`` followed by the mask's (and the probabilities') raw
bytes, ``stats`` (the model's figures), ``error`` (the exception that stopped it), ``end``.
The plan and the options go the other way on its standard input. A ``subprocess``, not
``multiprocessing``: nothing of the caller's ``__main__`` is imported again, whatever
script or test runner started the run.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np

from segnet_cli.errors import SegnetError


def runs_model_apart(config) -> bool:
    """Whether the local engine runs the model in a child process for ``config``.

    Only when polygons follow (``--vector``), and only while this process has not loaded
    TensorFlow itself: a caller that already holds it would then hold two of them.
    """
    from segnet_cli.config import Engine

    return (
        config.vector is not None
        and config.engine is Engine.LOCAL
        and "tensorflow" not in sys.modules
    )


def isolated_rows(
    plan,
    config,
    stats: dict,
    on_batch: Callable[[int, int], None],
    check: Callable[[], None],
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """``local.model_rows`` run in a child process: the same rows, in the same order.

    Args:
        plan: the plan (``TilePlan``).
        config: the options (``TileConfig``).
        stats: the child's timing figures are added to it at the end.
        on_batch: called with ``(tiles, core pixels)`` after each batch.
        check: called after each message; it raises to stop (``SignalGuard.check``).

    Yields:
        ``(y0, mask rows, probability rows or None)``. Closing the generator, or an
        exception, ends the child (SIGTERM, then waits for it).

    Raises:
        SegnetError: whatever stopped the child (the same exception class), or that the
            child died without saying why (killed by the system, for one).
    """
    # The child imports this very package: the installed one, or else the folder this one
    # was imported from (appended, so it never shadows anything installed).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        f"import sys; sys.path.append({root!r}); "
        "from segnet_cli.gigapixel.local import serve_rows; sys.exit(serve_rows())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(pickle.dumps((plan, config), protocol=5))
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once: reading says how
        while True:
            try:
                kind, payload = pickle.load(proc.stdout)
            except EOFError:
                status = proc.wait()
                raise SegnetError(
                    f"the model process ended without finishing (exit status {status})",
                    plan.source.path,
                ) from None
            if kind == "rows":
                y0, specs = payload
                arrays = [_read_array(proc.stdout, shape, dtype) for shape, dtype in specs]
                yield y0, arrays[0], (arrays[1] if len(arrays) > 1 else None)
            elif kind == "batch":
                on_batch(*payload)
            elif kind == "stats":
                stats.update({k: stats.get(k, 0) + v for k, v in payload.items()})
            elif kind == "error":
                raise payload
            elif kind == "end":
                break
            check()
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _read_array(stream, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` read straight into its own memory from ``stream``.

    Rows travel as raw bytes after their pickled header (``local.send_rows``): unpickling a
    20000-pixel-wide band would hold its bytes and its array at once, 40 MB more at the peak.
    """
    out = np.empty(shape, np.dtype(dtype))
    view = memoryview(out).cast("B")
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            raise EOFError("the model process ended in the middle of a row")
        got += n
    return out
