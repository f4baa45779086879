"""The `qprobe` command line: parse, call `qprobe.pipeline`, print. Nothing is computed here.

`qprobe`, `python -m qprobe` and `python cli.py` (from a checkout) are the same program.
torch and transformers are imported only by the commands that need a model.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import click

from qprobe.errors import QProbeError, missing_extra
from qprobe.hfmodel import DEFAULT_MODEL, DTYPE_HELP

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def user_errors(fn):
    """Turn a QProbeError (and a few plain mistakes) into one line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QProbeError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; finished work is cached, rerun the same command to resume") from None
        except ModuleNotFoundError as e:  # an optional dependency: name the extra that installs it
            err = missing_extra(e)
            if err is e:
                raise
            raise click.ClickException(str(err)) from None
        except MemoryError:
            raise click.ClickException("out of memory; try a smaller --batch-size") from None
        except OSError as e:  # a file the library did not wrap (disk full, permissions): still one line
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or type(e).__name__}") from None

    return wrapper


class Finite(click.FloatRange):
    """A FloatRange that also refuses nan and inf (click's accepts nan whatever the bounds)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


SEED = click.IntRange(0, 2**32 - 1)  # what numpy's and torch's seeding accept
MAX_SECONDS = 3600.0  # --timeout / --request-timeout: longer is a typo, and 1e308 overflows the limits
features_unchecked_option = click.option(
    "--features-unchecked", is_flag=True,
    help="Accept features without a sidecar (.npy.json) recording their rows: you vouch that row i of the "
         "features is row i of ROWS. Without it such features are refused.")


def cache_options(fn):
    fn = click.option("--cache-dir", type=click.Path(file_okay=False), envvar="QPROBE_CACHE",
                      help="Where finished completions and features are kept [default: ~/.cache/qprobe].")(fn)
    fn = click.option("--no-cache", is_flag=True, help="Neither read nor write the cache.")(fn)
    return fn


def make_cache(cache_dir, no_cache):
    from qprobe.cache import Cache

    return Cache.null() if no_cache else Cache(cache_dir)


def model_options(fn):
    opts = [
        click.option("--model", "-m", default=None, help="Local model: Hugging Face id, folder, .gguf file, or "
                     f"'{DEFAULT_MODEL}' (the default when no --api-base is given)."),
        click.option("--api-base", default=None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1."),
        click.option("--api-model", default=None, help="Model name on the server (required with --api-base)."),
        click.option("--api-key", default=None, envvar="OPENAI_API_KEY", show_envvar=True,
                     help="API key (local servers accept any)."),
        click.option("--device", default=None, help="torch device [default: cuda if present, else cpu]."),
        click.option("--dtype", default=None, help=DTYPE_HELP),
        click.option("--batch-size", type=click.IntRange(1), default=None, help="Rows per model or API batch."),
        click.option("--request-timeout", type=Finite(0, MAX_SECONDS, min_open=True), default=60.0, show_default=True,
                     help="API: seconds per HTTP attempt."),
        click.option("--max-retries", type=click.IntRange(0), default=6, show_default=True,
                     help="API: retries per request, with exponential backoff from 0.5 s (a refused "
                          "connection is reported after 15-30 s at the default; 0: at once)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _parse_backend_options(ctx, param, values) -> dict:
    out = {}
    for v in values:
        key, sep, raw = v.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{v!r}: expected KEY=VALUE", ctx=ctx, param=param)
        try:
            out[key] = json.loads(raw)  # numbers, true/false, lists; anything else stays a string
        except ValueError:
            out[key] = raw
    return out


backend_options = click.option(
    "--option", "-O", "backend_opts", multiple=True, metavar="KEY=VALUE", callback=_parse_backend_options,
    help="Backend-specific keyword argument, passed to the backend's constructor (repeatable; "
         "VALUE is read as JSON when it parses, else as a string).")


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="qprobe", message="qprobe %(version)s")
def cli():
    """Rerank k samples of a frozen language model with a trained linear Q-probe.

    \b
    prompts.jsonl -sample-> completions.jsonl -reward-> rewarded.jsonl -embed-> features.npy
    rewarded.jsonl + features.npy -train-> probe/ -rerank/eval-> chosen.jsonl / report

    Start with `qprobe demo` (a small MBPP run on the embedded default model).
    """


# --------------------------------------------------------------------------- prompts
@cli.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Choice(["mbpp", "humaneval"]))
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Prompt rows (JSONL).")
@click.option("--split", "splits", multiple=True, help="MBPP split(s): prompt, train, validation, test.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Keep the first N tasks.")
@user_errors
def prompts(dataset, source, output, splits, limit):
    """Turn MBPP or HumanEval-format tasks into prompt rows with their tests."""
    from qprobe.datasets import humaneval_rows, mbpp_rows
    from qprobe.io import write_jsonl

    splits = [s for arg in splits for s in arg.split(",")]
    rows = mbpp_rows(source, splits=splits or None, limit=limit) if dataset == "mbpp" else humaneval_rows(source, limit)
    write_jsonl(output, rows)
    click.echo(f"wrote {len(rows)} prompts to {output}", err=True)


# --------------------------------------------------------------------------- sample
@cli.command(context_settings=CONTEXT)
@click.argument("prompts_file", metavar="PROMPTS", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Completion rows (JSONL).")
@model_options
@click.option("-k", type=click.IntRange(1), default=8, show_default=True, help="Completions per prompt.")
@click.option("--temperature", type=Finite(0), default=0.8, show_default=True)
@click.option("--top-p", type=Finite(0, 1, min_open=True), default=0.95, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--code-block/--no-code-block", default=False, show_default=True,
              help="Stop when the first fenced code block closes (local models).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--sampler", "sampler_name", default=None, metavar="NAME",
              help="A registered sampler (entry-point group qprobe.samplers) [default: api with --api-base, else hf].")
@backend_options
@click.option("--capture", multiple=True, metavar="LAYER:POOLING",
              help="Local models: also keep these features from the sampling pass (e.g. -1:last), so a later "
                   "`qprobe embed` with the same --layer/--pooling costs no forward pass.")
@click.option("--prefix-every", default=None, metavar="N|line",
              help="With --capture: also keep the features of prefixes of each completion, every N tokens or at "
                   "line ends (for `embed --prefix` and `train --prefix`); rows gain `prefix_chars`.")
@click.option("--guide", type=click.Path(file_okay=False), default=None,
              help="Local models: guided decoding with this prefix value probe (`train --prefix`).")
@click.option("--chunk", default="32", show_default=True, metavar="N|line",
              help="--guide: tokens per chunk, or 'line' (a chunk ends at a line end).")
@click.option("--branch", type=click.IntRange(1, 64), default=4, show_default=True,
              help="--guide: continuations proposed per row at each chunk boundary.")
@click.option("--beta", type=Finite(0), default=0.1, show_default=True,
              help="--guide: keep a continuation with probability softmax(Q / beta); 0 = argmax, inf = uniform.")
@cache_options
@user_errors
def sample(prompts_file, output, model, api_base, api_model, api_key, device, dtype, batch_size, request_timeout,
           max_retries, k, temperature, top_p, max_new_tokens, stop, code_block, seed, sampler_name, backend_opts, capture,
           prefix_every, guide, chunk, branch, beta, cache_dir, no_cache):
    """Draw k completions per prompt from a local model, an OpenAI-compatible API or a plugin sampler.

    With --guide, generate in chunks steered by a prefix value probe (Transfer Q*-style):
    each live row proposes --branch continuations per chunk and keeps one by softmax(Q / beta).
    """
    from qprobe.pipeline import sample_file
    from qprobe.registry import SAMPLERS, build

    sampler = build(SAMPLERS, sampler_name, backend_opts, model=model, api_base=api_base, api_model=api_model,
                    api_key=api_key, device=device, dtype=dtype, batch_size=batch_size, timeout=request_timeout,
                    max_retries=max_retries, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                    stop=list(stop), capture=list(capture), code_block=code_block, prefix_every=prefix_every,
                    guide=guide, chunk=chunk, branch=branch, beta=beta)
    rows = sample_file(prompts_file, output, sampler, k=k, seed=seed, cache=make_cache(cache_dir, no_cache))
    click.echo(f"wrote {len(rows)} completions to {output}", err=True)


# --------------------------------------------------------------------------- reward
@cli.command(context_settings=CONTEXT)
@click.argument("completions", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Rows with `reward`.")
@click.option("--kind", default="code", show_default=True,
              help="code (run the row's tests in the sandbox), code:FIELD (run the tests in that field, e.g. "
                   "code:shown_tests, the ones the prompt shows), match[:FIELD], regex[:FIELD], or "
                   "python:MODULE:FN (imports your module and runs it in this process, NOT sandboxed).")
@click.option("--into", default="reward", show_default=True, metavar="FIELD",
              help="Write the score to this field (and its reason to FIELD_reason), keeping the rest: "
                   "--kind code:shown_tests --into shown adds a signal beside the reward.")
@click.option("--timeout", type=Finite(0, MAX_SECONDS, min_open=True), default=3.0, show_default=True,
              help="Seconds per program (code) or per match (regex).")
@click.option("--workers", type=click.IntRange(1), default=None, help="Parallel programs [default: CPU count].")
@cache_options
@user_errors
def reward(completions, output, kind, into, timeout, workers, cache_dir, no_cache):
    """Score completions: 1 pass / 0 fail, with the reason in `reward_reason` (or FIELD_reason with --into)."""
    from qprobe.pipeline import reward_file

    rows = reward_file(completions, output, kind, cache=make_cache(cache_dir, no_cache), workers=workers,
                       timeout=timeout, into=into)
    mean = sum(r[into] for r in rows) / len(rows)
    click.echo(f"wrote {len(rows)} rows to {output}; mean {into} {mean:.3f}", err=True)


# --------------------------------------------------------------------------- embed
@cli.command(context_settings=CONTEXT)
@click.argument("completions", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Features: .npy (+ .npy.json sidecar) or .safetensors.")
@model_options
@click.option("--layer", type=int, default=None, help="Hidden-state index (local models) [default: -1].")
@click.option("--pooling", type=click.Choice(["last", "mean"]), default=None,
              help="Last completion token or mean over completion tokens [default: last].")
@click.option("--embedder", "embedder_name", default=None, metavar="NAME",
              help="A registered embedder (entry-point group qprobe.embedders) "
                   "[default: sentence with --sentence-model, api with --api-base, else hf].")
@backend_options
@click.option("--sentence-model", default=None,
              help="Use a sentence-embedding model instead (e.g. all-MiniLM-L6-v2).")
@click.option("--prefix", is_flag=True,
              help="One feature row per kept prefix of each completion (rows from `sample --prefix-every`).")
@cache_options
@user_errors
def embed(completions, output, model, api_base, api_model, api_key, device, dtype, batch_size, request_timeout,
          max_retries, layer, pooling, embedder_name, backend_opts, sentence_model, prefix, cache_dir, no_cache):
    """Features of each (prompt, completion) row, aligned with the rows (or with --prefix, of each prefix)."""
    from qprobe.pipeline import embed_file
    from qprobe.registry import EMBEDDERS, build

    embedder = build(EMBEDDERS, embedder_name, backend_opts, model=model, api_base=api_base, api_model=api_model,
                     api_key=api_key, device=device, dtype=dtype, batch_size=batch_size, timeout=request_timeout,
                     max_retries=max_retries, layer=layer, pooling=pooling, sentence_model=sentence_model)
    X = embed_file(completions, output, embedder, cache=make_cache(cache_dir, no_cache), prefix=prefix)
    click.echo(f"wrote features {X.shape[0]} x {X.shape[1]} to {output}", err=True)


# --------------------------------------------------------------------------- train / rerank / eval
where_option = click.option("--where", multiple=True, metavar="FIELD=V1,V2",
                            help="Use only rows whose FIELD is one of the values (repeatable). Numbers compare "
                                 "as numbers (reward=1 matches 1.0), null/true/false as JSON; a row without "
                                 "FIELD never matches.")


@cli.command(context_settings=CONTEXT)
@click.argument("rows", type=click.Path(dir_okay=False))
@click.argument("features", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Probe folder.")
@click.option("--objective", type=click.Choice(["mse", "ce", "pg", "pref"]), default="pg", show_default=True)
@click.option("--beta", type=Finite(0), default=0.1, show_default=True, help="Selection temperature.")
@click.option("--k", "chunk_k", type=click.IntRange(2), default=None, help="pg: chunk size [default: the probe's].")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Torch heads (pg, pref, MLP): passes over the data.")
@click.option("--lr", type=Finite(0, min_open=True), default=None)
@click.option("--alpha", type=Finite(0), default=None, help="Linear mse / ce: L2 penalty [default: 1].")
@click.option("--hidden", type=click.IntRange(1), default=None, help="Hidden units of an MLP head [default: linear].")
@click.option("--tune", "tune_folds", type=click.IntRange(2), default=None, metavar="FOLDS",
              help="Choose --alpha (mse, ce) or --epochs (pg, pref, MLP: about 25-1600 steps) and "
                   "--beta by FOLDS-fold cross-validation over prompts; recommended when positives are few.")
@click.option("--prefix", is_flag=True,
              help="A value probe for `sample --guide`: FEATURES come from `embed --prefix`, each prefix labelled "
                   "with its completion's reward; the probe file records it.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--demos", default=None, metavar="FIELD_OR_FILE",
              help="Demonstrations (e.g. reference solutions): a field of the rows, or a JSONL file of prompt_id, "
                   "completion. Each is embedded as a completion of its prompt with the features' extractor and "
                   "trained on as a reward-1 row of that prompt (pg: it joins the prompt's group).")
@click.option("--demo-weight", type=Finite(0), default=None,
              help="Loss weight of each demonstration [default: chosen by cross-validation from 0, 1, 3, 10 "
                   "with --tune (0 leaves them out), else 1].")
@click.option("--demo-template", default="{demo}", show_default=True,
              help="How a demonstration is written as a completion, e.g. '```python\n{demo}\n' when the model's "
                   "answers open a code block.")
@click.option("--reward-transform", default="none", show_default=True, metavar="none|calibrated|calibrated-exp:T",
              help="Train on transformed rewards (InfAlign; mse, ce, pg). calibrated: C = the reward's mid-rank among "
                   "the other samples of its prompt, P[r(z) < r(y)] + P[r(z) = r(y)] / 2, in [0, 1]. "
                   "calibrated-exp:T: (exp(T C) - 1) / (exp(T) - 1), InfAlign's exponential transform for "
                   "best-of-N, rescaled to [0, 1]. Beta is still chosen on the raw reward.")
@click.option("--signal", "signals", multiple=True, metavar="FIELD",
              help="A numeric row field to use beside the features as a probe input (repeatable): e.g. shown "
                   "(from `reward --kind code:shown_tests --into shown`), or logprob_sum, logprob_mean, n_tokens "
                   "(derived from token_logprobs). The probe records them; rerank and serve need them.")
@click.option("--cascade", default=None, metavar="FIELD",
              help="Choose only among each prompt's rows at its maximum of FIELD (e.g. shown: the candidates "
                   "that pass the shown tests; all rows where none does); trains on those rows. Recorded.")
@click.option("--extractor-api-key", default=None,
              help="--demos with features from an API extractor: the key for the host their sidecar records "
                   "(that host comes from a file, so it never gets $OPENAI_API_KEY).")
@cache_options
@where_option
@features_unchecked_option
@user_errors
def train(rows, features, output, objective, beta, chunk_k, epochs, lr, alpha, hidden, tune_folds, prefix, seed, demos,
          demo_weight, demo_template, reward_transform, signals, cascade, extractor_api_key, cache_dir, no_cache,
          where, features_unchecked):
    """Fit a Q-probe on rewarded rows and their features."""
    from qprobe.pipeline import train_file

    if tune_folds and (alpha is not None or epochs is not None):
        raise QProbeError("--tune chooses --alpha / --epochs itself: give --tune or them, not both")
    if demo_weight is not None and not demos:
        raise QProbeError("--demo-weight needs --demos")
    params = dict(objective=objective, beta=beta, random_state=seed, hidden=hidden)
    params.update({k: v for k, v in dict(k=chunk_k, epochs=epochs, lr=lr, alpha=alpha).items() if v is not None})
    _, n, tuned, info = train_file(rows, features, output, where=where, tune_folds=tune_folds,
                                   features_unchecked=features_unchecked, prefix=prefix, demos=demos,
                                   demo_weight=demo_weight, demo_template=demo_template,
                                   reward_transform=reward_transform, signals=signals, cascade=cascade,
                                   demos_api_key=extractor_api_key,
                                   cache=make_cache(cache_dir, no_cache) if demos else None, **params)
    if tuned:
        chosen = ", ".join(f"{k} {v:g}" for k, v in tuned.params.items())
        if info["n_demos"]:
            chosen += f", demo weight {info['demo_weight']:g}"
        click.echo(f"cross-validation chose {chosen}, beta {tuned.beta:g} "
                   f"(held-out expected reward {tuned.cv_reward:.3f})", err=True)
    extra = f" + {info['n_demos']} demonstrations (weight {info['demo_weight']:g})" if info["n_demos"] else ""
    click.echo(f"trained a {objective} {'prefix value ' if prefix else ''}probe on {n} rows{extra}; saved to {output}",
               err=True)


@cli.command(context_settings=CONTEXT)
@click.argument("rows", type=click.Path(dir_okay=False))
@click.argument("features", type=click.Path(dir_okay=False))
@click.option("--probe", "probe_dir", required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="One chosen row per prompt.")
@click.option("--beta", type=Finite(0), default=None, help="0 = argmax [default: the probe's beta].")
@click.option("--seed", type=SEED, default=None, help="Seed of the softmax draw.")
@where_option
@features_unchecked_option
@user_errors
def rerank(rows, features, probe_dir, output, beta, seed, where, features_unchecked):
    """Choose one completion per prompt by softmax(Q / beta)."""
    from qprobe.pipeline import rerank_file

    out = rerank_file(rows, features, probe_dir, output, beta=beta, seed=seed, where=where,
                      features_unchecked=features_unchecked)
    click.echo(f"wrote {len(out)} chosen completions to {output}", err=True)


@cli.command("eval", context_settings=CONTEXT)
@click.argument("rows", type=click.Path(dir_okay=False))
@click.argument("features", type=click.Path(dir_okay=False))
@click.option("--probe", "probe_dir", required=True, type=click.Path(file_okay=False))
@click.option("-k", type=click.IntRange(1), default=None, help="Use the first k samples of each prompt.")
@click.option("--beta", type=Finite(0), default=None, help="[default: the probe's beta]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--filter", "filters", multiple=True, metavar="FIELD",
              help="Also report FIELD used as a filter (uniform, then likelihood, among each prompt's rows at its "
                   "maximum of FIELD; e.g. shown), repeatable.")
@where_option
@features_unchecked_option
@user_errors
def evaluate(rows, features, probe_dir, k, beta, as_json, filters, where, features_unchecked):
    """Report base, probe, best-of-k rewards, the KL of the probe's choice, and the baselines
    (likelihood, each --filter) with paired 95% bootstrap intervals over prompts."""
    from qprobe.pipeline import eval_file

    rep = eval_file(rows, features, probe_dir, k=k, beta=beta, where=where, features_unchecked=features_unchecked,
                    filters=filters)
    click.echo(json.dumps(rep) if as_json else format_report(rep))


def format_report(rep: dict) -> str:
    lines = [
        f"prompts {rep['n_prompts']}, k = {rep['k']}",
        f"{'policy':<28}{'reward':>8}{'KL (nats)':>11}",
        f"{'base (mean of k)':<28}{rep['base_reward']:>8.3f}{0.0:>11.3f}",
        f"{'probe, beta = ' + format(rep['beta'], 'g'):<28}{rep['probe_reward']:>8.3f}{rep['kl']:>11.3f}",
        f"{'probe, argmax':<28}{rep['argmax_reward']:>8.3f}{rep['argmax_kl']:>11.3f}",
        f"{'best-of-k oracle':<28}{rep['oracle_reward']:>8.3f}{rep['bon_kl_bound']:>11.3f}",
    ]
    if "bok_reward_at_probe_kl" in rep:
        cap = " (capped: the probe's KL is beyond best-of-k's)" if rep.get("bok_kl_capped") else ""
        lines.append(f"KL view: probe ESS {rep['ess']:.2f} of {rep['k']}; best-of-n at the probe's KL "
                     f"{rep['kl']:.3f} reaches reward {rep['bok_reward_at_probe_kl']:.3f}{cap}")
    if rep.get("baselines"):
        lines += ["", f"{'baselines (argmax)':<30}{'reward':>8}  paired 95% interval vs the best other policy"]
        for b in rep["baselines"]:
            ci = "" if b["vs"] is None else f"{b['diff']:+.3f} [{b['lo']:+.3f}, {b['hi']:+.3f}] vs {b['vs']}"
            lines.append(f"{b['policy']:<30}{b['reward']:>8.3f}  {ci}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- loop
@cli.command(context_settings=CONTEXT)
@click.argument("rows", type=click.Path(dir_okay=False))
@click.argument("features", type=click.Path(dir_okay=False))
@click.option("--state", "state_path", required=True, type=click.Path(dir_okay=False),
              help="JSON state file: each round is committed here before the next begins; rerun to resume.")
@click.option("--rounds", type=click.IntRange(1), required=True)
@click.option("--label-budget", "budget", type=click.IntRange(1), required=True, help="Rewards asked for per round.")
@click.option("--rule", type=click.Choice(["optimism", "greedy", "uniform"]), default="optimism", show_default=True,
              help="optimism: Q + C * uncertainty (ridge bonus sqrt(x^T A^-1 x) for mse, bootstrap spread "
                   "otherwise); greedy: highest Q; uniform: at random. Round 0 is uniform for all.")
@click.option("--explore", "c", type=Finite(0), default=0.1, show_default=True,
              help="optimism: C (on MBPP, C = 1 mostly explored and found 6x fewer passes than 0.1).")
@click.option("--objective", type=click.Choice(["mse", "ce", "pg"]), default="mse", show_default=True)
@click.option("--alpha", type=Finite(0, min_open=True), default=1.0, show_default=True,
              help="mse / ce: L2 penalty (also the ridge bonus's).")
@click.option("--ensemble", type=click.IntRange(2), default=5, show_default=True,
              help="optimism with ce / pg: bootstrap probes.")
@click.option("--pool", multiple=True, metavar="FIELD=V1,V2", help="Rows whose reward may be asked for [default: all "
              "rows outside --held-out].")
@click.option("--held-out", multiple=True, metavar="FIELD=V1,V2",
              help="Rows to report pass@1 on (argmax, ties split); they need a stored reward.")
@click.option("--kind", default="stored", show_default=True,
              help="The reward asked for: stored (the rows' `reward` field, a simulated labeller) or any "
                   "`qprobe reward --kind`; python:MODULE:FN imports your module and runs it in this process, "
                   "NOT sandboxed.")
@click.option("--timeout", type=Finite(0, MAX_SECONDS, min_open=True), default=3.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the rounds as one JSON list.")
@user_errors
def loop(rows, features, state_path, rounds, budget, rule, c, objective, alpha, ensemble, pool, held_out, kind,
         timeout, seed, as_json):
    """Label-budgeted online loop: each round ask B rewards chosen by an exploration rule, retrain, report.

    ROWS are k sampled completions per prompt (from `qprobe sample`) with FEATURES; labels are
    revealed round by round from this pool. Prints held-out pass@1 against labels spent.
    """
    from qprobe.pipeline import loop_file

    if not pool and not held_out:
        raise QProbeError("give --held-out (and optionally --pool), e.g. --pool split=train --held-out split=test")

    def show(rec):
        if not as_json:
            click.echo(f"round {rec['round']}: labels {rec['labels']} ({rec['positives']} positive), "
                       f"held-out pass@1 {rec['pass1']:.3f}", err=True)

    recs = loop_file(rows, features, state_path, rounds, budget, rule=rule, objective=objective, pool=pool,
                     held_out=held_out, kind=kind, timeout=timeout, seed=seed, c=c, ensemble=ensemble,
                     probe_params={"alpha": alpha} if objective in ("mse", "ce") else {}, on_round=show)
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k not in ("rows", "rewards")} for r in recs]))
    else:
        click.echo(f"{'round':>5}{'labels':>8}{'pass@1':>8}")
        for r in recs:
            click.echo(f"{r['round']:>5}{r['labels']:>8}{r['pass1']:>8.3f}")


# --------------------------------------------------------------------------- demo
@cli.command(context_settings=CONTEXT)
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--mbpp", "mbpp_path", default=None, type=click.Path(dir_okay=False),
              help="MBPP file [default: the 100 + 100 tasks shipped in the package].")
@click.option("--train-tasks", type=click.IntRange(2), default=24, show_default=True,
              help="MBPP train tasks (at most 100 without --mbpp).")
@click.option("--test-tasks", type=click.IntRange(1), default=12, show_default=True,
              help="MBPP test tasks (at most 100 without --mbpp).")
@click.option("-k", type=click.IntRange(2), default=4, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=160, show_default=True)
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True)
@click.option("--benchmark", "benchmark_dir", default=None, type=click.Path(file_okay=False),
              help="A committed benchmark set for part 2 [default: a checkout's data/mbpp-qwen2.5-coder-0.5b].")
@click.option("--no-benchmark", is_flag=True, help="Only part 1, the live run.")
@cache_options
@user_errors
def demo(out_dir, mbpp_path, train_tasks, test_tasks, k, max_new_tokens, model, benchmark_dir, no_benchmark,
         cache_dir, no_cache):
    """Part 1: a small MBPP run end to end on the embedded default (sample, reward, embed, train,
    eval). Part 2: on the committed Qwen2.5-Coder-0.5B MBPP set, likelihood, the prompt's shown
    test as a filter and the probe, each policy's choices run again in the sandbox. About 5
    minutes on 2 cores."""
    from qprobe.demo import BENCHMARK, BENCHMARK_FEATURE, format_replay, run_demo

    echo = functools.partial(click.echo, err=True)
    echo("part 1: the whole pipeline, live, on a few MBPP tasks (a smoke test: too few tasks for a result)")
    rep = run_demo(out_dir, mbpp_path, train_tasks, test_tasks, k, max_new_tokens, model,
                   cache=make_cache(cache_dir, no_cache), echo=echo)
    click.echo(format_report(rep))
    if no_benchmark:
        return
    folder = Path(benchmark_dir) if benchmark_dir else BENCHMARK
    if not folder.exists():
        echo(f"part 2 skipped: no benchmark set at {folder} (it is in a git checkout of qprobe; or give --benchmark)")
        return
    from qprobe.benchmark import replay

    echo(f"\npart 2: the probe on {folder.name} (500 MBPP test prompts, k = 8; completions and features "
         "sampled once, see its PROVENANCE.md)")
    click.echo(format_replay(replay(folder, BENCHMARK_FEATURE, objectives=("mse", "ce"), echo=echo)))


# --------------------------------------------------------------------------- cache
@cli.group("cache", context_settings=CONTEXT)
def cache_group():
    """Show or clear the cache of finished completions, rewards and features."""


def _existing_cache(cache_dir):
    from qprobe.cache import DEFAULT_CACHE_DIR, Cache

    directory = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    return Cache(directory) if (directory / "cache.sqlite").exists() else None, directory


cache_dir_option = click.option("--cache-dir", type=click.Path(file_okay=False), envvar="QPROBE_CACHE",
                                help="The cache folder [default: ~/.cache/qprobe].")


@cache_group.command("size", context_settings=CONTEXT)
@cache_dir_option
@user_errors
def cache_size(cache_dir):
    """Entries and bytes on disk."""
    cache, directory = _existing_cache(cache_dir)
    if cache is None:
        click.echo(f"no cache in {directory}")
        return
    st = cache.stats()
    kinds = ", ".join(f"{n} {'feature vectors' if k == 'f32' else 'completions/rewards'}"
                      for k, n in sorted(st["entries"].items())) or "empty"
    click.echo(f"{st['path']}: {st['bytes'] / 2**20:.1f} MiB; {kinds}")


@cache_group.command("clear", context_settings=CONTEXT)
@cache_dir_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@user_errors
def cache_clear(cache_dir, yes):
    """Delete every cached completion, reward and feature (the next runs recompute them)."""
    cache, directory = _existing_cache(cache_dir)
    if cache is None:
        click.echo(f"no cache in {directory}")
        return
    if not yes:
        click.confirm(f"delete every entry in {cache.path}?", abort=True)
    click.echo(f"deleted {cache.clear()} entries from {cache.path}")


# --------------------------------------------------------------------------- serve
def read_key_file(path: str, flag: str) -> str:
    """The one-line key in `path`; warns when other users may read it."""
    import os
    import stat

    try:
        raw = Path(path).read_bytes()
        mode = os.stat(path).st_mode
    except OSError as e:
        raise QProbeError(f"{flag} {path}: {e.strerror or type(e).__name__}") from None
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise QProbeError(f"{flag} {path}: not UTF-8 text (expected one line holding the key)") from None
    if not token:
        raise QProbeError(f"{flag} {path} is empty")
    if "\n" in token or any(ord(c) < 32 or ord(c) == 127 for c in token):
        raise QProbeError(f"{flag} {path}: expected one line holding the key, without control characters")
    if mode & stat.S_IROTH:
        click.echo(f"warning: {flag} {path} can be read by every user of this machine (chmod 600 {path})", err=True)
    return token


@cli.command(context_settings=CONTEXT)
@click.option("--probe", "probe_dir", required=True, type=click.Path(file_okay=False), help="Probe folder.")
@click.option("--model", "-m", default=None, help=f"Local model [default: {DEFAULT_MODEL} when no --api-base].")
@click.option("--api-base", default=None, help="Upstream OpenAI-compatible server, e.g. http://127.0.0.1:8123/v1.")
@click.option("--api-model", default=None, help="Model name on the upstream server (required with --api-base).")
@click.option("--api-key", default=None, envvar="OPENAI_API_KEY", show_envvar=True,
              help="Key for the upstream (--api-base) only; the probe's API extractor gets it only when it is "
                   "the same host.")
@click.option("--extractor-api-key", default=None,
              help="Key for the host of the probe's API extractor (recorded in the probe file, printed at start-up); "
                   "without it that host gets no key.")
@click.option("--api-key-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="File holding the bearer token clients must send [default: $QPROBE_SERVE_API_KEY; none: no auth].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A name clients may reach the server by (Host and Origin), besides the bound address and "
                   "localhost (repeatable). Others get 403: a web page cannot drive the server.")
@click.option("--served-model-name", default=None, help="Name clients send as `model` [default: the model's].")
@click.option("-k", type=click.IntRange(1), default=4, show_default=True, help="Candidates per request (extra_body k).")
@click.option("--beta", type=Finite(0), default=None, help="Selection temperature [default: the probe's].")
@click.option("--max-k", type=click.IntRange(1, 1024), default=32, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True,
              help="Default and largest max_tokens.")
@click.option("--temperature", type=Finite(0, 2), default=0.8, show_default=True)
@click.option("--top-p", type=Finite(0, 1, min_open=True), default=0.95, show_default=True)
@click.option("--max-queue", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Requests in flight before new ones get 503 (also the upstream thread pool's size).")
@click.option("--max-connections", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Open connections; more are closed at once (idle ones close after 10 s without headers).")
@click.option("--max-request-bytes", type=click.IntRange(1), default=1 << 20, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="Local: rows decoded together.")
@click.option("--device", default=None, help="torch device [default: cuda if present, else cpu].")
@click.option("--dtype", default=None, help=DTYPE_HELP)
@click.option("--request-timeout", type=Finite(0, MAX_SECONDS, min_open=True), default=60.0, show_default=True,
              help="Upstream: seconds per attempt, the whole answer included.")
@click.option("--deadline", type=Finite(0, MAX_SECONDS, min_open=True), default=300.0, show_default=True,
              help="Seconds a request may take from admission to answer; past it, 504.")
@click.option("--max-retries", type=click.IntRange(0, 20), default=2, show_default=True, help="Upstream retries.")
@user_errors
def serve(probe_dir, model, api_base, api_model, api_key, extractor_api_key, api_key_file, host, port, allowed_hosts,
          served_model_name, k, beta, max_k, max_tokens, temperature, top_p, max_queue, max_connections,
          max_request_bytes, batch_size, device, dtype, request_timeout, deadline, max_retries):
    """Serve an OpenAI-compatible API that answers with the probe's choice among k samples.

    A request may carry tests (extra_body={"tests": [...]}: asserts, or a string of code); they run
    in the sandbox against each candidate, and candidates that pass are preferred. A probe trained
    with --signal reads them per candidate: shown from the request's tests (a request without
    tests is then a 400), logprob_sum/logprob_mean/n_tokens from the candidates' token log-probs;
    its --cascade picks the candidates it chooses among. See docs/serve.md, and docs/safety.md for
    what the server promises and what it does not.
    """
    import os

    from qprobe.registry import uses_api
    from qprobe.serve import build

    uses_api(model, api_base, api_model)  # one line for a contradictory set, before any loading
    token = read_key_file(api_key_file, "--api-key-file") if api_key_file else (
        os.environ.get("QPROBE_SERVE_API_KEY") or None)
    app = build(probe_dir, model=model, api_base=api_base, api_model=api_model, api_key=api_key,
                extractor_key=extractor_api_key, served_model_name=served_model_name, k=k, beta=beta,
                batch_size=batch_size, device=device, dtype=dtype, request_timeout=request_timeout,
                max_retries=max_retries, server_api_key=token, max_k=max_k, max_tokens=max_tokens,
                temperature=temperature, top_p=top_p, max_queue=max_queue, max_request_bytes=max_request_bytes,
                deadline=deadline, bind_host=host, allowed_hosts=tuple(allowed_hosts))
    import uvicorn

    from qprobe.serve.guard import uvicorn_config

    backend = app.state.backend
    if backend.extractor_host:
        sent = "a key" if backend.extractor_key_sent else "no key"
        click.echo(f"the probe's feature extractor sends every prompt and completion to {backend.extractor_host} "
                   f"({sent}; the host is recorded in {probe_dir}/config.json)", err=True)
    probe = app.state.probe
    uses = (f", signals {','.join(probe.signals)}" if probe.signals else "") + (
        f", cascade {probe.cascade}" if probe.cascade else "")
    click.echo(f"serving {app.state.config.model_id} on http://{host}:{port}/v1 (k {app.state.config.k}, "
               f"beta {app.state.config.beta:g}{uses}, auth {'on' if token else 'off'})", err=True)
    uvicorn.Server(uvicorn_config(app, host, port, max_connections=max_connections)).run()


def main():
    cli(prog_name="qprobe")


if __name__ == "__main__":
    main()
