"""Run the `qprobe` CLI under test: as a subprocess of this very qprobe, or in this process,
and read its stderr (message lines, the one error line).

The CLI runs as `python -m qprobe` with this qprobe first on PYTHONPATH, offline (an unknown
model id fails at once instead of waiting for the hub). Nothing here sets anything in the
environment of the process that imports it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding this qprobe package

# a tqdm bar or a transformers loading bar: progress, not a message
_PROGRESS = re.compile(r"^\s*$|^[\w .-]+:\s*\d+%\|")


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

