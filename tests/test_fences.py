"""One fence parser: the sampler's --code-block stop ends a sample where the code reward's extractor ends its block."""
from __future__ import annotations

import pytest

from qprobe.rewards.code import extract_code
from qprobe.samplers.stops import truncate

TEXTS = [
    "Here:\n```python\ndef f():\n    return 1\n```\nThis function returns 1.",
    "```py\nx = 1\n```python\ny = 2\n```\nchatter",  # a second opening line does not close the block
    "```\nprint(1)\n   ```   \nmore",  # indented close with trailing spaces
    "```python\ndef g():\n    return '```'\n```\n",  # backticks inside a line are not a fence
]


@pytest.mark.parametrize("text", TEXTS)
def test_stop_and_extractor_agree(text):
    cut, hit = truncate(text, code_block=True)
    assert hit
    assert extract_code(cut) == extract_code(text)  # cutting at the stop loses none of the scored code
    assert extract_code(cut).strip() and extract_code(cut) in cut


def test_a_streamed_close_counts_once_its_line_is_complete():
    assert truncate("```python\nx = 1\n``", code_block=True) == ("```python\nx = 1\n``", False)
    assert truncate("```python\nx = 1\n```", code_block=True) == ("```python\nx = 1\n", True)
    assert truncate("```python\nx = 1\n```py", code_block=True) == ("```python\nx = 1\n```py", False)
