"""Broken or hostile input files given to the CLI: each refused with one line naming the file (exit 1,
no traceback), odd valid ones accepted, and no pickle ever executed (`hostile_inputs`); and an empty
completion handled by every step (`empty_completions`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from qprobe.testing.inputs import completion_rows, write_jsonl
from qprobe.testing.runner import one_error_line
from qprobe.testing.scenario import STUB_MODEL, RecordingStub


# ------------------------------------------------------------------ scenario: hostile inputs
def _hostile_files(d: Path, model_dir: str | None) -> list[tuple[str, list, str | None]]:
    """(what, CLI args, text the error must contain, or None if the input must be accepted)."""
    from qprobe._probe_io import _digest
    import pickle
    import shutil

    from qprobe.io import save_features

    rng = np.random.default_rng(0)
    rows = [dict(r, reward=float(i % 2)) for i, r in enumerate(completion_rows(24, k=4))]
    good = write_jsonl(d / "good.jsonl", rows)
    X = rng.standard_normal((len(rows), 5))
    ident = {"kind": "hf", "model": "m", "layer": 1, "pooling": "last"}
    save_features(d / "good.npy", X, rows, ident)
    probe = d / "probe"
    from click.testing import CliRunner

    from qprobe.cli import cli

    r = CliRunner().invoke(cli, ["train", str(good), str(d / "good.npy"), "-o", str(probe), "--objective", "mse"])
    assert r.exit_code == 0, r.output

    def variant(name, text=None, raw=None):
        p = d / name
        p.write_bytes(raw if raw is not None else text.encode())
        return p

    text = good.read_text()
    lines = text.splitlines(keepends=True)
    import gzip

    gz = gzip.compress(text.encode())
    cases = [
        ("missing file", ["reward", d / "absent.jsonl", "-o", d / "o.jsonl", "--kind", "match"],
         "absent.jsonl: no such file"),
        ("empty file", ["reward", variant("empty.jsonl", ""), "-o", d / "o.jsonl"], "empty.jsonl: no rows"),
        ("truncated JSONL", ["embed", variant("trunc.jsonl", "".join(lines[:5]) + lines[5][:30]), "-o", d / "o.npy",
                             "--api-base", "http://127.0.0.1:9/v1", "--api-model", "m"],
         "trunc.jsonl:6: truncated JSON"),
        ("truncated .jsonl.gz", ["reward", variant("trunc.jsonl.gz", raw=gz[: len(gz) // 2]), "-o", d / "o.jsonl"],
         "trunc.jsonl.gz:"),
        ("malformed line", ["reward", variant("bad.jsonl", lines[0] + "{'prompt_id': 1}\n"), "-o", d / "o.jsonl"],
         "bad.jsonl:2: malformed JSON"),
        ("a line that is not an object", ["reward", variant("list.jsonl", lines[0] + "[1, 2]\n"), "-o", d / "o.jsonl"],
         "list.jsonl:2: expected a JSON object"),
        ("Latin-1 text", ["reward", variant("latin1.jsonl", raw=text.replace("Task", "T\u00e2che").encode("latin-1")),
                          "-o", d / "o.jsonl"], "latin1.jsonl:1: not UTF-8"),
        ("UTF-16 text", ["reward", variant("utf16.jsonl", raw=text.encode("utf-16")), "-o", d / "o.jsonl"],
         "utf16.jsonl:1: not UTF-8"),
        ("UTF-8 with a byte-order mark (accepted)", [
            "reward", variant("bom.jsonl", raw=b"\xef\xbb\xbf" + text.encode()), "-o", d / "o.jsonl",
            "--kind", "match:prompt_id"], None),
        ("duplicate prompt_id/sample", ["reward", variant("dup.jsonl", text + lines[3]), "-o", d / "o.jsonl"],
         "dup.jsonl: row 25 duplicates row 4 (prompt_id='p0', sample=3)"),
        ("duplicate prompt_id in prompts", ["sample", variant("dupp.jsonl", '{"prompt_id": 1, "prompt": "a"}\n' * 2),
                                            "-o", d / "o.jsonl", "--api-base", "http://127.0.0.1:9/v1",
                                            "--api-model", "m"], "dupp.jsonl: row 2 duplicates row 1"),
        ("non-string completion", ["reward", variant("nonstr.jsonl", lines[0] + lines[1].replace(
            '"completion": "', '"completion": 7, "x": "')), "-o", d / "o.jsonl"], "nonstr.jsonl: row 2: 'completion'"),
        ("rows without reward to train", ["train", variant("noreward.jsonl", "".join(
            json.dumps({k: v for k, v in r.items() if k != "reward"}) + "\n" for r in rows)), d / "good.npy",
            "-o", d / "p2"], "noreward.jsonl: row 1 has no 'reward'"),
        ("NaN reward", ["train", variant("nanreward.jsonl", text.replace('"reward": 1.0', '"reward": NaN', 1)),
                        d / "good.npy", "-o", d / "p2"], "nanreward.jsonl: row 2: reward nan is not finite"),
    ]
    for name, bad in (("NaN features", np.nan), ("infinite features", np.inf)):
        Xb = X.copy()
        Xb[7, 2] = bad
        p = d / f"{name.split()[0].lower()}.npy"
        save_features(p, X, rows, ident)
        np.save(p, Xb)  # the sidecar still lines up: only the values are bad
        cases.append((name, ["train", good, p, "-o", d / "p2"], f"{p.name}: row 8 has NaN or infinite features"))
    np.save(d / "pickled.npy", np.array([{"a": 1}] * len(rows), dtype=object), allow_pickle=True)
    cases.append(("feature file holding a pickle", ["train", good, d / "pickled.npy", "-o", d / "p2"],
                  "pickled.npy: not a readable feature file"))
    save_features(d / "shuffled.npy", X[::-1], rows[::-1], ident)
    cases.append(("features for other rows (order)", ["train", good, d / "shuffled.npy", "-o", d / "p2"],
                  "shuffled.npy: features were computed for other rows"))
    save_features(d / "short.npy", X[:-1], rows[:-1], ident)
    cases.append(("features for fewer rows", ["eval", good, d / "short.npy", "--probe", probe],
                  "short.npy: 23 feature rows do not line up with 24 data rows"))
    save_features(d / "other.npy", X, rows, dict(ident, layer=2))
    cases.append(("features from another extractor", ["rerank", good, d / "other.npy", "--probe", probe, "-o",
                                                      d / "o.jsonl"], "other.npy does not fit the probe"))

    def probe_copy(name):
        p = d / name
        shutil.copytree(probe, p)
        return p

    p = probe_copy("probe-edited-weights")
    w = bytearray((p / "probe.safetensors").read_bytes())
    w[-9] ^= 0x10
    (p / "probe.safetensors").write_bytes(bytes(w))
    cases.append(("probe weights edited by hand", ["eval", good, d / "good.npy", "--probe", p],
                  "do not match the checksum"))
    p = probe_copy("probe-edited-config")
    cfg = json.loads((p / "config.json").read_text())
    cfg["n_features"] = 9
    (p / "config.json").write_text(json.dumps(cfg))
    cases.append(("probe config edited by hand", ["eval", good, d / "good.npy", "--probe", p],
                  "do not match the checksum"))
    p = probe_copy("probe-broken-config")
    (p / "config.json").write_text('{"format": "qprobe-probe v1", ')
    cases.append(("probe config not JSON", ["eval", good, d / "good.npy", "--probe", p],
                  "config.json is not a qprobe config"))

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))

    p = probe_copy("probe-pickle")
    blob = pickle.dumps(Payload())
    (p / "probe.safetensors").write_bytes(blob)
    cfg = json.loads((p / "config.json").read_text())
    cfg["sha256"] = _digest(blob, cfg)  # a forger fixes the checksum too
    (p / "config.json").write_text(json.dumps(cfg))
    cases.append(("probe carrying a pickle payload", ["eval", good, d / "good.npy", "--probe", p],
                  "probe-pickle is not a valid probe"))
    if model_dir:
        huge = {"prompt_id": "huge", "prompt": "word " * 600}
        cases.append(("prompt beyond the model's context (sample)", [
            "sample", variant("huge.jsonl", json.dumps(huge) + "\n"), "-o", d / "o.jsonl", "--model", model_dir,
            "-k", "1", "--max-new-tokens", "4", "--no-cache"], "exceeds the model's context of 512 tokens"))
        cases.append(("prompt beyond the model's context (embed)", [
            "embed", variant("hugec.jsonl", json.dumps(dict(huge, sample=0, completion="x")) + "\n"), "-o",
            d / "o.npy", "--model", model_dir, "--no-cache"], "exceeds the model's context of 512 tokens"))
        cases.append(("unknown model folder", ["sample", variant("one.jsonl", json.dumps(huge) + "\n"), "-o",
                                               d / "o.jsonl", "--model", d / "no-such-model", "--no-cache"],
                      "no such folder or file"))
    return cases


def hostile_inputs(work, model_dir: str | None = None) -> list[dict]:
    """Run the CLI (in this process, through click's runner) on each hostile input.

    Each entry: what, refused (exit 1 with exactly one 'Error:' line naming the
    file, containing the expected text, and no traceback), accepted (for inputs
    that are valid: exit 0), line (the error line), and ran_code (a pickle payload
    was executed: must be False).
    """
    from click.testing import CliRunner

    from qprobe.cli import cli

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for what, args, expect in _hostile_files(work, model_dir):
        r = CliRunner().invoke(cli, [str(a) for a in args])
        crashed = r.exception is not None and not isinstance(r.exception, SystemExit)
        line = None if crashed else one_error_line(r.stderr)
        if expect is None:
            ok = r.exit_code == 0 and not crashed
        else:
            ok = r.exit_code == 1 and line is not None and expect in line
        if crashed:
            line = "crashed: " + repr(r.exception)
        elif expect is None:
            line = f"exit {r.exit_code}" + (f": {r.stderr[-200:]}" if r.exit_code else "")
        out.append({"what": what, "expected": "accepted" if expect is None else "refused", "ok": ok,
                    "line": line if line is not None else r.stderr[-300:]})
    ran = (work / "PWNED").exists()
    out.append({"what": "pickle payload never executed", "expected": "refused", "ok": not ran, "line": None})
    return out


def empty_completions(work, model_dir: str | None = None) -> list[dict]:
    """An empty completion is a legitimate sample (the model may stop at once): every step handles it.

    code reward: 0.0 with the sandbox's reason (the tests fail: nothing is defined);
    match reward: 1.0 against an empty reference; API embedder: the prompt's text is
    embedded; local embedder: the state at the last prompt token.
    """
    from click.testing import CliRunner

    from qprobe.cli import cli
    from qprobe.io import load_features, read_jsonl

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt_id": "e", "prompt": "Write add(a, b).", "sample": 0, "completion": "",
             "test_list": ["assert add(1, 2) == 3"], "reference": ""},
            {"prompt_id": "e", "prompt": "Write add(a, b).", "sample": 1,
             "completion": "def add(a, b):\n    return a + b\n", "test_list": ["assert add(1, 2) == 3"],
             "reference": "x"}]
    src = write_jsonl(work / "empty.jsonl", rows)
    res = []
    for kind in ("code", "match"):
        r = CliRunner().invoke(cli, ["reward", str(src), "-o", str(work / f"{kind}.jsonl"), "--kind", kind,
                                     "--no-cache"])
        got = read_jsonl(work / f"{kind}.jsonl")[0] if r.exit_code == 0 else {}
        res.append({"step": f"reward {kind}", "rc": r.exit_code, "reward": got.get("reward"),
                    "reason": got.get("reward_reason")})
    with RecordingStub() as stub:
        r = CliRunner().invoke(cli, ["embed", str(src), "-o", str(work / "api.npy"), "--api-base", stub.url,
                                     "--api-model", STUB_MODEL, "--no-cache"])
    X = load_features(work / "api.npy")[0] if r.exit_code == 0 else None
    res.append({"step": "embed api", "rc": r.exit_code, "finite": X is not None and bool(np.isfinite(X).all()),
                "distinct": X is not None and not np.array_equal(X[0], X[1])})
    if model_dir:
        r = CliRunner().invoke(cli, ["embed", str(src), "-o", str(work / "hf.npy"), "--model", model_dir, "--no-cache"])
        X = load_features(work / "hf.npy")[0] if r.exit_code == 0 else None
        res.append({"step": "embed local", "rc": r.exit_code, "finite": X is not None and bool(np.isfinite(X).all()),
                    "distinct": X is not None and not np.array_equal(X[0], X[1])})
    return res


