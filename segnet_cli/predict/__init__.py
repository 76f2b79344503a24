"""``segnet predict``: folders of images in, palette-PNG masks out, resumable, on any engine.

``run_predict`` is the one entry point; it picks the engine. The engines (``local``: this
machine; ``ray``: a Ray cluster) share the plan and the write (``plan``), the run lifecycle
(``segnet_cli.jobs``) and the pipeline (``segnet_cli.pipeline``); neither imports the other,
nor this package.
"""

from __future__ import annotations

from segnet_cli.config import Engine, PredictConfig, Report
from segnet_cli.jobs import Run


def run_predict(config: PredictConfig, on_event=None, progress=None, log=None) -> Report:
    """Segment every input of ``config`` and write its mask.

    Args:
        config: the options; ``config.engine`` picks where the work runs.
        on_event: called with each input's ``jobs.Outcome`` as soon as it is final.
        progress: optional ``ui.Progress``-like object (``start``, ``advance``).
        log: optional callable for one-line human messages.

    Returns:
        A report whose ``return_code`` is 0 (all done or skipped), 1 (some failed),
        130/143 (interrupted) or 141: ``on_event`` met a closed pipe (``BrokenPipeError``,
        or ``EINVAL`` on Windows: its reader went away), which stops the run cleanly, as
        SIGPIPE would.

    Raises:
        SegnetError: the options, model or output folder are unusable (nothing ran).
        Exception: any other error of ``on_event``: the run stops (nothing partial written,
            every claim released) and the error is raised.
    """
    run = Run(on_event, progress, log)
    if config.engine is Engine.RAY:
        from segnet_cli.predict.ray import run_ray

        return run_ray(config, run)
    from segnet_cli.predict.local import run_local

    return run_local(config, run)


__all__ = ["run_predict"]
