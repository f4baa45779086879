"""Rewards that need no sandbox: exact match, regex, a user's Python function.

Every reward here takes a completion row (a dict with at least
``completion``) and returns ``(reward, reason)``.

* :func:`match_reward`: 1.0 when the stripped completion equals the stripped
  reference (or one of them, when the reference is a list).
* :func:`regex_reward`: 1.0 when the reference regex matches the *whole*
  stripped completion (``fullmatch`` with ``DOTALL``); write ``.*answer.*`` to
  accept the answer anywhere. Matching uses the `regex` package (the syntax of
  ``re``) for its time limit: a pattern that backtracks catastrophically scores
  0.0 with reason ``timeout`` instead of hanging.
* :func:`load_python_reward`: a user's ``fn(row) -> float | (float, reason)``;
  an exception it raises, or a value that is not a finite number, is one
  ``QProbeError`` naming the function and the row.

It does not run untrusted code; see ``code.py`` for that.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import sys
from typing import Callable

from qprobe.errors import QProbeError

RewardFn = Callable[[dict], "tuple[float, str]"]
_ID_FIELDS = ("id", "row_id", "sample_id", "prompt_id", "task_id")


def describe_row(row: dict) -> str:
    """A short name for ``row`` in error messages, e.g. ``row task_id=11``."""
    if isinstance(row, dict):
        for key in _ID_FIELDS:
            if key in row:
                sample = f" sample={_short(row['sample'], 20)}" if "sample" in row else ""
                return f"row {key}={_short(row[key], 40)}{sample}"
        if isinstance(row.get("prompt"), str):
            prompt = " ".join(row["prompt"].split())
            return f"row with prompt {prompt[:40]!r}"
    return "row"


def _get(row: dict, field: str, kind: str):
    if not isinstance(row, dict) or field not in row:
        raise QProbeError(f"{kind} reward: {describe_row(row)} has no {field!r} field")
    return row[field]


def _completion(row: dict, kind: str) -> str:
    completion = _get(row, "completion", kind)
    if not isinstance(completion, str):
        raise QProbeError(f"{kind} reward: {describe_row(row)} has a non-string completion")
    return completion


def match_reward(row: dict, field: str = "reference") -> tuple[float, str]:
    """Exact match of the stripped completion against ``row[field]``.

    Parameters
    ----------
    row : dict
        Needs ``completion`` and ``field``; the reference may be a string, a
        number, or a list of acceptable answers.
    field : str
        Which field holds the reference.

    Returns
    -------
    (float, str)
        ``(1.0, "match")`` or ``(0.0, "no match")``.
    """
    answer = _completion(row, "match").strip()
    ref = _get(row, field, "match")
    refs = ref if isinstance(ref, list) else [ref]
    ok = any(answer == str(r).strip() for r in refs)
    return (1.0, "match") if ok else (0.0, "no match")


def regex_reward(row: dict, field: str = "reference", timeout: float = 3.0) -> tuple[float, str]:
    """``fullmatch(row[field], completion.strip(), DOTALL)``, with a time limit.

    Parameters
    ----------
    row : dict
        Needs ``completion`` and ``field`` (a regular expression, ``re`` syntax).
    field : str
        Which field holds the pattern.
    timeout : float
        Seconds the match may take.

    Returns
    -------
    (float, str)
        ``(1.0, "match")``, ``(0.0, "no match")`` or ``(0.0, "timeout")``.

    Raises
    ------
    QProbeError
        Missing field or invalid pattern.
    """
    import regex  # the `regex` package: like `re`, plus a timeout

    text = _completion(row, "regex").strip()
    pattern = _get(row, field, "regex")
    try:
        ok = regex.fullmatch(str(pattern), text, regex.DOTALL, timeout=timeout) is not None
    except TimeoutError:
        return 0.0, "timeout"
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise QProbeError(f"regex reward: {describe_row(row)} has an invalid pattern "
                          f"{_short(pattern)}: {exc}") from None
    return (1.0, "match") if ok else (0.0, "no match")


def _short(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def load_python_reward(spec: str) -> RewardFn:
    """Import a user's reward function from ``MODULE:FN`` or ``path/file.py:FN``.

    Parameters
    ----------
    spec : str
        ``package.module:function`` (importable from ``sys.path`` or the
        current directory) or ``some/file.py:function``. The function takes a
        row dict and returns a float or ``(float, reason)``; it may be called
        from several threads at once.

    Returns
    -------
    callable
        ``row -> (float, str)``, checking what the function returns.

    Raises
    ------
    QProbeError
        Bad spec, module that cannot be imported, missing function.
    """
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise QProbeError(f"reward kind 'python:{spec}' should look like python:MODULE:FUNCTION")
    try:
        if module_name.endswith(".py"):
            path = os.path.abspath(module_name)
            mod_spec = importlib.util.spec_from_file_location(
                "qprobe_user_reward_" + os.path.basename(path)[:-3], path)
            if mod_spec is None or not os.path.isfile(path):
                raise FileNotFoundError(f"no such file {path}")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = _import_with_cwd(module_name)
    except Exception as exc:  # any import-time failure is the user's to fix
        raise QProbeError(f"cannot import {module_name!r} for reward kind 'python:{spec}': "
                          f"{type(exc).__name__}: {exc}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise QProbeError(f"{module_name!r} has no function {fn_name!r} (reward kind 'python:{spec}')")

    def reward(row: dict) -> tuple[float, str]:
        try:
            out = fn(row)
        except Exception as exc:  # noqa: BLE001 - the user's bug, reported as one line
            raise QProbeError(f"python:{spec} raised {type(exc).__name__} for {describe_row(row)}: "
                              f"{str(exc)[:200]}") from None
        value, reason = out if isinstance(out, tuple) and len(out) == 2 else (out, "python")
        try:
            ok = isinstance(value, numbers.Real) and math.isfinite(float(value)) and isinstance(reason, str)
        except (OverflowError, TypeError, ValueError):
            ok = False
        if not ok:
            raise QProbeError(f"python:{spec} returned {_short(out)} for {describe_row(row)}; "
                              "expected a finite float or (float, str)")
        return float(value), reason

    return reward


def _import_with_cwd(name: str):
    """``importlib.import_module``, also looking in the current directory (the
    ``qprobe`` console script does not put it on ``sys.path``)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(cwd)


# Entry points of the ``qprobe.rewards`` group: factory(arg, timeout=...) -> RewardFn,
# where arg is the text after ``NAME:`` in the kind ("" when absent).
def make_match_reward(arg: str, *, timeout: float = 3.0) -> RewardFn:
    """``match`` / ``match:FIELD``: exact match against ``row[FIELD]`` (default ``reference``)."""
    return functools.partial(match_reward, field=arg) if arg else match_reward


def make_regex_reward(arg: str, *, timeout: float = 3.0) -> RewardFn:
    """``regex`` / ``regex:FIELD``: ``row[FIELD]`` must fullmatch the completion, within ``timeout`` s."""
    return functools.partial(regex_reward, field=arg or "reference", timeout=timeout)


def make_python_reward(arg: str, *, timeout: float = 3.0) -> RewardFn:
    """``python:MODULE:FN``: a user's function, see :func:`load_python_reward`."""
    if not arg:
        raise QProbeError("reward kind 'python' should look like python:MODULE:FUNCTION")
    return load_python_reward(arg)


def python_reward_source(spec: str) -> str:
    """The source file of the module behind ``python:MODULE:FN`` (found, not imported).

    A dotted module is looked up as :func:`load_python_reward` imports it (``sys.path``, then the
    current directory); its parent packages are imported to find it.
    """
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise QProbeError(f"reward kind 'python:{spec}' should look like python:MODULE:FUNCTION")
    if module_name.endswith(".py"):
        path = os.path.abspath(module_name)
    else:
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.append(cwd)
        try:
            found = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            found = None
        finally:
            if added:
                sys.path.remove(cwd)
        path = found.origin if found is not None and found.has_location else ""
    if not path or not os.path.isfile(path):
        load_python_reward(spec)  # not importable: its own one-line error
        raise QProbeError(f"cannot find the source file of {module_name!r} for reward kind 'python:{spec}'")
    return path


def _python_reward_identity(arg: str, *, timeout: float = 3.0) -> dict:
    """The hash of the function's module source: an edited reward never reads its old cached scores.

    Only that one file: an edit to a module it imports is not seen (clear the cache, or touch it).
    """
    if not arg:
        raise QProbeError("reward kind 'python' should look like python:MODULE:FUNCTION")
    with open(python_reward_source(arg), "rb") as f:
        return {"source_sha256": hashlib.sha256(f.read()).hexdigest()}


make_python_reward.identity = _python_reward_identity  # see score.reward_identity
