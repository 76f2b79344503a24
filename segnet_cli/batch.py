"""What makes a batch run safe to repeat from cron: inputs, claims, signals, records.

* ``collect_inputs`` expands files, folders (recursive) and glob patterns into inputs with
  the relative path their outputs mirror.
* ``Claim`` is a per-output ``flock``: two overlapping runs never write the same mask; the
  kernel drops the lock when a process dies, even by SIGKILL, so no stale lock blocks anyone.
* ``Provenance`` is what a mask records about how it was made (input content hash, model
  hash, settings); a re-run skips an input whose mask records the same provenance.
* ``SignalGuard`` turns SIGINT/SIGTERM into a flag the run checks between batches, so the
  run stops cleanly, writes nothing partial and still prints its summary.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from segnet_cli.errors import Interrupted, NoInputError
from segnet_cli.imageio import HOST_TOKEN, IMAGE_SUFFIXES, TMP_PREFIX

LOCK_DIR = ".segnet-locks"


@dataclass(frozen=True)
class InputItem:
    """One input and where its outputs go, relative to the output folder."""

    path: Path
    rel: Path  # relative path of the input, mirrored under the output folder


def collect_inputs(specs: tuple[str, ...] | list[str], suffixes=IMAGE_SUFFIXES) -> tuple[list[InputItem], list[str]]:
    """Expand inputs: files as given, folders recursively, glob patterns.

    Files named explicitly are kept whatever their suffix (the reader will say if they are
    not images); files found in folders are kept by suffix. Hidden files and segnet's own
    temporaries are skipped.

    Returns:
        ``(items, missing)``: ``missing`` lists specs that matched nothing.

    Raises:
        NoInputError: nothing matched at all.
    """
    items: list[InputItem] = []
    missing: list[str] = []
    seen: set[Path] = set()

    def add(path: Path, rel: Path) -> None:
        key = path.absolute()
        if key not in seen:
            seen.add(key)
            items.append(InputItem(path, rel))

    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if f.suffix.lower() in suffixes and (f.is_file() or f.is_symlink() or f.is_dir()):
                    add(f, rel)
        elif p.exists() or p.is_symlink():
            add(p, Path(p.name))
        elif any(ch in spec for ch in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                missing.append(spec)
            root = Path(_glob_root(spec))
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    continue
                try:
                    rel = mp.relative_to(root)
                except ValueError:
                    rel = Path(mp.name)
                add(mp, rel)
        else:
            missing.append(spec)
    if not items:
        raise NoInputError(
            "no input matched" + (f": {', '.join(missing)}" if missing else "")
        )
    return items, missing


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    root = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        root.append(part)
    return str(Path(*root)) if root else "."


def file_digest(path: Path, limit: int | None = None) -> str:
    """SHA-256 of a file's content (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        read = 0
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            read += len(chunk)
            if limit is not None and read >= limit:
                break
    return h.hexdigest()[:16]


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
    return json.dumps(settings, sort_keys=True, default=str)


class Claim:
    """An exclusive, non-blocking claim on one output, held with ``flock``.

    ``acquire`` returns False when another live process holds it. The lock file lives in a
    hidden folder of the output folder; the lock dies with its process.
    """

    def __init__(self, out_root: Path, output: Path) -> None:
        key = hashlib.sha1(str(output.resolve()).encode()).hexdigest()[:20]
        self.lock_path = out_root / LOCK_DIR / f"{key}.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


def remove_dead_temporaries(folder: Path, pattern: str = "*", recursive: bool = True) -> int:
    """Remove temporaries (``TMP_PREFIX``) whose writing process is gone; returns how many.

    Temporaries carry their writer's pid and host, so a live concurrent run's files (and this
    process's own) are left alone; so are another machine's, whose pids mean nothing here
    (that machine's next run removes its own).

    Args:
        folder: where to look.
        pattern: what follows ``TMP_PREFIX`` in the names to consider (e.g. ``"*-out.tif.*"``
            to touch only one output's temporaries).
        recursive: also look in subfolders.
    """
    n = 0
    if not folder.is_dir():
        return 0
    found = folder.rglob if recursive else folder.glob
    for p in found(f"{TMP_PREFIX}{pattern}"):
        pid = _local_pid_of(p.name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def _local_pid_of(name: str) -> int | None:
    """The writer's pid if this host wrote the temporary (``<pid>.<host>-``), else None.

    A bare ``<pid>-`` (no host) is taken as local.
    """
    head = name[len(TMP_PREFIX) :].split("-", 1)[0]
    pid, _, host = head.partition(".")
    if not pid.isdigit() or (host and host != HOST_TOKEN):
        return None
    return int(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SignalGuard:
    """Catch SIGINT/SIGTERM: set ``stop`` and let the run finish cleanly.

    A second signal of the same kind restores the default action (a second Ctrl-C kills).
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

    @property
    def stop(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class Outcome:
    """One input's result, as printed with ``--json``."""

    path: str
    output: str | None
    status: str  # "done", "skipped", "failed", "planned"
    seconds: float = 0.0
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d = {
            "path": self.path,
            "output": self.output,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }
        d.update(self.extra)
        return json.dumps(d)


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
