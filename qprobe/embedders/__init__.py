"""Feature extractors: (prompt, completion) -> one vector. See `base.Embedder`."""
from qprobe.embedders.base import Embedder, get_embedder

__all__ = ["Embedder", "get_embedder"]
