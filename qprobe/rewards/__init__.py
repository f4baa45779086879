"""Rewards for completion rows: sandboxed code execution, exact match, regex,
user functions. Re-exports only; see ``score.py`` for the ``kind`` names."""
from qprobe.rewards.code import build_program, code_reward, extract_code
from qprobe.rewards.sandbox import SandboxResult, run_python, sandbox_backend
from qprobe.rewards.score import KINDS, REWARDS_VERSION, get_reward_fn, reward_identity, score_rows
from qprobe.rewards.simple import load_python_reward, match_reward, regex_reward

__all__ = [
    "KINDS",
    "REWARDS_VERSION",
    "SandboxResult",
    "build_program",
    "code_reward",
    "extract_code",
    "get_reward_fn",
    "load_python_reward",
    "match_reward",
    "regex_reward",
    "reward_identity",
    "run_python",
    "sandbox_backend",
    "score_rows",
]
