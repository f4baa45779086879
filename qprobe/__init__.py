"""qprobe: rerank k samples of a frozen language model with a linear Q-probe.

This module only re-exports; it must stay cheap to import (no torch, no
transformers), so heavy backends are imported lazily by the code that needs them.
"""
from qprobe.errors import QProbeError
from qprobe.fit import fit_probe
from qprobe.loop import ridge_bonus, run_loop
from qprobe.probe import QProbe
from qprobe.select import (
    best_of_n_curve,
    kl_to_base,
    selection_report,
    select_indices,
    softmax_weights,
)
from qprobe.transforms import calibrate, transform_rewards
from qprobe.tune import TuneResult, tune

__version__ = "0.1.0"

__all__ = [
    "QProbe",
    "QProbeError",
    "best_of_n_curve",
    "calibrate",
    "fit_probe",
    "kl_to_base",
    "ridge_bonus",
    "run_loop",
    "selection_report",
    "select_indices",
    "softmax_weights",
    "transform_rewards",
    "tune",
    "TuneResult",
    "__version__",
]
