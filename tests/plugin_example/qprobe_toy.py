"""A toy qprobe plugin: a sampler, an embedder and a reward kind, each a few lines.

The sampler repeats the prompt's last word `sample + 1` times, the embedder counts
characters and words, and `toy:N` rewards completions of at least N characters.
A real plugin declares its entry points in its own packaging metadata, e.g. pyproject.toml:

    [project.entry-points."qprobe.samplers"]
    toy = "qprobe_toy:ToySampler"
    [project.entry-points."qprobe.embedders"]
    toy = "qprobe_toy:ToyEmbedder"
    [project.entry-points."qprobe.rewards"]
    toy = "qprobe_toy:make_length_reward"

tests/test_registry.py packs this module and those lines into a wheel and pip-installs it.
"""
import numpy as np

from qprobe.embedders import Embedder
from qprobe.samplers import Sampler


class ToySampler(Sampler):
    def __init__(self, model="toy", temperature=1.0, top_p=1.0, max_new_tokens=16, stop=(), word=None):
        self.model, self.temperature, self.max_new_tokens, self.word = model, temperature, max_new_tokens, word

    def identity(self):
        return {"kind": "toy", "model": self.model, "max_new_tokens": self.max_new_tokens, "word": self.word}

    def sample_stream(self, jobs):
        for i, job in enumerate(jobs):
            word = self.word or str(job.prompt).split()[-1]
            yield i, {"completion": " ".join([word] * (job.sample + 1))[: self.max_new_tokens],
                      "finish_reason": "stop"}


class ToyEmbedder(Embedder):
    def __init__(self, model="toy", scale=1.0):
        self.model, self.scale = model, scale

    def identity(self):
        return {"kind": "toy", "model": self.model, "scale": self.scale}

    def embed_batch(self, items):
        return np.array([[len(c) * self.scale, len(c.split())] for _, c in items], dtype=np.float32)


def make_length_reward(arg, *, timeout=3.0):
    n = int(arg or 1)
    return lambda row: (float(len(row["completion"]) >= n), f"length >= {n}")
