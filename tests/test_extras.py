"""A missing optional dependency is one line naming the extra that installs it (issue 12, item 2).

Each case runs the CLI in a fresh process where the dependency cannot be imported
(the path finder is wrapped so that it does not see them, as if they were not installed).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qprobe.errors import QProbeError, missing_extra, require_extra

ROOT = Path(__file__).resolve().parents[1]


def _cli_without(blocked: list[str], args: list[str], cwd) -> subprocess.CompletedProcess:
    code = ("import sys, importlib.machinery as m\n"
            "class Hide(m.PathFinder):\n"
            "    @classmethod\n"
            "    def find_spec(cls, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {blocked!r}: return None\n"
            "        return m.PathFinder.find_spec(name, path, target)\n"
            "sys.meta_path = [Hide if f is m.PathFinder else f for f in sys.meta_path]\n"
            f"sys.argv = ['qprobe'] + {args!r}\nfrom qprobe.cli import main\nmain()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt_id": 0, "prompt": "hi"}) + "\n")
    (tmp_path / "c.jsonl").write_text("".join(
        json.dumps({"prompt_id": p, "prompt": "hi", "sample": s, "completion": "x", "reward": float(s)}) + "\n"
        for p in range(2) for s in range(2)))
    return tmp_path


@pytest.mark.parametrize("blocked, args, extra", [
    (["transformers"], ["sample", "p.jsonl", "-o", "o.jsonl", "--no-cache"], "hf"),
    (["torch"], ["embed", "c.jsonl", "-o", "f.npy", "--no-cache"], "hf"),
    (["transformers"], ["embed", "c.jsonl", "-o", "f.npy", "--no-cache", "--sentence-model", "all-minilm-l6-v2"],
     "sentence"),
    (["openai"], ["sample", "p.jsonl", "-o", "o.jsonl", "--api-base", "http://127.0.0.1:9/v1", "--api-model", "m",
                  "--no-cache"], "api"),
    (["openai"], ["embed", "c.jsonl", "-o", "f.npy", "--api-base", "http://127.0.0.1:9/v1", "--api-model", "m",
                  "--no-cache"], "api"),
])
@pytest.mark.subprocess
def test_missing_extra_is_one_line(files, blocked, args, extra):
    r = _cli_without(blocked, args, files)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr  # lines before the last one are progress bars
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: {blocked[0]} is not installed; it comes with: pip install 'qprobe[{extra}]'")


@pytest.mark.subprocess
def test_missing_torch_for_a_torch_head(files):
    np_feats = files / "f.npy"
    import numpy as np

    from qprobe.io import read_jsonl, save_features

    save_features(np_feats, np.ones((4, 2), dtype=np.float32), read_jsonl(files / "c.jsonl"), {"kind": "t"})
    r = _cli_without(["torch"], ["train", "c.jsonl", "f.npy", "-o", "probe", "--objective", "pg"], files)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "Error: torch is not installed; it comes with: pip install 'qprobe[torch]'"


def test_helpers():
    err = missing_extra(ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot"))
    assert isinstance(err, QProbeError) and "pip install 'qprobe[plot]'" in str(err)
    other = ModuleNotFoundError("No module named 'nope'", name="nope")
    assert missing_extra(other) is other  # not an optional dependency: a real bug, left as it is
    with pytest.raises(QProbeError, match=r"no_such_mod_xyz is not installed; .*qprobe\[hf\]"):
        require_extra("hf", ("json", "no_such_mod_xyz"))
    require_extra("hf", ("json",))
