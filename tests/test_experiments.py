"""The README's MBPP table command runs on the committed data and keeps its JSON contract."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.subprocess
def test_mbpp_table_json_contract(tmp_path):
    plot = tmp_path / "plot.png"
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "mbpp_table.py"), "--json", "--seeds", "1",
                        "--no-variants", "--plot", str(plot)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"base_pass1", "oracle_pass8", "best_objective", "best_probe_pass1", "n_test_prompts"} <= set(res)
    assert set(res["objectives"]) == {"mse", "ce", "pg"} and res["best_objective"] in res["objectives"]
    assert 0 <= res["base_pass1"] <= res["oracle_pass8"] <= 1
    assert res["best_probe_pass1"] == res["objectives"][res["best_objective"]]["pass1"][0]
    assert res["n_test_prompts"] > 0 and res["n_train_prompts"] > 0
    assert plot.stat().st_size > 10_000
    assert "best-of-8 oracle (pass@8)" in r.stderr
    # setting A (nothing runs at inference) on every set; B needs the set's shown-test outcomes
    assert [row["policy"] for row in res["settings"]["A"]][0] == "base"
    assert res["setting_a_probe_pass1"] == next(row["reward"] for row in res["settings"]["A"] if row["policy"] == "probe")
    assert "setting A: CV chose" in r.stderr
