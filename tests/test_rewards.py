"""Rewards: code extraction, program assembly, code/match/regex/python kinds.

Code runs on the default sandbox backend; test_sandbox.py covers each backend
and hostile programs.
"""
import pytest

from qprobe.errors import QProbeError
from qprobe.rewards import (
    build_program,
    code_reward,
    extract_code,
    get_reward_fn,
    score_rows,
)

# MBPP task 17 and task 367 (the one with test_setup_code), copied from
# shared/data/mbpp.jsonl with their original \r\n and tabs.
MBPP_17 = {
    "task_id": 17,
    "text": "Write a function to find the perimeter of a square.",
    "code": "def square_perimeter(a):\r\n  perimeter=4*a\r\n  return perimeter",
    "test_setup_code": "",
    "test_list": ["assert square_perimeter(10)==40", "assert square_perimeter(5)==20",
                  "assert square_perimeter(4)==16"],
}
MBPP_367 = {
    "task_id": 367,
    "text": "Write a function to check if a binary tree is balanced or not.",
    "code": "class Node: \r\n\tdef __init__(self, data): \r\n\t\tself.data = data \r\n\t\tself.left = None\r\n\t\tself.right = None\r\ndef get_height(root): \r\n\tif root is None: \r\n\t\treturn 0\r\n\treturn max(get_height(root.left), get_height(root.right)) + 1\r\ndef is_tree_balanced(root): \r\n\tif root is None: \r\n\t\treturn True\r\n\tlh = get_height(root.left) \r\n\trh = get_height(root.right) \r\n\tif (abs(lh - rh) <= 1) and is_tree_balanced( \r\n\troot.left) is True and is_tree_balanced( root.right) is True: \r\n\t\treturn True\r\n\treturn False",  # noqa: E501
    "test_setup_code": "root = Node(1) \r\nroot.left = Node(2) \r\nroot.right = Node(3) \r\nroot.left.left = Node(4) \r\nroot.left.right = Node(5) \r\nroot.left.left.left = Node(8) \r\nroot1 = Node(1) \r\nroot1.left = Node(2) \r\nroot1.right = Node(3) \r\nroot1.left.left = Node(4) \r\nroot1.left.right = Node(5) \r\nroot1.right.left = Node(6) \r\nroot1.left.left.left = Node(7)\r\nroot2 = Node(1) \r\nroot2.left = Node(2) \r\nroot2.right = Node(3) \r\nroot2.left.left = Node(4) \r\nroot2.left.right = Node(5)\r\nroot2.left.left.left = Node(7)",  # noqa: E501
    "test_list": ["assert is_tree_balanced(root) == False", "assert is_tree_balanced(root1) == True",
                  "assert is_tree_balanced(root2) == False "],
}

# HumanEval/0, abridged.
HE_PROMPT = ('from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n'
             '    """ Check if any two numbers are closer to each other than threshold. """\n')
HE_BODY = ("    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n"
           "            if i != j and abs(a - b) < threshold:\n                return True\n    return False\n")
HE_TEST = ("def check(candidate):\n    assert candidate([1.0, 2.0, 3.9, 4.0], 0.3) == True\n"
           "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.8) == False\n")


def he_row(completion, **extra):
    return {"task_id": "HumanEval/0", "prompt": HE_PROMPT, "completion": completion,
            "test": HE_TEST, "entry_point": "has_close_elements", **extra}


def mbpp_row(task, completion):
    return {**task, "completion": completion}


@pytest.mark.parametrize("completion, code", [
    ("Here:\n```python\nx = 1\n```\nDone.", "x = 1\n"),
    ("```\nx = 2\n```", "x = 2\n"),
    ("```py\nx = 3\n```\n```python\nx = 4\n```", "x = 3\n"),  # the first block
    ("Run:\n```bash\nls\n```\nthen\n```python\nx = 5\n```", "x = 5\n"),  # skips other languages
    ("```python\ndef f():\n    return 6\n", "def f():\n    return 6\n"),  # unterminated
    ("x = 7\nprint(x)", "x = 7\nprint(x)"),  # no fence: as is
    ("  ```Python\n    y = 8\n  ```", "    y = 8\n"),
    ("```python\n```", ""),
    ("```bash\nls\n", "```bash\nls\n"),  # only another language, unterminated
])
def test_extract_code(completion, code):
    assert extract_code(completion) == code


def test_real_mbpp_rows_pass():
    for task in (MBPP_17, MBPP_367):
        row = mbpp_row(task, "Sure:\n```python\n" + task["code"] + "\n```")
        assert code_reward(row) == (1.0, "passed"), task["task_id"]


def test_mbpp_setup_code_runs_after_the_code():
    program = build_program(mbpp_row(MBPP_367, MBPP_367["code"]))
    assert program.index("class Node") < program.index("root = Node(1)") < program.index("assert")


def test_failing_assert():
    row = mbpp_row(MBPP_17, "def square_perimeter(a):\n    return 3 * a")
    assert code_reward(row) == (0.0, "failed: AssertionError")


def test_syntax_error():
    row = mbpp_row(MBPP_17, "```python\ndef square_perimeter(a)\n    return 4 * a\n```")
    assert code_reward(row) == (0.0, "syntax error")


def test_missing_function():
    reward, reason = code_reward(mbpp_row(MBPP_17, "I cannot do that."))
    assert reward == 0.0 and reason.startswith(("syntax error", "failed: NameError"))


def test_humaneval_continuation_gets_the_prompt():
    assert code_reward(he_row(HE_BODY)) == (1.0, "passed")
    assert code_reward(he_row(HE_BODY.replace("< threshold", "> threshold")))[0] == 0.0


def test_humaneval_full_function_gets_the_prompt_imports():
    full = HE_PROMPT.split("\n", 1)[1] + HE_BODY  # drops `from typing import List`
    program = build_program(he_row(f"```python\n{full}```"))
    assert program.startswith("from typing import List\n") and program.count("def has_close_elements") == 1
    assert program.rstrip().endswith("check(has_close_elements)")
    assert code_reward(he_row(f"```python\n{full}```")) == (1.0, "passed")


def test_code_prefix_field_wins():
    row = he_row("    return False\n", code_prefix="def has_close_elements(numbers, threshold):\n")
    assert code_reward(row) == (0.0, "failed: AssertionError")
    assert "from typing" not in build_program(row)


def test_generic_tests_field():
    row = {"completion": "def add(a, b):\n    return a + b", "tests": "assert add(2, 3) == 5"}
    assert code_reward(row) == (1.0, "passed")


def test_row_without_tests_is_named():
    with pytest.raises(QProbeError, match=r"task_id=42 has no tests"):
        code_reward({"task_id": 42, "completion": "x = 1"})
    with pytest.raises(QProbeError, match=r"prompt 'Add two numbers' .*no tests"):
        build_program({"prompt": "Add two\nnumbers", "completion": "x = 1"})


def test_exiting_early_earns_nothing():
    row = mbpp_row(MBPP_17, "import os\nos._exit(0)")
    assert code_reward(row) == (0.0, "failed: exited before the tests finished")


def test_match_kind():
    fn = get_reward_fn("match")
    assert fn({"completion": " 42\n", "reference": "42"}) == (1.0, "match")
    assert fn({"completion": "41", "reference": 42}) == (0.0, "no match")
    assert fn({"completion": "b", "reference": ["a", "b"]}) == (1.0, "match")
    assert get_reward_fn("match:answer")({"completion": "7", "answer": "7"}) == (1.0, "match")
    with pytest.raises(QProbeError, match="id=3 has no 'answer' field"):
        get_reward_fn("match:answer")({"id": 3, "completion": "7"})


def test_regex_kind_is_a_fullmatch():
    fn = get_reward_fn("regex")
    assert fn({"completion": "The answer is 42.", "reference": r".*\b42\b.*"}) == (1.0, "match")
    assert fn({"completion": "The answer is 42.", "reference": r"42"}) == (0.0, "no match")
    assert fn({"completion": "  yes \n", "reference": "yes|no"}) == (1.0, "match")
    with pytest.raises(QProbeError, match="invalid pattern"):
        fn({"completion": "x", "reference": "("})


def test_python_kind(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(row):\n    return len(row['completion'])\n"
        "def judged(row):\n    return 0.5, 'half'\n"
        "def broken(row):\n    return 'high'\n")
    monkeypatch.chdir(tmp_path)  # MODULE is looked up in the current directory too
    assert get_reward_fn("python:my_rewards:length")({"completion": "abc"}) == (3.0, "python")
    assert get_reward_fn(f"python:{tmp_path}/my_rewards.py:judged")({"completion": ""}) == (0.5, "half")
    with pytest.raises(QProbeError, match="expected a finite float"):
        get_reward_fn("python:my_rewards:broken")({"completion": ""})
    with pytest.raises(QProbeError, match="has no function 'nope'"):
        get_reward_fn("python:my_rewards:nope")
    with pytest.raises(QProbeError, match="cannot import 'no_such_module_xyz'"):
        get_reward_fn("python:no_such_module_xyz:fn")


@pytest.mark.parametrize("kind", ["bleu", "code:x-y", "python:", "python:mod", ""])
def test_unknown_kind(kind):
    with pytest.raises(QProbeError, match="reward kind"):
        get_reward_fn(kind)


def test_score_rows_keeps_order():
    rows = [{"completion": str(i), "reference": str(i % 2)} for i in range(6)]
    want = [(1.0, "match") if i < 2 else (0.0, "no match") for i in range(6)]
    assert score_rows(rows, "match", workers=3, progress=False) == want
    assert score_rows(rows, "match", workers=1, progress=False) == want


def test_score_rows_code_in_parallel():
    rows = [mbpp_row(MBPP_17, MBPP_17["code"]), mbpp_row(MBPP_17, "while True: pass"),
            mbpp_row(MBPP_17, "def square_perimeter(a): return a"), mbpp_row(MBPP_367, MBPP_367["code"])]
    assert score_rows(rows, "code", workers=2, timeout=1.5, progress=False) == [
        (1.0, "passed"), (0.0, "timeout"), (0.0, "failed: AssertionError"), (1.0, "passed")]


def test_score_rows_names_the_bad_row():
    rows = [{"id": "a", "completion": "x", "reference": "x"}, {"id": "b", "completion": "x"}]
    with pytest.raises(QProbeError, match="id='b' has no 'reference'"):
        score_rows(rows, "match", workers=2, progress=False)


def test_extract_code_bare_code_closed_by_an_unopened_fence():
    from qprobe.rewards.code import extract_code

    assert extract_code("def f():\n    return 1\n```\n\nThis function returns 1.") == "def f():\n    return 1\n"
    # prose before an untagged block is not code: the block wins
    assert extract_code("Here is code\n```\ndef f():\n    return 1\n```\n") == "def f():\n    return 1\n"


def test_an_edited_python_reward_misses_the_cache(tmp_path, monkeypatch):
    """The reward cache key holds a hash of the function's source file: after an edit the rows are
    scored again (an unchanged file reads the cache); both `path.py:FN` and `MODULE:FN` forms."""
    import json
    import sys

    from qprobe.cache import Cache
    from qprobe.pipeline import reward_file

    monkeypatch.chdir(tmp_path)
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"prompt_id": i, "prompt": "p", "sample": 0, "completion": "abc"}) + "\n"
                           for i in range(3)))
    cache = Cache(tmp_path / "cache")

    def rewards(kind, value, cached=False):
        (tmp_path / "judge.py").write_text(f"def score(row):\n    return {value}\n")
        sys.modules.pop("judge", None)  # as a fresh process would import it
        with monkeypatch.context() as m:
            if cached:  # a cache hit calls no reward
                m.setattr("qprobe.rewards.score.get_reward_fn", None)
            return [r["reward"] for r in reward_file(src, tmp_path / "out.jsonl", kind, cache=cache, progress=False)]

    for kind in (f"python:{tmp_path}/judge.py:score", "python:judge:score"):
        assert rewards(kind, 1.0) == [1.0] * 3
        assert rewards(kind, 2.0) == [2.0] * 3  # edited: not the cached 1.0
        assert rewards(kind, 1.0, cached=True) == [1.0] * 3  # the first source again: its cached scores


def test_reward_identity(monkeypatch, tmp_path):
    from qprobe.rewards import REWARDS_VERSION, reward_identity

    assert reward_identity("match:answer", timeout=2.0) == {"reward": "match:answer", "timeout": 2.0,
                                                            "version": REWARDS_VERSION}
    (tmp_path / "r.py").write_text("def f(row):\n    return 0.0\n")
    ident = reward_identity(f"python:{tmp_path}/r.py:f")
    assert len(ident["source_sha256"]) == 64
    with pytest.raises(QProbeError, match="cannot import 'no_such_module_xyz'"):
        reward_identity("python:no_such_module_xyz:fn")
    with pytest.raises(QProbeError, match="unknown reward kind"):
        reward_identity("bleu")
    # a plugin's kind records the version of the package that registers it
    versions = iter(["qprobe-toy==0.1.0", "qprobe-toy==0.2.0"])
    monkeypatch.setattr("qprobe.rewards.score.distribution", lambda group, name: next(versions))
    old, new = reward_identity("match"), reward_identity("match")
    assert old["plugin"] == "qprobe-toy==0.1.0" and old != new
