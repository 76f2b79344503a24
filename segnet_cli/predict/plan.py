"""What every ``segnet predict`` engine does before and around segmenting, without a model.

* ``plan``: inputs, outputs, what is up to date, what cannot work (an output on an input,
  two inputs with one output name, a folder given as an image), decided before any model
  is loaded.
* ``begin``: the plan reported, a dry run answered, a run with nothing to do ended.
* ``claim``: an input entering the pipeline takes its output's claim and re-checks under it.
* ``write_outputs``: the mask (and overlay) of one input, written atomically with the
  provenance that later runs compare.

Outputs mirror the inputs' relative paths under ``--out`` as ``<stem>.png`` and
``<stem>.overlay.jpg``. An output is up to date when every output the run asks for exists,
decodes completely and records the same provenance: a truncated mask, or a missing overlay
when ``--overlay`` is asked for, is redone.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segnet_cli import __version__
from segnet_cli.config import PredictConfig, Report, Status
from segnet_cli.errors import UsageError
from segnet_cli.io.files import FileSet, file_digest, same_file
from segnet_cli.io.images import image_dpi, write_mask_png, write_overlay
from segnet_cli.jobs import (
    PROVENANCE_KEY,
    Claim,
    InputItem,
    Outcome,
    Provenance,
    Run,
    collect_inputs,
    first_of,
    foreign_image,
    settings_key,
)
from segnet_cli.model.modelfile import ModelInfo, model_fingerprint, read_info, resolve_model_path
from segnet_cli.tiling import check_tiling


def mask_path(out: Path, item: InputItem) -> Path:
    return out / item.rel.with_suffix(".png")


def overlay_path(out: Path, item: InputItem) -> Path:
    return out / item.rel.parent / f"{item.rel.stem}.overlay.jpg"


#: How each output format ends when complete: PNG's IEND chunk (with its CRC), JPEG's EOI.
_END_MARKERS = {"PNG": b"\x00\x00\x00\x00IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}


def read_provenance(output: Path) -> Provenance | None:
    """The provenance an existing output records, or None if absent, unreadable or damaged.

    The whole file is checked, not just its header: a mask truncated by a crash of another
    tool, or a disk error, is not up to date and gets redone. Decoding the pixels alone is
    not enough (Pillow decodes a PNG that lost its last bytes); so the file must also end as
    its format ends (PNG: the IEND chunk, JPEG: the end-of-image marker), and a PNG's every
    chunk must pass its checksum.
    """
    if not output.is_file():
        return None
    try:
        from PIL import Image

        with Image.open(output) as im:
            fmt = im.format
            if fmt == "PNG":
                im.verify()  # every chunk's CRC, through IEND
        end = _END_MARKERS.get(fmt)
        if end is None:
            return None
        with open(output, "rb") as fh:
            fh.seek(-len(end), os.SEEK_END)
            if fh.read(len(end)) != end:
                return None
        with Image.open(output) as im:
            im.load()
            text = im.info.get(PROVENANCE_KEY) or im.info.get("comment")
    except Exception:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return Provenance.from_json(text)


@dataclass(eq=False)
class Job:
    """One input on its way through the pipeline."""

    item: InputItem
    mask: Path
    overlay: Path | None
    claim: Claim
    model_sha: str = ""
    settings: str = ""
    provenance: Provenance | None = None  # computed on first need (see ensure_provenance)
    seconds: float = 0.0
    raw: np.ndarray | None = field(default=None, repr=False)

    def ensure_provenance(self) -> Provenance:
        """Hash the input (once) and return the provenance its outputs will record.

        Planning hashes only inputs whose mask already exists (to decide a skip); new inputs
        are hashed by the reader threads, in parallel and just before decoding, so a first
        run over a big folder starts at once and reads each file while it is in the cache.
        """
        if self.provenance is None:
            self.provenance = Provenance(file_digest(self.item.path), self.model_sha, self.settings)
        return self.provenance

    def outputs(self) -> list[Path]:
        return [self.mask] + ([self.overlay] if self.overlay is not None else [])

    def up_to_date(self) -> bool:
        """Every output exists, decodes and records this input's provenance.

        Raises:
            OSError: the input cannot be read (to hash it).
        """
        if not self.mask.exists():
            return False
        prov = self.ensure_provenance()
        return all(read_provenance(p) == prov for p in self.outputs())


def check_outputs_off_inputs(config: PredictConfig, items: list[InputItem]) -> None:
    """Refuse a run where any output (mask or overlay) would land on an input.

    Also refuses an output folder that *is* an input folder: even where no name collides
    today, its masks would be inputs of the next run (masks of masks). An output folder
    strictly inside an input folder is fine: ``collect_inputs`` skips it.

    Raises:
        UsageError: naming the input that would be overwritten (or the folder).
    """
    inputs = FileSet(i.path for i in items)
    for item in items:
        outputs = [mask_path(config.out, item)]
        if config.overlay:
            outputs.append(overlay_path(config.out, item))
        for output in outputs:
            hit = inputs.find(output)
            if hit is not None:
                raise UsageError(
                    f"the output {output} would overwrite this input; nothing was written: "
                    "give another --out",
                    hit,
                )
    out = Path(os.path.realpath(config.out))
    for spec in config.inputs:
        if Path(spec).is_dir() and Path(os.path.realpath(spec)) == out:
            raise UsageError(
                f"--out is the input folder {spec}: its masks would be inputs of the next run; "
                "give another folder (a subfolder is fine: it is not searched for inputs)",
                config.out,
            )


def _not_a_file(path: Path) -> str:
    """Why an input that is not a regular file cannot be read, in the user's terms."""
    if path.is_dir():
        return "is a folder, not an image"
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop (the link leads back to itself)"
        if path.is_symlink():
            return "broken symbolic link (its target does not exist)"
        return f"cannot read: {exc.strerror or exc}"
    return "not a regular file"


def plan(config: PredictConfig) -> tuple[list[Job], list[Outcome], str, ModelInfo]:
    """Decide, before loading any model, what each input needs: work, skip, or failure.

    Returns:
        ``(jobs, outcomes, model_sha, info)``. Claims are taken later, one input at a time
        as it enters the pipeline, so a huge folder never holds more than a queue's worth
        of locks (or file descriptors).

    Raises:
        UsageError: a bad option, an output that would land on an input (the user's
            photos are never replaced by masks), or one that would replace an image segnet
            did not write (without ``overwrite``): nothing is written.
        ModelFileError: the model file is missing or not a segnet model.
        NoInputError: no input matched.
    """
    inference = config.inference
    model_path = resolve_model_path(inference.model)
    info = read_info(model_path)  # a foreign or corrupt model fails here, before any work
    check_tiling(inference.tiling, info.stride)
    model_sha = model_fingerprint(model_path)
    settings = settings_key(**inference.output_settings(), version=1)
    items, missing = collect_inputs(config.inputs, exclude=config.out, ignore=config.log_file)
    outcomes = [Outcome(spec, None, Status.FAILED, error="no input matched this") for spec in missing]
    check_outputs_off_inputs(config, items)
    _check_log_off_outputs(config, items)
    jobs: list[Job] = []
    foreign: list[Path] = []
    claimed: dict[Path, Path] = {}
    for item in items:
        m = mask_path(config.out, item)
        ov = overlay_path(config.out, item) if config.overlay else None
        if m in claimed:
            outcomes.append(
                Outcome(
                    str(item.path), str(m), Status.FAILED,
                    error=f"same output name as {claimed[m]} (rename one of them)",
                )
            )
            continue
        claimed[m] = item.path
        if not item.path.is_file():
            outcomes.append(Outcome(str(item.path), None, Status.FAILED, error=_not_a_file(item.path)))
            continue
        job = Job(item, m, ov, Claim(config.out, m), model_sha, settings)
        if not config.overwrite:
            try:
                up_to_date = job.up_to_date()
            except OSError as exc:
                outcomes.append(
                    Outcome(str(item.path), None, Status.FAILED, error=f"cannot read: {exc.strerror}")
                )
                continue
            if up_to_date:
                outcomes.append(
                    Outcome(str(item.path), str(m), Status.SKIPPED, extra={"reason": "up to date"})
                )
                continue
            # Only an output that is not up to date can be someone else's image.
            foreign.extend(o for o in job.outputs() if foreign_image(o))
        jobs.append(job)
    if foreign:
        raise UsageError(
            f"--out holds files that segnet did not write, which this run would replace: "
            f"{first_of(foreign)}; nothing was written: give another --out, or pass "
            "--overwrite to replace them",
            config.out,
        )
    return jobs, outcomes, model_sha, info


def _check_log_off_outputs(config: PredictConfig, items: list[InputItem]) -> None:
    """Refuse a run that would write a mask or an overlay over its own log.

    Raises:
        UsageError: ``config.log_file`` is where an input's mask or overlay goes.
    """
    if config.log_file is None:
        return
    for item in items:
        outputs = [("mask", mask_path(config.out, item))]
        if config.overlay:
            outputs.append(("overlay", overlay_path(config.out, item)))
        for kind, output in outputs:
            if same_file(output, config.log_file):
                raise UsageError(
                    f"--log-file is where the {kind} of {item.path} goes: give the log a file "
                    "outside --out, or another name",
                    config.log_file,
                )


def refuse_file_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file before planning; the folder is made later.

    Raises:
        UsageError: ``out`` exists and is not a folder.
    """
    if out.exists() and not out.is_dir():
        raise UsageError("--out is a file, not a folder", out)


def begin(config: PredictConfig, run: Run, **details) -> tuple[list[Job], str, Report | None]:
    """What every engine does before segmenting: plan, report skips and failures found while
    planning, and answer a dry run or a run with nothing to do without loading any model.

    Returns:
        ``(jobs, model_sha, early_report)``; ``early_report`` is not None when the run ends
        here. ``details`` are added to that report's details.
    """
    jobs, outcomes, model_sha, _info = plan(config)
    for o in outcomes:
        run.emit(o, advance=False)
    if config.dry_run:
        for job in jobs:
            run.emit(Outcome(str(job.item.path), str(job.mask), Status.PLANNED), advance=False)
        return jobs, model_sha, run.report(planned=len(jobs), dry_run=True, **details)
    if not jobs:
        return jobs, model_sha, run.report(nothing_to_do=True, **details)
    return jobs, model_sha, None


def claim(job: Job, overwrite: bool) -> str | None:
    """Take the job's claim and re-check under it; None when the job is to be done.

    Returns:
        Why the job is skipped instead (the claim is then not held).

    Raises:
        OSError: the claim's lock file or the input cannot be read or written.
    """
    if not job.claim.acquire():
        return "another segnet run is writing this mask"
    try:
        # An overlapping run may have finished it meanwhile.
        if not overwrite and job.up_to_date():
            job.claim.release()
            return "up to date"
    except BaseException:
        job.claim.release()
        raise
    return None


def mask_text(job: Job, info: ModelInfo) -> dict[str, str]:
    """The PNG text chunks of a mask: provenance, software, source, class names."""
    return {
        PROVENANCE_KEY: job.ensure_provenance().to_json(),
        "Software": f"segnet {__version__}",
        "Source": os.fsdecode(job.item.path.name).encode("utf-8", "replace").decode("utf-8"),
        "Classes": ",".join(info.class_names),
    }


def write_outputs(job: Job, mask: np.ndarray, raw: np.ndarray | None, info: ModelInfo, alpha: float) -> None:
    """Write one input's overlay (if asked) and then its mask, each atomically.

    The mask goes last: a run stopped between the two leaves no mask, so the input is
    redone, overlay included.

    Raises:
        OutputError, OSError, ValueError: a file could not be written.
    """
    dpi = image_dpi(job.item.path)  # a slide's mask measures as the slide does
    if job.overlay is not None and raw is not None:
        write_overlay(raw, mask, job.overlay, info.palette, alpha,
                      job.ensure_provenance().to_json(), dpi)
    write_mask_png(mask, job.mask, info.palette, mask_text(job, info), dpi)


__all__ = [
    "plan",
    "begin",
    "claim",
    "Job",
    "mask_path",
    "overlay_path",
    "read_provenance",
    "write_outputs",
    "PROVENANCE_KEY",
]
