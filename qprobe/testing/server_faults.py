"""What the CLI does against a faulty OpenAI-compatible server, each a function returning figures:

* `faulty_server`: faults injected at a 30% rate; did `sample` and `embed` still end with the right output;
* `dead_server`: a server that dies for good: one error line, the work so far cached, a rerun completes;
* `concurrent_embeds`: two `embed` runs sharing one cache directory at once.
"""
from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np

from qprobe.testing.inputs import cache_values, completion_rows, prompt_rows, write_jsonl
from qprobe.testing.runner import cli_cmd, cli_env, one_error_line, run_cli, run_in_process
from qprobe.testing.servers import TRANSIENT, embedding_for
from qprobe.testing.scenario import STUB_MODEL, RecordingStub, _compare_outputs, _Kind


# ------------------------------------------------------------------ scenario: a faulty server
def faulty_server(command: str, work, n_rows: int = 120, rate: float = 0.3, timeout: float = 150) -> dict:
    """`sample` (k = 2) or `embed` against a stub that fails `rate` of its requests.

    Faults: 429 with Retry-After, 500, 503, dropped connections, stalls past the
    client's 1 s timeout, malformed JSON, and fewer embeddings than inputs (embed)
    or fewer choices than asked for (sample). `correct` means: embed, features
    equal to a fault-free server's; sample, every (prompt, sample) row once, in
    order, each completion one the server produced for that prompt and none
    repeated within a prompt (a short answer is topped up with a new seed, so
    completions can differ from a fault-free run's).
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    faults = TRANSIENT + (("fewer_choices",) if command == "sample" else ("fewer_embeddings",))
    with RecordingStub(fault_rate=rate, faults=faults, stall_s=2.0, retry_after="0.1") as stub:
        t0 = time.monotonic()
        if command == "sample":
            src = write_jsonl(work / "prompts.jsonl", prompt_rows(n_rows // 2))
            args = ["sample", src, "-o", work / "out.jsonl", "-k", "2"]
        else:
            src = write_jsonl(work / "rows.jsonl", completion_rows(n_rows))
            args = ["embed", src, "-o", work / "out.npy", "--batch-size", "4"]
        args += ["--api-base", stub.url, "--api-model", STUB_MODEL, "--request-timeout", "1",
                 "--cache-dir", work / "cache"]
        proc = run_cli(args, work, timeout)
        wall = time.monotonic() - t0
        served = Counter(u for _, u in stub.served)
        injected = {f: stub.counts[f] for f in faults if stub.counts[f]}
        requests = stub.counts["chat"] + stub.counts["completions"] + stub.counts["embeddings"]
    correct = proc.returncode == 0 and _fault_output_correct(command, work, src, served)
    return {"command": command, "rows": n_rows, "rate": rate, "requests": requests,
            "faults": sum(injected.values()), "by_kind": injected, "rc": proc.returncode,
            "error": one_error_line(proc.stderr) if proc.returncode else None,
            "correct": correct, "wall_s": round(wall, 1)}


def _fault_output_correct(command, work, src, served: Counter) -> bool:
    from qprobe.embedders.openai_api import item_text
    from qprobe.io import load_features, read_jsonl

    rows = read_jsonl(src)
    if command == "embed":
        X, _ = load_features(work / "out.npy", rows)
        want = np.stack([embedding_for(item_text(r["prompt"], r["completion"]), pooling="last") for r in rows])
        return bool(np.array_equal(X, want))
    out = read_jsonl(work / "out.jsonl")
    if [(r["prompt_id"], r["sample"]) for r in out] != [(p["prompt_id"], s) for p in rows for s in range(2)]:
        return False
    by_prompt: dict[str, list[str]] = {}  # prompt_id -> its completions
    for r in out:
        by_prompt.setdefault(r["prompt_id"], []).append(r["completion"])
    return all(c in served for r in out for c in [r["completion"]]) and \
        all(len(set(cs)) == len(cs) for cs in by_prompt.values())


# ------------------------------------------------------------------ scenario: the server dies for good
def dead_server(command: str, work, n_rows: int = 60, die_after: int = 10, timeout: float = 120) -> dict:
    """The server stops answering for good after `die_after` answers; then it comes back.

    Returns the first run's exit status, its one error line (None if stderr held
    anything else), its wall time, the units cached when it stopped, whether it left
    no output file, and, after the server is back on the same port, whether the
    rerun finished with the output of an uninterrupted run, asking only for the rest.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    with RecordingStub() as first:
        port = first.port = first._httpd.server_address[1]
        kind = _Kind(command, work, n_rows, first)
        ref_out = work / ("reference.npy" if command == "embed" else "reference.out")
        out = work / ("out.npy" if command == "embed" else "out.jsonl")
        ref = run_in_process(kind.args(ref_out, work / "reference-cache"), kind.env("reference"))
        assert ref.returncode == 0, ref.stderr[-2000:]
        total = len(first.units("reference"))
    with RecordingStub(die_after=die_after, port=port) as dying:
        kind.stub = dying
        t0 = time.monotonic()
        down = run_cli(kind.args(out, work / "cache"), work, timeout, kind.env("down"))
        wall = time.monotonic() - t0
        answered = len(dying.units("down"))
    cached = kind.cached_units(work / "cache")
    no_output = not out.exists()
    with RecordingStub(port=port) as back:
        kind.stub = back
        again = run_cli(kind.args(out, work / "cache"), work, timeout, kind.env("again"))
        asked = len(back.units("again"))
    res = {"command": command, "rows": n_rows, "rc": down.returncode, "error": one_error_line(down.stderr),
           "stderr_tail": down.stderr[-300:], "wall_s": round(wall, 1), "answered": answered,
           "cached": len(cached), "no_partial_output": no_output, "rerun_rc": again.returncode,
           "rerun_asked": asked, "rerun_missing": total - len(cached)}
    res.update(_compare_outputs(command, ref_out, out))
    return res


# ------------------------------------------------------------------ scenario: two runs, one cache
def concurrent_embeds(work, n_rows: int = 200, timeout: float = 120) -> dict:
    """Two `embed` runs over overlapping rows at once, sharing one cache folder."""
    from qprobe.embedders.openai_api import item_text
    from qprobe.io import load_features

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    rows = completion_rows(n_rows)
    half = n_rows // 4 * 2  # whole prompts
    parts = {"a": rows[: n_rows // 2 + half // 2], "b": rows[half // 2:]}  # they share the middle
    with RecordingStub(delay_s=0.01) as stub:
        procs = {}
        for name, part in parts.items():
            src = write_jsonl(work / f"{name}.jsonl", part)
            args = ["embed", src, "-o", work / f"{name}.npy", "--api-base", stub.url, "--api-model", STUB_MODEL,
                    "--batch-size", "4", "--cache-dir", work / "cache"]
            procs[name] = subprocess.Popen(cli_cmd(args), cwd=work, env=cli_env(), stderr=subprocess.PIPE,
                                           stdout=subprocess.DEVNULL, text=True)
        errs = {name: p.communicate(timeout=timeout)[1] for name, p in procs.items()}
        served = len(stub.served)
    ok = {}
    for name, part in parts.items():
        want = np.stack([embedding_for(item_text(r["prompt"], r["completion"]), pooling="last") for r in part])
        ok[name] = procs[name].returncode == 0 and bool(np.array_equal(load_features(work / f"{name}.npy", part)[0],
                                                                         want))
    distinct = len({(r["prompt"], r["completion"]) for r in rows})
    return {"runs": 2, "rows": [len(p) for p in parts.values()], "both_correct": all(ok.values()),
            "rc": [p.returncode for p in procs.values()], "errors": [one_error_line(e) for e in errs.values()
                                                                    if "Error" in e],
            "cache_entries": len(cache_values(work / "cache")), "distinct_inputs": distinct, "served": served}


