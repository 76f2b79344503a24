"""One run lifecycle for every command and engine: inputs, provenance, claims, signals, report.

* ``collect_inputs`` expands files, folders (recursive) and glob patterns into inputs with
  the relative path their outputs mirror.
* ``Provenance`` is what an output records about how it was made (input content hash, model
  hash, settings); a re-run skips an input whose outputs record the same provenance.
* ``Claim`` keeps two overlapping runs off the same output (a per-output ``io.files.Lock``):
  claim, re-check under the claim, write, release.
* ``SignalGuard`` turns SIGINT/SIGTERM into a flag the run checks between batches, so the
  run stops cleanly, writes nothing partial and still reports; a closed event stream
  (``--json | head``) stops it the same way, as SIGPIPE.
* ``Run`` counts each input's final ``Outcome`` as it comes (and tells the caller and the
  progress bar), and makes the one ``Report`` whose ``return_code`` the CLI exits with.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from segnet_cli.config import Report, Status
from segnet_cli.errors import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    Interrupted,
    NoInputError,
    closed_stream,
)
from segnet_cli.io.files import is_temporary, output_lock, same_file
from segnet_cli.io.images import IMAGE_SUFFIXES

#: What a closed output pipe stops a run with (exit 141, as the shell reports SIGPIPE).
SIGPIPE = getattr(signal, "SIGPIPE", 13)

# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputItem:
    """One input and where its outputs go, relative to the output folder."""

    path: Path
    rel: Path  # relative path of the input, mirrored under the output folder


def collect_inputs(
    specs: tuple[str, ...] | list[str],
    suffixes=IMAGE_SUFFIXES,
    exclude: Path | None = None,
    ignore: Path | None = None,
) -> tuple[list[InputItem], list[str]]:
    """Expand inputs: files as given, folders recursively, glob patterns.

    Files named explicitly are kept whatever their suffix (the reader will say if they are
    not images); files found in folders are kept by suffix. Hidden files and segnet's own
    temporaries are skipped.

    ``exclude`` is the run's output folder. When it lies *strictly inside* a folder being
    searched (an input folder, or a glob's fixed root), everything below it is skipped:
    masks written inside an input folder are not inputs of the next run. An output folder
    that *is* an input folder is not excluded (that would silently leave nothing to do):
    its files stay inputs, and the caller refuses the outputs that would land on them.

    ``ignore`` is one file that is never an input, however it is matched: the run's own
    log, which a glob such as ``'in/*'`` would otherwise pick up as it is being written.

    Returns:
        ``(items, missing)``: ``missing`` lists specs that matched nothing.

    Raises:
        NoInputError: nothing matched at all.
    """
    items: list[InputItem] = []
    missing: list[str] = []
    seen: set[Path] = set()

    def add(path: Path, rel: Path, skip: Path | None = None) -> None:
        if skip is not None and _real_parent(path).is_relative_to(skip):
            return
        if ignore is not None and same_file(path, ignore):
            return
        key = path.absolute()
        if key not in seen:
            seen.add(key)
            items.append(InputItem(path, rel))

    empty: list[str] = []  # folders that hold no image: named when nothing matched at all
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            skip = _strictly_inside(exclude, p)
            before = len(items)
            for f in _walk(p, skip):
                rel = f.relative_to(p)
                if f.suffix.lower() in suffixes:
                    add(f, rel, skip)
            if len(items) == before:
                empty.append(spec)
        elif p.exists() or p.is_symlink():
            add(p, Path(p.name))  # named explicitly: an input, wherever it lies
        elif any(ch in spec for ch in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                missing.append(spec)
            root = Path(_glob_root(spec))
            skip = _strictly_inside(exclude, root)
            for m in matches:
                mp = Path(m)
                if mp.is_dir() or is_temporary(mp):
                    continue
                add(mp, _mirrored(mp, root), skip)
        else:
            missing.append(spec)
    if not items:
        why = [f"{m} ({'matched nothing' if any(c in m for c in '*?[') else 'not found'})"
               for m in missing]
        kinds = ", ".join(sorted({x.lstrip(".") for x in suffixes}))
        why += [f"{e} (a folder with no {kinds} file)" for e in empty]
        raise NoInputError("no input matched" + (f": {'; '.join(why)}" if why else ""))
    return items, missing


def _real_parent(path: Path) -> Path:
    """``path`` with its folders' symbolic links resolved (the file itself is not followed)."""
    return Path(os.path.realpath(path.parent)) / path.name


def _strictly_inside(folder: Path | None, top: Path) -> Path | None:
    """``folder`` resolved, when it lies strictly inside ``top`` (never ``top`` itself)."""
    if folder is None:
        return None
    inner, outer = Path(os.path.realpath(folder)), Path(os.path.realpath(top))
    return inner if inner != outer and inner.is_relative_to(outer) else None


def _walk(top: Path, skip: Path | None = None) -> list[Path]:
    """Every non-hidden entry below ``top`` (not below ``skip``), sorted, without recursion.

    An explicit stack: a tree thousands of folders deep must not hit Python's recursion
    limit. Symbolic links to folders are not followed (a loop would never end); links to
    files are kept, as files. ``skip`` is compared resolved (``_strictly_inside``).
    """
    found: list[Path] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # unreadable folder: its files are simply not inputs
        for e in entries:
            if e.name.startswith("."):
                continue
            path = Path(e.path)
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                if skip is not None and Path(os.path.realpath(path)) == skip:
                    continue
                stack.append(path)
            found.append(path)
    return sorted(found)


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    root = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        root.append(part)
    return str(Path(*root)) if root else "."


def _mirrored(path: Path, root: Path) -> Path:
    """The relative path a glob match mirrors under the output folder.

    Never climbs out of it: ``..`` components (``imgs/*/../../imgs/a.png``) are resolved
    away lexically, and a match outside the glob's root mirrors as its file name alone.
    """
    norm = Path(os.path.normpath(path))
    try:
        rel = norm.relative_to(Path(os.path.normpath(root)))
    except ValueError:
        return Path(norm.name)
    if not rel.parts or rel.parts[0] == "..":
        return Path(norm.name)
    return rel


# --------------------------------------------------------------------------- provenance


#: The PNG text chunk (and JPEG comment) that holds an output's provenance.
PROVENANCE_KEY = "segnet"


@dataclass(frozen=True)
class Provenance:
    """How an output was made; equal provenance means the output is up to date."""

    input_sha: str
    model_sha: str
    settings: str

    def to_json(self) -> str:
        return json.dumps(
            {"input_sha256": self.input_sha, "model_sha256": self.model_sha, "settings": self.settings},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | None) -> Provenance | None:
        if not text:
            return None
        try:
            d = json.loads(text)
            return cls(d["input_sha256"], d["model_sha256"], d["settings"])
        except (ValueError, KeyError, TypeError):
            return None


def settings_key(**settings) -> str:
    """The settings that change an output, as a stable string (enums as their values)."""
    return json.dumps(settings, sort_keys=True, default=str)


# --------------------------------------------------------------------------- claims


class Claim:
    """An exclusive, non-blocking claim on one output of a run writing into ``out_root``.

    The lock lives in a hidden folder of the output folder while it is held and is removed
    on release (``io.files.Lock``); it dies with its process, even by SIGKILL.
    """

    def __init__(self, out_root: Path, output: Path) -> None:
        self._lock = output_lock(out_root, output)

    @property
    def lock_path(self) -> Path:
        return self._lock.path

    def acquire(self) -> bool:
        return self._lock.acquire()

    def release(self) -> None:
        self._lock.release()


# --------------------------------------------------------------------------- signals


class SignalGuard:
    """Catch SIGINT/SIGTERM: set ``stop`` and let the run finish cleanly.

    A second signal, once the run is stopping for any reason, restores the default action
    (a second Ctrl-C kills).
    Only installs handlers in the main thread (tests run commands from other threads).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def reinstall(self) -> None:
        """Put the guard's handlers back (libraries such as Ray replace SIGTERM's)."""
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def request(self, signum: int) -> None:
        """Stop the run as if ``signum`` had come (the first reason to stop is kept)."""
        if self.signum is None:
            self.signum = signum

    @property
    def stop(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise ``Interrupted`` once a signal came."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def stopped_by(signum: int | None) -> str:
    """What stopped a run, for its log line."""
    return "output closed" if signum == SIGPIPE else "interrupted"


# --------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """One input's result, as printed with ``--json``."""

    path: str
    output: str | None
    status: Status
    seconds: float = 0.0
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {
            "path": self.path,
            "output": self.output,
            "status": str(self.status),
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }
        d.update(self.extra)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


class Timer:
    """Seconds since it was made (a monotonic clock)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


class Run:
    """The bookkeeping of one run: outcomes as they become final, and the report.

    Thread-safe: a writer thread and the main thread may both report outcomes.

    Args:
        on_event: called with each ``Outcome`` as soon as it is final.
        progress: optional ``ui.Progress``-like object; advanced once per finished input.
        log: optional callable for one-line human messages.
    """

    def __init__(self, on_event: Callable[[Outcome], None] | None = None, progress=None, log=None) -> None:
        self.timer = Timer()
        self.counts = {Status.DONE: 0, Status.SKIPPED: 0, Status.FAILED: 0, Status.PLANNED: 0}
        self.interrupted: int | None = None
        self._on_event = on_event or (lambda o: None)
        self.progress = progress
        self.log = log or (lambda _msg: None)
        #: The engine's guard: a closed event stream stops the run through it.
        self.guard: SignalGuard | None = None
        self.events_closed = False
        self._lock = threading.Lock()

    def attach(self, guard: SignalGuard) -> None:
        """Stop the run through ``guard`` when the events' reader goes (even while planning)."""
        self.guard = guard
        if self.events_closed:
            guard.request(SIGPIPE)

    def emit(self, outcome: Outcome, advance: bool = True) -> None:
        """Count one final outcome and pass it on (``advance``: move the progress bar).

        When the reader of the events has gone (``segnet predict --json | head -1``), the
        run stops as SIGPIPE would stop it, cleanly: the inputs under way finish, the rest
        are left for the next run. Going on would only fail on the closed pipe again.
        """
        with self._lock:
            self.counts[outcome.status] += 1
        if not self.events_closed:
            try:
                self._on_event(outcome)
            except OSError as exc:
                if not closed_stream(exc):
                    raise
                self.events_closed = True
                if self.guard is not None:
                    self.guard.request(SIGPIPE)
        if advance and self.progress is not None and outcome.status is not Status.PLANNED:
            self.progress.advance(1)

    def fail(self, path, error: str, seconds: float = 0.0, advance: bool = True) -> None:
        self.emit(Outcome(str(path), None, Status.FAILED, seconds, error), advance)

    def skip(self, path, output, reason: str, advance: bool = True) -> None:
        self.emit(Outcome(str(path), str(output), Status.SKIPPED, extra={"reason": reason}), advance)

    @property
    def return_code(self) -> int:
        if self.interrupted is None and self.events_closed:
            # A run ended, or only planned, with its events unread: say so, as SIGPIPE would.
            return 128 + SIGPIPE
        if self.interrupted is not None:
            return 128 + self.interrupted
        return EXIT_SOME_FAILED if self.counts[Status.FAILED] else EXIT_OK

    def report(self, **details) -> Report:
        """The run's report: counts, time, ``details`` and the return code."""
        if self.interrupted is not None:
            details.setdefault("interrupted", self.interrupted)
        return Report(
            return_code=self.return_code,
            done=self.counts[Status.DONE],
            skipped=self.counts[Status.SKIPPED],
            failed=self.counts[Status.FAILED],
            seconds=self.timer(),
            details=details,
        )


def first_of(paths: list) -> str:
    """The first of several paths for a message, and how many more ("a.png and 3 more")."""
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    return f"{paths[0]}{more}"


def foreign_image(output: Path) -> bool:
    """Whether ``output`` is a file that segnet did not write (so not ours to replace).

    segnet's masks and overlays carry their provenance in a PNG text chunk or a JPEG
    comment (``eval --save-masks`` masks: a ``Software`` chunk), read with the header,
    before the pixels. A readable image without either is someone else's: a folder of
    ground-truth masks given as ``--out`` by mistake, say. A file Pillow cannot open is
    someone's too (notes, a chart, a document saved under a mask's name) unless it is empty
    or begins as an image does and was cut short in its header: segnet replaces its files
    by an fsynced rename, so such remains come from a crash of the disk or of another
    writer, and the repair rules redo them.
    """
    if not output.is_file():
        return False
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(output) as im:
                info = dict(im.info)
    except Image.DecompressionBombError:
        # Over Pillow's process-wide pixel guard (which a run's --max-pixels sets): a whole
        # image, so someone's, unless its header holds segnet's marks.
        with open(output, "rb") as fh:
            head = fh.read(1 << 16)
        return b'"input_sha256"' not in head and b"Software\x00segnet " not in head
    except Exception:
        return not _cut_short_image(output)
    text = info.get(PROVENANCE_KEY) or info.get("comment")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    software = str(info.get("Software", ""))
    return Provenance.from_json(text) is None and not software.startswith("segnet ")


#: How the image formats segnet writes begin (PNG, JPEG, little- and big-endian TIFF and
#: BigTIFF).
_IMAGE_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+",
)


def _cut_short_image(path: Path) -> bool:
    """Whether an unreadable ``path`` is empty or starts like an image: remains, not a document.

    A file this process may not read at all (its permissions) is not judged: it is replaced
    by rename like any other of segnet's outputs.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return True  # unreadable to us (its permissions), as it was to Pillow: not judged
    return not head or any(
        head.startswith(sig) or sig.startswith(head) for sig in _IMAGE_SIGNATURES
    )


__all__ = [
    "PROVENANCE_KEY",
    "foreign_image",
    "InputItem",
    "collect_inputs",
    "Provenance",
    "settings_key",
    "Claim",
    "SignalGuard",
    "SIGPIPE",
    "stopped_by",
    "Outcome",
    "Run",
    "Timer",
]
