"""MBPP and HumanEval-format tasks as prompt rows.

A prompt row: `prompt_id`, `prompt` (chat messages), and the task's own fields
(tests included) carried through every later step. Reading only; no sampling here.
"""
from __future__ import annotations

import os

from qprobe.errors import QProbeError
from qprobe.io import iter_jsonl

# split -> inclusive task_id range (the standard MBPP splits)
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}

MBPP_INSTRUCTION = (
    "{text}\nYour code should pass this test:\n{test}\n"
    "Write the Python function in one ```python code block."
)


def mbpp_split(task_id: int) -> str:
    for name, (lo, hi) in MBPP_SPLITS.items():
        if lo <= task_id <= hi:
            return name
    return "extra"


def mbpp_rows(path: str | os.PathLike, splits: list[str] | None = None, limit: int | None = None) -> list[dict]:
    """Prompt rows for MBPP tasks, prompted zero-shot with the task text and its first test (as the paper).

    The row keeps `task_id`, `split`, `test_list`, `test_setup_code`; the reward
    runs all of `test_list`.
    """
    unknown = set(splits or []) - set(MBPP_SPLITS)
    if unknown:
        raise QProbeError(f"--split: unknown MBPP split(s) {sorted(unknown)}; expected {', '.join(MBPP_SPLITS)}")
    rows = []
    for i, task in enumerate(iter_jsonl(path), 1):
        for field in ("task_id", "text", "test_list"):
            if field not in task:
                raise QProbeError(f"{path}:{i}: MBPP task has no '{field}' field")
        split = mbpp_split(int(task["task_id"]))
        if splits and split not in splits:
            continue
        content = MBPP_INSTRUCTION.format(text=task["text"].strip(), test=task["test_list"][0])
        rows.append({
            "prompt_id": f"mbpp-{task['task_id']}",
            "prompt": [{"role": "user", "content": content}],
            "task_id": task["task_id"],
            "split": split,
            "test_list": task["test_list"],
            "test_setup_code": task.get("test_setup_code", ""),
        })
        if limit and len(rows) >= limit:
            break
    return rows


def humaneval_rows(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Prompt rows for HumanEval-format tasks (`task_id`, `prompt`, `test`, `entry_point`).

    The model is asked to complete the function; the reward runs `test` and `check(entry_point)`.
    """
    rows = []
    for i, task in enumerate(iter_jsonl(path), 1):
        for field in ("task_id", "prompt", "test", "entry_point"):
            if field not in task:
                raise QProbeError(f"{path}:{i}: HumanEval task has no '{field}' field")
        content = (
            "Complete this Python function. Answer with the whole function in one ```python code block.\n\n"
            f"```python\n{task['prompt']}```"
        )
        rows.append({
            "prompt_id": str(task["task_id"]),
            "prompt": [{"role": "user", "content": content}],
            "task_id": task["task_id"],
            "code_prefix": task["prompt"],
            "test": task["test"],
            "entry_point": task["entry_point"],
        })
        if limit and len(rows) >= limit:
            break
    return rows
