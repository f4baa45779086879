"""Markdown code fences, parsed one way for the whole package.

An opening fence is a line starting with three backticks and an optional info
string (```` ```python ````); a closing fence is a line holding three backticks
and nothing else. The sampler's ``--code-block`` stop (``samplers/stops.py``) and
the code reward's extractor (``rewards/code.py``) both use these, so a sample stops
exactly where the reward sees its first block end.

Pure string functions; nothing here runs code.
"""
from __future__ import annotations

import re

FENCE_OPEN = re.compile(r"^[ \t]*```[ \t]*([^\s`]*)[^\n`]*$", re.M)  # group 1: the language tag
FENCE_CLOSE = re.compile(r"^[ \t]*```[ \t]*$", re.M)


def first_block_close(text: str) -> int | None:
    """Offset of the fence that closes the first fenced block, or None while it is open (or absent).

    A fence at the very end of ``text`` counts as closing: a streamed completion that has
    just written the three backticks of a closing line ends there.
    """
    opening = FENCE_OPEN.search(text)
    if opening is None:
        return None
    closing = FENCE_CLOSE.search(text, opening.end() + 1)
    return closing.start() if closing else None
