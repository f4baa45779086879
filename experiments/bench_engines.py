"""Useful tokens/s of sampling engines on the same prompts: qprobe's local sampler, llama.cpp's
own C++ `llama-server`, llama-cpp-python's server and vLLM's server (its CPU build here).

    python experiments/bench_engines.py --json                  # local vs llama-server, SmolLM2 and Qwen 0.5B
    python experiments/bench_engines.py --models smollm2-135m --engines local,native,llama,vllm

`--json` ends with one object holding, per model, `local_tok_s`, `llama_server_tok_s` and
`ratio` (local / llama-server). The native server is built by `scripts/llama_server.sh
native-install` and runs the model's GGUF with `-np --parallel` slots (it honours `n`).

The same MBPP chat prompts, k samples each, temperature 0.8, top-p 0.95, through the
`qprobe` samplers a user would run (`qprobe sample` and `qprobe sample --api-base`), no
cache. Each server is started by `qprobe.testing.servers` (llama.cpp: `scripts/llama_server.sh
install`; vLLM: `scripts/vllm_server.sh install`), warmed with one request, then timed.
"Useful" tokens are the returned completions' tokens under the model's own tokenizer
(the same count for every engine). The engines serve the same GGUF: the local sampler and
vLLM run its weights dequantised (the local sampler in qprobe's default dtype for this CPU);
llama.cpp runs the quantised GGUF itself (SmolLM2: Q4_1, Qwen: its carried quantisation). llama-cpp-python's server ignores `n` and serves one request at a time,
so qprobe sends one request per sample; vLLM honours `n` (one request per prompt).
Prints one line per engine, then one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> list[dict]:
    from qprobe.datasets.code import mbpp_rows  # what `qprobe prompts mbpp` writes

    return mbpp_rows(ROOT / "data" / "mbpp" / "mbpp.jsonl", ["test"], limit=n)


def count_tokens(rows: list[dict], model: str) -> int:
    from qprobe.hfmodel import load_model

    _, tok = load_model(model)
    return sum(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows)


def timed(sampler, rows, k) -> tuple[float, list[dict]]:
    sampler.sample(rows[:1], k=1, seed=123, progress=False)  # warm-up: load, first request
    t = time.perf_counter()
    out = sampler.sample(rows, k=k, seed=0, progress=False)
    return time.perf_counter() - t, out


def gguf_of(model: str) -> Path:
    from qprobe.hfmodel import resolve_model

    path, extra = resolve_model(model)
    if "gguf_file" not in extra:
        raise SystemExit(f"--models: {model} has no GGUF for llama.cpp")
    return Path(path) / extra["gguf_file"]


def run_engine(engine: str, model: str, rows, args, settings, stack) -> tuple[dict, str]:
    from qprobe.hfmodel import default_dtype
    from qprobe.samplers.openai_api import OpenAISampler

    tmp = Path(args.log_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    if engine == "local":
        from qprobe.samplers.hf import HFSampler

        sampler = HFSampler(model, batch_size=args.batch_size, **settings)
        note = f"HFSampler, {default_dtype('cpu')}, batch {args.batch_size}"
    elif engine == "native":
        from qprobe.testing.servers import native_llama_server

        gguf = gguf_of(model)
        url = stack.enter_context(native_llama_server(gguf, tmp / f"native-{model}.log", parallel=args.parallel))
        sampler = OpenAISampler(url, model, concurrency=args.concurrency, timeout=600, **settings)
        note = f"llama.cpp llama-server -np {args.parallel} ({gguf.name}), n = k per request"
    elif engine == "llama":
        from qprobe.testing.servers import llama_server

        if model != "smollm2-135m":
            raise SystemExit("--engines llama: llama-cpp-python's server runs SmolLM2 only here")
        url = stack.enter_context(llama_server(tmp / "llama.log", timeout=300))
        sampler = OpenAISampler(url, "smollm2", concurrency=args.concurrency, timeout=600, **settings)
        note = "llama-cpp-python server (Q4_1 GGUF), one request per sample"
    elif engine == "vllm":
        from qprobe.testing.servers import vllm_server

        if model != "smollm2-135m":
            raise SystemExit("--engines vllm: scripts/vllm_server.sh serves SmolLM2 only")
        if args.vllm_threads:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_threads
        url = stack.enter_context(vllm_server("generate", tmp / "vllm.log"))
        sampler = OpenAISampler(url, "smollm2", concurrency=args.concurrency, timeout=600, **settings)
        note = "vLLM CPU server, float32, n = k per request" + (
            f", threads bound to {args.vllm_threads}" if args.vllm_threads else ", default thread binding")
    else:
        raise SystemExit(f"--engines: unknown engine {engine!r} (local, native, llama, vllm)")
    secs, out = timed(sampler, rows, args.k)
    n = count_tokens(out, model)
    return {"seconds": round(secs, 2), "useful_tokens": n, "tok_s": round(n / secs, 1), "completions": len(out),
            "what": note, "requests": getattr(sampler, "n_requests", None)}, note


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    ap.add_argument("--engines", default="local,native")
    ap.add_argument("--batch-size", type=int, default=96, help="local sampler's batch")
    ap.add_argument("--parallel", type=int, default=16, help="llama-server's slots (-np)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight to a server")
    ap.add_argument("--json", action="store_true", help="end with one JSON object")
    ap.add_argument("--log-dir", default=str(ROOT / "runs" / "bench_engines"), help="servers' logs")
    ap.add_argument("--vllm-threads", default=None,
                    help="VLLM_CPU_OMP_THREADS_BIND for the vLLM server, e.g. 0-1 (vLLM's default keeps one core "
                         "for its front end on a 2-core machine)")
    args = ap.parse_args(argv)
    import torch

    from qprobe.hfmodel import speed_flags

    rows = prompts(args.prompts)
    settings = dict(temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens)
    flags = speed_flags()
    res = {"prompts": len(rows), "k": args.k, "max_new_tokens": args.max_new_tokens,
           "cpu_threads": torch.get_num_threads(), "cpu_flags": flags, "models": {}}
    print(f"{len(rows)} MBPP test prompts x {args.k}, {args.max_new_tokens} new tokens, "
          f"{res['cpu_threads']} threads, CPU flags: {flags}", flush=True)
    for model in args.models.split(","):
        m = res["models"][model] = {"engines": {}}
        for engine in args.engines.split(","):
            with contextlib.ExitStack() as stack:
                r, note = run_engine(engine, model, rows, args, settings, stack)
            m["engines"][engine] = r
            print(f"{model:20s} {engine:6s}: {r['useful_tokens']} useful tokens in {r['seconds']:.1f} s = "
                  f"{r['tok_s']:.0f} tok/s  ({note})", flush=True)
        e = m["engines"]
        if "local" in e and "native" in e:
            m.update(local_tok_s=e["local"]["tok_s"], llama_server_tok_s=e["native"]["tok_s"],
                     ratio=round(e["local"]["tok_s"] / e["native"]["tok_s"], 3))
            print(f"{model:20s} local / llama-server: {m['ratio']:.2f}", flush=True)
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
