"""``segnet tile``: one gigapixel image through SegNet in bounded memory, georeferencing kept.

``run_tile`` is the one entry point; it picks the engine. The rooms:

* ``budget``: the memory and time model (pure arithmetic);
* ``plan``: the plan (``plan_tile``) and the run lifecycle every engine shares
  (``run_planned``: claim, up-to-date skip, signals, report);
* ``rows``: the pixel core, grid rows in, mask rows out (``stitch_rows``);
* ``outputs``: the output TIFFs, written row by row, renamed into place when complete;
* ``local``: the engine for this machine; ``ray``: the grid's rows spread over a Ray
  cluster's actors (work units, parts, assembly).

Peak memory depends on the image *width* and the tile size, never on its height
(``segnet tile --plan`` prints the estimate before anything runs; ``--max-memory`` shrinks
the batch, then the tile, to fit). Outputs are written to temporaries and renamed only when
complete; they record their provenance (input hash, model hash, settings), so a re-run skips
them when up to date; a claim keeps two runs off the same output; SIGINT and SIGTERM stop
between batches and leave nothing partial.
"""

from __future__ import annotations

from segnet_cli.config import Engine, Report, TileConfig
from segnet_cli.gigapixel.plan import TilePlan, plan_tile, run_planned


def run_tile(config: TileConfig, progress=None, log=None) -> Report:
    """Segment one (huge) image into a tiled, georeferenced mask TIFF, streaming.

    Args:
        config: the options; ``config.engine`` picks this machine (``local``) or a Ray
            cluster (``ray``).
        progress: optional ``ui.Progress``-like object (``start``, ``advance``).
        log: optional callable for one-line human messages.

    Returns:
        A report: ``return_code`` 0 (done or up to date) or 130/143 (interrupted, nothing
        written); ``details`` holds the plan, outputs, timings and the measured peak RSS.

    Raises:
        SegnetError: the input, model, options or output are unusable (see ``plan_tile``),
            ``LockedError`` when another run is writing the same output.
    """
    from segnet_cli.gigapixel.isolated import runs_model_apart

    if (config.vector is not None or config.aoi is not None) and not runs_model_apart(config):
        from segnet_cli.geo import load_before_tensorflow

        # A no-op when TensorFlow came first (see its docstring). Not needed when the model
        # runs in its own process, and 20 MiB less beside it while it runs.
        load_before_tensorflow()
    if config.engine is Engine.RAY:
        from segnet_cli.gigapixel.ray import run_ray

        return run_ray(config, progress, log)
    from segnet_cli.gigapixel.local import stream

    return run_planned(
        config, stream, progress, log, "interrupted: no output written (temporary files removed)"
    )


__all__ = ["run_tile", "plan_tile", "TilePlan"]
