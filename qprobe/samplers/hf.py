"""Sample completions from a local transformers model, batched across prompts.

A hand-written decode loop, for two things neither `model.generate` nor
transformers' own continuous-batching API (`generate_batch`, the paged
`ContinuousBatchingManager` of transformers 5) gives:

- **per-row seeds**: each row draws its tokens from its own seeded generator, so a
  completion is the same whatever it was batched with (reruns and resumed runs agree).
  `generate` and the continuous-batching API draw from one global torch RNG (the latter
  seeds it once per manager), so a row's tokens depend on its batch-mates.
- **features of the sampling pass**: the hidden states of the fed tokens are kept, so the
  features of each sample (and of chosen prefixes, `prefix_every`) come out of the
  sampling pass with no second forward pass; and guided decoding (`guide`) scores
  branches with them mid-generation and copies a row's cache into its branches.
  Neither API returns hidden states nor lets a caller fork a running row.

It is also continuous: finished rows leave the batch at once and new prompts are
admitted into the free slots (`generate` runs a batch until its longest member stops).
Each `sample_stream` call keeps its state in a `_Run` (model, jobs, running batch), so one
sampler serves concurrent calls. Three steps: `_Run.admit` prefills new prompts and merges
them into the running batch, `_Run.step` feeds every row its newest token and draws the
next, `_Run.settle` retires finished rows. What a completion's rows do is its decode
policy's: `DecodePolicy` (plain sampling, one row) or `GuidedPolicy` (branches, a choice
among them at each chunk boundary, the winner's cache row forked into the next chunk).

Does not cache, count or print progress: `Sampler.sample` does that.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from qprobe.errors import QProbeError
from qprobe.hfmodel import DEFAULT_MODEL, completion_ids, load_model, model_layers, norm_layer, prompt_ids
from qprobe.samplers.base import Captured, Sample, Sampler, SampleJob, row_seed
from qprobe.samplers.guide import Guide, parse_every, prefix_points
from qprobe.samplers.stops import truncate


@dataclass(eq=False)  # compared by identity
class _Slot:
    """One row of the batch: a completion being drawn (or, guided, one branch of it)."""

    job: int
    gen: object  # torch.Generator of this row
    ids: list = field(default_factory=list)  # sampled completion token ids; the newest is not fed yet
    logprobs: list = field(default_factory=list)  # log p(token) under the model (temperature 1), per id
    states: list = field(default_factory=list)  # per fed completion token: (n_state_layers, hidden)
    prompt_state: object = None  # (n_state_layers, hidden) at the last prompt token
    final: tuple | None = None  # (text, n_kept, reason) once finished but its last token still needs a feed
    # guided decoding only
    start: int = 0  # completion tokens fed when this branch's chunk began
    wait: bool = False  # at its chunk boundary: idle (masked feeds) until its siblings get there
    logits: object = None  # the logits that drew ids[-1], kept at a boundary to redraw for copies
    done: tuple | None = None  # (text, n_kept, reason): finished, out of the batch, awaiting the choice


@dataclass
class _Job:
    """Guided decoding: the per-completion state shared by its branches."""

    rng: object  # numpy Generator of the softmax(Q / beta) choices
    n_chunks: int = 0
    n_fed: int = 0  # decode positions run for this completion, over all its branches
    parked: list = field(default_factory=list)  # finished branches awaiting their siblings


class _Batch:
    """The running batch: its slots and their KV cache, attention mask and next positions."""

    def __init__(self):
        self.slots: list[_Slot] = []
        self.cache = self.mask = self.pos = None  # DynamicCache; (B, T) 1 = real token, 0 = pad or idle; (B,)

    def select(self, keep: list[int]) -> None:
        """Keep rows `keep`; drop left columns that are padding for all of them."""
        import torch

        if keep == list(range(len(self.slots))):
            return
        self.slots = [self.slots[r] for r in keep]
        if not self.slots:
            self.cache = self.mask = self.pos = None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.pos = self.mask[idx], self.pos[idx]
        lead = int((self.mask.cumsum(1) == 0).sum(1).min())
        if lead:
            self.mask = self.mask[:, lead:]
            for L in self.cache.layers:
                L.keys, L.values = L.keys[:, :, lead:], L.values[:, :, lead:]

    def merge(self, slots, cache, mask, pos) -> None:
        """Append rows (their cache, mask and positions), left-padding the shorter side."""
        import torch

        if not self.slots:
            self.slots, self.cache, self.mask, self.pos = list(slots), cache, mask, pos
            return
        T = max(self.mask.shape[1], mask.shape[1])
        for L0, L1 in zip(self.cache.layers, cache.layers):
            L0.keys = torch.cat([_lpad(L0.keys, T), _lpad(L1.keys, T)], 0)
            L0.values = torch.cat([_lpad(L0.values, T), _lpad(L1.values, T)], 0)
        self.mask = torch.cat([_lpad(self.mask, T, dim=1), _lpad(mask, T, dim=1)], 0)
        self.pos = torch.cat([self.pos, pos])
        self.slots += list(slots)

    def fork(self, r: int, slots) -> None:
        """Append `slots` as copies of row r (its cache, mask and position)."""
        import torch

        idx = torch.full((len(slots),), r, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = torch.cat([layer.keys, layer.keys[idx]], 0)
            layer.values = torch.cat([layer.values, layer.values[idx]], 0)
        self.mask = torch.cat([self.mask, self.mask[idx]], 0)
        self.pos = torch.cat([self.pos, self.pos[idx]])
        self.slots += slots


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
    prefix_every : int or "line", optional
        With `capture`: also keep the features of prefixes of each completion, every
        N tokens or after each token that ends a line (and the whole completion), under
        the embedder's keys of (prompt, prefix text). Results gain ``prefix_chars``: the
        length of each kept prefix, in characters of the completion.
    guide : str or QProbe, optional
        A prefix value probe (`qprobe train --prefix`): generate in chunks; at each chunk
        boundary every live row proposes `branch` continuations of `chunk` tokens (or to a
        line end), scored by the probe on prefix + continuation, and keeps one drawn from
        softmax(Q / `beta`). Branches are extra rows sharing the prefix's KV cache (copied
        rows). Results gain ``n_generated``: decode positions run over all branches.
    """

    def __init__(self, model=DEFAULT_MODEL, temperature=0.8, top_p=0.95, max_new_tokens=256, stop=None,
                 code_block=False, batch_size=32, capture=None, device=None, dtype=None, prefix_every=None,
                 guide=None, chunk=32, branch=4, beta=0.1):
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
        self._cap_embedders = None  # built on first use (capture_embedders)
        self.prefix_every = parse_every(prefix_every)
        if self.prefix_every is not None and not self.capture:
            raise QProbeError("--prefix-every keeps prefix features: give --capture LAYER:POOLING too")
        self.guide = Guide(guide, model, chunk, branch, beta) if guide is not None else None

    @classmethod
    def kwargs_from_options(cls, *, model=None, api_base=None, api_model=None, device=None, dtype=None,
                            batch_size=None, temperature=None, top_p=None, max_new_tokens=None, stop=None, capture=None,
                            code_block=False, prefix_every=None, guide=None, chunk=None, branch=None, beta=None,
                            **_) -> dict:
        """The generic options (`registry.build`): a local model, the default one when none is named;
        ``capture`` as ``LAYER:POOLING`` strings; ``chunk``, ``branch`` and ``beta`` only with ``guide``."""
        from qprobe.registry import uses_api

        if uses_api(model, api_base, api_model):
            raise QProbeError("--sampler hf needs --model (or nothing), not --api-base")
        caps = []
        for c in capture or ():
            layer, _, pooling = c.partition(":") if isinstance(c, str) else (c[0], ":", c[1])
            try:
                caps.append((int(layer), pooling or "last"))
            except ValueError:
                raise QProbeError(f"--capture {c!r}: expected LAYER:POOLING, e.g. -1:last") from None
        kw = dict(model=model or DEFAULT_MODEL, device=device, dtype=dtype, batch_size=batch_size, capture=caps,
                  code_block=code_block, prefix_every=prefix_every, temperature=temperature, top_p=top_p,
                  max_new_tokens=max_new_tokens, stop=stop)
        if guide:
            kw.update(guide=guide, chunk=chunk, branch=branch, beta=beta)
        return {k: v for k, v in kw.items() if v is not None}

    def identity(self) -> dict:
        ident = {"kind": "hf", "model": self.model, "temperature": self.temperature, "top_p": self.top_p,
                 "max_new_tokens": self.max_new_tokens, "stop": self.stop, "code_block": self.code_block}
        if self.prefix_every is not None:  # only when set: plain runs keep their cache keys
            ident["prefix_every"] = self.prefix_every
        if self.guide is not None:
            ident["guide"] = self.guide.identity()
        return ident

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
    def sample_stream(self, jobs: Sequence[SampleJob]) -> Iterator[tuple[int, Sample]]:
        """Each call keeps its state in its own `_Run` (and decode policy), so calls may run at once."""
        import torch

        model, tok = load_model(self.model, self.device, self.dtype)
        run = _Run(self, model, tok, jobs, GuidedPolicy(self.guide) if self.guide else DecodePolicy())
        lengths = [len(prompt_ids(tok, j.prompt)) for j in jobs]
        limit = getattr(model.config, "max_position_embeddings", None) or 10**9
        for j, n in zip(jobs, lengths):
            if n + self.max_new_tokens > limit:
                raise QProbeError(f"a prompt of {n} tokens plus --max-new-tokens {self.max_new_tokens} exceeds the "
                                  f"model's context of {limit} tokens (prompt starting {str(j.prompt)[:40]!r})")
        # longest prompts first: admitted together, they share padding
        order = sorted(range(len(jobs)), key=lambda i: -lengths[i])
        queue = list(reversed(order))  # pop() takes the next
        rows_per_job, batch = run.policy.rows_per_job, run.batch
        while queue or batch.slots:
            # inference mode for the step only, not across the yields: another call's steps may run in between
            with torch.inference_mode():
                done = []
                free = self.batch_size - len(batch.slots)
                # admit new prompts when a quarter of the slots are free
                if queue and (not batch.slots or free >= max(rows_per_job, self.batch_size // 4)):
                    n = max(1, free // rows_per_job)
                    done += run.admit([queue.pop() for _ in range(min(n, len(queue)))])
                if batch.slots:
                    done += run.step()
            yield from done

    def capture_embedders(self) -> list:
        """The `HFEmbedder` whose features each `capture` entry equals (it owns their cache keys)."""
        if self._cap_embedders is None:
            from qprobe.embedders.hf import HFEmbedder

            self._cap_embedders = [HFEmbedder(self.model, layer, pooling, device=self.device, dtype=self.dtype)
                                   for layer, pooling in self.capture]
        return self._cap_embedders


class DecodePolicy:
    """What the decode loop does with a completion's rows: plain sampling, one row per completion.

    The loop (`_Run`) asks its policy how many rows a completion starts with (`start`), tells it
    of each fed row (`fed`) and of each finished one (`finish`), lets it stop a row at a boundary
    (`boundary`) and, after each step, act on the rows it stopped (`after_step`). A policy serves
    one `sample_stream` call: it may keep that call's state. `GuidedPolicy` is the other one.
    """

    rows_per_job = 1
    layer = None  # a hidden-state layer the policy reads (besides the captured ones), normalised by `bind`

    def bind(self, model, name: str) -> None:
        """Check the policy against the loaded model (`name`: how the user named it)."""

    def start(self, run: _Run, j: int) -> list[_Slot]:
        """The rows job j starts with; they share its prompt's prefill."""
        return [_Slot(job=j, gen=run.gen(j, 0))]

    def fed(self, s: _Slot) -> None:
        """Row s was fed a token."""

    def finish(self, run: _Run, s: _Slot, res: tuple):
        """Row s finished with `res` (text, n_kept, reason): the (job, Sample) to yield now, or None."""
        return run.result(s, *res)

    def boundary(self, run: _Run, s: _Slot, logits) -> None:
        """Row s, live and just fed, drew its next token from `logits`: the policy may stop it (`s.wait`)."""

    def after_step(self, run: _Run):
        """After finished rows left the batch: yield what the policy finishes (nothing here)."""
        return ()


class GuidedPolicy(DecodePolicy):
    """Guided decoding by a `Guide`: a completion decodes `branch` rows; once all of them reach their
    chunk boundary (or finish), one is kept, drawn from softmax(Q / beta) on the guide probe's
    features, and its cache row is copied into the next chunk's branches. Holds one call's jobs."""

    def __init__(self, guide: Guide):
        self.guide = guide
        self.rows_per_job = guide.branch
        self.jobs: dict[int, _Job] = {}  # job index -> its guided-decoding state
        self.touched: list[int] = []  # jobs with a row parked or stopped at its boundary in this step

    def bind(self, model, name: str) -> None:
        try:
            self.layer = norm_layer(model, self.guide.layer)
        except QProbeError:
            raise QProbeError(f"the guide probe records layer {self.guide.layer}, but {name} has layers "
                              f"0..{model_layers(model)}") from None

    def start(self, run: _Run, j: int) -> list[_Slot]:
        self.jobs[j] = _Job(rng=np.random.default_rng([int(run.jobs[j].seed), 1]))
        # the first chunk's branches share the prompt's prefill
        return [_Slot(job=j, gen=run.gen(j, b)) for b in range(self.guide.branch)]

    def fed(self, s: _Slot) -> None:
        self.jobs[s.job].n_fed += 1

    def finish(self, run: _Run, s: _Slot, res: tuple):
        s.done = res  # out of the batch, waiting for the choice among its siblings
        self.jobs[s.job].parked.append(s)
        self.touched.append(s.job)
        return None

    def boundary(self, run: _Run, s: _Slot, logits) -> None:
        if self.guide.at_boundary(run.tok, s.ids, s.start, len(s.ids) - 1):
            s.wait, s.logits = True, logits.clone()  # a copy: a view would keep the whole step's logits
            self.touched.append(s.job)

    def after_step(self, run: _Run):
        touched, self.touched = dict.fromkeys(self.touched), []
        for j in touched:
            if not any(s.job == j and not s.wait for s in run.batch.slots):  # every branch is at its boundary or done
                yield from self._choose(run, j)

    def _choose(self, run: _Run, j: int):
        """Keep one of job j's branches by softmax(Q / beta); fork it into the next chunk's branches."""
        batch, g = run.batch, self.jobs[j]
        rows = [r for r, s in enumerate(batch.slots) if s.job == j]
        cands = [batch.slots[r] for r in rows] + g.parked
        li = run.layers.index(self.layer)
        feats = [_pooled(s, li, s.done[1] if s.done else len(s.ids) - 1, self.guide.pooling) for s in cands]
        c, _ = self.guide.choose(np.stack(feats), g.rng)
        win, g.parked = cands[c], []
        g.n_chunks += 1
        others = set(rows) - ({rows[c]} if c < len(rows) else set())
        batch.select([r for r in range(len(batch.slots)) if r not in others])
        if win.done:
            job, res = run.result(win, *win.done)
            res.fields["n_generated"] = g.n_fed
            del self.jobs[j]
            yield job, res
            return
        win.wait, win.start = False, len(win.ids) - 1
        B = self.guide.branch
        if B == 1:
            win.logits = None
            return
        # the next chunk's other branches: copies of the winner's cache row, each redrawing the
        # chunk's first token from the winner's logits with its own generator
        r = next(i for i, x in enumerate(batch.slots) if x is win)
        copies = [_Slot(job=j, gen=run.gen(j, b, g.n_chunks), ids=list(win.ids), logprobs=list(win.logprobs),
                        states=list(win.states), prompt_state=win.prompt_state, start=win.start) for b in range(1, B)]
        L = win.logits[None].expand(B - 1, -1)
        drawn = run.sampler._draw(L, copies)
        for s, t, lp in zip(copies, drawn, _token_logprobs(L, drawn)):
            s.ids[-1], s.logprobs[-1] = t, lp
            s.done = run.finished(s, fed=False)  # a redrawn token can end the branch at once
        g.parked = [s for s in copies if s.done]
        copies = [s for s in copies if not s.done]
        win.logits = None
        if copies:
            batch.fork(r, copies)


class _Run:
    """The state of one `sample_stream` call: its model, jobs and decode policy, and the running batch.

    Three steps, each returning the (job, Sample) pairs it finished: `admit` prefills new prompts
    and merges them into the batch, `step` feeds every row its newest token and draws the next,
    and both end in `settle`, which retires finished rows (the policy decides what a finished row,
    or one at a boundary, does).
    """

    def __init__(self, sampler: HFSampler, model, tok, jobs: Sequence[SampleJob], policy: DecodePolicy):
        self.sampler, self.model, self.tok, self.jobs, self.policy = sampler, model, tok, jobs, policy
        self.batch = _Batch()
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
        self.eos.discard(None)
        # hidden-state layers kept per fed token: the captured ones, then the policy's
        self.cap_layers = [norm_layer(model, l) for l, _ in sampler.capture]
        policy.bind(model, sampler.model)
        self.layers = list(dict.fromkeys(self.cap_layers + ([policy.layer] if policy.layer is not None else [])))
        self.want_states = bool(self.layers)

    def admit(self, new: list[int]) -> list:
        """Prefill the prompts of jobs `new` (each distinct prompt once), draw their first tokens, merge."""
        import torch
        from transformers import DynamicCache

        model, tok, jobs, dev = self.model, self.tok, self.jobs, self.model.device
        uniq: dict[tuple, int] = {}  # prompt ids -> row of the prefill batch
        pids, row_of, slots = [], [], []
        for j in new:
            ids = tuple(prompt_ids(tok, jobs[j].prompt))
            if ids not in uniq:
                uniq[ids] = len(pids)
                pids.append(ids)
            for s in self.policy.start(self, j):
                row_of.append(uniq[ids])
                slots.append(s)
        P = max(map(len, pids))
        inp = torch.full((len(pids), P), tok.pad_token_id, dtype=torch.long)
        m = torch.zeros((len(pids), P), dtype=torch.long)
        for r, ids in enumerate(pids):
            inp[r, P - len(ids):] = torch.tensor(ids)
            m[r, P - len(ids):] = 1
        pcache = DynamicCache()
        out = model(input_ids=inp.to(dev), attention_mask=m.to(dev), position_ids=(m.cumsum(-1) - 1).clamp(min=0).to(dev),
                    past_key_values=pcache, use_cache=True, output_hidden_states=self.want_states, logits_to_keep=1)
        rows = torch.tensor(row_of, device=dev)
        for L in pcache.layers:
            L.keys, L.values = L.keys[rows], L.values[rows]
        m = m.to(dev)[rows]
        if self.want_states:
            for r, s in zip(row_of, slots):
                s.prompt_state = torch.stack([out.hidden_states[l][r, -1] for l in self.layers]).float().cpu()
        logits = out.logits[:, -1][rows]
        drawn = self.sampler._draw(logits, slots)
        for s, t, lp in zip(slots, drawn, _token_logprobs(logits, drawn)):
            s.ids.append(t)
            s.logprobs.append(lp)
        self.batch.merge(slots, pcache, m, m.sum(-1))
        # a first token can already end a row (EOS, or max_new_tokens 1)
        return self.settle(fed=False, logits=None)

    def step(self) -> list:
        """One decode step: every live row is fed its newest token; rows waiting at a boundary idle."""
        import torch

        batch, dev = self.batch, self.model.device
        live = [r for r, s in enumerate(batch.slots) if not s.wait]
        act = torch.tensor([not s.wait for s in batch.slots], dtype=batch.mask.dtype, device=dev)
        nxt = [s.ids[-1] if not s.wait else self.tok.pad_token_id for s in batch.slots]
        # an idle row's feed lands in a masked column and does not advance its position
        batch.mask = torch.cat([batch.mask, act[:, None]], 1)
        out = self.model(input_ids=torch.tensor(nxt, device=dev)[:, None], attention_mask=batch.mask,
                         position_ids=batch.pos[:, None], past_key_values=batch.cache, use_cache=True,
                         output_hidden_states=self.want_states)
        batch.pos = batch.pos + act
        logits = out.logits[live, -1]
        slots = [batch.slots[r] for r in live]
        if self.want_states:
            hs = torch.stack([out.hidden_states[l][live, -1] for l in self.layers], 1).float().cpu()  # (n, layers, H)
            for i, s in enumerate(slots):
                s.states.append(hs[i])
        drawn = self.sampler._draw(logits, slots)
        for s, t, lp in zip(slots, drawn, _token_logprobs(logits, drawn)):
            self.policy.fed(s)
            if s.final is None:
                s.ids.append(t)
                s.logprobs.append(lp)
        full = [None] * len(batch.slots)  # row -> its logits (live rows only)
        for i, r in enumerate(live):
            full[r] = logits[i]
        return self.settle(fed=True, logits=full)

    def settle(self, fed: bool, logits) -> list:
        """The results finished now; finished rows leave the batch; the policy acts on the rows it stopped."""
        batch, policy, done, keep = self.batch, self.policy, [], []
        for r, s in enumerate(batch.slots):
            if s.wait:
                keep.append(r)
                continue
            res = self.finished(s, fed)
            if res is not None:
                out = policy.finish(self, s, res)
                if out is not None:
                    done.append(out)
                continue
            keep.append(r)
            if fed and s.final is None:
                policy.boundary(self, s, logits[r])
        batch.select(keep)
        done += policy.after_step(self)
        return done

    def gen(self, j: int, b: int, chunk: int = 0):
        """Branch 0 of the first chunk draws from the row's own seed (so one branch is plain sampling);
        every other branch from a seed derived from the row's, the chunk and the branch."""
        import torch

        seed = int(self.jobs[j].seed)
        if b or chunk:
            seed = row_seed(seed, ["branch", chunk], b)
        return torch.Generator(device="cpu").manual_seed(seed)

    def finished(self, s: _Slot, fed: bool):
        """(text, n_kept_tokens, reason) when slot `s` is done, else None."""
        tok, eos, sp = self.tok, self.eos, self.sampler
        if s.final is not None:
            return s.final if fed else None  # done once its last kept token has been fed
        n_fed = len(s.ids) - 1  # the newest sampled token is not fed yet
        if s.ids[-1] in eos:
            text, kept, reason = tok.decode(s.ids[:-1], skip_special_tokens=True), len(s.ids) - 1, "stop"
        else:
            full = tok.decode(s.ids, skip_special_tokens=True)
            text, stopped = truncate(full, sp.stop, sp.code_block)
            if stopped:
                kept, reason = _kept_tokens(tok, s.ids, len(text)), "stop"
            elif len(s.ids) >= sp.max_new_tokens:
                kept, reason = len(s.ids), "length"
            else:
                return None
        if kept > n_fed and self.want_states:
            s.final = (text, kept, reason)  # feed it once more for its hidden state
            return None
        return text, kept, reason

    def result(self, s: _Slot, text: str, kept: int, reason: str) -> tuple[int, Sample]:
        res = Sample(text, reason, {"n_tokens": kept, "token_logprobs": [round(float(x), 4) for x in s.logprobs[:kept]]})
        sp, tok = self.sampler, self.tok
        if not sp.capture:
            return s.job, res
        points = [(kept, text)]  # (tokens, text) of each prefix whose features are kept
        if sp.prefix_every is not None:
            points = []
            for t in prefix_points(tok, s.ids[:kept], sp.prefix_every)[:-1]:
                pre = tok.decode(s.ids[:t], skip_special_tokens=True)
                if text.startswith(pre) and (not points or len(pre) > len(points[-1][1])) and len(pre) < len(text):
                    # kept only where the text tokenizes back to the sampled tokens, so that its features
                    # equal a separate forward pass on (prompt, prefix): a cut inside a multi-byte
                    # character, or one the tokenizer would merge differently, is skipped
                    if completion_ids(tok, pre) == list(s.ids[:t]):
                        points.append((t, pre))
            points.append((kept, text))
            res.fields["prefix_chars"] = [len(p) for _, p in points]
        prompt = self.jobs[s.job].prompt
        for emb, layer in zip(sp.capture_embedders(), self.cap_layers):
            li = self.layers.index(layer)
            res.features += [Captured(emb, prompt, pre, _pooled(s, li, t, emb.pooling)) for t, pre in points]
        return s.job, res


def _pooled(s: _Slot, li: int, n: int, pooling: str):
    """Features of the first n completion tokens of slot s at state layer li (the prompt's when n = 0)."""
    from qprobe.embedders.hf import pool_states
    import torch

    st = torch.stack([x[li] for x in s.states[:n]]) if n else None
    return np.asarray(pool_states(st, s.prompt_state[li], pooling), dtype=np.float32)


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
