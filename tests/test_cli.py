"""The command line itself: instant help, version, info, logging, one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import shapes_image, write_png
from typer.testing import CliRunner

from segnet_cli import __version__
from segnet_cli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_commands_and_exit_codes():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("predict", "train", "verify", "info"):
        assert cmd in r.output
    assert "Exit codes" in r.output and "130/143" in r.output
    r = runner.invoke(app, ["predict", "--help"])
    assert r.exit_code == 0 and "--out" in r.output and "Exit codes" in r.output


def test_help_and_version_do_not_import_tensorflow():
    code = (
        "import sys\n"
        "from segnet_cli.cli import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--version'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['predict', '--help'])\n"
        "assert r.exit_code == 0\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    # The bundled model's figure: val/ if it records one, else its held-out drive's.
    assert "(bundled model: segnet-camvid.keras, " in r.output and " mIoU " in r.output


def test_info_describes_model(tiny_model):
    r = runner.invoke(app, ["info", "--model", str(tiny_model)])
    assert r.exit_code == 0, r.output
    assert "disc" in r.output and "stride 8" in r.output
    # Piped, each class's colour is still there as numbers, one class per line.
    from segnet_cli.model.modelfile import read_info

    info = read_info(tiny_model)
    for i, (name, rgb) in enumerate(zip(info.class_names, info.palette)):
        colour = ",".join(f"{v:3d}" for v in rgb)
        assert any(line.split()[:1] == [str(i)] and colour in line and line.endswith(name)
                   for line in r.output.splitlines()), (name, colour, r.output)
    r = runner.invoke(app, ["info", "--model", str(tiny_model), "--json"])
    data = json.loads(r.stdout)
    assert data["class_names"] == ["background", "disc", "square"] and data["in_channels"] == 3
    r = runner.invoke(app, ["info", "--model", "/nonexistent/model.keras"])
    assert r.exit_code == 2 and "/nonexistent/model.keras" in r.output


def test_info_names_the_splits_of_recorded_figures(tmp_path, tiny_model):
    import dataclasses
    import shutil

    from segnet_cli.model.modelfile import read_info, replace_info

    copy = tmp_path / "m.keras"
    shutil.copyfile(tiny_model, copy)
    figures = {"global_accuracy": 0.8, "class_accuracy": 0.6, "per_class_iou": [0.5, 0.25, 0.125]}
    training = {
        "val": {**figures, "mean_iou": 0.524, "split": "CamVid val/"},
        "held_out": {**figures, "mean_iou": 0.358, "split": "drive 0006R0"},
    }
    replace_info(copy, dataclasses.replace(read_info(copy), training=training))
    r = runner.invoke(app, ["info", "--model", str(copy)])
    assert r.exit_code == 0, r.output
    assert "validation on CamVid val/: mIoU 52.4, G 80.0, C 60.0" in r.output
    assert "held out on drive 0006R0: mIoU 35.8" in r.output
    assert "disc  val IoU 25.0" in r.output


def test_info_shows_held_out_figures_of_a_model_without_validation(tmp_path, tiny_model):
    """A final fit that trained on its validation split records held-out figures only."""
    import dataclasses
    import shutil

    from segnet_cli.config import ExportFormat
    from segnet_cli.export import export_metadata
    from segnet_cli.model.modelfile import read_info, replace_info

    copy = tmp_path / "m.keras"
    shutil.copyfile(tiny_model, copy)
    held = {"mean_iou": 0.389, "global_accuracy": 0.8, "class_accuracy": 0.55,
            "per_class_iou": [0.5, 0.25, 0.125], "split": "drive 0006R0"}
    replace_info(copy, dataclasses.replace(read_info(copy), training={"held_out": held}))
    r = runner.invoke(app, ["info", "--model", str(copy)])
    assert r.exit_code == 0, r.output
    assert "disc  held-out IoU 25.0" in r.output and "val IoU" not in r.output
    assert "held out on drive 0006R0: mIoU 38.9" in r.output and "validation" not in r.output
    # Exports keep them, so `segnet info --model x.onnx` shows the same figures.
    data = export_metadata(read_info(copy), copy, ExportFormat.ONNX, False)
    assert data["training"] == {"held_out": held}


def test_log_file_and_plain_progress(tmp_path, tiny_model):
    src = write_png(tmp_path / "in" / "a.png", shapes_image(30, 40)[0])
    (tmp_path / "in" / "bad.png").write_text("nope")
    log = tmp_path / "run.log"
    r = runner.invoke(
        app, ["predict", str(src.parent), "--out", str(tmp_path / "o"), "--model", str(tiny_model),
              "--log-file", str(log)],
    )
    assert r.exit_code == 1
    text = log.read_text()
    assert "bad.png" in text and "1 done" in text
    # Not a terminal: progress is plain lines, never carriage-return animation.
    assert "\r" not in r.stderr and "images: 2/2" in r.stderr


def test_real_segnet_subprocess(tmp_path, tiny_model):
    """One real process: console entry point via `python -m segnet_cli`."""
    src = write_png(tmp_path / "in" / "x.png", shapes_image(37, 53)[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "segnet_cli", "predict", str(src), "--out", str(tmp_path / "o"),
         "--model", str(tiny_model), "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0]["status"] == "done" and lines[-1]["summary"]["done"] == 1
    assert "\x1b[" not in out.stderr  # NO_COLOR: no escape codes
    assert (tmp_path / "o" / "x.png").exists()
