"""Fault report: run the fault-injection scenarios of `qprobe.testing` and print their figures.

    python experiments/fault_report.py [--rows 300] [--workdir DIR]

prints one table of figures and ends with one JSON line of the same figures (see the
scenarios' docstrings in qprobe/testing/; tests/test_reliability.py and
tests/test_misuse.py assert on them). Misused commands (`qprobe.testing.misuse`): outputs naming an input, special
files (on device nodes of its own, never the system's), absurd limits, features without a
sidecar, about thirty malformed inputs, completions that try to forge a code reward, and
the input files destroyed by all of it (must be 0). `--misuse-only` runs just these
(no model, minutes).
The `serve` section runs a real `qprobe serve` process against
hostile clients and a hostile upstream: requests refused with the right status, connections the
server dropped, keys sent to hosts the user did not name (must be 0), error bodies echoing a
password or an upstream body (must be 0), and the server's peak memory over its idle size
(see qprobe/testing/serve_faults.py). `--serve-only` runs just it (about a minute).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an unknown model id must fail at once, not wait for the hub

from qprobe.testing.bad_files import empty_completions, hostile_inputs  # noqa: E402
from qprobe.testing.inputs import tiny_model  # noqa: E402
from qprobe.testing.misuse import misuse_figures, run_misuse_cases  # noqa: E402
from qprobe.testing.resume import kill_and_resume  # noqa: E402
from qprobe.testing.server_faults import concurrent_embeds, dead_server, faulty_server  # noqa: E402
from qprobe.testing.serve_faults import serve_faults, serve_figures  # noqa: E402


# ------------------------------------------------------------------ the report
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=300, help="rows per kill scenario")
    ap.add_argument("--workdir", default=None, help="keep the files here [default: a temporary folder]")
    ap.add_argument("--model-dir", default=None, help="a small local model for the context-length cases")
    ap.add_argument("--no-model", action="store_true", help="skip the cases that need a local model")
    ap.add_argument("--misuse-only", dest="misuse_only", action="store_true",
                    help="run only the misused commands and the forged rewards (no model, a few minutes)")
    ap.add_argument("--serve-only", action="store_true",
                    help="run only the serve section (no model, about a minute)")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    if a.serve_only:
        with tempfile.TemporaryDirectory(prefix="qprobe-faults-") as tmp:
            sv = serve_faults(Path(a.workdir or tmp) / "serve")
        fig = {**serve_figures(sv), "seconds": round(time.monotonic() - t0, 1)}
        _print_serve(sv)
        print(json.dumps(fig))
        return fig
    if a.misuse_only:
        with tempfile.TemporaryDirectory(prefix="qprobe-faults-") as tmp:
            r2 = run_misuse_cases(Path(a.workdir or tmp) / "misuse")
        fig = {**misuse_figures(r2), "seconds": round(time.monotonic() - t0, 1)}
        _print_misuse(r2)
        print(json.dumps(fig))
        return fig
    with tempfile.TemporaryDirectory(prefix="qprobe-faults-") as tmp:
        work = Path(a.workdir or tmp)
        model_dir = a.model_dir
        if model_dir is None and not a.no_model:
            model_dir = tiny_model(work / "tiny-model")
        kills = [kill_and_resume(c, work / f"kill-{c}", a.rows, kill_at=(0.2, 0.5, 0.8))
                 for c in ("sample", "reward", "embed")]
        faults = [faulty_server(c, work / f"faults-{c}", 120) for c in ("sample", "embed")]
        dead = [dead_server(c, work / f"dead-{c}") for c in ("sample", "embed")]
        shared = concurrent_embeds(work / "shared", 200)
        hostile = hostile_inputs(work / "hostile", model_dir)
        empty = empty_completions(work / "empty", model_dir)
        r2 = run_misuse_cases(work / "misuse")
        sv = serve_faults(work / "serve")
    fig = {
        "runs_interrupted": sum(k["interrupted"] for k in kills),
        "rows_recovered": sum(k["recovered"] for k in kills),
        "finished_calls_repeated": sum(k["repeated"] + max(0, k["extra_rerun"]) for k in kills),
        "unfinished_work_redone": sum(k["redone"] for k in kills),
        "resumed_outputs_identical": sum(k["identical"] and k["final_rc"] == 0 for k in kills),
        "resume_scenarios": len(kills),
        "faults_injected": sum(f["faults"] for f in faults),
        "faulty_runs_correct": sum(f["correct"] for f in faults),
        "faulty_runs": len(faults),
        "dead_server_one_line_errors": sum(d["rc"] == 1 and d["error"] is not None for d in dead),
        "dead_server_reruns_identical": sum(d["identical"] and d["rerun_asked"] == d["rerun_missing"] for d in dead),
        "dead_server_runs": len(dead),
        "hostile_inputs_tried": sum(h["expected"] == "refused" for h in hostile),
        "hostile_inputs_refused": sum(h["ok"] for h in hostile if h["expected"] == "refused"),
        "valid_odd_inputs_accepted": sum(h["ok"] for h in hostile if h["expected"] == "accepted")
        + sum(e["rc"] == 0 for e in empty),
        "shared_cache_runs_correct": 2 * shared["both_correct"],
        **misuse_figures(r2),
        **serve_figures(sv),
        "seconds": round(time.monotonic() - t0, 1),
    }
    _print(kills, faults, dead, shared, hostile, empty)
    _print_misuse(r2)
    _print_serve(sv)
    print(json.dumps(fig))
    return fig


def _print_misuse(r2: dict) -> None:
    print("misused commands")
    for x in r2["entries"]:
        mark = "ok " if x["ok"] else "BAD"
        print(f"  {mark} {x['class']:<14}{x['what']:<52} {(x['line'] or '')[:100]}")
    print("forged rewards (a wrong add() plus a trick; 1.0 would be a forgery)")
    for x in r2["forgeries"]:
        print(f"  {'FORGED' if x['forged'] else 'held  '} {x['what']:<52} {x['reward']:.1f} {x['reason'][:60]}")
    print(f"inputs destroyed: {len(r2['destroyed'])} of {r2['inputs_watched']} watched "
          + (", ".join(r2["destroyed"]) if r2["destroyed"] else ""))


def _print_serve(sv: dict) -> None:
    print("serve under attack (issue 24): qprobe serve as a process, $OPENAI_API_KEY set, an upstream URL with a "
          "password, --deadline 3, --max-connections 64")
    for x in sv["entries"]:
        mark = "ok " if x["ok"] and not x["echo"] else "BAD"
        took = f" in {x['seconds']} s" if "seconds" in x else ""
        print(f"  {mark} {x['what']:<44} want {x['want']} got {x['got']}{took}  {x['message'][:70]}")
    c = sv["connections"]
    print(f"  connections: {c['half_sent_closed']} of {c['half_sent']} holding an unfinished 1 MiB body closed "
          f"within {c['half_sent_seconds']} s; {c['idle_closed']} of {c['idle']} idle closed within "
          f"{c['idle_seconds']} s")
    print(f"  keys sent to a host the user did not name them for: {sv['keys_leaked']} "
          f"({sv['recorded_host_requests']} requests reached the probe file's host)")
    print(f"  memory: {sv['idle_mib']} MiB idle, peak {sv['peak_mib']} MiB "
          f"(+{round(sv['peak_mib'] - sv['idle_mib'], 1)} MiB)")


def _print(kills, faults, dead, shared, hostile, empty) -> None:
    print("kill -9 and rerun (figures per command)")
    print(f"  {'command':<8}{'rows':>6}{'kills':>7}{'landed':>8}{'cached at each kill':>22}{'redone':>8}"
          f"{'repeated':>10}{'identical':>11}")
    for k in kills:
        print(f"  {k['command']:<8}{k['rows']:>6}{k['kills']:>7}{k['interrupted']:>8}"
              f"{' '.join(map(str, k['cached_at_kill'])):>22}{k['redone']:>8}"
              f"{k['repeated'] + max(0, k['extra_rerun']):>10}{str(k['identical']):>11}")
    print("faulty server, 30% of requests")
    for f in faults:
        kinds = ", ".join(f"{n} {c}" for c, n in sorted(f["by_kind"].items()))
        print(f"  {f['command']:<8}{f['rows']:>5} rows {f['requests']:>4} requests {f['faults']:>3} faults "
              f"({kinds}); correct: {f['correct']} in {f['wall_s']} s")
    print("server down for good, then back")
    for d in dead:
        print(f"  {d['command']:<8} exit {d['rc']} after {d['wall_s']} s, {d['cached']} units cached; "
              f"rerun asked {d['rerun_asked']} of {d['rerun_missing']} missing; identical: {d['identical']}")
        print(f"           {d['error']}")
    print(f"two embeds sharing one cache: both correct: {shared['both_correct']}, "
          f"{shared['cache_entries']} entries for {shared['distinct_inputs']} inputs, {shared['served']} served")
    print("hostile inputs")
    for h in hostile:
        mark = "ok " if h["ok"] else "BAD"
        print(f"  {mark} {h['what']:<44} {(h['line'] or '')[:110]}")
    for e in empty:
        print(f"  empty completion, {e['step']}: " + ", ".join(f"{k}={v}" for k, v in e.items() if k != "step"))


if __name__ == "__main__":
    main()
