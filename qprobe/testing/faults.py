"""Fault-injection harness: kill, fault and feed broken files to the `qprobe` CLI, and count what it survived.

Each scenario is a function returning figures:

* `kill_and_resume`: runs interrupted by SIGKILL at several points of `sample`, `reward`
  and `embed`, rows recovered from the cache, finished calls repeated by the reruns (must be 0);
* `faulty_server`: faults injected by a stub OpenAI-compatible server at a 30% rate, and
  whether `sample` and `embed` still ended with the right output;
* `dead_server`: a server that dies for good: one error line, the work so far cached, a rerun completes;
* `hostile_inputs`, `empty_completions`: hostile or broken inputs, refused with one line
  (exit 1, no traceback), and odd valid ones accepted;
* `concurrent_embeds`: two `embed` runs sharing one cache directory at once.

`tests/test_reliability.py` calls them and asserts; `experiments/fault_report.py` runs
them and prints the figures. The stub server is `qprobe.testing.servers`'. Nothing here
needs model weights except the context-length cases of `hostile_inputs`, which use a
tiny random local model (`tiny_model`, about 30 s). The CLI runs as `python -m qprobe`
with this very qprobe first on PYTHONPATH. It never touches the user's cache: every run
gets its own cache folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from qprobe.testing.servers import TRANSIENT, StubServer, embedding_for

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding this qprobe package
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an unknown model id must fail, not wait for the hub

STUB_MODEL = "stub-model"
# a tqdm bar or a transformers loading bar: progress, not a message
_PROGRESS = re.compile(r"^\s*$|^[\w .-]+:\s*\d+%\|")


# ------------------------------------------------------------------ running the CLI
def cli_env(**extra) -> dict:
    """Environment for CLI subprocesses: offline hub, quiet tokenizers."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    # the CLI under test is this qprobe, whether installed or a checkout
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env.pop("QPROBE_CACHE", None)
    env.update(extra)
    return env


def cli_cmd(args) -> list[str]:
    return [sys.executable, "-m", "qprobe", *map(str, args)]


def run_cli(args, cwd, timeout: float = 180, env=None) -> subprocess.CompletedProcess:
    """Run `python -m qprobe ARGS` to the end; stdout and stderr captured as text."""
    return subprocess.run(cli_cmd(args), cwd=cwd, env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_in_process(args, env=None) -> subprocess.CompletedProcess:
    """The same through click's runner in this process (no interpreter start-up): for reference runs."""
    from click.testing import CliRunner

    from qprobe.cli import cli

    extra = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}
    r = CliRunner(env=extra).invoke(cli, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def message_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not progress bars."""
    return [ln for ln in re.split(r"[\r\n]", stderr) if not _PROGRESS.match(ln)]


def one_error_line(stderr: str) -> str | None:
    """The error line if stderr holds exactly one message line, 'Error: ...', and no traceback."""
    lines = message_lines(stderr)
    if "Traceback" in stderr or len(lines) != 1 or not lines[0].startswith("Error: "):
        return None
    return lines[0]


# ------------------------------------------------------------------ a stub that records what it served
class RecordingStub(StubServer):
    """`StubServer` that also records each unit it answered, can answer slowly, and can take a fixed port.

    A unit is one completion text (chat / completions) or one input text (embeddings).
    `served` lists (run tag, unit) in answer order; set `tag` before each client run.
    """

    def __init__(self, *args, delay_s: float = 0.0, port: int = 0, **kw):
        super().__init__(*args, **kw)
        self.delay_s, self.port, self.tag = delay_s, port, None
        self.served: list[tuple] = []  # (tag, unit)

    def __enter__(self):
        from http.server import ThreadingHTTPServer
        import threading

        from qprobe.testing.servers import _Handler

        stub = self

        class Handler(_Handler):
            server_stub = stub

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a killed client resets its connection: expected
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self._httpd = Server(("127.0.0.1", self.port), Handler)  # reuses the address (SO_REUSEADDR)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def answer(self, endpoint, body, fault):
        payload = super().answer(endpoint, body, fault)
        if self.delay_s:
            self._closing.wait(self.delay_s)
        if endpoint == "embeddings":
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            units = [texts[d["index"]] for d in payload["data"]]
        else:
            units = [c["message"]["content"] if "message" in c else c["text"] for c in payload["choices"]]
        with self._lock:
            self.served += [(self.tag, u) for u in units]
        return payload

    def units(self, tag) -> list:
        return [u for t, u in self.served if t == tag]


# ------------------------------------------------------------------ inputs
def prompt_rows(n: int) -> list[dict]:
    return [{"prompt_id": f"p{i}", "prompt": f"Task {i}: write a function that returns {i}."} for i in range(n)]


def completion_rows(n: int, k: int = 2) -> list[dict]:
    """n rows: n // k prompts with k samples each (plus distinct, some empty, completions)."""
    rows = []
    for i in range(n):
        p, s = divmod(i, k)
        completion = "" if i % 97 == 5 else f"def f():\n    return {i}  # sample {s}"
        rows.append({"prompt_id": f"p{p}", "prompt": f"Task {p}: return a number.", "sample": s,
                     "completion": completion})
    return rows


REWARD_MODULE = '''\
import os, time

def reward(row):
    """Parity of the completion's length; logs each call (run tag, row) to $QPROBE_CALLS."""
    time.sleep(0.004)
    with open(os.environ["QPROBE_CALLS"], "a") as f:
        f.write(f"{os.environ.get('QPROBE_RUN', '-')}\\t{row['prompt_id']}\\t{row['sample']}\\n")
    return float(len(row["completion"]) % 2), f"row {row['prompt_id']}/{row['sample']}"
'''


def write_jsonl(path, rows) -> Path:
    from qprobe.io import write_jsonl as _write

    _write(path, rows)
    return Path(path)


# ------------------------------------------------------------------ reading a cache folder
def cache_values(cache_dir) -> list[tuple[str, bytes]]:
    """(kind, value) of every entry in a qprobe cache folder (empty when there is none)."""
    path = Path(cache_dir) / "cache.sqlite"
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=60)
    try:
        return list(conn.execute("SELECT kind, v FROM kv"))
    finally:
        conn.close()


def _vector_key(v) -> bytes:
    return np.asarray(v, dtype=np.float32).tobytes()


# ------------------------------------------------------------------ scenario: kill -9 and resume
class _Kind:
    """How one command is set up, how its progress is counted, and what a cached unit is."""

    def __init__(self, command: str, work: Path, n_rows: int, stub: RecordingStub | None):
        self.command, self.work, self.n, self.stub = command, work, n_rows, stub
        if command == "sample":  # k = 1: one request per row, each with the row's own seed
            self.src = write_jsonl(work / "prompts.jsonl", prompt_rows(n_rows))
            self.extra = ["--api-base", stub.url, "--api-model", STUB_MODEL, "-k", "1", "--max-retries", "2"]
        elif command == "embed":
            self.src = write_jsonl(work / "rows.jsonl", completion_rows(n_rows))
            self.extra = ["--api-base", stub.url, "--api-model", STUB_MODEL, "--batch-size", "4",
                          "--max-retries", "2"]
            from qprobe.embedders.openai_api import item_text

            self.vec_to_text = {_vector_key(embedding_for(t, pooling="last")): t
                                for t in (item_text(r["prompt"], r["completion"]) for r in completion_rows(n_rows))}
        else:
            self.src = write_jsonl(work / "rows.jsonl", completion_rows(n_rows))
            (work / "count_reward.py").write_text(REWARD_MODULE)
            self.calls = work / "calls.tsv"
            self.extra = ["--kind", f"python:{work / 'count_reward.py'}:reward", "--workers", "2"]

    def args(self, out: Path, cache: Path) -> list:
        return [self.command, self.src, "-o", out, *self.extra, "--cache-dir", cache]

    def env(self, tag: str) -> dict:
        if self.stub is not None:
            self.stub.tag = tag
            return cli_env()
        return cli_env(QPROBE_CALLS=str(self.calls), QPROBE_RUN=tag)

    def units(self, tag) -> list:
        """Units computed (served by the stub, or reward calls made) during run `tag`."""
        if self.stub is not None:
            return self.stub.units(tag)
        if not self.calls.exists():
            return []
        lines = [ln.split("\t") for ln in self.calls.read_text().splitlines()]
        return [f"row {p}/{s}" for t, p, s in lines if t == tag]

    def progress(self) -> int:
        """Units computed so far, all runs together (cheap: polled while a run is going)."""
        if self.stub is not None:
            return len(self.stub.served)
        return self.calls.read_bytes().count(b"\n") if self.calls.exists() else 0

    def cached_units(self, cache: Path) -> set:
        out = set()
        for kind, v in cache_values(cache):
            if kind == "f32":
                out.add(self.vec_to_text[bytes(v)])
            elif self.command == "sample":
                out.add(json.loads(v)["completion"])
            else:
                out.add(json.loads(v)[1])  # the reward reason names the row
        return out


def kill_and_resume(command: str, work, n_rows: int = 300, kill_at=(0.25, 0.6), timeout: float = 120) -> dict:
    """SIGKILL `qprobe COMMAND` when a fraction `kill_at[i]` of its units is done, rerun, compare.

    The reference is an uninterrupted run of the same command into another cache
    folder. A unit is a completion (sample), an embedding input (embed, stub API)
    or a reward call (reward, a `python:` reward that logs its calls).

    Returns
    -------
    dict
        interrupted (kills that landed before the run ended), cached_at_kill (units in
        the cache after each kill), recovered (rows of the final output taken from the
        cache), redone (units computed before a kill but not yet cached, so computed
        again), repeated (units computed again although cached at the last kill: must be 0),
        extra_rerun (units the final run computed beyond those missing: must be 0),
        identical (final output equals the reference, byte for byte), lost and
        duplicated rows, final_rc, final_error.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    stub = RecordingStub(delay_s=0.01) if command in ("sample", "embed") else None
    with (stub if stub is not None else _nullcontext()):
        kind = _Kind(command, work, n_rows, stub)
        ref_out, out, cache = work / "reference.out", work / "resumed.out", work / "cache"
        if command == "embed":
            ref_out, out = work / "reference.npy", work / "resumed.npy"
        ref = run_in_process(kind.args(ref_out, work / "reference-cache"), kind.env("reference"))
        if ref.returncode != 0:
            raise RuntimeError(f"reference run failed: {ref.stderr[-2000:]}")
        base = kind.progress()
        total = len(kind.units("reference"))
        cached_at_kill, redone, repeated, interrupted = [], 0, 0, 0
        cached_before: set = set()
        for i, frac in enumerate(kill_at):
            tag = f"killed-{i}"
            proc = subprocess.Popen(cli_cmd(kind.args(out, cache)), cwd=work, env=kind.env(tag),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and kind.progress() - base < frac * total and time.monotonic() < deadline:
                time.sleep(0.003)
            landed = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            interrupted += landed
            now = kind.cached_units(cache)
            mine = kind.units(tag)
            repeated += len(set(mine) & cached_before)
            redone += len(set(mine) - now)  # computed, never cached: the next run does it again
            cached_at_kill.append(len(now))
            cached_before = now
        final = run_cli(kind.args(out, cache), work, timeout, kind.env("final"))
        last = kind.units("final")
        repeated += len(set(last) & cached_before)
        result = {
            "command": command, "rows": n_rows, "kills": len(kill_at), "interrupted": interrupted,
            "cached_at_kill": cached_at_kill, "recovered": len(cached_before), "redone": redone,
            "repeated": repeated, "extra_rerun": len(last) - (total - len(cached_before)),
            "final_rc": final.returncode, "final_error": one_error_line(final.stderr) if final.returncode else None,
        }
    result.update(_compare_outputs(command, ref_out, out))
    return result


def _compare_outputs(command: str, ref_out: Path, out: Path) -> dict:
    if not out.exists():
        return {"identical": False, "lost": None, "duplicated": None}
    if command == "embed":
        same = ref_out.read_bytes() == out.read_bytes() and \
            Path(f"{ref_out}.json").read_text() == Path(f"{out}.json").read_text()
        from qprobe.io import load_features

        n = load_features(out)[0].shape[0]
        n_ref = load_features(ref_out)[0].shape[0]
        return {"identical": same, "lost": max(0, n_ref - n), "duplicated": max(0, n - n_ref)}
    keys = [(r["prompt_id"], r["sample"]) for r in map(json.loads, out.read_text().splitlines())]
    ref_keys = [(r["prompt_id"], r["sample"]) for r in map(json.loads, ref_out.read_text().splitlines())]
    return {"identical": out.read_bytes() == ref_out.read_bytes(),
            "lost": len(set(ref_keys) - set(keys)), "duplicated": len(keys) - len(set(keys))}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


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


# ------------------------------------------------------------------ a tiny local model
def tiny_model(out) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer (context 512), saved to `out`.

    Deterministic (seed 0), so it is built once per transformers version and copied from
    ``$QPROBE_CACHE/testing/`` after that: reading the tokenizer out of the GGUF is most of
    the cost (about 10 s here).
    """
    import shutil
    from pathlib import Path

    import transformers

    from qprobe.cache import DEFAULT_CACHE_DIR

    kept = DEFAULT_CACHE_DIR / "testing" / f"tiny-llama-v1-transformers-{transformers.__version__}"
    if not (kept / "config.json").exists():
        tmp = kept.with_name(f"{kept.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _build_tiny_model(tmp)
        try:
            tmp.rename(kept)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(kept, out, dirs_exist_ok=True)
    return str(Path(out))


def _build_tiny_model(out) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qprobe.hfmodel import resolve_model

    path, extra = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path, **extra)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)


# ------------------------------------------------------------------ scenario: hostile inputs, round 2 (issue 16)
R2_IDENT = {"kind": "hf", "model": "m", "layer": 1, "pooling": "last"}


def round2_rows(n_prompts: int = 6, k: int = 4) -> list[dict]:
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


def round2_setup(d: Path) -> None:
    """rows.jsonl, X.npy (+ sidecar) and a ridge probe P/ in `d`: the inputs the cases try to destroy."""
    from click.testing import CliRunner

    from qprobe.cli import cli
    from qprobe.io import save_features

    d.mkdir(parents=True, exist_ok=True)
    rows = round2_rows()
    write_jsonl(d / "rows.jsonl", rows)
    save_features(d / "X.npy", np.random.default_rng(0).standard_normal((len(rows), 5)), rows, R2_IDENT)
    r = CliRunner().invoke(cli, ["train", str(d / "rows.jsonl"), str(d / "X.npy"), "-o", str(d / "P"),
                                 "--objective", "mse"])
    assert r.exit_code == 0, r.output


def round2_cases(d: Path) -> list[tuple[str, str, list, str | None]]:
    """(class, what, CLI args, text the one error line must contain, or None: must succeed).

    Classes: output=input, special file, limit, bare features, malformed. Files the
    cases may write on purpose are named out-*; every other file in `d` is an input.
    """
    import shutil

    from qprobe.io import save_features

    good = round2_rows()
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
        save_features(d / f"{name}.npy", X, good, R2_IDENT)
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


# Completions that try to score 1.0 on `assert add(1, 2) == 3` without a correct add().
FORGERIES = {
    "reads the token from sys.argv[0]": "import re, os, sys\nt = re.findall(r'[0-9a-f]{32}', open(sys.argv[0]).read())"
                                        "\nprint(*t, sep='\\n'); sys.stdout.flush(); os._exit(0)",
    "reads /proc/self/cmdline": "import re, os\nt = re.findall(r'[0-9a-f]{32}', open('/proc/self/cmdline').read())\n"
                                "print(*t, sep='\\n', flush=True); os._exit(0)",
    "reads stdin": "import os, sys\nprint(sys.stdin.read(), flush=True); os._exit(0)",
    "reads the files of its folder": "import os, re\nfor f in os.listdir('.'):\n    print(*re.findall(r'[0-9a-f]{32}',"
                                     " open(f).read()), sep='\\n', flush=True)\nos._exit(0)",
    "exits early with sys.exit(0)": "import sys\nsys.exit(0)",
    "exits early with os._exit(0)": "import os\nos._exit(0)",
    "prints from an atexit hook": "import atexit\natexit.register(lambda: print('0' * 32))\nraise SystemExit(0)",
    "kills itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "prints a guessed token": "import os\nprint(os.urandom(16).hex(), flush=True); os._exit(0)",
}
# Documented in rewards/code.py as beyond the check: code in the same process that reads the
# boot's copy of the token from the interpreter's frames.
KNOWN_LIMIT = {
    "walks the interpreter's frames (documented limit)": (
        "import sys, os\nf = sys._getframe()\nwhile f is not None:\n"
        "    fin = f.f_globals.get('_finish')\n"
        "    if fin is not None and getattr(fin, '__defaults__', None):\n"
        "        print(fin.__defaults__[0].decode(), flush=True); os._exit(0)\n"
        "    f = f.f_back\n"),
}


def forged_rewards(timeout: float = 30.0) -> list[dict]:
    """Each forgery as a completion for `add` (whose test fails): reward, reason, forged (reward 1.0)."""
    from qprobe.rewards.code import code_reward

    out = []
    for known, table in ((False, FORGERIES), (True, KNOWN_LIMIT)):
        for what, code in table.items():
            row = {"prompt_id": "add", "prompt": "Write add(a, b).", "sample": 0,
                   "completion": "def add(a, b):\n    return 0\n" + code, "test_list": ["assert add(1, 2) == 3"]}
            reward, reason = code_reward(row, timeout=timeout)
            out.append({"what": what, "known_limit": known, "reward": reward, "reason": reason,
                        "forged": reward == 1.0})
    return out


def hostile_round2(work, forgeries: bool = True) -> dict:
    """Run every `round2_cases` case through the CLI (in this process), then the forgeries.

    Returns entries (class, what, expected, ok, line), forgeries, and destroyed: the
    input files (everything in the folder before the cases ran, but out-*) whose bytes
    or type changed (must be 0), of inputs_watched.
    """
    import stat

    from click.testing import CliRunner

    from qprobe.cli import cli

    d = Path(work)
    round2_setup(d)
    cases = round2_cases(d)

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


def round2_figures(r2: dict) -> dict:
    """The round-2 figures: hostile inputs tried and refused, forged rewards, inputs destroyed."""
    e, f = r2["entries"], r2["forgeries"]
    return {
        "round2_hostile_inputs_tried": sum(x["expected"] == "refused" for x in e),
        "round2_hostile_inputs_refused": sum(x["ok"] for x in e if x["expected"] == "refused"),
        "round2_odd_inputs_accepted": sum(x["ok"] for x in e if x["expected"] == "accepted"),
        "round2_odd_inputs": sum(x["expected"] == "accepted" for x in e),
        "forgeries_tried": sum(not x["known_limit"] for x in f),
        "forged_rewards": sum(x["forged"] for x in f if not x["known_limit"]),
        "known_limit_forgeries_tried": sum(x["known_limit"] for x in f),
        "known_limit_forged": sum(x["forged"] for x in f if x["known_limit"]),
        "inputs_watched": r2["inputs_watched"],
        "inputs_destroyed": len(r2["destroyed"]),
    }
