"""Completion samplers: prompt -> k completions. See `base.Sampler`."""
from qprobe.samplers.base import Sampler, SampleJob, get_sampler

__all__ = ["Sampler", "SampleJob", "get_sampler"]
