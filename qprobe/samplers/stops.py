"""Where a completion ends: stop strings and the close of a fenced code block.

Pure string functions shared by every sampler (servers apply `stop` themselves,
but not the code-block rule, so the API sampler truncates with this too).
"""
from __future__ import annotations

from qprobe.fences import first_block_close


def truncate(text: str, stop: list[str] | None = None, code_block: bool = False) -> tuple[str, bool]:
    """Return (text cut before the first stop, whether a stop was found).

    code_block: stop right before the fence that closes the first fenced code
    block (chat models answer with one block, then chatter); fences as in `qprobe.fences`.
    """
    cut = len(text)
    for s in stop or ():
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    if code_block:
        close = first_block_close(text)  # the same fence rules as the code reward's extractor
        if close is not None:
            cut = min(cut, close)
    return text[:cut], cut < len(text)
