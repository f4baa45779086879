"""Package-level promises: light imports, one program behind `qprobe`, `python -m qprobe` and `python cli.py`."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    code = ("import sys; sys.argv = ['qprobe', '--help']\nfrom qprobe import cli\ntry:\n    cli.main()\nexcept SystemExit:\n    pass")
    mods = _modules_after(code)
    assert "click" in mods and not [m for m in HEAVY if m in mods]


def _installed_qprobe() -> str:
    exe = Path(sys.executable).parent / "qprobe"
    found = str(exe) if exe.exists() else shutil.which("qprobe")
    if not found:
        pytest.skip("qprobe is not installed in this environment")
    return found


def test_checkout_cli_module_and_installed_command_are_the_same_program():
    runs = {
        "cli.py": [sys.executable, "cli.py", "--help"],
        "-m": [sys.executable, "-m", "qprobe", "--help"],
        "installed": [_installed_qprobe(), "--help"],
    }
    outs = {}
    for name, argv in runs.items():
        r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, (name, r.stderr)
        outs[name] = r.stdout.replace("cli.py", "qprobe").replace("python -m qprobe", "qprobe")
    assert outs["cli.py"] == outs["-m"] == outs["installed"]
    for command in ("sample", "reward", "embed", "train", "rerank", "eval", "demo", "prompts"):
        assert f"  {command} " in outs["installed"]


def test_no_top_level_cli_module_is_installed():
    """The installed package puts nothing named `cli` at the top of site-packages."""
    code = "import importlib.util, sys; s = importlib.util.find_spec('cli'); print(s.origin if s else '')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.stdout.strip() == ""
