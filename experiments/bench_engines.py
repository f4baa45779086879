"""Useful tokens/s of three sampling engines on the same prompts: qprobe's local sampler,
llama.cpp's server (llama-cpp-python) and vLLM's server (its CPU build here).

    python experiments/bench_engines.py [--prompts 24] [-k 4] [--max-new-tokens 128] [--engines local,llama,vllm]

The same MBPP chat prompts, k samples each, temperature 0.8, top-p 0.95, through the
`qprobe` samplers a user would run (`qprobe sample` and `qprobe sample --api-base`), no
cache. Each server is started by `qprobe.testing.servers` (llama.cpp: `scripts/llama_server.sh
install`; vLLM: `scripts/vllm_server.sh install`), warmed with one request, then timed.
"Useful" tokens are the returned completions' tokens under the model's own tokenizer
(the same count for every engine). The engines serve the same SmolLM2-135M-Instruct: the
local sampler and vLLM run the GGUF's weights dequantised to float32; llama.cpp runs the
Q4_1 GGUF itself. llama-cpp-python's server ignores `n` and serves one request at a time,
so qprobe sends one request per sample; vLLM honours `n` (one request per prompt).
Prints one line per engine, then one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts(n: int) -> list[dict]:
    from qprobe.datasets.code import mbpp_rows  # what `qprobe prompts mbpp` writes

    return mbpp_rows(ROOT / "data" / "mbpp" / "mbpp.jsonl", ["test"], limit=n)


def count_tokens(rows: list[dict]) -> int:
    from qprobe.hfmodel import load_model

    _, tok = load_model("smollm2-135m")
    return sum(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows)


def timed(sampler, rows, k) -> tuple[float, list[dict]]:
    sampler.sample(rows[:1], k=1, seed=123, progress=False)  # warm-up: load, first request
    t = time.perf_counter()
    out = sampler.sample(rows, k=k, seed=0, progress=False)
    return time.perf_counter() - t, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--engines", default="local,llama,vllm")
    ap.add_argument("--batch-size", type=int, default=96, help="local sampler's batch")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight to a server")
    ap.add_argument("--log-dir", default=str(ROOT / "runs" / "bench_engines"), help="servers' logs")
    ap.add_argument("--vllm-threads", default=None,
                    help="VLLM_CPU_OMP_THREADS_BIND for the vLLM server, e.g. 0-1 (vLLM's default keeps one core "
                         "for its front end on a 2-core machine)")
    args = ap.parse_args(argv)
    import torch

    rows = prompts(args.prompts)
    settings = dict(temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens)
    res = {"prompts": len(rows), "k": args.k, "max_new_tokens": args.max_new_tokens, "cpu_threads": torch.get_num_threads(),
           "engines": {}}
    for engine in args.engines.split(","):
        with contextlib.ExitStack() as stack:
            tmp = Path(args.log_dir)
            tmp.mkdir(parents=True, exist_ok=True)
            if engine == "local":
                from qprobe.samplers.hf import HFSampler

                sampler = HFSampler("smollm2-135m", batch_size=args.batch_size, **settings)
                note = f"HFSampler, float32, batch {args.batch_size}"
            elif engine == "llama":
                from qprobe.samplers.openai_api import OpenAISampler
                from qprobe.testing.servers import llama_server

                url = stack.enter_context(llama_server(Path(tmp) / "llama.log", timeout=300))
                sampler = OpenAISampler(url, "smollm2", concurrency=args.concurrency, timeout=600, **settings)
                note = "llama-cpp-python server (Q4_1 GGUF), one request per sample"
            elif engine == "vllm":
                from qprobe.samplers.openai_api import OpenAISampler
                from qprobe.testing.servers import vllm_server

                if args.vllm_threads:
                    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_threads
                url = stack.enter_context(vllm_server("generate", Path(tmp) / "vllm.log"))
                sampler = OpenAISampler(url, "smollm2", concurrency=args.concurrency, timeout=600, **settings)
                note = "vLLM CPU server, float32, n = k per request" + (
                    f", threads bound to {args.vllm_threads}" if args.vllm_threads else ", default thread binding")
            else:
                raise SystemExit(f"--engines: unknown engine {engine!r} (local, llama, vllm)")
            secs, out = timed(sampler, rows, args.k)
            n = count_tokens(out)
            res["engines"][engine] = {"seconds": round(secs, 2), "useful_tokens": n, "tok_s": round(n / secs, 1),
                                      "completions": len(out), "what": note,
                                      "requests": getattr(sampler, "n_requests", None)}
            print(f"{engine:6s}: {n} useful tokens in {secs:.1f} s = {n / secs:.0f} tok/s  ({note})", flush=True)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
