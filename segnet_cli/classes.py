"""Class tables: names, display colours and the void (ignored) class.

A class table comes from a preset (``camvid``), a JSON file (``[{"name": ..., "color":
[r, g, b]}, ...]`` or ``{"classes": [...], "void": 11}``) or a CSV file (``name,r,g,b`` per
line, an optional header). The void class, when given, is an index *outside* the model's
outputs: it is ignored in the loss and in every metric.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from segnet_cli.errors import UsageError

# CamVid, 11 classes + void, colours from the SegNet tutorial's script.
CAMVID = (
    ("Sky", (128, 128, 128)),
    ("Building", (128, 0, 0)),
    ("Pole", (192, 192, 128)),
    ("Road", (128, 64, 128)),
    ("Pavement", (60, 40, 222)),
    ("Tree", (128, 128, 0)),
    ("SignSymbol", (192, 128, 128)),
    ("Fence", (64, 64, 128)),
    ("Car", (64, 0, 128)),
    ("Pedestrian", (64, 64, 0)),
    ("Bicyclist", (0, 128, 192)),
)
CAMVID_VOID = 11

# A readable qualitative palette for tables given without colours.
_DEFAULT_COLOURS = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)  # fmt: skip


@dataclass(frozen=True)
class ClassTable:
    """Names and colours of a model's classes, plus the void index (or ``None``)."""

    names: tuple[str, ...]
    colours: tuple[tuple[int, int, int], ...]
    void: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def palette(self) -> tuple[tuple[int, int, int], ...]:
        """Colours for every mask value: the classes, then void in black."""
        pal = list(self.colours)
        if self.void is not None and self.void >= len(pal):
            pal.extend([(0, 0, 0)] * (self.void - len(pal) + 1))
        return tuple(pal)


#: Masks hold 8-bit class indices.
MAX_CLASSES = 256


def default_colour(i: int) -> tuple[int, int, int]:
    return _DEFAULT_COLOURS[i % len(_DEFAULT_COLOURS)]


def numbered(n: int, void: int | None = None) -> ClassTable:
    return ClassTable(
        tuple(f"class{i}" for i in range(n)), tuple(default_colour(i) for i in range(n)), void
    )


def load_classes(spec: str, void: int | None = None) -> ClassTable:
    """Load a class table from a preset name or a JSON/CSV file.

    Args:
        spec: ``camvid``, a number of classes (``"5"``), or a path to a JSON or CSV file.
        void: overrides the table's void index.

    Raises:
        UsageError: the file is missing or malformed.
    """
    if spec.lower() == "camvid":
        names = tuple(n for n, _ in CAMVID)
        colours = tuple(c for _, c in CAMVID)
        return _checked(ClassTable(names, colours, CAMVID_VOID if void is None else void), None)
    if spec.isdigit():
        if not 1 <= int(spec) <= MAX_CLASSES:
            raise UsageError(f"--classes {spec}: give 1 to {MAX_CLASSES} classes (masks hold "
                             "8-bit class indices)")
        return _checked(numbered(int(spec), void), None)
    path = Path(spec)
    if not path.is_file():
        raise UsageError("classes file not found (or give 'camvid' or a number)", path)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            file_void = None
            if isinstance(data, dict):
                file_void = data.get("void")
                data = data["classes"]
            names, colours = [], []
            for i, item in enumerate(data):
                if isinstance(item, str):
                    names.append(item)
                    colours.append(default_colour(i))
                else:
                    names.append(str(item["name"]))
                    colour = item.get("color", item.get("colour"))
                    colours.append(tuple(int(v) for v in colour) if colour else default_colour(i))
        else:
            names, colours = [], []
            file_void = None
            with path.open(newline="") as fh:
                for i, row in enumerate(csv.reader(fh)):
                    row = [c.strip() for c in row]
                    if not row or row[0].startswith("#"):
                        continue
                    if i == 0 and len(row) >= 4 and not row[1].lstrip("-").isdigit():
                        continue  # header
                    names.append(row[0])
                    colours.append(
                        tuple(int(v) for v in row[1:4]) if len(row) >= 4 else default_colour(i)
                    )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read classes file: {exc}", path) from None
    if not names:
        raise UsageError("classes file lists no classes", path)
    for c in colours:
        if len(c) != 3 or not all(0 <= v <= 255 for v in c):
            raise UsageError(f"colour {c} is not an RGB triple of 0-255", path)
    v = void if void is not None else file_void
    try:
        v = None if v is None else int(v)
    except (TypeError, ValueError):
        raise UsageError(f"void {v!r} is not a class index", path) from None
    return _checked(ClassTable(tuple(names), tuple(colours), v), path)


def _checked(table: ClassTable, path: Path | None) -> ClassTable:
    """Refuse tables whose masks could not be written or read back unambiguously.

    Masks store 8-bit class indices, so at most 256 classes and a void index of 0-255; the
    names label palettes, QGIS attribute tables and JSON reports, so each must be unique.
    """
    if len(table.names) > MAX_CLASSES:
        raise UsageError(f"{len(table.names)} classes: at most {MAX_CLASSES} (masks hold "
                         "8-bit class indices)", path)
    seen: set[str] = set()
    twice = [n for n in table.names if n in seen or seen.add(n)]
    if twice:
        raise UsageError(f"class names must differ: {', '.join(sorted(set(twice)))} "
                         "appears more than once", path)
    if table.void is not None and not 0 <= table.void <= 255:
        raise UsageError(f"the void index must be 0-255 (masks are 8-bit), not {table.void}", path)
    return table
