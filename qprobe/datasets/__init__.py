"""Dataset adapters: turn benchmark files into qprobe prompt rows (with their tests attached)."""
from qprobe.datasets.code import humaneval_rows, mbpp_rows, MBPP_SPLITS

__all__ = ["humaneval_rows", "mbpp_rows", "MBPP_SPLITS"]
