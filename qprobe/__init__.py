"""qprobe: rerank k samples of a frozen language model with a linear Q-probe.

This module only re-exports; it must stay cheap to import (no torch, no
transformers), so heavy backends are imported lazily by the code that needs them.
"""
from qprobe.errors import QProbeError
from qprobe.probe import QProbe
from qprobe.select import (
    kl_to_base,
    selection_report,
    select_indices,
    softmax_weights,
)
from qprobe.tune import TuneResult, tune

__version__ = "0.1.0"

__all__ = [
    "QProbe",
    "QProbeError",
    "kl_to_base",
    "selection_report",
    "select_indices",
    "softmax_weights",
    "tune",
    "TuneResult",
    "__version__",
]
