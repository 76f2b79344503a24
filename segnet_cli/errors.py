"""Named exceptions raised by the library and the exit codes the CLI maps them to.

The library never prints or exits: it raises one of these, and only ``segnet_cli.cli``
turns them into a one-line message and an exit code. Every command uses the same codes so
a shell script can trust them.
"""

from __future__ import annotations

from pathlib import Path

#: Everything asked for was done (or there was nothing to do).
EXIT_OK = 0
#: Some inputs failed; the others were processed.
EXIT_SOME_FAILED = 1
#: Usage error: a bad option, or nothing to work on (no input matched, nothing to check or
#: score), or an unusable output folder: nothing ran.
EXIT_USAGE = 2
#: Interrupted by SIGINT (Ctrl-C): 128 + 2. SIGTERM gives 128 + 15 = 143 (``Interrupted``).
EXIT_SIGINT = 130
#: The output pipe closed (``segnet predict --json | head -1``): 128 + 13, as the shell
#: reports a process that SIGPIPE stopped; the run stopped cleanly.
EXIT_PIPE_CLOSED = 141


def closed_stream(exc: OSError) -> bool:
    """Whether ``exc``, raised by a write, means that the stream's reader has gone.

    ``EPIPE`` on POSIX; Windows reports a write to a closed pipe as ``EINVAL``.
    """
    import errno

    return isinstance(exc, BrokenPipeError) or exc.errno in (errno.EPIPE, errno.EINVAL)


class SegnetError(Exception):
    """Base class of every error the library raises on purpose."""

    exit_code = EXIT_SOME_FAILED

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.message = message
        super().__init__(f"{path}: {message}" if path is not None else message)

    def __reduce__(self):
        # Rebuilt as it was whatever a subclass's __init__ takes: errors cross processes
        # (``tile``'s model process), and pickle would call __init__ with the full text.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type, args: tuple, state: dict) -> Exception:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class UsageError(SegnetError):
    """A bad option value or a combination that cannot work."""

    exit_code = EXIT_USAGE


class NoInputError(UsageError):
    """No input file matched what was asked for: nothing to segment, check or score.

    ``problems`` lists what was found wrong on the way (say, images without masks), so the
    user learns why nothing was left.
    """

    def __init__(self, message: str, path: str | Path | None = None, problems=None) -> None:
        super().__init__(message, path)
        self.problems = list(problems or [])


class ModelFileError(SegnetError):
    """A model file is missing, corrupt, or not a segnet model."""

    exit_code = EXIT_USAGE


class ImageReadError(SegnetError):
    """An input image cannot be read or converted to the model's channels."""


class ImageTooLargeError(ImageReadError):
    """An image is over the decompression-bomb limit (or too large to handle)."""


class ImageTooSmallError(ImageReadError):
    """An image has no pixels the model could segment."""


class OutputError(SegnetError):
    """An output cannot be written (read-only folder, disk full, ...)."""


class DatasetError(SegnetError):
    """A training or evaluation dataset has problems (see ``problems``)."""

    exit_code = EXIT_SOME_FAILED

    def __init__(self, message: str, problems: list[str] | None = None, path=None) -> None:
        super().__init__(message, path)
        self.problems = list(problems or [])


class TiffLayoutError(ImageReadError):
    """A TIFF whose layout cannot be read window by window."""


class LockedError(SegnetError):
    """Another run holds the lock on the same output."""


class MissingExtraError(UsageError):
    """An optional dependency is not installed; the message names the pip command."""


class ExportError(SegnetError):
    """A model cannot be exported, or the exported file failed its own parity check."""


class Interrupted(SegnetError):
    """A run was stopped by a signal; ``exit_code`` tells which."""

    def __init__(self, signum: int) -> None:
        import signal as _signal

        self.signum = signum
        name = _signal.Signals(signum).name
        super().__init__(f"interrupted by {name}")
        self.exit_code = 128 + int(signum)
