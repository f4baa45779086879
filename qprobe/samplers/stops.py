"""Where a completion ends: stop strings and the close of a fenced code block.

Pure string functions shared by every sampler (servers apply `stop` themselves,
but not the code-block rule, so the API sampler truncates with this too).
"""
from __future__ import annotations

import re

_FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)


def truncate(text: str, stop: list[str] | None = None, code_block: bool = False) -> tuple[str, bool]:
    """Return (text cut before the first stop, whether a stop was found).

    code_block: stop right before the fence that closes the first fenced code
    block (chat models answer with one block, then chatter).
    """
    cut = len(text)
    for s in stop or ():
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    if code_block:
        fences = [m.start() for m in _FENCE.finditer(text)]
        if len(fences) >= 2:
            # the closing fence must be complete: followed by a newline or the end of a line
            close = fences[1]
            line_end = text.find("\n", close)
            if line_end != -1 or text[close:].strip() == "```":
                cut = min(cut, close)
    return text[:cut], cut < len(text)
