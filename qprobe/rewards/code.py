"""Reward for code completions: run the row's code with the row's tests.

What it does: pulls the code out of a completion (:func:`extract_code`),
glues it to the tests a row carries (:func:`build_program`) and runs the
result in the sandbox (:func:`code_reward`): 1.0 if every test passes, else
0.0 with the sandbox's reason.

Row formats understood (the first one present wins):

* MBPP: ``test_list`` (assert statements) and optional ``test_setup_code``.
  Program = code + setup + asserts (setup may use the code's classes, e.g.
  MBPP task 367 builds ``Node`` trees).
* HumanEval: ``test`` (defines ``check(candidate)``) and ``entry_point``.
  Program = code + test + ``check(entry_point)``. When the completion does not
  define ``entry_point`` it is taken to continue the prompt, and
  ``row["prompt"]`` is put in front; when it does, only the prompt's import
  lines are (HumanEval prompts import ``List`` and friends that full-function
  completions often forget).
* Generic: ``tests``, a string of Python run after the code.

A ``code_prefix`` field, when present, is always put in front of the
completion's code instead of the prompt.

What the check proves, and what it does not. A run scores 1.0 only if the
program returns normally and, after that, the sandbox's boot code writes a
random token that reached the process over stdin (never through the program
file, argv, the environment or disk). So a completion cannot earn a reward by
exiting early (``sys.exit(0)``, ``os._exit(0)``, an atexit hook), by killing
itself, or by reading the token from its own file, ``sys.argv``,
``/proc/self/cmdline`` or stdin. The tests run in the same process as the
completion's code, so code written to attack the check (walking the
interpreter's frames or heap to find the boot code's copy of the token, or
patching the test functions it calls) could still forge a pass: the reward
tests a program's behaviour, it is not a proof against code crafted to defeat
it. The sandbox still confines such code (see ``sandbox.py``).

It does not sample, embed or store anything.
"""
from __future__ import annotations

import functools
import re
import secrets
from typing import Callable

from qprobe.errors import QProbeError
from qprobe.rewards.sandbox import run_python, sandbox_backend
from qprobe.rewards.simple import describe_row

from qprobe.fences import FENCE_CLOSE as _FENCE_CLOSE
from qprobe.fences import FENCE_OPEN as _FENCE_OPEN  # the one fence parser (the sampler's stop uses it too)

_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}
_IMPORT_LINE = re.compile(r"^(?:import [\w., ]+|from [\w.]+ import [^\n]+)$", re.M)


def extract_code(completion: str) -> str:
    """The code of the first Python (or untagged) fenced block, else the text.

    Parameters
    ----------
    completion : str
        A model completion, Markdown or bare code.

    Returns
    -------
    str
        The inside of the first ```` ```python ````/```` ```py ````/```` ``` ````
        block (blocks tagged with another language are skipped); everything
        after the opening fence if that block is never closed; or
        ``completion`` unchanged when it has no such fence.
    """
    first = _FENCE_OPEN.search(completion)
    if first is not None and first.group(1) == "" and completion[: first.start()].strip():
        # bare code closed by a fence it never opened ("def f(): ...\n```\nThis function..."):
        # keep the code before the fence when it is valid Python (compile only parses, never runs it)
        head = completion[: first.start()]
        if re.search(r"^(def |class |import |from |@)", head, re.MULTILINE):
            try:
                compile(head, "<completion>", "exec")
                return head
            except Exception:  # SyntaxError, ValueError, RecursionError, MemoryError on hostile input
                pass
    pos = 0
    while True:
        opening = _FENCE_OPEN.search(completion, pos)
        if opening is None:
            return completion
        start = opening.end() + 1  # past the newline ending the fence line
        closing = _FENCE_CLOSE.search(completion, start)
        if opening.group(1).lower() in _PYTHON_TAGS:
            body = completion[start:closing.start()] if closing else completion[start:]
            return body.rstrip("\n") + "\n" if body.strip() else ""
        if closing is None:
            return completion
        pos = closing.end()


def _text_field(row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise QProbeError(f"code reward: {describe_row(row)} needs a string {name!r} field, "
                          f"got {type(value).__name__}")
    return value


def build_program(row: dict) -> str:
    """The program that :func:`code_reward` runs for ``row`` (without the token).

    Parameters
    ----------
    row : dict
        A completion row with ``completion`` and one of the test formats
        described in the module docstring.

    Returns
    -------
    str

    Raises
    ------
    QProbeError
        The row has no completion or no tests.
    """
    code = extract_code(_text_field(row, "completion"))
    if "code_prefix" in row:
        code = _text_field(row, "code_prefix") + code
    if row.get("test_list") is not None:
        tests = row["test_list"]
        if isinstance(tests, str) or not all(isinstance(t, str) for t in tests):
            raise QProbeError(f"code reward: {describe_row(row)} has a test_list that is not a list of strings")
        setup = row.get("test_setup_code") or ""
        return f"{code}\n\n{setup}\n\n" + "\n".join(tests) + "\n"
    if row.get("test") is not None and row.get("entry_point"):
        entry = _text_field(row, "entry_point")
        if "code_prefix" not in row and isinstance(row.get("prompt"), str):
            if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
                code = "\n".join(_IMPORT_LINE.findall(row["prompt"])) + "\n" + code
            else:
                code = row["prompt"] + code
        return f"{code}\n\n{_text_field(row, 'test')}\n\ncheck({entry})\n"
    if row.get("tests") is not None:
        return f"{code}\n\n{_text_field(row, 'tests')}\n"
    raise QProbeError(f"code reward: {describe_row(row)} has no tests; expected test_list "
                      "(MBPP), test + entry_point (HumanEval) or tests")


def with_tests_from(row: dict, field: str) -> dict:
    """`row` with its tests replaced by the ones in `row[field]`: a list of assert statements
    (run like MBPP's ``test_list``, after the row's ``test_setup_code``) or one string of code.

    This is how a row names the tests its prompt shows (``shown_tests``, written by
    ``qprobe prompts``): ``reward --kind code:shown_tests --into shown`` runs only those.
    """
    if field not in row:
        raise QProbeError(f"code reward: {describe_row(row)} has no {field!r} field (the tests to run)")
    tests = row[field]
    out = {k: v for k, v in row.items() if k not in ("test_list", "test", "tests")}
    if isinstance(tests, str):
        out["tests"] = tests
    elif isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        out["test_list"] = tests  # an empty list: the code must still run (import and define) without error
    else:
        raise QProbeError(f"code reward: {describe_row(row)}: {field!r} must be a list of strings or a string")
    return out


def code_reward(row: dict, timeout: float = 3.0, *, backend: str | None = None,
                tests_field: str | None = None) -> tuple[float, str]:
    """Run a row's code against its tests in the sandbox.

    Parameters
    ----------
    row : dict
        See :func:`build_program`.
    tests_field : str or None
        Run the tests in this field instead (see :func:`with_tests_from`).
    timeout : float
        Wall-clock seconds for the whole program.
    backend : str or None
        Sandbox backend, see :func:`qprobe.rewards.sandbox.sandbox_backend`.

    Returns
    -------
    reward : float
        1.0 when every test passed, else 0.0.
    reason : str
        ``passed`` or the sandbox's reason (``failed: AssertionError``,
        ``timeout``, ``syntax error``, ...).
    """
    if not str(row.get("completion", "")).strip():
        return 0.0, "empty completion"
    if tests_field is not None:
        row = with_tests_from(row, tests_field)
    token = secrets.token_hex(16)
    result = run_python(build_program(row), timeout=timeout, backend=backend, token=token)
    if not result.passed:
        return 0.0, result.reason
    if token not in result.stdout:
        return 0.0, "failed: exited before the tests finished"
    return 1.0, "passed"


def make_code_reward(arg: str, *, timeout: float = 3.0) -> Callable[[dict], tuple[float, str]]:
    """The ``code`` reward kind (entry point ``qprobe.rewards: code``): ``code`` runs the row's own
    tests; ``code:FIELD`` runs the tests in ``row[FIELD]`` instead (e.g. ``code:shown_tests``).

    Resolves the sandbox backend first, so that a machine without a working sandbox
    fails once, before any row runs.
    """
    if arg and not arg.isidentifier():
        raise QProbeError(f"reward kind 'code:{arg}': expected code or code:FIELD (a row field of tests)")
    sandbox_backend()
    return functools.partial(code_reward, timeout=timeout, tests_field=arg or None)
