"""What the scenarios of `resume` and `server_faults` share: a stub server that records what it
served, the three commands under test (`sample`, `reward`, `embed`) with their inputs, and the
comparison of a scenario's output with an uninterrupted run's."""
from __future__ import annotations

import json
import sys
from pathlib import Path


from qprobe.testing.inputs import REWARD_MODULE, _vector_key, cache_values, completion_rows, prompt_rows, write_jsonl
from qprobe.testing.runner import cli_env
from qprobe.testing.servers import StubServer, embedding_for

STUB_MODEL = "stub-model"


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

