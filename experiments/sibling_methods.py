"""The README's table for the sibling papers' ideas, measured on the committed MBPP data.

    python experiments/sibling_methods.py [--model smollm2-135m] [--seeds 3] [--no-demos] [--json]

One table, three parts, all on MBPP test (500 prompts, k = 8), probes trained on train+validation:

1. Demonstrations (Tiapkin et al.): MBPP's reference solution (`code` in data/mbpp/mbpp.jsonl) of
   each training prompt, written as the model writes its answers (an opened ```python block), is
   embedded with the same extractor as the samples and added as a reward-1 row of its prompt, with a
   weight chosen by 5-fold cross-validation (0 = no demonstrations is on the grid). The features need
   one forward pass of the model per demonstration; they are cached in .qprobe-cache/.
2. Reward transforms (InfAlign, Balashankar et al.): each objective trained on `none`,
   `calibrated` and `calibrated-exp:T` targets (see qprobe/transforms.py).
3. The label-budgeted loop (XPO, Xie et al.): labels spent until held-out pass@1 first reaches a
   target, for the rules optimism, greedy and uniform (qprobe/loop.py); the reward oracle is the
   stored reward, so nothing is sampled.

Conventions of experiments/mbpp_table.py: penalty then beta by `tune()` over prompt folds, test
pass@1 from `selection_report` at the CV beta; mean ± std over seeds. `--json`: last line is one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mbpp_data import DATASETS, ROOT, is_greedy, load  # noqa: E402

sys.path.insert(0, str(ROOT))
from qprobe import QProbe  # noqa: E402
from qprobe.pipeline import group_ids  # noqa: E402
from qprobe.select import selection_report  # noqa: E402

K = 8
# model alias -> (feature key of the default extractor in the shards, HF layer that makes it)
FEATURES = {"smollm2-135m": ("L30_last", -1), "qwen2.5-coder-0.5b": ("L24_last", -1)}
DEMO_TEMPLATE = "```python\n{code}\n"  # sampled completions open a block and stop when it closes (fence dropped)


def demo_texts(rows):
    """{prompt_id: (prompt, demonstration completion)} for the prompts in rows, from mbpp.jsonl's `code`."""
    code = {}
    with open(ROOT / "data" / "mbpp" / "mbpp.jsonl", encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)
            code[t["task_id"]] = t["code"].replace("\r\n", "\n").strip()
    out = {}
    for r in rows:
        if r["prompt_id"] not in out:
            out[r["prompt_id"]] = (r["prompt"], DEMO_TEMPLATE.format(code=code[r["task_id"]]))
    return out


def demo_features(model, items, check_rows=None, check_X=None):
    """Features of the demonstrations with the model's default extractor, cached in .qprobe-cache/.

    With check_rows/check_X, first embeds a few sampled rows the same way and checks they match the
    features captured during sampling (float16), so demonstrations and samples share one extractor.
    """
    from qprobe.cache import Cache
    from qprobe.embedders.hf import HFEmbedder

    emb = HFEmbedder(model=model, layer=FEATURES[model][1], pooling="last", batch_size=8)
    cache = Cache(ROOT / ".qprobe-cache")
    if check_rows is not None:
        got = emb.embed([(r["prompt"], r["completion"]) for r in check_rows], cache=cache, progress=False)
        err = np.abs(got - check_X).max() / np.abs(check_X).max()
        print(f"extractor check on {len(check_rows)} sampled rows: max relative difference {err:.2e}",
              file=sys.stderr)
        if err > 2e-2:
            raise SystemExit(f"demonstration features would not match the samples' (difference {err:.2e})")
    return emb.embed(items, cache=cache, desc="demonstration features")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(DATASETS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-demos", action="store_true", help="skip part 1 (needs the model's forward pass)")
    ap.add_argument("--demos-only", action="store_true", help="only compute (and cache) the demonstration features")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    rows, feats = load(skip_unscored=True, model=args.model)
    samp = np.array([not is_greedy(r) for r in rows])
    split = np.array([r["split"] for r in rows])
    tr = samp & np.isin(split, ["train", "validation"])
    key = FEATURES[args.model][0]
    X = feats[key]
    if args.demos_only:
        train_rows = [r for r, m in zip(rows, tr) if m]
        d = demo_texts(train_rows)
        check = np.flatnonzero(tr)[:4]
        Xd = demo_features(args.model, list(d.values()), [rows[i] for i in check], X[check])
        print(f"{Xd.shape[0]} demonstration features of width {Xd.shape[1]}, {time.time() - t0:.0f} s", file=sys.stderr)
        return


if __name__ == "__main__":
    main()
