"""Human output: messages and progress on stderr, never on stdout.

Stdout is kept for machine-readable output (``--json``). When stderr is a terminal the
progress is a rich bar with rate and ETA; otherwise (cron, a pipe, a log file) it is plain
log lines every few seconds, never animation. ``NO_COLOR`` is honoured by rich itself.

Every message is passed through ``safe`` on its way out, here and only here: file names are
user data, and a name holding a newline or an escape sequence must not start a line of its
own (a forged ``error:`` in a log) or drive the terminal.

When stderr's reader goes away (``segnet predict ... 2>&1 | head -1``), messages stop and
the run goes on: they are for people, and the masks are what was asked for. (A closed
stdout, where ``--json`` goes, stops a run instead: see ``jobs.Run.emit``.)
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from rich.console import Console

_console: Console | None = None
_log_file = None
_quiet = False
_stderr_closed = False


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's default points stdout at /dev/null and exits 1 (from whichever thread
        # wrote); a closed stderr only silences the messages.
        global _stderr_closed
        _stderr_closed = True
        self.quiet = True


#: What ``safe`` escapes: C0 controls (newline, carriage return, escape, ...), DEL, C1
#: controls, Unicode line and paragraph separators, and lone surrogates (the bytes of a file
#: name that is not valid UTF-8, as ``os.fsdecode`` keeps them).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match) -> str:
    ch = match.group()
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the undecodable byte itself
        return f"\\x{code - 0xDC00:02x}"
    if ch in _NAMED:
        return _NAMED[ch]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str) -> str:
    """``text`` with control characters and undecodable bytes shown as escapes (``\\n``,
    ``\\x1b``, ``\\xff``), so one message is always one line of plain text."""
    return _UNSAFE.sub(_escape_char, str(text))


def console() -> Console:
    global _console
    if _console is None:
        _console = _Console(stderr=True, highlight=False, soft_wrap=True)
    return _console


def configure(quiet: bool = False, log_file: Path | None = None) -> None:
    """Set up one command's output: ``--quiet`` and ``--log-file`` (appended, line-buffered)."""
    global _quiet, _log_file
    _quiet = quiet
    if _log_file is not None:
        _log_file.close()
        _log_file = None
    if log_file is not None:
        _refuse_binary_log(Path(log_file))
        try:
            _log_file = open(
                log_file, "a", buffering=1, encoding="utf-8", errors="backslashreplace"
            )
        except OSError as exc:
            from segnet_cli.errors import UsageError

            raise UsageError(f"cannot open the log file: {exc.strerror or exc}", log_file) from None


def _refuse_binary_log(path: Path) -> None:
    """Refuse to append log lines to a file that is not a text log.

    ``--log-file`` appends, so a slip such as ``--log-file photos/a.jpg`` would otherwise
    change an image, a mask or a model for good. Logs are UTF-8 text, which never holds a
    NUL byte; images, TIFFs and model files hold one in their first bytes.

    Raises:
        UsageError: ``path`` exists and its first 8 KiB hold a NUL byte.
    """
    if not path.is_file():
        return  # new, or a pipe or terminal (reading one would block): nothing to protect
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return  # unreadable: open() below says what is wrong
    if b"\0" in head:
        from segnet_cli.errors import UsageError

        raise UsageError(
            "--log-file is not a text log (it holds binary data: an image or a model?); "
            "segnet only appends to text logs",
            path,
        )


def _to_log_file(text: str) -> None:
    if _log_file is not None:
        _log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {safe(text)}\n")


def info(text: str) -> None:
    """A progress or status line; dropped with ``--quiet``."""
    text = safe(text)
    _to_log_file(text)
    if not _quiet:
        console().print(text, markup=False)


def summary(text: str) -> None:
    """The closing summary of a run: shown even with ``--quiet``, and logged."""
    text = safe(text)
    _to_log_file(text)
    console().print(text, markup=False)


def error(text: str) -> None:
    """An error line; always shown."""
    text = safe(text)
    _to_log_file(f"error: {text}")
    console().print(f"[bold red]error:[/] {_escape(text)}")


def warn(text: str) -> None:
    text = safe(text)
    _to_log_file(f"warning: {text}")
    if not _quiet:
        console().print(f"[yellow]warning:[/] {_escape(text)}")


def echo(text: str) -> None:
    """A line of human output on stdout (``tile --plan``, ``info``), escaped like the rest."""
    import typer

    typer.echo(safe(text))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def interactive() -> bool:
    return console().is_terminal and not _quiet


class Progress:
    """Progress over ``total`` units: a rich bar on a terminal, log lines otherwise.

    Args:
        label: what is being counted ("images", "tiles", "steps").
        total: the number of units.
        every: seconds between plain log lines.
    """

    def __init__(self, label: str, total: int, every: float = 10.0) -> None:
        self.label = label
        self.total = max(int(total), 0)
        self.done = 0
        self.extra = ""
        self.every = every
        self._t0 = time.time()
        self._last = 0.0
        self._bar = None
        self._task = None
        self._start_done = 0

    def __enter__(self) -> Progress:
        if self.total:
            self.start(self.total, 0)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, total: int, done: int = 0) -> None:
        self.stop()  # a restart replaces the bar instead of leaving a stale one behind
        self.total, self.done, self._start_done = int(total), int(done), int(done)
        self._t0 = time.time()
        if _quiet:
            return
        if interactive():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[extra]}"),
                console=console(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, completed=done, rate="", extra="")

    def advance(self, n: int = 1, extra: str | None = None) -> None:
        self.done += n
        if extra is not None:
            self.extra = extra
        self._update()

    def step(self, loss: float | None = None) -> None:
        """Training hook: one step done (with its loss)."""
        self.advance(1, None if loss is None else f"loss {loss:.4f}")

    def rate(self) -> float:
        dt = time.time() - self._t0
        return (self.done - self._start_done) / dt if dt > 0 else 0.0

    def eta(self) -> float | None:
        r = self.rate()
        return (self.total - self.done) / r if r > 0 else None

    def _update(self) -> None:
        if _quiet:
            return
        rate = f"{self.rate():.2f} {self.label}/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=rate, extra=self.extra)
            return
        now = time.time()
        if now - self._last >= self.every or self.done >= self.total:
            self._last = now
            eta = self.eta()
            eta_s = "?" if eta is None else _fmt_seconds(eta)
            line = safe(f"{self.label}: {self.done}/{self.total} ({rate}, ETA {eta_s}) {self.extra}")
            _to_log_file(line)
            _plain_line(line.rstrip())

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _plain_line(line: str) -> None:
    """One line on stderr, unless its reader has gone."""
    global _stderr_closed
    if _stderr_closed:
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError as exc:
        from segnet_cli.errors import closed_stream

        if not closed_stream(exc):
            raise
        _stderr_closed = True


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
