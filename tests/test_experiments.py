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


def test_profile_sampler_accounts_for_the_sampler_time(tiny_model_dir):
    """The profile's parts are measured (not zero) and add up to no more than the profiled run,
    and the sampler drew the same tokens with the profiler's wrappers as without them."""
    from experiments import profile_sampler

    res = profile_sampler.main(["--model", tiny_model_dir, "--prompts", "2", "-k", "2", "--max-new-tokens", "6",
                                "--batch-size", "2"])
    parts = res["parts_s"]
    assert parts["forward, decode steps"] > 0 and parts["forward, prefill (admission)"] >= 0  # rounded to 10 ms
    assert sum(parts.values()) <= res["profiled_s"] + 0.01
    assert res["decode_steps"] > 0 and 0 <= res["padding_share"] < 1
    assert res["useful_tokens"] > 0
