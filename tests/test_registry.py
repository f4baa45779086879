"""Backends are entry points: the built-in table matches setup.cfg, bases import no backend,
and a plugin package installed with pip is used by `sample`, `embed` and `reward`."""
from __future__ import annotations

import ast
import configparser
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qprobe.errors import QProbeError
from qprobe.registry import BUILTIN, EMBEDDERS, REWARDS, SAMPLERS, available, load

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).parent / "plugin_example" / "qprobe_toy.py"
ENTRY_POINTS = """[qprobe.samplers]
toy = qprobe_toy:ToySampler

[qprobe.embedders]
toy = qprobe_toy:ToyEmbedder

[qprobe.rewards]
toy = qprobe_toy:make_length_reward
"""


def test_builtin_table_is_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = {}
    for group in (SAMPLERS, EMBEDDERS, REWARDS):
        lines = [ln.strip() for ln in cfg["options.entry_points"][group].strip().splitlines()]
        declared[group] = dict(tuple(p.strip() for p in ln.split("=", 1)) for ln in lines)
    assert declared == BUILTIN


@pytest.mark.parametrize("group", [SAMPLERS, EMBEDDERS, REWARDS])
def test_every_builtin_loads(group):
    for name in BUILTIN[group]:
        assert callable(load(group, name))


def test_bases_import_no_backend():
    for base in sorted((ROOT / "qprobe").glob("*/base.py")) + [ROOT / "qprobe/rewards/score.py"]:
        tree = ast.parse(base.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        backends = {v.partition(":")[0] for table in BUILTIN.values() for v in table.values()}
        assert not imported & backends, base


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(QProbeError, match=r"unknown sampler 'nope' \(registered: .*api.*hf"):
        load(SAMPLERS, "nope")
    from qprobe.embedders import get_embedder

    with pytest.raises(QProbeError, match="embedder 'hf' does not take these options"):
        get_embedder({"kind": "hf", "colour": "red"})


def _toy_wheel(folder: Path) -> Path:
    """A wheel of tests/plugin_example/qprobe_toy.py with its three entry points (no build backend needed)."""
    dist = "qprobe_toy-0.1.0.dist-info"
    files = {
        "qprobe_toy.py": PLUGIN.read_text(),
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: qprobe-toy\nVersion: 0.1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/entry_points.txt": ENTRY_POINTS,
    }
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    path = folder / "qprobe_toy-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """Environment whose sys.path holds the pip-installed toy plugin, then this checkout."""
    tmp = tmp_path_factory.mktemp("plugin")
    wheel = _toy_wheel(tmp)
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    assert (site / "qprobe_toy-0.1.0.dist-info" / "entry_points.txt").exists()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    return env


def _cli(env, cwd, *args):
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, env=env, cwd=cwd)
    return r


@pytest.mark.slow  # a subprocess (fresh interpreter, imports): the full lane
def test_plugin_backends_from_the_cli(plugin_env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": i, "prompt": f"say {w}"}) + "\n"
                               for i, w in enumerate(["yes", "no"])))
    r = _cli(plugin_env, tmp_path, "sample", str(prompts), "-o", "c.jsonl", "--sampler", "toy", "-k", "3",
             "-O", "word=hey", "--no-cache")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows[:3]] == ["hey", "hey hey", "hey hey hey"]
    assert len(rows) == 6

    r = _cli(plugin_env, tmp_path, "reward", "c.jsonl", "-o", "r.jsonl", "--kind", "toy:5", "--no-cache")
    assert r.returncode == 0, r.stderr
    rewarded = [json.loads(ln) for ln in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [x["reward"] for x in rewarded[:3]] == [0.0, 1.0, 1.0]
    assert rewarded[0]["reward_reason"] == "length >= 5"

    r = _cli(plugin_env, tmp_path, "embed", "r.jsonl", "-o", "f.npy", "--embedder", "toy", "-O", "scale=2",
             "--no-cache")
    assert r.returncode == 0, r.stderr
    import numpy as np

    X = np.load(tmp_path / "f.npy")
    assert X.tolist()[:3] == [[6.0, 1.0], [14.0, 2.0], [22.0, 3.0]]
    assert json.loads((tmp_path / "f.npy.json").read_text())["extractor"]["kind"] == "toy"


@pytest.mark.slow  # a subprocess (fresh interpreter, imports): the full lane
def test_plugin_errors_are_one_line(plugin_env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": 0, "prompt": "say yes"}) + "\n")
    r = _cli(plugin_env, tmp_path, "sample", str(prompts), "-o", "c.jsonl", "--sampler", "toy", "-O", "colour=red")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "sampler 'toy' does not take these options" in r.stderr and "colour" in r.stderr
    r = _cli(plugin_env, tmp_path, "sample", str(prompts), "-o", "c.jsonl", "--sampler", "nope")
    assert r.returncode == 1 and "unknown sampler 'nope' (registered: api, hf, toy)" in r.stderr


@pytest.mark.slow  # a subprocess (fresh interpreter, imports): the full lane
def test_plugin_is_listed(plugin_env):
    code = "from qprobe.registry import available; print(sorted(available('qprobe.rewards')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=plugin_env, check=True)
    assert "'toy'" in out.stdout
    assert "toy" not in available(REWARDS)  # this process never saw the plugin
    code = "from qprobe.rewards import reward_identity; print(reward_identity('toy:5')['plugin'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=plugin_env, check=True)
    assert out.stdout.strip() == "qprobe-toy==0.1.0"  # an upgraded plugin: its cached scores are not reused
