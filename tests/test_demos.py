"""Demonstrations (`qprobe.demos`) and reward transforms through `qprobe train`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner

from qprobe.cli import cli
from qprobe.io import write_jsonl
from qprobe.testing.inputs import rows_and_features

ROOT = Path(__file__).resolve().parents[1]



# ---------------------------------------------------------------- demonstrations and transforms from the CLI
class FakeEmbedder:
    """Stands in for the features' extractor: a fixed vector per (prompt, completion)."""

    def __init__(self, d=6):
        self.d, self.calls = d, 0

    def embed(self, items, cache=None, desc=""):
        self.calls += len(items)
        out = np.zeros((len(items), self.d), np.float32)
        out[:, 0] = 3.0  # demonstrations look like passes
        return out


def test_train_with_demos_and_transform(tmp_path, monkeypatch):
    import qprobe.demos

    rows, feats = rows_and_features(tmp_path, extra=lambda p: {"code": f"return {p}"} if p % 2 else {})
    fake = FakeEmbedder()
    monkeypatch.setattr(qprobe.demos, "embedder_from_identity", lambda ident, api_key=None: fake)
    base = ["train", str(rows), str(feats), "--objective", "ce", "--where", "split=train"]
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "p"), "--demos", "code", "--demo-weight", "2",
                                        "--demo-template", "```python\n{demo}\n", "--reward-transform", "calibrated"])
    assert r.exit_code == 0, r.output
    n_demo = len({p for p in range(30) if p % 3 and p % 2})
    assert fake.calls == n_demo and f"+ {n_demo} demonstrations (weight 2)" in r.stderr
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "q"), "--demos", "code", "--tune", "3"])
    assert r.exit_code == 0, r.output
    assert "demo weight" in r.stderr
    demo_file = tmp_path / "demos.jsonl"
    write_jsonl(demo_file, [{"prompt_id": 1, "completion": "x"}, {"prompt_id": 2, "completion": "y"}])
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "s"), "--demos", str(demo_file)])
    assert r.exit_code == 0 and "+ 2 demonstrations (weight 1)" in r.stderr
    write_jsonl(demo_file, [{"prompt_id": 999, "completion": "x"}])
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "t"), "--demos", str(demo_file)])
    assert r.exit_code == 1 and "row 1: prompt_id 999 is not in the training rows" in r.stderr
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "u"), "--reward-transform", "calibrated-exp:-1"])
    assert r.exit_code == 1 and "calibrated-exp:T with T > 0" in r.stderr
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "v"), "--demos", "nofield"])
    assert r.exit_code == 1 and "neither a file nor a field" in r.stderr
