"""Misused commands: an output that is one of the inputs, special files (devices, symlinks, fifos),
absurd limits, features without their sidecar, malformed values and read-only places. Each case
is refused with one line naming what is wrong, or accepted where it is valid, and no input file
is destroyed (`run_misuse_cases`); and completions that try to forge a passing reward
(`forged_rewards`, cases in `forgeries.json`)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from qprobe.testing.inputs import write_jsonl
from qprobe.testing.runner import message_lines

TOY_EXTRACTOR = {"kind": "hf", "model": "m", "layer": 1, "pooling": "last"}


def misuse_rows(n_prompts: int = 6, k: int = 4) -> list[dict]:
    """Rewarded rows with a `reference` for the match/regex rewards."""
    return [{"prompt_id": f"p{p}", "prompt": f"Task {p}", "sample": s, "completion": f"answer {p}.{s}",
             "reward": float((p + s) % 2), "reference": f"answer {p}.0"}
            for p in range(n_prompts) for s in range(k)]


def private_device(path: Path, minor: int) -> Path | None:
    """A character device node of our own (1, minor: 3 = null, 7 = full) at `path`, or None where
    mknod or opening it is not allowed. The cases write to these, never to the system's /dev/null or
    /dev/full: code that renames over its output would replace them (a regression must not cost the
    machine its /dev/null)."""
    import stat

    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
        os.close(os.open(path, os.O_WRONLY))
        return path
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None


def misuse_setup(d: Path) -> None:
    """rows.jsonl, X.npy (+ sidecar) and a ridge probe P/ in `d`: the inputs the cases try to destroy."""
    from click.testing import CliRunner

    from qprobe.cli import cli
    from qprobe.io import save_features

    d.mkdir(parents=True, exist_ok=True)
    rows = misuse_rows()
    write_jsonl(d / "rows.jsonl", rows)
    save_features(d / "X.npy", np.random.default_rng(0).standard_normal((len(rows), 5)), rows, TOY_EXTRACTOR)
    r = CliRunner().invoke(cli, ["train", str(d / "rows.jsonl"), str(d / "X.npy"), "-o", str(d / "P"),
                                 "--objective", "mse"])
    assert r.exit_code == 0, r.output


def misuse_cases(d: Path) -> list[tuple[str, str, list, str | None]]:
    """(class, what, CLI args, text the one error line must contain, or None: must succeed).

    Classes: output=input, special file, limit, bare features, malformed. Files the
    cases may write on purpose are named out-*; every other file in `d` is an input.
    """
    import shutil

    from qprobe.io import save_features

    good = misuse_rows()
    rows, feats, probe = d / "rows.jsonl", d / "X.npy", d / "P"
    rr = ["rerank", rows, feats, "--probe", probe, "-o"]
    ev = ["eval", rows, feats, "--probe", probe]

    def jl(name, rs=None, text=None):
        p = d / name
        p.write_text(text if text is not None else "".join(json.dumps(r) + "\n" for r in rs), encoding="utf-8")
        return p

    def row0(**kw):
        return [dict(good[0], **kw)] + good[1:]

    def ev_rows(p):
        return ["eval", p, feats, "--probe", probe]

    os.link(rows, d / "hardlink.jsonl")
    os.symlink(feats, d / "symlink.npy")
    null, full = private_device(d / "null", 3), private_device(d / "full", 7)
    if null is not None:
        os.symlink(null, d / "null-link")
    (d / "out-real.jsonl").write_text("old\n")
    os.symlink(d / "out-real.jsonl", d / "out-link.jsonl")
    os.symlink(d / "absent.jsonl", d / "dangling.jsonl")
    X = np.random.default_rng(0).standard_normal((24, 5))
    np.save(d / "bare.npy", X[::-1])
    np.save(d / "str.npy", X.astype(str))
    np.save(d / "rec.npy", np.zeros((24, 2), dtype=[("a", "f4"), ("b", "i4")]))
    for name, text in (("Xl", "[1, 2]"), ("Xd", "[" * 100000 + "]" * 100000), ("Xg", None)):
        save_features(d / f"{name}.npy", X, good, TOY_EXTRACTOR)
        if text is None:
            meta = json.loads((d / f"{name}.npy.json").read_text())
            text = json.dumps(dict(meta, rows_digest=["x"]))
        (d / f"{name}.npy.json").write_text(text)
    cfg = json.loads((probe / "config.json").read_text())
    probes = {}
    for name, text in (("Pdeep", '{"format": ' + "[" * 100000 + "]" * 100000 + "}"), ("Plist", json.dumps([cfg])),
                       ("Pparams", json.dumps(dict(cfg, params=[1, 2])))):
        shutil.copytree(probe, d / name)
        (d / name / "config.json").write_text(text)
        probes[name] = d / name
    (d / "cache-bad").mkdir()
    (d / "cache-bad" / "cache.sqlite").write_bytes(b"this is not an sqlite database" * 100)
    (d / "user_reward.py").write_text("def raises(row):\n    raise RuntimeError('oops')\n"
                                      "def huge(row):\n    return 10 ** 400\n"
                                      "def nan(row):\n    return float('nan')\n")
    (d / "afile").write_text("x")
    regex_rows = jl("regex.jsonl", [dict(good[0], completion="a" * 40, reference="(a|aa)+b")])
    match = ["--kind", "match", "--no-cache"]
    return [
        *[("output=input", f"rerank -o {t}", [*rr, d / t], "would overwrite the input")
          for t in ("rows.jsonl", "X.npy", "X.npy.json", "P/config.json", "P/probe.safetensors", "hardlink.jsonl",
                    "symlink.npy")],
        ("output=input", "reward -o its input", ["reward", rows, "-o", rows, *match], "would overwrite the input"),
        ("output=input", "train -o the folder holding its inputs", ["train", rows, feats, "-o", d],
         "would overwrite the input"),
        ("output=input", "embed -o its input", ["embed", rows, "-o", rows, "--api-base", "http://127.0.0.1:9/v1",
                                                "--api-model", "m"], "would overwrite the input"),
        *([("special file", "rerank -o a null device (accepted, still a device)", [*rr, null], None),
           ("special file", "rerank -o a symlink to a null device (accepted)", [*rr, d / "null-link"], None),
           ("special file", "embed -o a null device (features need a file)",
            ["embed", rows, "-o", null, "--api-base", "http://127.0.0.1:9/v1", "--api-model", "m"], "regular file")]
          if null is not None else []),
        *([("malformed", "output on a full disk (a full device)", ["reward", rows, "-o", full, *match],
            "full: cannot write")] if full is not None else []),
        ("special file", "rerank -o a symlink to a file (accepted, link kept)", [*rr, d / "out-link.jsonl"], None),
        ("special file", "rerank -o a dangling symlink", [*rr, d / "dangling.jsonl"], "does not exist"),
        ("special file", "reward -o out.jsonl.gz (accepted, gzip)", ["reward", rows, "-o", d / "out-r.jsonl.gz",
                                                                     *match], None),
        *[("limit", f"reward --timeout {v}", ["reward", rows, "-o", d / "out-o.jsonl", "--kind", "code",
                                              "--timeout", v], "--timeout")
          for v in ("inf", "nan", "1e308", "3601")],
        *[("limit", f"train {f} {v}", ["train", rows, feats, "-o", d / "out-Q", f, v], f)
          for f, v in (("--beta", "nan"), ("--beta", "inf"), ("--alpha", "nan"), ("--lr", "inf"))],
        ("limit", "sample --temperature nan", ["sample", rows, "-o", d / "out-o.jsonl", "--temperature", "nan",
                                               "--api-base", "http://127.0.0.1:9/v1", "--api-model", "m"],
         "--temperature"),
        ("limit", "regex reward, catastrophic pattern (accepted: 0.0 'timeout')",
         ["reward", regex_rows, "-o", d / "out-regex.jsonl", "--kind", "regex", "--timeout", "0.5", "--no-cache"],
         None),
        ("limit", "--seed -1", ["train", rows, feats, "-o", d / "out-Q", "--seed", "-1"], "--seed"),
        ("limit", "--seed 2**64", [*rr, d / "out-o.jsonl", "--seed", str(2**64)], "--seed"),
        ("bare features", "a .npy without its sidecar, rows reordered", ["eval", rows, d / "bare.npy", "--probe",
                                                                         probe], "--features-unchecked"),
        ("bare features", "the same with --features-unchecked (accepted)",
         ["eval", rows, d / "bare.npy", "--probe", probe, "--features-unchecked"], None),
        ("malformed", "prompt_id is a list", ev_rows(jl("id-list.jsonl", row0(prompt_id=[1, 2]))),
         "row 1: 'prompt_id'"),
        ("malformed", "prompt_id is null", ev_rows(jl("id-null.jsonl", row0(prompt_id=None))), "row 1: 'prompt_id'"),
        ("malformed", "prompt_id is a float", ev_rows(jl("id-float.jsonl", row0(prompt_id=1.5))),
         "row 1: 'prompt_id'"),
        ("malformed", "sample is a string", ev_rows(jl("s-str.jsonl", row0(sample="0"))), "row 1: 'sample'"),
        ("malformed", "sample is negative", ev_rows(jl("s-neg.jsonl", row0(sample=-1))), "row 1: 'sample'"),
        ("malformed", "sample is 10**30", ev_rows(jl("s-huge.jsonl", row0(sample=10**30))), "row 1: 'sample'"),
        ("malformed", "sample is true", ev_rows(jl("s-bool.jsonl", row0(sample=True))), "row 1: 'sample'"),
        ("malformed", "a 5000-digit integer", ev_rows(jl("digits.jsonl", text=json.dumps(good[0])[:-1]
                                                         + ', "n": ' + "9" * 5000 + "}\n")), "digits.jsonl:1:"),
        ("malformed", "JSON nested 100000 deep", ev_rows(jl("deep.jsonl", text='{"a": ' + "[" * 100000
                                                            + "]" * 100000 + "}\n")), "deep.jsonl:1: JSON nested"),
        ("malformed", "a lone surrogate", ev_rows(jl("surr.jsonl", text=json.dumps(good[0])[:-1]
                                                     + ', "x": "\\ud800"}\n')), "surr.jsonl:1: field 'x'"),
        ("malformed", "reward is 10**400", ev_rows(jl("r-huge.jsonl", row0(reward=10**400))), "row 1: reward"),
        ("malformed", "features of strings", ["eval", rows, d / "str.npy", "--probe", probe], "must be numbers"),
        ("malformed", "features of a structured dtype", ["eval", rows, d / "rec.npy", "--probe", probe],
         "must be numbers"),
        ("malformed", "sidecar is a list", ["eval", rows, d / "Xl.npy", "--probe", probe], "Xl.npy.json: expected"),
        ("malformed", "sidecar nested 100000 deep", ["eval", rows, d / "Xd.npy", "--probe", probe], "Xd.npy.json:"),
        ("malformed", "sidecar digest is a list", ["eval", rows, d / "Xg.npy", "--probe", probe],
         "'rows_digest' must be str"),
        ("malformed", "probe config nested 100000 deep", [*ev[:3], "--probe", probes["Pdeep"]], "config.json"),
        ("malformed", "probe config is a list", [*ev[:3], "--probe", probes["Plist"]], "config.json"),
        ("malformed", "probe params not an object", [*ev[:3], "--probe", probes["Pparams"]], "'params' must be dict"),
        ("malformed", "output under a file", ["reward", rows, "-o", d / "afile" / "o.jsonl", *match], "cannot write"),
        ("malformed", "output name of 300 bytes", ["reward", rows, "-o", d / ("x" * 300), *match], "cannot write"),
        ("malformed", "output on a read-only file system", ["reward", rows, "-o", "/proc/version", *match],
         "/proc/version: cannot write"),
        ("malformed", "probe onto a read-only file system", ["train", rows, feats, "-o", "/proc/qprobe-probe",
                                                             "--objective", "mse"], "/proc/qprobe-probe"),
        ("malformed", "a corrupt cache file", ["reward", rows, "-o", d / "out-o.jsonl", "--kind", "match",
                                               "--cache-dir", d / "cache-bad"], "cache.sqlite: cache unusable"),
        *[("malformed", f"a reward function that {what}", ["reward", rows, "-o", d / "out-o.jsonl", "--kind",
                                                           f"python:{d / 'user_reward.py'}:{fn}", "--no-cache"], text)
          for what, fn, text in (("raises", "raises", "raised RuntimeError for row prompt_id="),
                                 ("returns 10**400", "huge", "returned 1000"), ("returns nan", "nan", "returned nan"))],
    ]


def forgery_cases() -> list[dict]:
    """The forgery cases (what, known_limit, code) from `forgeries.json`: completions that try to score 1.0
    on `assert add(1, 2) == 3` without a correct add(); ``known_limit`` ones are documented in
    rewards/code.py as beyond the check."""
    from importlib import resources

    return json.loads(resources.files("qprobe.testing").joinpath("forgeries.json").read_text())["cases"]


def forged_rewards(timeout: float = 30.0) -> list[dict]:
    """Each forgery as a completion for `add` (whose test fails): reward, reason, forged (reward 1.0)."""
    from qprobe.rewards.code import code_reward

    out = []
    for case in forgery_cases():
        row = {"prompt_id": "add", "prompt": "Write add(a, b).", "sample": 0,
               "completion": "def add(a, b):\n    return 0\n" + case["code"], "test_list": ["assert add(1, 2) == 3"]}
        reward, reason = code_reward(row, timeout=timeout)
        out.append({"what": case["what"], "known_limit": case["known_limit"], "reward": reward, "reason": reason,
                    "forged": reward == 1.0})
    return out


def run_misuse_cases(work, forgeries: bool = True) -> dict:
    """Run every `misuse_cases` case through the CLI (in this process), then the forgeries.

    Returns entries (class, what, expected, ok, line), forgeries, and destroyed: the
    input files (everything in the folder before the cases ran, but out-*) whose bytes
    or type changed (must be 0), of inputs_watched.
    """
    import stat

    from click.testing import CliRunner

    from qprobe.cli import cli

    d = Path(work)
    misuse_setup(d)
    cases = misuse_cases(d)

    def snapshot():
        snap = {}
        for p in sorted(d.rglob("*")):
            st = os.lstat(p)
            if p.name.startswith("out-") or stat.S_ISDIR(st.st_mode):
                continue
            body = (os.readlink(p) if stat.S_ISLNK(st.st_mode) else p.read_bytes() if stat.S_ISREG(st.st_mode)
                    else st.st_rdev)  # a device: its type and number
            snap[str(p)] = (stat.S_IFMT(st.st_mode), hash(body))
        return snap

    before = snapshot()
    entries = []
    for cls, what, args, expect in cases:
        r = CliRunner().invoke(cli, [str(a) for a in args])
        crashed = r.exception is not None and not isinstance(r.exception, SystemExit)
        lines = message_lines(r.stderr)
        errors = [ln for ln in lines if ln.startswith("Error: ")]
        if crashed:
            ok, line = False, "crashed: " + repr(r.exception)[:200]
        elif expect is None:
            ok, line = r.exit_code == 0, f"exit {r.exit_code}" + (f": {r.stderr[-200:]}" if r.exit_code else "")
        else:  # exit 1 with one line, or a usage error (exit 2) whose one Error: line names the flag
            ok = ("Traceback" not in r.stderr and len(errors) == 1 and expect in errors[0]
                  and (r.exit_code == 2 or (r.exit_code == 1 and len(lines) == 1)))
            line = errors[0] if errors else r.stderr[-300:]
        entries.append({"class": cls, "what": what, "expected": "accepted" if expect is None else "refused",
                        "ok": ok, "line": line})
    after = snapshot()
    destroyed = sorted(p for p in before if after.get(p) != before[p])
    checks = {  # the accepted special-file cases left the right thing behind
        "the null and full devices are still devices": all(
            stat.S_ISCHR(os.lstat(p).st_mode) for p in (d / "null", d / "full") if os.path.lexists(p)),
        "symlinked output: link kept, target written": (d / "out-link.jsonl").is_symlink()
        and (d / "out-real.jsonl").read_text().count("\n") == 6,
        "out.jsonl.gz is gzip": (d / "out-r.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b",
        "regex timeout scored 0.0 'timeout'": '"reward_reason": "timeout"' in (d / "out-regex.jsonl").read_text(),
    }
    for what, ok in checks.items():
        entries.append({"class": "special file", "what": what, "expected": "accepted", "ok": ok, "line": None})
    return {"entries": entries, "forgeries": forged_rewards() if forgeries else [], "destroyed": destroyed,
            "inputs_watched": len(before)}


# ------------------------------------------------------------------ the report


def misuse_figures(r2: dict) -> dict:
    """The figures of `run_misuse_cases`: hostile inputs tried and refused, forged rewards, inputs destroyed."""
    e, f = r2["entries"], r2["forgeries"]
    return {
        "misuse_inputs_tried": sum(x["expected"] == "refused" for x in e),
        "misuse_inputs_refused": sum(x["ok"] for x in e if x["expected"] == "refused"),
        "misuse_odd_inputs_accepted": sum(x["ok"] for x in e if x["expected"] == "accepted"),
        "misuse_odd_inputs": sum(x["expected"] == "accepted" for x in e),
        "forgeries_tried": sum(not x["known_limit"] for x in f),
        "forged_rewards": sum(x["forged"] for x in f if not x["known_limit"]),
        "known_limit_forgeries_tried": sum(x["known_limit"] for x in f),
        "known_limit_forged": sum(x["forged"] for x in f if x["known_limit"]),
        "inputs_watched": r2["inputs_watched"],
        "inputs_destroyed": len(r2["destroyed"]),
    }
