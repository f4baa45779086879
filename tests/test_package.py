"""Package-level promises: light imports, one program behind `qprobe` and `python cli.py`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "openai", "sklearn.linear_model")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return set(out.split())


def test_import_qprobe_does_not_import_heavy_backends():
    mods = _modules_after("import qprobe")
    assert not [m for m in HEAVY if m in mods]


def test_cli_help_does_not_import_heavy_backends():
    code = ("import sys; sys.argv = ['qprobe', '--help']\nimport cli\ntry:\n    cli.main()\nexcept SystemExit:\n    pass")
    mods = _modules_after(code)
    assert "click" in mods and not [m for m in HEAVY if m in mods]


def test_checkout_cli_and_installed_command_are_the_same_program():
    a = subprocess.run([sys.executable, "cli.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    b = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "--help"], capture_output=True, text=True,
                       cwd=ROOT)
    assert a.returncode == 0 and a.stdout.replace("cli.py", "qprobe") == b.stdout.replace("-c", "qprobe")
    for command in ("sample", "reward", "embed", "train", "rerank", "eval", "demo", "prompts"):
        assert f"  {command} " in a.stdout
