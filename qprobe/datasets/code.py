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

    The row keeps `task_id`, `split`, `test_list`, `test_setup_code` and `shown_tests` (the assert
    the prompt prints); the reward
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
            "shown_tests": task["test_list"][:1],  # the assert the prompt prints
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
            "shown_tests": doctest_asserts(task["prompt"]),  # the docstring's >>> examples
        })
        if limit and len(rows) >= limit:
            break
    return rows


# --------------------------------------------------------------------------- shown tests
def _docstrings(source: str) -> list[str]:
    """Docstrings of the module and of every function and class in `source` (parsed, never run)."""
    import ast

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return [source]  # not Python on its own (a fragment): look for examples in the whole text
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                   ast.ClassDef))]
    return [d for d in (ast.get_docstring(n, clean=True) for n in nodes) if d]


def _is_expression(src: str) -> bool:
    try:
        compile(src, "<doctest>", "eval")
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def _is_print(src: str) -> bool:
    import ast

    node = ast.parse(src, mode="eval").body
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"


def doctest_asserts(source: str) -> list[str]:
    """The ``>>>`` examples of `source`'s docstrings as assert statements, in order.

    Parsed by the standard library's :class:`doctest.DocTestParser` (continuation
    lines, blank-line ends and ``<BLANKLINE>`` included), then turned into code:

    * an expression whose expected output is itself a Python expression (``[1, 2]``,
      ``True``, ``'abc'``, a multi-line dict): ``assert (SRC) == (WANT)``, so
      ``1.0`` and ``1`` compare as numbers, not as text;
    * an expression whose output is not Python (a printed table): its ``repr``
      must equal the text, as doctest compares it;
    * a statement with output (``print(...)``): its captured stdout must equal the text;
    * an expected exception (``Traceback ...`` then ``ValueError: ...``): the call must
      raise an exception of that class name;
    * a statement without output (``x = f(2)``): run as written, so later examples see it.

    A docstring without examples gives an empty list.
    """
    import doctest

    parser = doctest.DocTestParser()
    out: list[str] = []
    for doc in _docstrings(source):
        try:
            examples = parser.get_examples(doc)
        except ValueError:  # malformed example (bad indentation): doctest itself would refuse it
            continue
        for ex in examples:
            src = ex.source.rstrip("\n")
            want = ex.want.replace("<BLANKLINE>", "").rstrip("\n")
            if ex.exc_msg is not None:
                name = ex.exc_msg.split(":", 1)[0].strip().rsplit(".", 1)[-1]
                body = "\n".join("    " + line for line in src.splitlines())
                out.append(f"try:\n{body}\nexcept BaseException as _e:\n"
                           f"    assert type(_e).__name__ == {name!r}, type(_e).__name__\n"
                           f"else:\n    raise AssertionError('expected {name}')")
            elif not want.strip():
                out.append(src)
            elif _is_expression(src) and not _is_print(src):
                if _is_expression(f"(\n{want}\n)"):  # newlines: a comment in either ends on its own line
                    out.append(f"assert (\n{src}\n) == (\n{want}\n)")
                else:
                    out.append(f"assert repr(\n{src}\n) == {want!r}")
            else:  # a statement, or print(...): compare what it writes
                out.append("import contextlib as _cl, io as _io\n_buf = _io.StringIO()\n"
                           "with _cl.redirect_stdout(_buf):\n"
                           + "\n".join("    " + line for line in src.splitlines())
                           + f"\nassert _buf.getvalue().rstrip('\\n') == {want!r}")
    return out
