"""fastcl.benchmark.sass, the SASS reader: on a checked-in sample whose loops and counts are known
by reading it (tests/sass_sample_sm80.sass: ``cuobjdump -sass`` of nvcc's sm_80 code for
tests/sass_sample.cu), and on a cubin Triton compiles here (sm_90, a gradient GEMM)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from fastcl.benchmark import sass

SAMPLE = Path(__file__).with_name("sass_sample_sm80.sass")
K_LOOP, ROW_LOOP, COPY_LOOP = (0x100, 0x3E0), (0x070, 0x4F0), (0x1D0, 0x340)


def _sample() -> list[sass.Instruction]:
    (name, instrs), = sass.parse(SAMPLE.read_text()).items()
    assert name == "_Z6samplePK6__halfS1_Pfiii"
    return instrs


def _at(instrs, offset: int) -> sass.Instruction:
    return next(i for i in instrs if i.offset == offset)


def test_parse_reads_every_instruction_with_its_modifiers():
    instrs = _sample()
    assert [i.offset for i in instrs] == list(range(0, 0x600, 0x10))
    load, ldsm, mma, back, trap = (_at(instrs, a) for a in (0x2A0, 0x390, 0x3B0, 0x340, 0x510))
    assert (load.opcode, load.base, load.modifiers, load.bytes) == ("LDG.E.U16", "LDG", ["E", "U16"], 2)
    assert (ldsm.opcode, ldsm.bytes) == ("LDSM.16.M88.4", 16)
    assert (mma.opcode, mma.operands) == ("HMMA.16816.F32", "R4, R12.reuse, R16, R4")
    assert (back.predicate, back.opcode, back.target) == ("@!P0", "BRA", 0x1D0)
    assert back.text == "@!P0 BRA 0x1d0"
    assert (trap.predicate, trap.target) == ("", 0x510)
    assert _at(instrs, 0x520).opcode == "NOP" and _at(instrs, 0x4B0).bytes == 8  # "NOP;", STG.E.64


@pytest.mark.parametrize("opcode, size", [
    ("LDG.E.U16", 2), ("STS.U8", 1), ("STS", 4), ("LDG.E.64", 8), ("STG.E.128", 16), ("LDGSTS.E", 4),
    ("LDGSTS.E.BYPASS.128", 16), ("LDGSTS.E.BYPASS.LTC128B.128", 16), ("LDSM.16.M88.4", 16),
    ("LDSM.16.MT88.2", 8), ("LDSM.16.M88", 4), ("HMMA.16816.F32.BF16", 0), ("BAR.SYNC.DEFER_BLOCKING", 0)])
def test_access_bytes_come_from_the_width_modifier(opcode, size):
    assert sass.access_bytes(opcode) == size


def test_loops_come_from_backward_branches_and_the_trap_is_none():
    assert [(loop.start, loop.end) for loop in sass.loops(_sample())] == [ROW_LOOP, K_LOOP, COPY_LOOP]


def test_the_main_loop_is_the_innermost_with_tensor_instructions():
    """The copy loop inside the k-loop has no HMMA, the row loop around it holds the k-loop: neither is
    the main loop."""
    (main,) = sass.main_loops(_sample())
    assert (main.start, main.end) == K_LOOP


def test_without_tensor_instructions_the_largest_loop_is_the_main_loop():
    plain = [i for i in _sample() if i.base != "HMMA"]
    assert [(loop.start, loop.end) for loop in sass.main_loops(plain)] == [ROW_LOOP]


def test_summary_counts_one_iteration_of_the_main_loop():
    """Static counts: the copy loop's body counts once."""
    (c,) = sass.summary(_sample())
    assert (c.start, c.end, c.instructions) == (*K_LOOP, (K_LOOP[1] - K_LOOP[0]) // 16 + 1)
    assert (c.tensor, c.barriers) == (2, 2)
    assert (c.global_loads, c.global_load_bytes, c.shared_stores, c.shared_store_bytes) == (2, 4, 2, 4)
    assert (c.shared_loads, c.shared_load_bytes, c.global_stores, c.async_copies) == (2, 32, 0, 0)
    assert c.memory() == {"LDG.E.U16": 2, "STS.U16": 2, "LDSM.16.M88.4": 1, "LDSM.16.MT88.4": 1}


def test_never_executed_padding_is_not_counted():
    text = """\t\tFunction : k
        /*0000*/              @!PT LDS RZ, [RZ] ;             /* 0x00000000fffff984 */
        /*0010*/                   LDS.128 R4, [R2] ;          /* 0x0000000002047984 */
        /*0020*/               @P0 BRA 0x0 ;                   /* 0xfffffff000fc0947 */"""
    (instrs,) = sass.parse(text).values()
    assert instrs[0].never and not instrs[1].never
    (c,) = sass.summary(instrs)
    assert (c.instructions, c.shared_loads, c.shared_load_bytes) == (2, 1, 16)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes"),
                    reason="TRITON_INTERPRET is set: Triton interprets instead of compiling")
def test_a_triton_cubin_and_the_command_line(tmp_path, capsys):
    """The bfloat16 gradient GEMM for sm_90: one main loop of warpgroup MMAs (HGMMA); the command line
    prints one line for it."""
    import torch

    from fastcl.backend.triton import aot

    v = next(v for v in aot.launch_variants([128], arch=90, dtypes=[torch.bfloat16]) if v.kernel == "gemm")
    code = aot.cubin(v)
    (kernel, instrs), = sass.disassemble(code).items()
    assert kernel == "_gemm_kernel"
    (c,) = sass.summary(instrs)
    tensor = {op for op in c.opcodes if op.split(".")[0] in sass.TENSOR}
    assert c.tensor > 0 and tensor and all(op.startswith("HGMMA.64x") and op.endswith(".BF16") for op in tensor)
    (tmp_path / "gemm.cubin").write_bytes(code)
    assert sass.main([str(tmp_path)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"gemm.cubin _gemm_kernel loop {c.start:#06x}-{c.end:#06x}: {c.instructions} instrs")
