"""Kill -9 and resume: runs of `sample`, `reward` and `embed` interrupted by SIGKILL at several points,
rows recovered from the cache, and finished calls the reruns repeated (must be 0)."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


from qprobe.testing.runner import cli_cmd, one_error_line, run_cli, run_in_process
from qprobe.testing.scenario import RecordingStub, _compare_outputs, _Kind, _nullcontext


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


