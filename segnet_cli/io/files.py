"""Files: atomic writes, temporaries and locks, the one place that creates any of them.

Every output segnet writes goes through ``atomic_path``: a temporary beside the final file,
fsynced, then renamed. A kill at any moment leaves the old file or the new one, never half of
one, and never a file that looks like a result: a temporary is hidden (``TMP_PREFIX``) and
ends in ``TMP_SUFFIX``, not in the final extension, so ``find masks -name '*.png'`` or a
training glob never picks one up.

A temporary's name carries its writer's pid and host (``writer_tag``), so a later run can
tell a dead run's leftovers (removed by ``remove_dead_temporaries``) from a live run's, also
on a folder that several machines share.

``Lock`` is an exclusive, non-blocking ``flock`` on a lock file; the kernel drops it when its
process dies, even by SIGKILL. ``Lock.release`` removes the lock file, so a finished run
leaves nothing behind; ``acquire`` checks that the file it locked is still the one at the
path, which keeps that removal race-free.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from segnet_cli.errors import OutputError, UsageError

#: Prefix of every temporary file or folder segnet writes; a later run removes dead ones.
TMP_PREFIX = ".segnet-tmp-"
#: Suffix of every temporary file: never the final file's extension.
TMP_SUFFIX = ".tmp"

#: This machine in temporary names: a pid means something only on the host that wrote it.
HOST_TOKEN = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def writer_tag() -> str:
    """``<pid>.<host>`` for temporary names, so a later run can tell whose they are."""
    return f"{os.getpid()}.{HOST_TOKEN}"


def tmp_label(name: str) -> str:
    """``name`` as its temporaries carry it: as is, unless it holds bytes that are not UTF-8
    (a byte name decoded with surrogate escapes), which become ``%XX``.

    Some writers (GDAL, and so the COG and vector outputs) take only text paths; the final
    name itself is kept byte for byte by the rename.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return "".join(chr(b) if b < 128 else f"%{b:02X}" for b in os.fsencode(name))


def temporary_name(final: Path) -> str:
    """A fixed temporary name for ``final`` owned by this process (see the module notes)."""
    return f"{TMP_PREFIX}{writer_tag()}-{tmp_label(final.name)}{TMP_SUFFIX}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _reserve(final: Path, kind: str = "") -> str:
    """Create an empty, uniquely named temporary for ``final`` beside it; its path.

    Raises:
        OutputError: the folder cannot be created or written (naming the folder).
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f"{TMP_PREFIX}{writer_tag()}-{tmp_label(final.name)}.{kind}",
            suffix=TMP_SUFFIX,
            dir=final.parent,
        )
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write here: {exc.strerror or exc}", final.parent) from None
    return tmp


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only on success.

    The temporary is fsynced before the rename, so a crash leaves either the old file or the
    new one. It gets the permissions a plain ``open`` would give (umask), not ``mkstemp``'s
    0600. Writers must name their format explicitly: the temporary's suffix is
    ``TMP_SUFFIX``, not the final extension.

    Raises:
        OutputError: the folder cannot be written, or the disk is full (naming ``final``,
            never the hidden temporary).
    """
    final = Path(final)
    tmp = _reserve(final)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        raise OutputError(_as_final(f"cannot write: {exc.strerror or exc}", tmp, final), final) from None
    except OutputError as exc:
        # A writer that names the file it was given names the hidden temporary: the user
        # knows only the output.
        if exc.path is not None and os.path.abspath(exc.path) == os.path.abspath(tmp):
            raise OutputError(_as_final(exc.message, tmp, final), final) from None
        raise
    finally:
        if os.path.lexists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass


@contextmanager
def scratch_path(final: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary beside ``final`` that is always deleted, never renamed.

    For intermediate files of a write (the streamed raster a Cloud-Optimized GeoTIFF is
    made from): named like ``atomic_path``'s temporaries, so a dead run's are found and
    removed the same way; files GDAL derives from its name (``.aux.xml``, ``.ovr``) go too.
    """
    tmp = _reserve(Path(final), "scratch.")
    try:
        yield Path(tmp)
    finally:
        for path in [tmp, *glob.glob(glob.escape(tmp) + ".*")]:
            try:
                os.unlink(path)
            except OSError:
                pass


def _as_final(message: str, tmp: str, final: Path) -> str:
    """``message`` with the temporary's name replaced by the output's."""
    return message.replace(str(tmp), str(final)).replace(Path(tmp).name, final.name)


def check_writable(folder: str | Path, option: str = "--out") -> None:
    """Fail early, with a clear message, when an output folder cannot be written.

    The folder is created if needed, then probed with a temporary of a unique name (made by
    ``mkstemp``, removed at once): concurrent runs probing one folder never collide, and a
    killed probe leaves a temporary the next run removes like any other.

    Args:
        folder: the folder outputs will be written to.
        option: how the user named it, for the message (``--out``, ``--save-masks``, ...).

    Raises:
        UsageError: ``folder`` is a file, or cannot be created or written. Nothing could
            run, so it is a usage error (exit 2), not a failed input.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} is a file, not a folder", folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(
            prefix=f"{TMP_PREFIX}{writer_tag()}-write-test.", suffix=TMP_SUFFIX, dir=folder
        )
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            f"cannot write to the output folder ({option}): {exc.strerror or exc}", folder
        ) from None


@contextmanager
def atomic_folder(final: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it into place only on success.

    For outputs that are folders (a TensorFlow SavedModel): the folder is built under a
    hidden temporary name (``TMP_PREFIX``, ending in ``TMP_SUFFIX``), its files fsynced, then
    renamed. A failure or a kill leaves no folder under the final name. With ``replace``, an
    existing ``final`` is first renamed aside, then removed once the new one is in place.

    Raises:
        OutputError: the folder cannot be written, or ``final`` exists and ``replace`` is
            False.
    """
    import shutil

    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(
                prefix=f"{TMP_PREFIX}{writer_tag()}-{final.name}.", suffix=TMP_SUFFIX,
                dir=final.parent,
            )
        )
    except OSError as exc:
        raise OutputError(f"cannot write here: {exc.strerror or exc}", final.parent) from None
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        for root, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(root, name), "rb+") as fh:
                    os.fsync(fh.fileno())
        if os.path.lexists(final):
            if not replace:
                raise OutputError("already exists", final)
            old = final.parent / f"{TMP_PREFIX}{writer_tag()}-{final.name}.old{TMP_SUFFIX}"
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as exc:
        if old is not None and not os.path.lexists(final):
            os.replace(old, final)  # put the previous output back
            old = None
        raise OutputError(f"cannot write: {exc.strerror or exc}", final) from None
    finally:
        for leftover in (tmp, old):
            if leftover is not None and os.path.lexists(leftover):
                if os.path.isdir(leftover) and not os.path.islink(leftover):
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    try:
                        os.unlink(leftover)
                    except OSError:
                        pass


def same_file(a: str | Path, b: str | Path) -> bool:
    """True if ``a`` and ``b`` name one file: the same inode when both exist (hard and
    symbolic links included), else the same path with links resolved."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def is_temporary(path: Path) -> bool:
    """A segnet temporary (file or folder), by name."""
    return path.name.startswith(TMP_PREFIX)


def remove_dead_temporaries(folder: Path, pattern: str = "*", recursive: bool = True) -> int:
    """Remove temporaries whose writing process is gone; returns how many.

    A live concurrent run's files (and this process's own) are left alone; so are another
    machine's, whose pids mean nothing here (that machine's next run removes its own).

    Args:
        folder: where to look.
        pattern: what follows ``TMP_PREFIX`` in the names to consider (e.g. ``"*-out.tif*"``
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
            if p.is_dir() and not p.is_symlink():
                import shutil

                shutil.rmtree(p)
            else:
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


class Lock:
    """An exclusive, non-blocking ``flock`` on ``path``, removed again on release.

    ``acquire`` returns False when another live process holds it. Removing the lock file on
    release is safe because ``acquire`` verifies, after locking, that the path still names
    the file it locked: a process that opened the file just before its holder removed it
    sees the difference and retries on the new file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock if it is free; False if another process holds it.

        Raises:
            OSError: the lock file cannot be created (read-only folder, ...).
        """
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                continue  # removed by the last holder between mkdir's two checks: again
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # the folder was removed by the last lock's holder: make it again
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # removed or replaced by its last holder meanwhile: try again

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            try:
                self.path.parent.rmdir()  # only when empty: the last lock of a run
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


#: Hidden folder of an output folder that holds the per-output locks of live runs.
LOCK_DIR = ".segnet-locks"


def output_lock(out_root: Path, output: Path) -> Lock:
    """The lock that claims one output of a run writing into ``out_root``."""
    key = hashlib.sha1(os.fsencode(output.resolve())).hexdigest()[:20]
    return Lock(out_root / LOCK_DIR / f"{key}.lock")


def file_digest(path: Path, digits: int | None = 16) -> str:
    """SHA-256 of a file's content: its first ``digits`` hex digits (provenance keys), or
    all 64 with ``digits=None`` (a model's identity inside exports and training records)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:digits]


class FileSet:
    """A set of files known by resolved path and, when they exist, by device and inode, so
    an output is recognised as an input through symbolic links, hard links and ``..``.

    Each member is looked at once when the set is made; a lookup costs one ``stat``, so
    checking a folder of outputs against many inputs stays linear.
    """

    def __init__(self, paths) -> None:
        self._by_path: dict[Path, Path] = {}
        self._by_inode: dict[tuple[int, int], Path] = {}
        for p in paths:
            self._by_path.setdefault(Path(os.path.realpath(p)), p)
            try:
                st = os.stat(p)
            except OSError:
                continue
            self._by_inode.setdefault((st.st_dev, st.st_ino), p)

    def find(self, path: Path) -> Path | None:
        """The member ``path`` names, or None."""
        hit = self._by_path.get(Path(os.path.realpath(path)))
        if hit is not None:
            return hit
        try:
            st = os.stat(path)
        except OSError:
            return None
        return self._by_inode.get((st.st_dev, st.st_ino))


__all__ = [
    "FileSet",
    "TMP_PREFIX",
    "TMP_SUFFIX",
    "HOST_TOKEN",
    "atomic_path",
    "scratch_path",
    "check_writable",
    "atomic_folder",
    "temporary_name",
    "tmp_label",
    "is_temporary",
    "remove_dead_temporaries",
    "Lock",
    "output_lock",
    "file_digest",
    "writer_tag",
]
