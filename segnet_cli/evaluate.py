"""``segnet eval``: score segmentations against ground truth as the SegNet paper does.

Every figure comes from one confusion matrix accumulated over all labelled pixels of all
images (``segnet_cli.metrics``), void pixels dropped: global accuracy G, class-average
accuracy C, per-class IoU and accuracy, mean IoU and frequency-weighted IoU.

Two ways to get the predictions:

* **model mode** (``--model``, or the bundled model): each image is segmented at full
  resolution in memory by the one pipeline (``pipeline.run_works``) with the same
  ``InferenceConfig`` as ``segnet predict``, so eval scores exactly the masks predict would
  write.
* **pred mode** (``--pred DIR``): an existing folder of index masks (palette PNGs are read as
  their indices) from any tool, matched to the ground truth by relative path and stem. No
  model and no TensorFlow are loaded.

A file that cannot be scored (unreadable, missing prediction, size mismatch, values outside
the classes) is reported as a failure and the rest are scored; the return code is then 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from segnet_cli import __version__
from segnet_cli.classes import ClassTable, load_classes
from segnet_cli.config import EvalConfig, Report, Status
from segnet_cli.dataset import find_pairs, index_by_stem, label_values, read_label_mask
from segnet_cli.errors import (
    ImageReadError,
    NoInputError,
    OutputError,
    SegnetError,
    UsageError,
)
from segnet_cli.io.files import FileSet, atomic_path, check_writable
from segnet_cli.io.images import read_image, to_model_input, write_mask_png
from segnet_cli.jobs import Outcome, Run, first_of, foreign_image
from segnet_cli.metrics import confusion, scores
from segnet_cli.model.modelfile import ModelInfo, read_info, resolve_model_path
from segnet_cli.pipeline import image_work, read_ahead, run_works
from segnet_cli.tiling import TileGrid, check_tiling, stitch_all

#: Images decoded ahead of the one being scored (reading overlaps inference).
READ_AHEAD = 2


@dataclass(frozen=True)
class EvalItem:
    """One ground-truth mask to score, with its image (model mode) or prediction (pred mode).

    ``key`` is the mask's path relative to the masks folder without suffix (the file stem for
    a list file); predictions are matched by it and reports name items by it.
    """

    key: str
    mask: Path
    image: Path | None = None


class EvalFailure(SegnetError):
    """One item could not be scored; the others still are."""


# --------------------------------------------------------------------------- inputs


def resolve_classes(config: EvalConfig, info: ModelInfo | None) -> ClassTable:
    """The class table to score with: ``--classes``, else the model's metadata, else CamVid.

    The void class is ``--void`` if given, else the classes option's void, else the model's.

    Raises:
        UsageError: ``--classes`` disagrees with the model's number of classes.
    """
    if config.classes is not None:
        table = load_classes(config.classes, config.void)
        if info is not None and table.num_classes != info.num_classes:
            raise UsageError(
                f"--classes lists {table.num_classes} classes but the model has "
                f"{info.num_classes}"
            )
        if info is not None and table.void is None and info.void_class is not None:
            table = replace(table, void=info.void_class)
        return table
    if info is not None:
        k = info.num_classes
        palette = tuple(info.palette[:k]) + ((0, 0, 0),) * max(0, k - len(info.palette))
        void = config.void if config.void is not None else info.void_class
        return ClassTable(tuple(info.class_names), palette, None if void is None else int(void))
    return load_classes("camvid", config.void)


def gather_items(config: EvalConfig) -> tuple[list[EvalItem], list[dict]]:
    """The ground truth to score, from an images folder (or list file) and/or a masks folder.

    With images, items are image/mask pairs as ``dataset.find_pairs`` makes them, and an
    image without a mask (or a mask without an image) is a failure. Without images (pred
    mode only) every mask in the masks folder is an item.

    Returns:
        ``(items, failures)``; a failure is ``{"path": ..., "error": ...}``.

    Raises:
        UsageError: folders missing, or neither images nor masks given.
    """
    if config.images is None:
        if config.masks is None:
            raise UsageError("give an IMAGES folder or --masks (the ground-truth masks)")
        masks = Path(config.masks)
        if not masks.is_dir():
            raise UsageError("masks folder not found", masks)
        return [EvalItem(k, p) for k, p in index_by_stem(masks).items()], []
    images = Path(config.images)
    pairs, problems = find_pairs(images, config.masks)
    failures = [_problem_to_failure(text) for text in problems]
    if not images.is_file():
        items = [
            EvalItem(str(p.image.relative_to(images).with_suffix("")), p.mask, p.image)
            for p in pairs
        ]
        return items, failures
    # A list file: images and masks may live anywhere, so an item is named by its image's
    # stem, as ``segnet predict`` names its mask. Two images of one stem in different
    # folders would then share a saved mask or a prediction: the later one is refused.
    items, named = [], {}
    for p in pairs:
        if p.image.stem in named and (config.save_masks is not None or config.pred is not None):
            failures.append({"path": str(p.image), "error": f"same name as {named[p.image.stem]} "
                             "(its mask or prediction would be the same file; rename one)"})
            continue
        named.setdefault(p.image.stem, p.image)
        items.append(EvalItem(p.image.stem, p.mask, p.image))
    return items, failures


def _problem_to_failure(text: str) -> dict:
    path, sep, error = text.partition(": ")
    return {"path": path, "error": error} if sep else {"path": None, "error": text}


def match_predictions(items: list[EvalItem], pred: Path) -> tuple[dict[str, Path], list[Path]]:
    """Find each item's prediction in ``pred``: same relative stem, else a unique same stem.

    The fallback lets a flat folder of predictions score against nested ground truth (and a
    list file's masks), as long as no two predictions share a file name. The overlays
    ``segnet predict --overlay`` writes beside its masks are not predictions.

    Returns:
        ``(found, unused)``: the prediction of each matched key, and predictions no ground
        truth asked for.
    """
    # predict --overlay writes <stem>.overlay.jpg beside each mask: a picture, not a mask.
    index = {k: p for k, p in index_by_stem(pred).items() if not k.endswith(".overlay")}
    by_name: dict[str, list[Path]] = {}
    for key, path in index.items():
        by_name.setdefault(Path(key).name, []).append(path)
    found: dict[str, Path] = {}
    for item in items:
        if item.key in index:
            found[item.key] = index[item.key]
            continue
        candidates = by_name.get(Path(item.key).name, [])
        if len(candidates) == 1:
            found[item.key] = candidates[0]
    used = set(found.values())
    return found, [p for p in index.values() if p not in used]


# --------------------------------------------------------------------------- scoring


def check_truth(truth: np.ndarray, classes: ClassTable, path: Path) -> None:
    """Raise ``EvalFailure`` when ground truth holds values that are neither classes nor void.

    Unknown values are not silently dropped: an undeclared void (say 255 borders) would
    otherwise vanish from the figures without anyone knowing.
    """
    _, bad = label_values(truth, classes)
    if bad:
        void = f" or void {classes.void}" if classes.void is not None else " (no void set)"
        raise EvalFailure(
            f"ground truth holds values {', '.join(map(str, bad))} that are not classes "
            f"0..{classes.num_classes - 1}{void}; pass --void or --classes",
            path,
        )


def check_prediction(pred: np.ndarray, truth: np.ndarray, k: int, path: Path) -> None:
    """Raise ``EvalFailure`` for a prediction of another size or with values outside 0..k-1."""
    if pred.shape != truth.shape:
        raise EvalFailure(
            f"prediction is {pred.shape[1]}x{pred.shape[0]} but the ground truth is "
            f"{truth.shape[1]}x{truth.shape[0]}",
            path,
        )
    if not pred.size:
        return
    if np.issubdtype(pred.dtype, np.floating):
        ok = np.isfinite(pred) & (pred == np.round(pred)) & (pred >= 0) & (pred < k)
    else:
        ok = (pred >= 0) & (pred < k)
    if not ok.all():
        bad = np.unique(pred[~ok])[:5].tolist()
        raise EvalFailure(
            f"prediction holds values {', '.join(map(str, bad))} outside classes 0..{k - 1}",
            path,
        )


def _read_truth(item: EvalItem, classes: ClassTable, rgb: bool) -> np.ndarray:
    truth = read_label_mask(item.mask, classes, rgb)
    check_truth(truth, classes, item.mask)
    return truth


def run_eval(config: EvalConfig, progress=None, log: Callable[[str], None] | None = None) -> Report:
    """Score predictions against ground truth; the figures are in ``report.details``.

    Args:
        config: what to score (see ``EvalConfig``). ``config.pred`` selects pred mode;
            otherwise the model (or the bundled one) segments ``config.images``.
        progress: optional object with ``start(total, done)`` and ``advance()`` (the CLI
            passes a rich bar).
        log: where one-line human messages go.

    Returns:
        A report whose ``details`` hold ``confusion`` (``[true][predicted]`` pixel counts),
        ``global_accuracy``, ``class_accuracy``, ``mean_iou``, ``fw_iou`` (fractions in
        [0, 1], ``None`` when undefined), ``per_class`` (index, class, iou, accuracy, truth
        and predicted pixels), ``classes``, ``void``, ``images`` (how many were scored),
        ``failures`` and ``per_image``. ``return_code`` is 1 when anything failed.

    Raises:
        UsageError, NoInputError, ModelFileError: bad options, nothing to score, bad model.
    """
    log = log or (lambda _msg: None)
    run = Run(progress=progress, log=log)
    pred_dir = Path(config.pred) if config.pred is not None else None
    if pred_dir is not None and not pred_dir.is_dir():
        raise UsageError("predictions folder not found", pred_dir)
    if pred_dir is not None and config.save_masks is not None:
        raise UsageError("--save-masks needs a model: with --pred the masks already exist")

    segmenter = None
    info = None
    if pred_dir is None:
        if config.images is None:
            raise UsageError("give the IMAGES to segment (or --pred DIR to score saved masks)")
        # Its metadata now, the model itself once every option has been checked.
        info = read_info(resolve_model_path(config.inference.model))
        check_tiling(config.inference.tiling, info.stride)
    elif config.inference.model is not None:
        # The model names the classes; it does not run.
        info = read_info(config.inference.model)
    classes = resolve_classes(config, info)
    if config.classes is None and info is None:
        log("classes: camvid (the default; give --classes for other data)")
    k = classes.num_classes

    items, failures = gather_items(config)
    for f in failures:  # problems found while pairing (an image without a mask, ...)
        run.fail(f["path"], f["error"], advance=False)
    if not items:
        raise NoInputError(
            "no ground-truth masks to score" + (f" ({len(failures)} problem(s))" if failures else ""),
            problems=[f"{f['path']}: {f['error']}" if f["path"] else f["error"] for f in failures],
        )
    found: dict[str, Path] = {}
    if pred_dir is not None:
        found, unused = match_predictions(items, pred_dir)
        if unused:
            log(f"{len(unused)} prediction(s) in {pred_dir} have no ground truth; ignored")
        log(f"scoring {len(found)} prediction(s) from {pred_dir} against {len(items)} mask(s)")

    def read(item: EvalItem):
        """Everything one item needs before the model: truth, and image or prediction."""
        truth = _read_truth(item, classes, config.rgb_masks)
        if pred_dir is not None:
            path = found.get(item.key)
            if path is None:
                raise EvalFailure(f"no prediction named {item.key} in {pred_dir}", item.mask)
            pred = read_label_mask(path, classes, config.rgb_masks)
            check_prediction(pred, truth, k, path)
            return truth, pred
        raw = read_image(item.image, config.inference.max_pixels)
        if raw.shape[:2] != truth.shape:
            raise EvalFailure(
                f"mask is {truth.shape[1]}x{truth.shape[0]} but the image is "
                f"{raw.shape[1]}x{raw.shape[0]}",
                item.mask,
            )
        return truth, to_model_input(raw, info.in_channels, item.image)

    if config.plot is not None:
        _check_plot(Path(config.plot), items, found.values(), config)
    if config.save_masks is not None:
        _check_save_masks(Path(config.save_masks), items, config.overwrite)
        check_writable(config.save_masks, "--save-masks")
    if pred_dir is None:
        from segnet_cli.model.segmenter import open_segmenter

        inference = config.inference
        segmenter = open_segmenter(inference.model, inference.precision, inference.device)
        info = segmenter.info
        log(f"segmenting and scoring {len(items)} image(s) with {segmenter.path}")
    cm = np.zeros((k, k), np.int64)
    per_image: list[dict] = []
    if progress is not None:
        progress.start(len(items), 0)

    def score(item: EvalItem, truth: np.ndarray, pred: np.ndarray) -> None:
        nonlocal cm
        if config.save_masks is not None:
            write_mask_png(pred, Path(config.save_masks) / f"{item.key}.png", classes.palette(),
                           {"Software": f"segnet {__version__}", "Classes": ",".join(classes.names)})
        m = confusion(truth, pred, k, classes.void)
        cm += m
        labelled = int(m.sum())
        per_image.append(
            {
                "key": item.key,
                "mask": str(item.mask),
                "pixels": labelled,
                "correct": int(np.trace(m)),
                "accuracy": round(float(np.trace(m) / labelled), 6) if labelled else None,
            }
        )

    def failed(exc: SegnetError) -> None:
        # One file's problem; anything else (a bad tiling option, say) stops the run.
        failures.append({"path": str(exc.path) if exc.path else None, "error": exc.message})
        run.fail(exc.path, exc.message)

    def scored(item: EvalItem) -> None:
        run.emit(Outcome(str(item.image or item.mask), None, Status.DONE))

    def works():
        """Each readable item as a work of the pipeline (model mode)."""
        tiling = config.inference.tiling
        for item, fut in read_ahead(read, items, READ_AHEAD, workers=READ_AHEAD):
            try:
                truth, image = fut.result()
            except (ImageReadError, EvalFailure) as exc:
                failed(exc)
                continue
            del fut
            grid = TileGrid.make(*image.shape[:2], tiling.tile, tiling.halo, segmenter.stride)
            yield image_work(
                (item, truth), image, grid, segmenter.num_classes, tiling, config.inference.tta
            )
            del image, truth

    if segmenter is not None:
        tiling = config.inference.tiling
        for work in run_works(segmenter, works(), tiling.batch_size, max_open=READ_AHEAD):
            (item, truth), grid = work.key, work.stitcher.grid
            pred, _ = stitch_all(work.stitcher, grid.height, grid.width)
            del work
            try:
                score(item, truth, pred)
            except OutputError as exc:
                failed(exc)
                continue
            scored(item)
    else:
        for item, fut in read_ahead(read, items, READ_AHEAD, workers=READ_AHEAD):
            try:
                truth, pred = fut.result()
                score(item, truth, pred)
            except (ImageReadError, EvalFailure, OutputError) as exc:
                failed(exc)
                continue
            scored(item)

    ignore = classes.void if classes.void is not None and classes.void < k else None
    sc = scores(cm, ignore=ignore)
    figures = sc.as_dict(classes.names)
    truth_px, pred_px = cm.sum(axis=1), cm.sum(axis=0)
    figures["per_class"] = [
        {"index": i, **row, "truth_pixels": int(truth_px[i]), "predicted_pixels": int(pred_px[i])}
        for i, row in enumerate(figures["per_class"])
    ]
    details = {
        "mode": "pred" if pred_dir is not None else "model",
        "model": str(segmenter.path) if segmenter is not None else (
            str(config.inference.model) if config.inference.model is not None else None
        ),
        "pred": str(pred_dir) if pred_dir is not None else None,
        "images": len(per_image),
        "failed": len(failures),
        "classes": list(classes.names),
        "void": classes.void,
        **figures,
        "confusion": cm.tolist(),
        "failures": failures,
        "per_image": per_image,
    }
    if segmenter is not None:
        t = config.inference.tiling
        details["tiling"] = {
            "tile": t.tile,
            "halo": t.halo,
            "batch_size": t.batch_size,
            "blend": str(t.blend),
        }
        details["precision"] = str(config.inference.precision)
        details["tta"] = str(config.inference.tta)
    if config.plot is not None:
        if per_image:
            plot_confusion(cm, classes.names, config.plot, title=_plot_title(details))
            details["plot"] = str(config.plot)
        else:
            log(f"no plot written to {config.plot}: no image could be scored")
    return run.report(**details)


def _scored_files(items: list[EvalItem], preds=()) -> FileSet:
    """Every file the run reads (masks, images, predictions), by path and by inode."""
    paths = [q for item in items for q in (item.mask, item.image) if q is not None]
    return FileSet([*paths, *preds])


def _check_save_masks(folder: Path, items: list[EvalItem], overwrite: bool = False) -> None:
    """Refuse ``--save-masks`` where a saved mask would replace an image or a ground truth.

    Raises:
        UsageError: a target is one of the files being scored (the next eval would then
            score the model against itself), or (without ``overwrite``) an image segnet
            did not write; checked before anything is written.
    """
    inputs = _scored_files(items)
    for item in items:
        hit = inputs.find(folder / f"{item.key}.png")
        if hit is not None:
            raise UsageError(
                f"--save-masks would overwrite {hit}, a file being scored; give another folder",
                folder,
            )
    if overwrite:
        return
    # Another split's ground truth, say: images segnet did not write are not replaced.
    foreign = [t for item in items if foreign_image(t := folder / f"{item.key}.png")]
    if foreign:
        raise UsageError(
            f"--save-masks would replace files that segnet did not write: {first_of(foreign)}; "
            "give another folder, or pass --overwrite to replace them",
            folder,
        )


def _check_plot(plot: Path, items: list[EvalItem], preds, config: EvalConfig) -> None:
    """Refuse a ``--plot`` that would replace a file being scored, or cannot be written.

    Checked before anything runs, so that a slip such as ``--plot masks/0001.png`` never
    replaces a ground-truth mask with a chart, and an unwritable folder is a usage error
    (exit 2) rather than a failure after minutes of scoring.

    Raises:
        UsageError: not a ``.png`` name, a folder, one of the files being scored or the
            masks being saved, a file segnet did not write (without ``overwrite``), or a
            folder that cannot be written.
    """
    if plot.suffix.lower() != ".png":
        raise UsageError("--plot writes a PNG: give a file name ending in .png", plot)
    if plot.is_dir():
        raise UsageError("--plot is a folder; give a file name ending in .png", plot)
    hit = _scored_files(items, preds).find(plot)
    if hit is not None:
        raise UsageError(f"--plot would overwrite {hit}, a file being scored", plot)
    if config.save_masks is not None:
        saved = {Path(os.path.abspath(Path(config.save_masks) / f"{i.key}.png")) for i in items}
        if Path(os.path.abspath(plot)) in saved:
            raise UsageError("--plot would overwrite one of the masks --save-masks writes", plot)
    if not config.overwrite and foreign_image(plot):
        raise UsageError(
            "--plot would replace a file that segnet did not write; give another name, or "
            "pass --overwrite to replace it",
            plot,
        )
    check_writable(plot.parent, "--plot")


def _plot_title(d: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v * 100:.1f}"

    return (
        f"G {pct(d['global_accuracy'])}   C {pct(d['class_accuracy'])}   "
        f"mIoU {pct(d['mean_iou'])}   ({d['images']} images)"
    )


# --------------------------------------------------------------------------- plot


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _cell_colour(v: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1), perceptually even enough for reading a matrix."""
    lo, hi = np.array([247, 251, 255]), np.array([8, 48, 107])
    return tuple(int(round(c)) for c in lo + (hi - lo) * float(np.clip(v, 0, 1)) ** 0.8)


def plot_confusion(
    cm: np.ndarray, names, path: str | Path, title: str | None = None
) -> Path:
    """Draw a row-normalised confusion matrix as a PNG with Pillow, atomically.

    Row ``i`` shows where the pixels of true class ``i`` went, in percent; the diagonal is
    each class's accuracy (recall). A column on the right gives each class's IoU. Rows of
    classes absent from the ground truth are grey with a dash.

    Args:
        cm: ``cm[true, predicted]`` pixel counts.
        names: class names, one per row.
        path: the PNG to write.
        title: a line above the matrix (the headline figures).
    """
    from PIL import Image, ImageDraw

    cm = np.asarray(cm, np.float64)
    k = cm.shape[0]
    names = [str(n) for n in names]
    rows = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(rows[:, None] > 0, cm / rows[:, None], np.nan)
        union = rows + cm.sum(axis=0) - np.diag(cm)
        iou = np.where(union > 0, np.diag(cm) / union, np.nan)

    cell = int(np.clip(640 // max(k, 1), 18, 56))
    font = _font(max(10, min(16, cell // 2 - 2)))
    small = _font(max(8, min(13, cell // 3)))
    big = _font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, n, font)[0] for n in names) + 12
    label_h = max(_text_size(probe, n, font)[1] for n in names)
    pad = 16
    title_h = 28 if title else 0
    axis_h = 22
    left = pad + axis_h + label_w
    top = pad + title_h + axis_h + label_w  # rotated column labels are as tall as row labels wide
    iou_w = cell + 16
    header = "predicted class"
    note = "row-normalised: % of each true class's pixels; IoU % at the right"
    width = max(
        left + k * cell + 8 + iou_w + pad,
        left + _text_size(probe, header, font)[0] + pad,
        pad + _text_size(probe, note, small)[0] + pad,
        pad + (_text_size(probe, title, big)[0] if title else 0) + pad,
    )
    height = top + k * cell + 12 + _text_size(probe, note, small)[1] + pad

    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    if title:
        draw.text((pad, pad), title, fill="black", font=big)
    draw.text((left, pad + title_h), header, fill="black", font=font)
    draw.text((pad, top + k * cell + 10), note, fill=(90, 90, 90), font=small)

    # The vertical axis title and the column labels are drawn on strips and rotated.
    axis_label = "true class"
    tw, th = _text_size(probe, axis_label, font)
    strip = Image.new("RGB", (tw + 4, th + 6), "white")
    ImageDraw.Draw(strip).text((2, 0), axis_label, fill="black", font=font)
    im.paste(strip.rotate(90, expand=True), (pad, top + max(0, (k * cell - tw) // 2)))
    for j, name in enumerate(names):
        w, _ = _text_size(probe, name, font)
        strip = Image.new("RGB", (label_w, label_h + 6), "white")
        ImageDraw.Draw(strip).text((label_w - w - 6, 0), name, fill="black", font=font)
        rot = strip.rotate(90, expand=True)
        x = left + j * cell + (cell - rot.width) // 2
        im.paste(rot, (x, top - label_w))

    for i, name in enumerate(names):
        y = top + i * cell
        w, h = _text_size(probe, name, font)
        draw.text((left - w - 8, y + (cell - h) // 2 - 2), name, fill="black", font=font)
        for j in range(k):
            x = left + j * cell
            v = frac[i, j]
            if np.isnan(v):
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(225, 225, 225))
                text = "-" if j == i else ""
                colour = (110, 110, 110)
            else:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_cell_colour(v))
                pct = v * 100
                text = "" if pct < 0.5 else f"{pct:.0f}"
                colour = "white" if v > 0.5 else "black"
            if text and cell >= 20:
                tw, th = _text_size(probe, text, small)
                draw.text((x + (cell - tw) / 2, y + (cell - th) / 2 - 2), text, fill=colour, font=small)
        # The diagonal outlined, so it is found at a glance in large matrices.
        d = left + i * cell
        draw.rectangle([d, y, d + cell - 1, y + cell - 1], outline=(220, 60, 40))
        x = left + k * cell + 8
        text = "-" if np.isnan(iou[i]) else f"{iou[i] * 100:.0f}"
        tw, th = _text_size(probe, text, small)
        draw.text((x + (iou_w - tw) / 2, y + (cell - th) / 2 - 2), text, fill="black", font=small)
    x = left + k * cell + 8
    tw, th = _text_size(probe, "IoU", font)
    draw.text((x + (iou_w - tw) / 2, top - th - 8), "IoU", fill="black", font=font)
    draw.rectangle([left - 1, top - 1, left + k * cell, top + k * cell], outline="black")

    path = Path(path)
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("Software", f"segnet {__version__}")  # so the next run may replace it
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", pnginfo=text)
    return path
