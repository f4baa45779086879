"""Signals beside the features: shown tests from prompts, the cascade, signals recorded in the probe,
the baselines of eval with paired intervals."""
import json
import subprocess
import sys

import numpy as np
import pytest

from qprobe import QProbe
from qprobe.compare import compare, paired_bootstrap, per_prompt_reward, policies
from qprobe.datasets.code import doctest_asserts, humaneval_rows, mbpp_rows
from qprobe.errors import QProbeError
from qprobe.signals import cascade_mask, signal_columns, with_signals


def _run(program: str) -> subprocess.CompletedProcess:
    # the converted asserts are trusted test code (from the prompt), run here in a plain interpreter
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)


AWKWARD = r'''
def f(x, y=None):
    """Awkward examples.

    >>> f(1)
    2
    >>> f([1,
    ...    2])   # a comment after a continuation
    [1,
     2]
    >>> f('boom')
    Traceback (most recent call last):
      ...
    ValueError: bad input
    >>> print(f(3))
    4
    >>> g = f(2)
    >>> g
    3
    >>> f(1.0)
    2.0
    >>> for i in range(2):
    ...     print(i)
    0
    1
    >>> print('a\\n\\nb')
    a
    <BLANKLINE>
    b
    """
'''

BODY = '''
def f(x, y=None):
    if isinstance(x, list):
        return x
    if x == 'boom':
        raise ValueError('bad input')
    if isinstance(x, str):
        return x
    return x + 1
'''


def test_doctest_asserts_awkward_docstring_pass_on_a_right_body_and_fail_on_a_wrong_one():
    tests = doctest_asserts(AWKWARD)
    assert len(tests) == 9
    assert _run(BODY + "\n".join(tests)).returncode == 0, _run(BODY + "\n".join(tests)).stderr
    wrong = BODY.replace("return x + 1", "return x + 2")
    assert _run(wrong + "\n".join(tests)).returncode != 0
    no_raise = BODY.replace("raise ValueError('bad input')", "return 0")
    out = _run(no_raise + "\n".join(tests))
    assert out.returncode != 0 and "expected ValueError" in out.stderr
    wrong_exc = BODY.replace("raise ValueError('bad input')", "raise KeyError('bad input')")
    assert _run(wrong_exc + "\n".join(tests)).returncode != 0


def test_doctest_asserts_numbers_compare_as_numbers_and_output_as_text():
    tests = doctest_asserts('def h():\n    """\n    >>> h()\n    1.0\n    >>> object.__new__(C)\n    <C>\n    """\n')
    assert tests[0].replace("\n", "") == "assert (h()) == (1.0)"
    assert tests[1].startswith("assert repr(")  # '<C>' is not Python: compared as doctest compares
    prog = "class C:\n    def __repr__(self): return '<C>'\ndef h(): return 1\n" + "\n".join(tests)
    assert _run(prog).returncode == 0


def test_doctest_asserts_no_examples_and_not_python():
    assert doctest_asserts('def f():\n    """No examples here. f(1) == 2"""\n') == []
    assert doctest_asserts("") == []
    # a fragment that does not parse: examples are still read from the text
    assert doctest_asserts("def f(:\n  >>> f(1)\n  2\n").__len__() == 1


def test_prompts_record_shown_tests(tmp_path):
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps({"task_id": 11, "text": "t", "test_list": ["assert a(1) == 1", "assert a(2) == 2"]}) + "\n")
    (row,) = mbpp_rows(mbpp)
    assert row["shown_tests"] == ["assert a(1) == 1"] and row["shown_tests"][0] in row["prompt"][0]["content"]
    he = tmp_path / "he.jsonl"
    tasks = [{"task_id": "H/0", "prompt": 'def g(x):\n    """\n    >>> g(1)\n    2\n    """\n', "test": "", "entry_point": "g"},
             {"task_id": "H/1", "prompt": 'def g(x):\n    """no examples"""\n', "test": "", "entry_point": "g"}]
    he.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    rows = humaneval_rows(he)
    assert len(rows[0]["shown_tests"]) == 1 and rows[1]["shown_tests"] == []


def test_cascade_mask_ties_and_no_passer_fallback():
    g = ["a", "a", "a", "b", "b", "c"]
    m = cascade_mask([1, 0, 1, 0, 0, 0.5], g)
    assert m.tolist() == [True, False, True, True, True, True]  # ties kept; b has no passer: all stay
    with pytest.raises(QProbeError, match="NaN"):
        cascade_mask([np.nan, 1, 1, 1, 1, 1], g)


def test_probe_cascade_chooses_among_passers_only():
    rng = np.random.default_rng(0)
    n, k = 240, 4
    g = np.repeat(np.arange(n // k), k)
    X = rng.normal(size=(n, 3))
    shown = (rng.random(n) < 0.5).astype(float)
    y = ((X[:, 0] > 0) & (shown > 0)).astype(float)
    Xs = np.hstack([X, shown[:, None]])
    p = QProbe(objective="ce", beta=0, signals=("shown",), cascade="shown", random_state=0).fit(Xs, y, groups=g)
    idx = p.select(Xs, g)
    has_passer = np.array([shown[g == j].max() > 0 for j in range(n // k)])
    assert (shown[idx][has_passer] == 1).all()  # never leaves a passer for a failer
    # probe without the cascade, same features: picks failers where its score says so
    assert p.score(Xs, y, g) >= QProbe(objective="ce", beta=0, random_state=0).fit(X, y, groups=g).score(X, y, g)
    with pytest.raises(QProbeError, match="cascade='nope' must be one of the signals"):
        QProbe(signals=("shown",), cascade="nope").fit(Xs, y, groups=g)
    with pytest.raises(QProbeError, match="needs groups"):
        QProbe(objective="ce", signals=("shown",), cascade="shown").fit(Xs, y)


def test_signal_columns_derive_logprobs_and_refuse_missing():
    rows = [{"token_logprobs": [-1.0, -0.5], "shown": True}, {"token_logprobs": [], "shown": 0}]
    S = signal_columns(rows, ["logprob_sum", "n_tokens", "shown"])
    assert S[0].tolist() == [-1.5, 2, 1] and S[1].tolist() == [0, 0, 0]
    assert signal_columns(rows[:1], ["logprob_mean"]).tolist() == [[-0.75]]
    assert signal_columns(rows, ["logprob_mean"])[1, 0] == 0  # an empty completion: 0, as its sum
    with pytest.raises(QProbeError, match=r"rows.jsonl: row 2 has no finite number in field 'logprob_mean'"):
        signal_columns([rows[0], {"shown": 1}], ["logprob_mean"], "rows.jsonl")
    with pytest.raises(QProbeError, match="row 1 has no finite number in field 'shown'"):
        signal_columns([{"x": 1}], ["shown"])
    X = np.zeros((2, 2), np.float32)
    assert with_signals(X, rows, ["shown"]).shape == (2, 3) and with_signals(X, rows, []) is X


def _files(tmp_path, rows, X):
    from qprobe.io import save_features, write_jsonl

    write_jsonl(tmp_path / "rows.jsonl", rows)
    save_features(tmp_path / "f.npy", X, rows, {"kind": "test", "model": "m"})
    return tmp_path / "rows.jsonl", tmp_path / "f.npy"


def test_train_records_signals_rerank_refuses_rows_without_them(tmp_path):
    from qprobe.pipeline import eval_file, rerank_file, train_file

    rng = np.random.default_rng(1)
    rows, X = [], rng.normal(size=(80, 4)).astype(np.float32)
    for i in range(80):
        shown = int(rng.random() < 0.5)
        rows.append({"prompt_id": i // 4, "prompt": "p", "sample": i % 4, "completion": str(i),
                     "reward": float(shown and X[i, 0] > 0), "shown": shown,
                     "token_logprobs": rng.normal(size=3).round(3).tolist()})
    rp, fp = _files(tmp_path, rows, X)
    probe, *_ = train_file(rp, fp, tmp_path / "probe", objective="ce", beta=0.0, signals=["logprob_sum"],
                           cascade="shown")
    cfg = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert cfg["params"]["signals"] == ["logprob_sum", "shown"] and cfg["params"]["cascade"] == "shown"
    out = rerank_file(rp, fp, tmp_path / "probe", tmp_path / "chosen.jsonl")
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r["shown"])
    assert all(r["shown"] == max(by_prompt[r["prompt_id"]]) for r in out)
    rep = eval_file(rp, fp, tmp_path / "probe", filters=["shown"])
    names = [b["policy"] for b in rep["baselines"]]
    assert names == ["base", "likelihood", "filter:shown", "filter:shown + likelihood", "probe", "best-of-k"]
    for b in rep["baselines"][:-1]:
        assert b["lo"] <= b["diff"] <= b["hi"] and b["vs"] != b["policy"]
    stripped = [{k: v for k, v in r.items() if k != "shown"} for r in rows]
    (tmp_path / "b").mkdir()
    rp2, fp2 = _files(tmp_path / "b", stripped, X)
    with pytest.raises(QProbeError, match=r"row 1 has no finite number in field 'shown'.*signals \['logprob_sum', 'shown'\]"):
        rerank_file(rp2, fp2, tmp_path / "probe", tmp_path / "b" / "chosen.jsonl")


def test_compare_policies_and_paired_interval():
    r = np.array([0, 1, 0, 0, 1, 1, 0, 0.0])
    g = np.repeat([0, 1], 4)
    lp = np.array([0, -1, -2, -3, 0, -1, -2, -3.0])
    shown = np.array([0, 1, 0, 0, 0, 0, 0, 0.0])
    per = policies(r, g, logprob=lp, filters={"shown": shown}, probe_q=-lp)
    assert per["base"].tolist() == [0.25, 0.5] and per["likelihood"].tolist() == [0, 1]
    assert per["filter:shown"].tolist() == [1, 0.5] and per["filter:shown + likelihood"].tolist() == [1, 1]
    assert per["best-of-k"].tolist() == [1, 1]
    rows = {row["policy"]: row for row in compare(per)}
    assert rows["filter:shown + likelihood"]["vs"] == "filter:shown" and rows["best-of-k"]["vs"] is None
    assert per_prompt_reward([1, 1, 0], [1, 0, 0], [0, 0, 0]).tolist() == [0.5]  # ties split evenly
    ci = paired_bootstrap(np.ones(50), np.zeros(50))
    assert ci == {"diff": 1.0, "lo": 1.0, "hi": 1.0}
