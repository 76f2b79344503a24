"""Labelled datasets: finding image/mask pairs and verifying every one of them.

A dataset is an images folder and a masks folder whose files share stems (CamVid's
``train/`` + ``trainannot/``), or a list file with one ``image mask`` pair per line (paths
relative to the list file; the SegNet tutorial's absolute paths are reduced to file names
and looked up beside the list). ``verify`` reads every pair and reports *every* problem,
not just the first, with the class histogram and median-frequency weights.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

import numpy as np

from segnet_cli.classes import ClassTable
from segnet_cli.errors import DatasetError, ImageReadError, NoInputError, UsageError
from segnet_cli.io.images import is_image_path, read_image, read_mask, read_rgb_mask
from segnet_cli.metrics import median_frequency_weights


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path


def index_by_stem(folder: Path) -> dict[str, Path]:
    """Image files under ``folder`` (recursive) by relative path without suffix.

    Hidden files and folders (``.ipynb_checkpoints``, segnet's own temporaries and locks)
    are skipped. When two files share a stem (``a.png`` and ``a.tif``) the first in sorted
    order wins.
    """
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and is_image_path(p):
            out.setdefault(str(rel.with_suffix("")), p)
    return out



def find_pairs(
    images: str | Path, masks: str | Path | None = None
) -> tuple[list[Pair], list[str]]:
    """Pair images with masks by relative path and stem.

    Args:
        images: a folder of images, or a list file of ``image mask`` lines.
        masks: the masks folder (not with a list file: its lines name the masks). Defaults
            to ``<images>annot`` (CamVid's layout) when that folder exists.

    Returns:
        ``(pairs, problems)``: problems name every image without a mask and vice versa.

    Raises:
        UsageError: the folders do not exist; ``images`` is an image or a file that is not a
            text list; or ``masks`` is given with a list file.
    """
    images = Path(images)
    if images.is_file():
        if is_image_path(images):
            raise UsageError("is an image; give the images folder, or a list file of "
                             "'image mask' lines", images)
        if masks is not None:
            raise UsageError(f"--masks {masks} is not used with a list file: each of its lines "
                             "names the image and its mask", images)
        return _pairs_from_list(images)
    if not images.is_dir():
        raise UsageError("images folder not found", images)
    if masks is None:
        guess = images.parent / f"{images.name}annot"
        if not guess.is_dir():
            raise UsageError("no masks folder given (and no '<images>annot' beside it)", images)
        masks = guess
    masks = Path(masks)
    if not masks.is_dir():
        raise UsageError("masks folder not found", masks)
    imgs, msks = index_by_stem(images), index_by_stem(masks)
    problems = [f"{imgs[k]}: no mask with the same name in {masks}" for k in imgs if k not in msks]
    problems += [f"{msks[k]}: mask has no image in {images}" for k in msks if k not in imgs]
    pairs = [Pair(imgs[k], msks[k]) for k in imgs if k in msks]
    return pairs, problems


def split_held_out(
    pairs: list[Pair], patterns: tuple[str, ...], root: Path
) -> tuple[list[Pair], list[Pair]]:
    """Split ``pairs`` into those to train on and those held out, by glob on the image.

    Frames of one drive, tiles of one site or fields of one slide are near-copies of each
    other: a validation split drawn from the same groups as training rewards remembering
    them. Holding out whole groups measures what carries over to a group the model has not
    seen, which is what choosing epochs and recipes should reward. The groups are named by
    glob patterns, as file names usually encode them (CamVid's ``0006R0_*``).

    Args:
        pairs: the dataset's pairs.
        patterns: ``fnmatch`` globs (case-sensitive; ``*`` also matches ``/``, ``[[]``
            matches ``[``); a pair is held out when any matches its image's file name or its
            path under ``root``, written with ``/`` between folders (on Windows a ``\\`` in
            a glob is taken as one).
        root: the images folder, or the list file the pairs came from (then its folder).

    Returns:
        ``(train, held)``, each in the order of ``pairs``.
    """
    if os.sep == "\\":  # fnmatch has no escape character: a backslash can only be a folder
        patterns = tuple(p.replace("\\", "/") for p in patterns)
    # abspath, not resolve: '..' goes, links stay (a folder of links is a split of its own).
    root = Path(os.path.abspath(root.parent if root.is_file() else root))
    train, held = [], []
    for pair in pairs:
        names = [pair.image.name]
        try:
            rel = Path(os.path.abspath(pair.image)).relative_to(root)
            names.append(PurePosixPath(*rel.parts).as_posix())
        except ValueError:  # a list file may name images outside its folder
            pass
        matched = any(fnmatchcase(n, p) for n in names for p in patterns)
        (held if matched else train).append(pair)
    return train, held


def _pairs_from_list(listfile: Path) -> tuple[list[Pair], list[str]]:
    pairs, problems = [], []
    base = listfile.parent
    try:
        text = listfile.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError("is not a folder, nor a UTF-8 text list file of 'image mask' lines",
                         listfile) from None
    except OSError as exc:
        raise UsageError(f"cannot read the list file: {exc.strerror or exc}", listfile) from None
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            problems.append(f"{listfile}:{n}: expected 'image mask', got {line!r}")
            continue
        found = []
        for part in parts:
            p = Path(part)
            cand = p if p.is_absolute() and p.exists() else base / p
            if not cand.exists():
                # The SegNet tutorial's lists hold its own absolute paths: keep the last two
                # components (folder/name) and look beside the list file.
                cand = base / Path(*p.parts[-2:])
            found.append(cand)
        # Named as the line wrote them: the tutorial fallback above is only a guess.
        missing = [part for part, c in zip(parts, found) if not c.exists()]
        if missing:
            problems.append(
                f"{listfile}:{n}: not found: {', '.join(missing)}"
                + ("" if all(Path(m).is_absolute() for m in missing) else f" (under {base})")
            )
            continue
        pairs.append(Pair(found[0], found[1]))
    return pairs, problems


@dataclass
class VerifyReport:
    """What ``verify`` found: every problem, the class histogram and the class weights."""

    pairs: int = 0
    problems: list[str] = field(default_factory=list)
    pixel_counts: np.ndarray | None = None
    image_pixel_counts: np.ndarray | None = None
    void_pixels: int = 0
    weights: np.ndarray | None = None
    sizes: set = field(default_factory=set)
    channels: set = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def return_code(self) -> int:
        return 0 if self.ok else 1


def load_mask(path: Path, classes: ClassTable, rgb_palette: bool = False) -> np.ndarray:
    """Read a label mask as class indices (a colour mask through the class palette)."""
    if rgb_palette:
        return read_rgb_mask(path, classes.palette())
    return read_mask(path)


def read_label_mask(path: Path, classes: ClassTable, rgb_palette: bool = False) -> np.ndarray:
    """``load_mask`` that also refuses JPEG index masks.

    Raises:
        ImageReadError: unreadable, colour when indices were expected, or a JPEG (its lossy
            compression invents values at every class edge, so the labels are not the truth).
    """
    if path.suffix.lower() in (".jpg", ".jpeg") and not rgb_palette:
        raise ImageReadError(
            "mask is a JPEG: lossy compression changes class indices at edges", path
        )
    return load_mask(path, classes, rgb_palette)


def label_values(mask: np.ndarray, classes: ClassTable) -> tuple[np.ndarray, list[int]]:
    """Pixel counts of every value ``0..num_classes-1`` and the values that are not allowed.

    Allowed values are the classes and void. Negative values (signed TIFF masks) are
    reported too rather than crashing the count.
    """
    k = classes.num_classes
    flat = mask.reshape(-1)
    if np.issubdtype(flat.dtype, np.floating):
        bad_float = ~np.isfinite(flat) | (flat != np.round(flat))
        if bad_float.any():
            return np.zeros(k, np.int64), sorted({float(v) for v in flat[bad_float][:5]})
    flat = flat.astype(np.int64)
    negative = flat < 0
    bad: list[int] = sorted(int(v) for v in np.unique(flat[negative])[:5])
    values = np.bincount(flat[~negative], minlength=k)
    bad += [
        int(v) for v in np.nonzero(values)[0] if v >= k and (classes.void is None or v != classes.void)
    ]
    counts = values[:k].copy()
    if classes.void is not None and classes.void < k:
        counts[classes.void] = 0  # a void inside the class range is still ignored
    return counts, bad


def verify(
    pairs: list[Pair],
    classes: ClassTable,
    problems: list[str] | None = None,
    rgb_masks: bool = False,
    weight_power: float = 1.0,
    progress=None,
) -> VerifyReport:
    """Read every pair and collect every problem.

    Checks: image readable; mask readable and single-channel (an RGB or JPEG mask when indices
    were expected is reported); same size; mask values within the classes or void.

    Args:
        pairs: from ``find_pairs``.
        classes: the class table (number of classes and void).
        problems: problems already found while pairing.
        rgb_masks: masks are colour images to map through the class palette.
        weight_power: tempering exponent of the median-frequency weights.
        progress: optional callable ``progress(done, total)``.

    Raises:
        NoInputError: there is no pair to check (exit 2), with the pairing problems.
        UsageError: ``weight_power`` is negative or not a number.
    """
    if not (math.isfinite(weight_power) and weight_power >= 0):
        # A negative power would invert the balancing: the rarest class weighed least.
        raise UsageError(f"--weight-power must be a number of 0 or more, not {weight_power}")
    if not pairs:
        # Nothing to check is a usage error (exit 2), as "no input matched" is for predict
        # and "no ground-truth masks to score" for eval; the problems say why.
        problems = list(problems or [])
        raise NoInputError(
            "no image/mask pairs found" + (f" ({len(problems)} problem(s))" if problems else ""),
            problems=problems,
        )
    k = classes.num_classes
    report = VerifyReport(pairs=len(pairs), problems=list(problems or []))
    counts = np.zeros(k, np.int64)
    image_counts = np.zeros(k, np.int64)
    for i, pair in enumerate(pairs):
        try:
            img = read_image(pair.image)
        except ImageReadError as exc:
            report.problems.append(str(exc))
            img = None
        try:
            mask = read_label_mask(pair.mask, classes, rgb_masks)
        except ImageReadError as exc:
            report.problems.append(str(exc))
            mask = None
        if img is not None:
            report.sizes.add(img.shape[:2])
            report.channels.add(img.shape[2])
        if img is not None and mask is not None and img.shape[:2] != mask.shape:
            report.problems.append(
                f"{pair.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image "
                f"{pair.image.name} is {img.shape[1]}x{img.shape[0]}"
            )
        if mask is not None:
            values, bad = label_values(mask, classes)
            if bad:
                report.problems.append(
                    f"{pair.mask}: values {', '.join(map(str, bad[:5]))} are outside classes "
                    f"0..{k - 1}" + (f" and void {classes.void}" if classes.void is not None else "")
                )
            counts += values
            # Eigen & Fergus: a class's frequency is over the (labelled) pixels of the images
            # where it appears.
            image_counts[values > 0] += int(values.sum())
            if classes.void is not None:
                report.void_pixels += int(np.count_nonzero(mask == classes.void))
        if progress is not None:
            progress(i + 1, len(pairs))
    if len(report.channels) > 1:
        report.problems.append(
            f"images have mixed channel counts {sorted(report.channels)}; convert them first"
        )
    report.pixel_counts = counts
    report.image_pixel_counts = image_counts
    report.weights = median_frequency_weights(counts, image_counts, weight_power)
    return report


def require_ok(report: VerifyReport) -> None:
    if not report.ok:
        raise DatasetError(f"{len(report.problems)} problem(s) in the dataset", report.problems)
