"""Throughput of sampling and feature extraction, against the plain transformers baselines.

    python experiments/bench_sampling.py                       # SmolLM2-135M on this CPU
    python experiments/bench_sampling.py --random llama-7b --tokenizer DIR --device cuda   # a GPU
    python experiments/bench_sampling.py --model qwen2.5-coder-0.5b --dtype-compare        # fp32 vs bf16, LM head
(run from the repository root with qprobe installed, e.g. `scripts/setup.sh`)

Prints, for the same MBPP chat prompts:
  1. useful tokens/s of qprobe's continuous-batching sampler vs a plain loop that
     calls `model.generate` one prompt at a time (its k samples batched);
  2. the cost of keeping features during sampling (capture on vs off);
  3. feature extraction tokens/s of HFEmbedder vs a bare batched forward pass of
     the same rows in the same batches.
  4. with --dtype-compare: decode tokens/s per step at --batch-size and a feature
     pass's tokens/s with and without the LM head, in float32 and bfloat16.
"Useful" tokens are those kept in the completions (up to the stop), counted
with the same tokenizer for both samplers. `--random NAME` builds a randomly
initialised model of a real shape from its config (no download); a random model
rarely stops early, so there the comparison is of batching alone.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # real model shapes, for randomly initialised benchmarks
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, max_position_embeddings=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192),
}


def sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def build_random(shape, tokenizer_dir, device, dtype):
    """Register a randomly initialised model of `shape` under a name the loaders accept."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qprobe import hfmodel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    name = f"random-{shape}"
    hfmodel.load_model.cache_clear()
    orig = hfmodel.load_model
    hfmodel.load_model = lambda n, d=None, t=None: (model, tok) if n == name else orig(n, d, t)  # noqa: E731
    import qprobe.embedders.hf as eh
    import qprobe.samplers.hf as sh

    sh.load_model = eh.load_model = hfmodel.load_model
    hfmodel.ALIASES[name] = ("", "", cfg.num_hidden_layers)
    return name


def plain_loop(model, tok, rows, k, max_new_tokens, temperature, top_p, device):
    """The baseline: model.generate one prompt at a time (its k samples in one batch).

    generate has no "code block closed" stop, so it runs to EOS or max_new_tokens; its
    completions are then cut with the same rule as qprobe's, and only kept tokens count.
    """
    import torch

    from qprobe.hfmodel import prompt_ids
    from qprobe.samplers.stops import truncate

    out = []
    for r in rows:
        ids = torch.tensor([prompt_ids(tok, r["prompt"])], device=device)
        gen = model.generate(ids, do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             num_return_sequences=k, pad_token_id=tok.pad_token_id)
        for g in gen[:, ids.shape[1]:]:
            out.append(truncate(tok.decode(g, skip_special_tokens=True), code_block=True)[0])
    return out


def dtype_compare(name, batch, steps=16, prompt_len=128, threads=None):
    """Decode tok/s per step and forward tok/s with / without the LM head, float32 vs bfloat16 (CPU)."""
    import torch
    from transformers import DynamicCache

    from qprobe import hfmodel

    out = {}
    for dtype in ("float32", "bfloat16"):
        hfmodel.load_model.cache_clear()
        model, tok = hfmodel.load_model(name, "cpu", dtype)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, 1000, (batch, prompt_len), generator=g)
        with torch.inference_mode():
            cache = DynamicCache()
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            x = ids[:, -1:]
            model(input_ids=x, past_key_values=cache, use_cache=True)  # warm-up step
            t = time.perf_counter()
            for _ in range(steps):
                model(input_ids=x, past_key_values=cache, use_cache=True)
            decode = batch * steps / (time.perf_counter() - t)
            fwd_ids = ids[: max(1, batch // 4)]
            n = fwd_ids.numel()
            timings = {}
            for label, fn in (("with_head", lambda: model(input_ids=fwd_ids)),
                              ("no_head", lambda: model.get_decoder()(input_ids=fwd_ids))):
                fn()
                t = time.perf_counter()
                fn()
                timings[label] = n / (time.perf_counter() - t)
        out[dtype] = {"decode_tok_s": decode, "forward_tok_s_with_head": timings["with_head"],
                      "forward_tok_s_no_head": timings["no_head"]}
        print(f"{dtype:9s}: decode {decode:6.0f} tok/s (batch {batch}); feature pass {timings['no_head']:6.0f} tok/s "
              f"without the LM head, {timings['with_head']:6.0f} with it", flush=True)
        del model
    hfmodel.load_model.cache_clear()
    out["bf16_decode_speedup"] = out["bfloat16"]["decode_tok_s"] / out["float32"]["decode_tok_s"]
    out["bf16_forward_speedup"] = out["bfloat16"]["forward_tok_s_no_head"] / out["float32"]["forward_tok_s_no_head"]
    out["head_cost_float32"] = out["float32"]["forward_tok_s_no_head"] / out["float32"]["forward_tok_s_with_head"] - 1
    print(f"bfloat16 / float32: decode {out['bf16_decode_speedup']:.2f}x, feature pass {out['bf16_forward_speedup']:.2f}x;"
          f" the LM head adds {100 * out['head_cost_float32']:.0f}% to a float32 feature pass", flush=True)
    default = hfmodel.default_dtype("cpu")
    other = "float32" if default == "bfloat16" else "bfloat16"
    faster = {k: out[default][k] >= out[other][k] for k in ("decode_tok_s", "forward_tok_s_no_head")}
    out.update(default_dtype=default, default_is_faster=faster)
    print(f"qprobe's default on this CPU: {default}; faster than {other} for decoding: "
          f"{'yes' if faster['decode_tok_s'] else 'NO'}, for a feature pass: "
          f"{'yes' if faster['forward_tok_s_no_head'] else 'NO'}", flush=True)
    return out


def useful_tokens(tok, texts):
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random", choices=sorted(SHAPES), help="randomly initialised model of this shape")
    ap.add_argument("--tokenizer", help="tokenizer folder for --random")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--dtype-compare", action="store_true",
                    help="only compare float32 and bfloat16 decode and feature-pass speed on the CPU")
    args = ap.parse_args()
    import torch

    if args.dtype_compare:
        if args.threads:
            torch.set_num_threads(args.threads)
        from qprobe.hfmodel import speed_flags

        res = {"model": args.model, "threads": torch.get_num_threads(), "cpu_flags": speed_flags()}
        print(f"{args.model} on CPU, {res['threads']} threads, flags: {res['cpu_flags']}", flush=True)
        res.update(dtype_compare(args.model, args.batch_size, threads=args.threads))
        print(json.dumps(res))
        return

    from qprobe.datasets import mbpp_rows
    from qprobe.embedders.hf import HFEmbedder
    from qprobe.hfmodel import completion_ids, pick_device_dtype, prompt_ids
    from qprobe.samplers.hf import HFSampler

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = pick_device_dtype(args.device, args.dtype)
    dtype_name = str(dtype).replace("torch.", "")
    name = build_random(args.random, args.tokenizer, device, dtype_name) if args.random else args.model
    from qprobe import hfmodel

    model, tok = hfmodel.load_model(name, device, dtype_name)
    rows = mbpp_rows(ROOT / "data" / "mbpp" / "mbpp.jsonl", splits=["test"], limit=args.prompts)
    settings = dict(temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens, code_block=True)
    res = {"model": name, "device": str(device), "dtype": dtype_name, "threads": torch.get_num_threads(),
           "prompts": len(rows), "k": args.k, "max_new_tokens": args.max_new_tokens}

    def timed(fn):
        sync(device)
        t = time.perf_counter()
        v = fn()
        sync(device)
        return v, time.perf_counter() - t

    def sampler(**kw):
        return HFSampler(name, batch_size=args.batch_size, device=args.device, dtype=dtype_name, **{**settings, **kw})

    # warm-up at full batch (allocators, kernels), then alternate plain/capture runs and keep the best of two
    sampler(max_new_tokens=8).sample(rows, k=args.k, progress=False)
    runs = {"off": [], "on": []}
    for _ in range(2):
        out, t = timed(lambda: sampler().sample(rows, k=args.k, progress=False))
        runs["off"].append(t)
        _, t = timed(lambda: sampler(capture=[(-1, "last")]).sample(rows, k=args.k, progress=False))
        runs["on"].append(t)
    t_b, t_c = min(runs["off"]), min(runs["on"])
    texts = [r["completion"] for r in out]
    n_tok = useful_tokens(tok, texts)
    res.update(batched_s=t_b, useful_tokens=n_tok, batched_tok_s=n_tok / t_b)
    print(f"batched sampler : {n_tok} useful tokens in {t_b:.1f}s = {n_tok / t_b:.0f} tok/s", flush=True)
    res.update(capture_s=t_c, capture_overhead=t_c / t_b - 1)
    print(f"with features   : {t_c:.1f}s, overhead {100 * (t_c / t_b - 1):+.1f}%", flush=True)

    if not args.skip_plain:
        with torch.inference_mode():
            plain, t_p = timed(lambda: plain_loop(model, tok, rows, args.k, args.max_new_tokens, 0.8, 0.95, device))
        n_p = useful_tokens(tok, plain)
        res.update(plain_s=t_p, plain_tokens=n_p, plain_tok_s=n_p / t_p, speedup=(n_tok / t_b) / (n_p / t_p))
        print(f"plain generate  : {n_p} useful tokens in {t_p:.1f}s = {n_p / t_p:.0f} tok/s; "
              f"batched is {res['speedup']:.2f}x", flush=True)

    # feature extraction vs a bare forward pass of the same rows, same batches
    items = [(r["prompt"], r["completion"]) for r in out]
    emb = HFEmbedder(name, layer=-1, pooling="last", batch_size=16, device=args.device, dtype=dtype_name)
    order = sorted(range(len(items)), key=lambda i: len(str(items[i][0])) + len(items[i][1]))  # as Embedder.embed
    seqs = [prompt_ids(tok, items[i][0]) + completion_ids(tok, items[i][1]) for i in order]
    n_in = sum(map(len, seqs))

    def bare():
        base = model.get_decoder()
        with torch.inference_mode():
            for s in range(0, len(seqs), 16):
                b = seqs[s : s + 16]
                T = max(map(len, b))
                ids = torch.full((len(b), T), tok.pad_token_id, dtype=torch.long)
                m = torch.zeros((len(b), T), dtype=torch.long)
                for r, x in enumerate(b):
                    ids[r, : len(x)] = torch.tensor(x)
                    m[r, : len(x)] = 1
                base(input_ids=ids.to(model.device), attention_mask=m.to(model.device), output_hidden_states=True)

    bare()  # warm-up
    emb.embed(items[:16], progress=False)
    t_e = min(timed(lambda: emb.embed(items, progress=False))[1] for _ in range(2))
    t_f = min(timed(bare)[1] for _ in range(2))
    res.update(embed_s=t_e, bare_forward_s=t_f, input_tokens=n_in, embed_tok_s=n_in / t_e, bare_tok_s=n_in / t_f,
               extraction_vs_bare=(n_in / t_e) / (n_in / t_f))
    print(f"embed           : {n_in} input tokens in {t_e:.1f}s = {n_in / t_e:.0f} tok/s; bare forward "
          f"{n_in / t_f:.0f} tok/s ({100 * res['extraction_vs_bare']:.0f}% of bare)", flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
