"""The ``segnet`` command line: thin commands over the library.

Each command parses its options, builds a config (``segnet_cli.config``), calls one library
function, prints the report and exits with ``report.return_code``. TensorFlow is imported
only inside the commands that run a model, so ``segnet --help`` and ``--version`` are instant.

Exit codes (the same for every command):
  0  all done, or nothing to do
  1  some inputs failed (the others were processed)
  2  usage error: bad option, no input matched, model file missing or invalid
  130/143  interrupted by SIGINT/SIGTERM (nothing partial is left)
  141  its output pipe closed (``segnet predict --json | head -1``): stopped the same way
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from segnet_cli import __version__
from segnet_cli.cli.common import EXIT_CODES_HELP
from segnet_cli.cli.eval import eval_command
from segnet_cli.cli.export import export_command
from segnet_cli.cli.model import info_command
from segnet_cli.cli.predict import predict_command
from segnet_cli.cli.tile import tile_command
from segnet_cli.cli.train import train_command, verify_command
from segnet_cli.errors import EXIT_PIPE_CLOSED, SegnetError

app = typer.Typer(
    name="segnet",
    help="Segment images of any size with a Keras SegNet.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from segnet_cli.config import default_model_path
        from segnet_cli.model.modelfile import read_info

        line = f"segnet {__version__}"
        try:
            info = read_info(default_model_path())
            headline = info.headline()
            if headline:
                label, figures = headline
                label = "CamVid val" if label == "val" else label
                line += (
                    f" (bundled model: {default_model_path().name}, {label} mIoU "
                    f"{figures.get('mean_iou', 0) * 100:.1f})"
                )
        except SegnetError:
            line += " (no bundled model)"
        typer.echo(line)
        raise typer.Exit(0)


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Segment images of any size with a Keras SegNet."""


# Commands, registered in the order ``--help`` lists them.
app.command("predict", epilog=EXIT_CODES_HELP)(predict_command)
app.command("tile", epilog=EXIT_CODES_HELP)(tile_command)
app.command("eval", epilog=EXIT_CODES_HELP)(eval_command)
app.command("train", epilog=EXIT_CODES_HELP)(train_command)
app.command("verify")(verify_command)
app.command("export", epilog=EXIT_CODES_HELP)(export_command)
app.command("info", epilog="Exit codes: 0 described; 2 the model file is missing or not a segnet "
            "model.")(info_command)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit as exc:
        # Click answers a write to a closed pipe with exit 1, which segnet reserves for
        # failed inputs; a script must see what the shell reports for SIGPIPE.
        if exc.code == 1 and _pipe_closed():
            sys.exit(EXIT_PIPE_CLOSED)
        raise


def _pipe_closed() -> bool:
    """Whether Click met a closed stdout or stderr (it then wraps both to pacify flushes)."""
    return any(type(f).__name__ == "PacifyFlushWrapper" for f in (sys.stdout, sys.stderr))


if __name__ == "__main__":
    main()
