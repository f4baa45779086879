"""The fault-injection harness under its former name: re-exports only, for callers not yet moved.

The harness is split by what it tests: `runner` (running the CLI), `inputs` (rows, files, a tiny
model, cache contents), `resume` (kill -9 and resume), `server_faults` (a faulty, dead or shared
server), `bad_files` (broken input files, empty completions) and `misuse` (misused commands and
forged rewards, with `forgeries.json`). Import from those; this module goes once nothing uses it.
"""
from qprobe.testing.bad_files import empty_completions, hostile_inputs
from qprobe.testing.inputs import (REWARD_MODULE, cache_values, completion_rows, prompt_rows, tiny_model,
                                   write_jsonl)
from qprobe.testing.misuse import (TOY_EXTRACTOR, forged_rewards, misuse_cases, misuse_figures, misuse_rows,
                                   misuse_setup, private_device, run_misuse_cases)
from qprobe.testing.resume import kill_and_resume
from qprobe.testing.runner import cli_cmd, cli_env, message_lines, one_error_line, run_cli, run_in_process
from qprobe.testing.scenario import STUB_MODEL, RecordingStub
from qprobe.testing.server_faults import concurrent_embeds, dead_server, faulty_server

# former names
R2_IDENT, round2_rows, round2_setup, round2_cases = TOY_EXTRACTOR, misuse_rows, misuse_setup, misuse_cases
hostile_round2, round2_figures = run_misuse_cases, misuse_figures

__all__ = [
    "REWARD_MODULE", "STUB_MODEL", "TOY_EXTRACTOR", "RecordingStub", "cache_values", "cli_cmd", "cli_env",
    "completion_rows", "concurrent_embeds", "dead_server", "empty_completions", "faulty_server", "forged_rewards",
    "hostile_inputs", "kill_and_resume", "message_lines", "misuse_cases", "misuse_figures", "misuse_rows",
    "misuse_setup", "one_error_line", "private_device", "prompt_rows", "run_cli", "run_in_process",
    "run_misuse_cases", "tiny_model", "write_jsonl",
]
