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


@pytest.mark.subprocess
def test_import_qprobe_does_not_import_heavy_backends():
    mods = _modules_after("import qprobe")
    assert not [m for m in HEAVY if m in mods]


@pytest.mark.subprocess
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


@pytest.mark.subprocess
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


def test_demo_tasks_ship_in_the_package():
    """`qprobe demo` reads its MBPP tasks as package data: unchanged lines of data/mbpp/mbpp.jsonl."""
    from importlib import resources

    from qprobe.datasets import mbpp_rows
    from qprobe.demo import SHIPPED_MBPP, SHIPPED_TASKS

    shipped = resources.files("qprobe").joinpath(SHIPPED_MBPP)
    full = set((ROOT / "data" / "mbpp" / "mbpp.jsonl").read_text().splitlines())
    lines = shipped.read_text().splitlines()
    assert lines and all(line in full for line in lines)
    with resources.as_file(shipped) as path:
        assert len(mbpp_rows(path, splits=["train"])) == len(mbpp_rows(path, splits=["test"])) == SHIPPED_TASKS


@pytest.mark.subprocess
def test_wheel_holds_the_package_its_data_and_entry_points(tmp_path):
    """`pip wheel .`: package data and the backend entry points are in it; no top-level `cli` module."""
    import importlib.util
    import zipfile

    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("qprobe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "qprobe/data/mbpp_demo.jsonl" in names and "qprobe/registry.py" in names
    assert not [n for n in names if n.split("/")[0] in ("cli.py", "cli", "tests", "experiments")]
    eps = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for group in ("[console_scripts]", "[qprobe.samplers]", "[qprobe.embedders]", "[qprobe.rewards]"):
        assert group in eps


def test_declared_dependencies_are_the_imported_ones():
    """install_requires + extras cover every third-party import under qprobe/, and each core requirement is used."""
    import ast
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    import_name = {"scikit-learn": "sklearn", "sse-starlette": "sse_starlette"}  # distribution -> top-level module, where they differ

    def names(text):
        return {import_name.get(n, n) for n in re.findall(r"^\s*([A-Za-z0-9_.-]+)", text, re.M)}

    core = names(cfg["options"]["install_requires"])
    extras = set().union(*(names(v) for v in cfg["options.extras_require"].values()))
    imported = set()
    for path in (ROOT / "qprobe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"qprobe", "httpx", "httpx2"}  # httpx: openai's own
    assert third_party <= core | extras, third_party - core - extras
    assert core <= imported, core - imported
