"""Sample completions from a local transformers model, batched across prompts.

A hand-written decode loop rather than `model.generate`: `generate` runs a batch
until its longest member stops, so with varied lengths most of the compute is
wasted on finished rows. Here finished rows leave the batch at once and new
prompts are admitted into the free slots (continuous batching), each row draws
its tokens from its own seeded generator (reruns agree whatever the batching),
and the hidden states of the fed tokens can be kept, so the features of each
sample come out of the sampling pass with no second forward pass.

Does not cache, count or print progress: `Sampler.sample` does that.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from qprobe.cache import make_key
from qprobe.errors import QProbeError
from qprobe.hfmodel import DEFAULT_MODEL, load_model, norm_layer, prompt_ids
from qprobe.samplers.base import Sampler, SampleJob
from qprobe.samplers.stops import truncate


@dataclass
class _Slot:
    job: int
    gen: object  # torch.Generator of this row
    ids: list = field(default_factory=list)  # sampled completion token ids
    logprobs: list = field(default_factory=list)  # log p(token) under the model (temperature 1), per id
    states: list = field(default_factory=list)  # per fed completion token: (n_capture_layers, hidden)
    prompt_state: object = None  # (n_capture_layers, hidden) at the last prompt token
    final: tuple | None = None  # (text, n_kept, reason) once finished but its last token still needs a feed


class HFSampler(Sampler):
    """Continuous-batching sampler for any causal LM transformers can load.

    Parameters
    ----------
    model : str
        Hugging Face id, local folder, .gguf file, or the alias ``smollm2-135m``.
    temperature, top_p : float
        Sampling settings; temperature 0 is greedy.
    max_new_tokens : int
    stop : list of str, optional
        Cut the completion before the first of these strings.
    code_block : bool
        Stop when the first fenced code block closes.
    batch_size : int
        Rows decoded together; new prompts fill the slots of finished rows.
    capture : list of (layer, pooling), optional
        Also return the features an `HFEmbedder(model, layer, pooling)` would
        compute, taken from this sampling pass; stored in the cache under that
        embedder's keys.
    """

    def __init__(self, model=DEFAULT_MODEL, temperature=0.8, top_p=0.95, max_new_tokens=256, stop=None,
                 code_block=False, batch_size=32, capture=None, device=None, dtype=None):
        self.model = model
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.max_new_tokens = int(max_new_tokens)
        self.stop = list(stop or [])
        self.code_block = bool(code_block)
        self.batch_size = int(batch_size)
        self.capture = [(int(l) if l is not None else -1, p) for l, p in (capture or [])]
        self.device = device
        self.dtype = dtype

    def identity(self) -> dict:
        return {"kind": "hf", "model": self.model, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "stop": self.stop, "code_block": self.code_block}

    # ------------------------------------------------------------------ token choice
    def _draw(self, logits, slots):
        import torch

        if self.temperature <= 0:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        # nucleus: the top 256 tokens cover top_p in nearly every row; sort the whole
        # vocabulary only for rows where they don't (a full sort was 20% of a step)
        sp, si = probs.topk(min(256, probs.shape[-1]), dim=-1)
        short = sp.sum(-1) < min(self.top_p, 1.0 - 1e-6)
        if short.any():
            full_p, full_i = probs.sort(dim=-1, descending=True)
            pad = full_p.shape[-1] - sp.shape[-1]
            sp = torch.nn.functional.pad(sp, (0, pad))
            si = torch.nn.functional.pad(si, (0, pad))
            sp[short], si[short] = full_p[short], full_i[short]
        if self.top_p < 1.0:
            sp = sp.masked_fill(sp.cumsum(-1) - sp > self.top_p, 0.0)  # smallest prefix reaching top_p
        # inverse-CDF draw with one uniform per row from the row's own generator
        # (vectorised; a per-row torch.multinomial over the vocabulary was 16% of a step)
        cdf = sp.cumsum(-1)
        u = torch.stack([torch.rand((), generator=s.gen) for s in slots]).to(cdf.device) * cdf[:, -1]
        pick = torch.searchsorted(cdf, u[:, None]).clamp(max=cdf.shape[1] - 1)
        return si.gather(1, pick)[:, 0].tolist()

    # ------------------------------------------------------------------ main loop
    def sample_stream(self, jobs: Sequence[SampleJob]) -> Iterator[tuple[int, dict]]:
        import torch

        model, tok = load_model(self.model, self.device, self.dtype)
        layers = [norm_layer(model, l) for l, _ in self.capture]
        want_states = bool(self.capture)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
        eos.discard(None)
        lengths = [len(prompt_ids(tok, j.prompt)) for j in jobs]
        limit = getattr(model.config, "max_position_embeddings", None) or 10**9
        for j, n in zip(jobs, lengths):
            if n + self.max_new_tokens > limit:
                raise QProbeError(f"a prompt of {n} tokens plus --max-new-tokens {self.max_new_tokens} exceeds the "
                                  f"model's context of {limit} tokens (prompt starting {str(j.prompt)[:40]!r})")
        # longest prompts first: admitted together, they share padding
        order = sorted(range(len(jobs)), key=lambda i: -lengths[i])
        queue = list(reversed(order))  # pop() takes the next

        with torch.inference_mode():
            yield from self._loop(model, tok, jobs, layers, want_states, eos, queue)

    def _loop(self, model, tok, jobs, layers, want_states, eos, queue):
        import torch
        from transformers import DynamicCache

        dev = model.device
        slots: list[_Slot] = []
        cache = mask = pos = None  # batch KV cache; (B, T) 1 = real token, 0 = left pad; (B,) next position
        while queue or slots:
            # admit new prompts when a quarter of the slots are free
            free = self.batch_size - len(slots)
            if queue and (not slots or free >= max(1, self.batch_size // 4)):
                new = [queue.pop() for _ in range(min(free, len(queue)))]
                # the k samples of a prompt share its prefill: run each distinct prompt once
                uniq: dict[tuple, int] = {}  # prompt ids -> row of the prefill batch
                pids, row_of = [], []
                for j in new:
                    ids = tuple(prompt_ids(tok, jobs[j].prompt))
                    if ids not in uniq:
                        uniq[ids] = len(pids)
                        pids.append(ids)
                    row_of.append(uniq[ids])
                P = max(map(len, pids))
                inp = torch.full((len(pids), P), tok.pad_token_id, dtype=torch.long)
                m = torch.zeros((len(pids), P), dtype=torch.long)
                for r, ids in enumerate(pids):
                    inp[r, P - len(ids):] = torch.tensor(ids)
                    m[r, P - len(ids):] = 1
                pcache = DynamicCache()
                out = model(input_ids=inp.to(dev), attention_mask=m.to(dev),
                            position_ids=(m.cumsum(-1) - 1).clamp(min=0).to(dev),
                            past_key_values=pcache, use_cache=True, output_hidden_states=want_states,
                            logits_to_keep=1)
                rows = torch.tensor(row_of, device=dev)
                for L in pcache.layers:
                    L.keys, L.values = L.keys[rows], L.values[rows]
                m = m.to(dev)[rows]
                new_slots = []
                for r, j in zip(row_of, new):
                    g = torch.Generator(device="cpu").manual_seed(int(jobs[j].seed))
                    s = _Slot(job=j, gen=g)
                    if want_states:
                        s.prompt_state = torch.stack([out.hidden_states[l][r, -1] for l in layers]).float().cpu()
                    new_slots.append(s)
                first_logits = out.logits[:, -1][rows]
                first = self._draw(first_logits, new_slots)
                first_lp = _token_logprobs(first_logits, first)
                ppos = m.sum(-1)
                if not slots:
                    cache, mask, pos = pcache, m, ppos
                else:
                    T0, T1 = mask.shape[1], m.shape[1]
                    T = max(T0, T1)
                    for L0, L1 in zip(cache.layers, pcache.layers):
                        L0.keys = torch.cat([_lpad(L0.keys, T), _lpad(L1.keys, T)], 0)
                        L0.values = torch.cat([_lpad(L0.values, T), _lpad(L1.values, T)], 0)
                    mask = torch.cat([_lpad(mask, T, dim=1), _lpad(m, T, dim=1)], 0)
                    pos = torch.cat([pos, ppos])
                for s, t, lp in zip(new_slots, first, first_lp):
                    s.ids.append(t)
                    s.logprobs.append(lp)
                slots += new_slots
                # a first token can already end a row (EOS, or max_new_tokens 1)
                done, keep = self._retire(slots, jobs, tok, eos, layers, fed=False)
                yield from done
                slots, cache, mask, pos = _select(slots, keep, cache, mask, pos)

            if not slots:
                continue
            # one decode step for every slot: feed its newest token
            nxt = [s.ids[-1] for s in slots]
            mask = torch.cat([mask, torch.ones((len(slots), 1), dtype=mask.dtype, device=dev)], 1)
            out = model(input_ids=torch.tensor(nxt, device=dev)[:, None], attention_mask=mask,
                        position_ids=pos[:, None], past_key_values=cache, use_cache=True,
                        output_hidden_states=want_states)
            pos = pos + 1
            if want_states:
                hs = torch.stack([out.hidden_states[l][:, -1] for l in layers], 1).float().cpu()  # (B, n_layers, H)
                for r, s in enumerate(slots):
                    s.states.append(hs[r])
            drawn = self._draw(out.logits[:, -1], slots)
            drawn_lp = _token_logprobs(out.logits[:, -1], drawn)
            for s, t, lp in zip(slots, drawn, drawn_lp):
                if s.final is None:
                    s.ids.append(t)
                    s.logprobs.append(lp)
            done, keep = self._retire(slots, jobs, tok, eos, layers, fed=True)
            yield from done
            slots, cache, mask, pos = _select(slots, keep, cache, mask, pos)

    def _retire(self, slots, jobs, tok, eos, layers, fed: bool):
        """Results of finished slots, and the row indices of the slots that stay."""
        done, keep = [], []
        for r, s in enumerate(slots):
            res = self._finished(s, tok, eos, fed)
            if res is None:
                keep.append(r)
            else:
                done.append(self._result(s, jobs[s.job].prompt, *res, layers))
        return done, keep

    def _finished(self, s: _Slot, tok, eos, fed: bool):
        """(text, n_kept_tokens, reason) when slot `s` is done, else None."""
        if s.final is not None:
            return s.final if fed else None  # done once its last kept token has been fed
        n_fed = len(s.ids) - 1  # the newest sampled token is not fed yet
        if s.ids[-1] in eos:
            text, kept, reason = tok.decode(s.ids[:-1], skip_special_tokens=True), len(s.ids) - 1, "stop"
        else:
            full = tok.decode(s.ids, skip_special_tokens=True)
            text, stopped = truncate(full, self.stop, self.code_block)
            if stopped:
                kept, reason = _kept_tokens(tok, s.ids, len(text)), "stop"
            elif len(s.ids) >= self.max_new_tokens:
                kept, reason = len(s.ids), "length"
            else:
                return None
        if kept > n_fed and self.capture:
            s.final = (text, kept, reason)  # feed it once more for its hidden state
            return None
        return text, kept, reason

    def _result(self, s: _Slot, prompt, text: str, kept: int, reason: str, layers) -> tuple[int, dict]:
        res = {"completion": text, "finish_reason": reason, "n_tokens": kept,
               "token_logprobs": [round(float(x), 4) for x in s.logprobs[:kept]]}
        if self.capture:
            from qprobe.embedders.hf import hf_identity, pool_states
            from qprobe.hfmodel import dtype_name
            import torch

            states = torch.stack(s.states[:kept]) if kept else None  # (kept, n_layers, H)
            feats = {}
            for li, ((layer_arg, pooling), layer) in enumerate(zip(self.capture, layers)):
                st = states[:, li] if states is not None else None
                vec = pool_states(st, s.prompt_state[li], pooling)
                key = make_key(hf_identity(self.model, layer, pooling, dtype_name(self.device, self.dtype)), [prompt, text])
                feats[key] = np.asarray(vec, dtype=np.float32)
            res["_features"] = feats
        return s.job, res



def _select(slots, keep, cache, mask, pos):
    """Keep rows `keep` of the batch; drop left columns that are padding for all of them."""
    import torch

    if len(keep) == len(slots):
        return slots, cache, mask, pos
    slots = [slots[r] for r in keep]
    if not slots:
        return slots, None, None, None
    idx = torch.tensor(keep, device=mask.device)
    cache.batch_select_indices(idx)
    mask, pos = mask[idx], pos[idx]
    lead = int((mask.cumsum(1) == 0).sum(1).min())
    if lead:
        mask = mask[:, lead:]
        for L in cache.layers:
            L.keys, L.values = L.keys[:, :, lead:], L.values[:, :, lead:]
    return slots, cache, mask, pos


def _token_logprobs(logits, ids) -> list[float]:
    """log p(id) under the model's own distribution (temperature 1, no top-p) for each row."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp.gather(1, torch.tensor(ids, device=lp.device)[:, None])[:, 0].tolist()


def _lpad(x, T, dim=2):
    """Left-pad `x` with zeros along `dim` to length T."""
    import torch

    n = T - x.shape[dim]
    if n <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim)


def _kept_tokens(tok, ids: list[int], n_chars: int) -> int:
    """Fewest leading tokens whose text covers the first `n_chars` characters."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tok.decode(ids[:mid], skip_special_tokens=True)) >= n_chars:
            hi = mid
        else:
            lo = mid + 1
    return lo
