"""What a compiled kernel's main loop executes, read from its SASS (no GPU needed).

A kernel's speed is mostly decided by its main loop: how many tensor-core instructions it issues
per iteration, and how wide its memory accesses are. Resource counts (``aot.resources``) cannot
say that a loop loads 16 scalar 16-bit values per thread where one 128-bit copy would do; the
SASS can. This module disassembles a cubin with ``cuobjdump -sass`` and counts, per iteration of
each kernel's main loop, the tensor-core instructions, the shared, global and async (LDGSTS:
global to shared) accesses with their bytes per thread, the barriers, and every opcode:

    python -m fastcl.benchmark.sass CUBIN_OR_DIR     # one line per kernel's main loop

The main loops are the innermost loops that contain tensor-core instructions (a software-
pipelined GEMM has one), or the largest loop of a kernel without any. Loops are found from
backward branches: a ``BRA`` to an address at or before itself closes a loop whose body runs from
that address to the branch. Tests (tests/test_sass.py, tests/test_triton_sass.py) use it to check
that the Triton kernels' hot loops use vector accesses.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple

TENSOR = frozenset({"HMMA", "HGMMA", "DMMA", "IMMA", "IGMMA", "QGMMA", "BMMA"})
SHARED_LOADS = frozenset({"LDS", "LDSM"})
SHARED_STORES = frozenset({"STS", "STSM"})
GLOBAL_LOADS = frozenset({"LDG"})
GLOBAL_STORES = frozenset({"STG"})
ASYNC_COPIES = frozenset({"LDGSTS"})  # cp.async: global to shared without registers
MEMORY = SHARED_LOADS | SHARED_STORES | GLOBAL_LOADS | GLOBAL_STORES | ASYNC_COPIES
# Access width modifiers, bytes per thread; a memory opcode without one moves 32 bits.
WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "32": 4, "64": 8, "128": 16}

# "        /*2cf0*/               @P6 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;   /* 0x41e0... */"
_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;\s*(?:/\*.*\*/)?\s*$")
_INSTRUCTION = re.compile(r"^(@!?U?P\w+\s+)?(\S+)\s*(.*)$")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")


class Instruction(NamedTuple):
    offset: int  # byte address in the function
    predicate: str  # "@P0", "@!PT", or ""
    opcode: str  # with its modifiers: "LDGSTS.E.BYPASS.128"
    operands: str
    text: str  # the whole instruction as cuobjdump printed it

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def modifiers(self) -> list[str]:
        return self.opcode.split(".")[1:]

    @property
    def never(self) -> bool:
        """Predicated on constant false (``@!PT``): padding the scheduler inserts, never executed."""
        return self.predicate == "@!PT"

    @property
    def target(self) -> int | None:
        """A branch's target address (None: not a direct branch)."""
        if self.base != "BRA":
            return None
        found = re.findall(r"0x([0-9a-f]+)", self.operands)
        return int(found[-1], 16) if found else None

    @property
    def bytes(self) -> int:
        return access_bytes(self.opcode)


def access_bytes(opcode: str) -> int:
    """Bytes per thread a memory opcode moves (0 for other opcodes)."""
    base, *modifiers = opcode.split(".")
    if base not in MEMORY:
        return 0
    if base in ("LDSM", "STSM"):  # .x1 / .2 / .4 8x8 16-bit matrices: one 32-bit register each
        return 4 * (int(modifiers[-1]) if modifiers[-1] in ("2", "4") else 1)
    return next((WIDTHS[m] for m in modifiers if m in WIDTHS), 4)


class Loop(NamedTuple):
    start: int  # the backward branch's target
    end: int  # the (last) backward branch to it
    body: tuple[Instruction, ...]


class Counts(NamedTuple):
    """What a range of instructions executes once (a loop: per iteration), per thread."""
    start: int
    end: int
    instructions: int
    tensor: int
    shared_loads: int
    shared_load_bytes: int
    shared_stores: int
    shared_store_bytes: int
    async_copies: int
    async_copy_bytes: int
    global_loads: int
    global_load_bytes: int
    global_stores: int
    global_store_bytes: int
    barriers: int
    opcodes: Counter

    def memory(self) -> Counter:
        """The memory opcodes with their counts: where the access widths show."""
        return Counter({op: n for op, n in self.opcodes.items() if op.split(".")[0] in MEMORY})


def parse(text: str) -> dict[str, list[Instruction]]:
    """cuobjdump -sass output -> the instructions of each function, in address order."""
    out: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        function = _FUNCTION.match(line)
        if function:
            if function.group(1) in out:
                raise ValueError(f"{function.group(1)} appears twice: disassemble one architecture at a time")
            current = out.setdefault(function.group(1), [])
            continue
        found = _LINE.match(line)
        if found is None or current is None:
            continue  # headers, and the encoding's second line
        predicate, opcode, operands = _INSTRUCTION.match(found.group(2)).groups()
        current.append(Instruction(int(found.group(1), 16), (predicate or "").strip(), opcode, operands,
                                   found.group(2)))
    return out


def disassemble(cubin: bytes) -> dict[str, list[Instruction]]:
    """The instructions of each kernel function in a cubin (one architecture)."""
    from ..backend.triton.aot import cuobjdump

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return parse(text)


def loops(instrs: list[Instruction]) -> list[Loop]:
    """Every loop, from backward branches, by start address. Branches back to one address close one
    loop (a ``continue`` adds a second back edge). An unconditional branch to itself is the trap
    the compiler puts after the last EXIT, not a loop."""
    ends: dict[int, int] = {}
    for ins in instrs:
        target = ins.target
        if target is None or target > ins.offset or ins.never:
            continue
        if target == ins.offset and not ins.predicate:
            continue
        ends[target] = max(ends.get(target, target), ins.offset)
    return [Loop(start, end, tuple(i for i in instrs if start <= i.offset <= end))
            for start, end in sorted(ends.items())]


def _inside(inner: Loop, outer: Loop) -> bool:
    return inner != outer and outer.start <= inner.start and inner.end <= outer.end


def main_loops(instrs: list[Instruction]) -> list[Loop]:
    """The innermost loops with tensor-core instructions; else the largest loop; else none."""
    every = loops(instrs)
    tensor = [loop for loop in every if any(i.base in TENSOR and not i.never for i in loop.body)]
    if tensor:
        return [loop for loop in tensor if not any(_inside(other, loop) for other in tensor)]
    return [max(every, key=lambda loop: len(loop.body))] if every else []


def count(instrs) -> Counts:
    """What ``instrs`` execute once each (``@!PT`` padding left out)."""
    run = [i for i in instrs if not i.never]

    def tally(kinds):
        chosen = [i for i in run if i.base in kinds]
        return len(chosen), sum(i.bytes for i in chosen)

    return Counts(instrs[0].offset if instrs else 0, instrs[-1].offset if instrs else 0, len(run),
                  sum(i.base in TENSOR for i in run), *tally(SHARED_LOADS), *tally(SHARED_STORES),
                  *tally(ASYNC_COPIES), *tally(GLOBAL_LOADS), *tally(GLOBAL_STORES),
                  sum(i.base == "BAR" for i in run), Counter(i.opcode for i in run))


def summary(instrs: list[Instruction]) -> list[Counts]:
    """The counts of one iteration of each main loop."""
    return [count(loop.body) for loop in main_loops(instrs)]


def describe(c: Counts) -> str:
    memory = ", ".join(f"{op} x{n}" for op, n in sorted(c.memory().items()))
    return (f"{c.instructions} instrs, {c.tensor} tensor, shared ld {c.shared_loads} ({c.shared_load_bytes} B) "
            f"st {c.shared_stores} ({c.shared_store_bytes} B), async {c.async_copies} ({c.async_copy_bytes} B), "
            f"global ld {c.global_loads} ({c.global_load_bytes} B) st {c.global_stores} ({c.global_store_bytes} B), "
            f"{c.barriers} barriers [{memory}]")


def report(path: Path) -> list[str]:
    """One line per kernel loop of a cubin (bytes per thread and iteration)."""
    lines = []
    for kernel, instrs in disassemble(path.read_bytes()).items():
        found = summary(instrs)
        if not found:
            lines.append(f"{path.name} {kernel} no loop; whole kernel: {describe(count(instrs))}")
        for c in found:
            lines.append(f"{path.name} {kernel} loop {c.start:#06x}-{c.end:#06x}: {describe(c)}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a .cubin, or a folder searched for them")
    args = p.parse_args(argv)
    root = Path(args.path)
    cubins = sorted(root.rglob("*.cubin")) if root.is_dir() else [root]
    if not cubins:
        print(f"no .cubin under {root}", file=sys.stderr)
        return 1
    for cubin in cubins:
        print("\n".join(report(cubin)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
