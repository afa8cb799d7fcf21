"""The README's Python blocks run as pasted into ``python``, so the docs cannot drift from the API.

Convention: every fenced ```` ```python ```` block of README.md is runnable on CPU, each on its own
(its imports and small random inputs included), unless the line right above its fence is an HTML
comment ``<!-- fragment: what it needs -->`` (invisible on GitHub; the block's own first comment says
the same to the reader). Fragments are for what a test cannot cheaply provide: ``torch.distributed``,
a GPU, a real model. Each runnable block is fed line by line to ``code.InteractiveConsole``, the
interactive interpreter a paste goes to, in a fresh namespace; any traceback fails the test.
"""
from __future__ import annotations

import code
import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)
MARKER = re.compile(r"^<!-- fragment:(.*?)-->$", re.M)  # a line of its own, not a mention in the text


@dataclass(frozen=True)
class Block:
    line: int              # README line of the opening fence
    source: str
    fragment: str | None   # what a fragment needs, from its marker; None: runnable


def blocks(text: str) -> list[Block]:
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        found.append(Block(text.count("\n", 0, match.start()) + 1, match.group(1),
                           marker.group(1).strip() if marker else None))
    return found


TEXT = README.read_text()
BLOCKS = blocks(TEXT)
RUNNABLE = [b for b in BLOCKS if b.fragment is None]


class Console(code.InteractiveConsole):
    """The interactive interpreter, with its error reports kept instead of printed."""

    def __init__(self):
        super().__init__(locals={"__name__": "__console__"})
        self.errors: list[str] = []

    def write(self, data: str) -> None:
        self.errors.append(data)


def paste(source: str) -> str:
    """Runs ``source`` as typed into ``python``; returns what it printed, fails on any error."""
    console, out = Console(), io.StringIO()
    with contextlib.redirect_stdout(out):
        for line in source.splitlines():
            console.push(line)
        console.push("")  # the blank line that ends a pending compound statement
    assert not console.errors, "".join(console.errors)
    return out.getvalue()


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: f"README.md:{b.line}")
def test_runnable_block_runs_as_pasted(block):
    torch.manual_seed(0)
    paste(block.source)


def test_first_usage_block_is_runnable_and_prints_a_loss():
    usage = TEXT.index("\n## Usage\n")
    first = next(b for b in BLOCKS if TEXT.count("\n", 0, usage) < b.line)
    assert first.fragment is None, f"README.md:{first.line}, the first Usage block, is marked a fragment"
    torch.manual_seed(0)
    assert re.search(r"tensor\([-0-9.e]+, grad_fn=", paste(first.source)), "it prints no loss"


def test_markers_sit_on_python_blocks_and_say_what_they_need():
    assert len(RUNNABLE) >= 1
    for block in BLOCKS:
        if block.fragment is not None:  # the marker is invisible on GitHub: the block tells the reader
            assert block.fragment, f"README.md:{block.line}: say what the fragment needs"
            assert block.source.startswith("# fragment:"), f"README.md:{block.line}: open with '# fragment:'"
    # a marker separated from its block (an edit slid text between them) would silently run the block
    assert len(MARKER.findall(TEXT)) == len(BLOCKS) - len(RUNNABLE), "a fragment marker is not right above a block"


def test_the_console_reports_a_failing_block():
    """The harness itself: a NameError in a pasted line is an error, not a printed traceback."""
    with pytest.raises(AssertionError, match="NameError"):
        paste("import torch\nloss = fastcl.clip_loss(img, txt, 1.0)")
