"""The host execution's PTX tables (csrc/cuda/host/ptx.cpp) checked against the PTX ISA itself.

Everything expected here is written from NVIDIA's "Parallel Thread Execution ISA" (PTX ISA 8.x / 9.x,
https://docs.nvidia.com/cuda/parallel-thread-execution/), not from our kernels nor from ptx.cpp:

* the fragment layouts: the row/col formulas the ISA gives under each fragment figure, restated
  below in the ISA's own terms (groupID, threadID_in_group), and small tables of (lane, element)
  -> (row, col) as the figures draw them (each cell labelled T0..T31 with the element it holds);
  the ldmatrix figure has no formula beside it, only the prose restated in isa_ldmatrix_b16;
* the conversions: float -> half and float -> bfloat16 round to nearest even (torch is the reference),
  and cvt.rna.tf32.f32 rounds to nearest with ties away from zero (an independent exact-arithmetic
  model below, and hand-worked bit patterns).

ISA sections used (section numbers move between ISA versions; names do not):
  "Matrix Fragments for mma.m16n8k8" (9.7.14.5.7 in 8.x: Figures 72, 75, 77 for .tf32 / .f32),
  "Matrix Fragments for mma.m16n8k16 with floating point type" (9.7.14.5.8: Figures 79, 81, 83),
  "Warp-level matrix load instruction: ldmatrix" (9.7.14.5.15: Figure 104, one 8x8 b16 matrix),
  "Data Movement and Conversion Instructions: cvt" (the .rna rounding modifier and .tf32 destination).
"""
from __future__ import annotations

import math
import struct
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cuda_host

if cuda_host.compiler() is None:
    pytest.skip(f"no host C++ compiler ({cuda_host.CXX}) to build csrc/cuda/host", allow_module_level=True)


@pytest.fixture(scope="module")
def ops():
    return cuda_host.load()


# ---- the ISA's fragment formulas ------------------------------------------------------------------
# Each is the ISA's "The row and column of a matrix fragment can be computed as:" block, restated.
# For B operands the ISA's (row, col) is (k, n).


def _ids(laneid: int) -> tuple[int, int]:
    groupID = laneid >> 2
    threadID_in_group = laneid % 4
    return groupID, threadID_in_group


def isa_a_tf32(laneid: int, i: int) -> tuple[int, int]:
    """m16n8k8 .tf32 A (Figure 72): row = groupID for a0, a2, groupID + 8 for a1, a3;
    col = threadID_in_group for a0, a1, threadID_in_group + 4 for a2, a3."""
    groupID, threadID_in_group = _ids(laneid)
    row = groupID if i in (0, 2) else groupID + 8
    col = threadID_in_group if i in (0, 1) else threadID_in_group + 4
    return row, col


def isa_b_tf32(laneid: int, i: int) -> tuple[int, int]:
    """m16n8k8 .tf32 B (Figure 75): row = threadID_in_group for b0, threadID_in_group + 4 for b1;
    col = groupID."""
    groupID, threadID_in_group = _ids(laneid)
    row = threadID_in_group if i == 0 else threadID_in_group + 4
    return row, groupID


def isa_c_f32(laneid: int, i: int) -> tuple[int, int]:
    """C/D with .f32 of m16n8k8 (Figure 77) and of m16n8k16 (Figure 83), the same words in both:
    row = groupID for c0, c1 (i < 2), groupID + 8 for c2, c3; col = threadID_in_group * 2 + (i & 0x1)."""
    groupID, threadID_in_group = _ids(laneid)
    row = groupID if i < 2 else groupID + 8
    return row, threadID_in_group * 2 + (i & 0x1)


def isa_a_16bit(laneid: int, i: int) -> tuple[int, int]:
    """m16n8k16 .f16/.bf16 A (Figure 79): row = groupID for ai where 0 <= i < 2 || 4 <= i < 6, else
    groupID + 8; col = threadID_in_group * 2 + (i & 0x1) for i < 4, the same + 8 for i >= 4."""
    groupID, threadID_in_group = _ids(laneid)
    row = groupID if (0 <= i < 2 or 4 <= i < 6) else groupID + 8
    col = threadID_in_group * 2 + (i & 0x1) + (8 if i >= 4 else 0)
    return row, col


def isa_b_16bit(laneid: int, i: int) -> tuple[int, int]:
    """m16n8k16 .f16/.bf16 B (Figure 81): row = threadID_in_group * 2 + (i & 0x1) for bi where i < 2,
    the same + 8 for i >= 2; col = groupID."""
    groupID, threadID_in_group = _ids(laneid)
    row = threadID_in_group * 2 + (i & 0x1) + (8 if i >= 2 else 0)
    return row, groupID


def isa_ldmatrix_b16(laneid: int, i: int) -> tuple[int, int]:
    """ldmatrix .m8n8 .b16 (Figure 104; the ISA gives prose, no formula): each thread receives a
    fragment of a row, thread 0 the first, and a group of four consecutive threads receives a whole
    row. A fragment is one 32-bit register: two consecutive 16-bit elements, low half first."""
    row = laneid // 4  # the group of four threads
    fragment_in_row = laneid % 4
    return row, 2 * fragment_in_row + i


# (shape, operand, elements per lane, matrix rows, matrix cols, the ISA's formula)
OPERANDS = [
    ("m16n8k8.tf32", "a", 4, 16, 8, isa_a_tf32),
    ("m16n8k8.tf32", "b", 2, 8, 8, isa_b_tf32),
    ("m16n8k8.tf32", "c", 4, 16, 8, isa_c_f32),
    ("m16n8k16.16bit", "a", 8, 16, 16, isa_a_16bit),
    ("m16n8k16.16bit", "b", 4, 16, 8, isa_b_16bit),
    ("m16n8k16.16bit", "c", 4, 16, 8, isa_c_f32),
    ("m8n8.b16", "a", 2, 8, 8, isa_ldmatrix_b16),
]
_IDS = [f"{s}-{o}" for s, o, *_ in OPERANDS]

# ---- the ISA's figures, transcribed ---------------------------------------------------------------
# {(lane, element): (row, col)} as each figure draws it: the cell at (row, col) is labelled "T<lane>"
# with the element (a0.., b0.., c0..) it holds. Kept apart from the formulas on purpose: a table
# that agreed with a mistyped formula would still disagree here. Lanes 0, 1, 4, 5 and 31 (and all their elements
# where the figure is small enough to make that cheap).
FIGURES = {
    # Figure 72, MMA .m16n8k8 A with .tf32: row 0 reads T0..T3 {a0} in cols 0-3, then T0..T3 {a2} in
    # cols 4-7; row 8 reads the same lanes with a1, a3; row g belongs to T4g..T4g+3.
    ("m16n8k8.tf32", "a"): {
        (0, 0): (0, 0), (0, 1): (8, 0), (0, 2): (0, 4), (0, 3): (8, 4),
        (1, 0): (0, 1), (1, 1): (8, 1), (1, 2): (0, 5), (1, 3): (8, 5),
        (4, 0): (1, 0), (4, 2): (1, 4),
        (5, 1): (9, 1), (5, 3): (9, 5),
        (31, 0): (7, 3), (31, 1): (15, 3), (31, 2): (7, 7), (31, 3): (15, 7),
    },
    # Figure 75, MMA .m16n8k8 B with .tf32 (rows are k): column n holds T4n..T4n+3; rows 0-3 hold b0 of
    # T4n, T4n+1, T4n+2, T4n+3, rows 4-7 their b1.
    ("m16n8k8.tf32", "b"): {
        (0, 0): (0, 0), (0, 1): (4, 0),
        (1, 0): (1, 0), (1, 1): (5, 0),
        (4, 0): (0, 1), (4, 1): (4, 1),
        (5, 0): (1, 1), (5, 1): (5, 1),
        (31, 0): (3, 7), (31, 1): (7, 7),
    },
    # Figure 77, MMA .m16n8k8 C/D with .f32: row 0 reads T0 {c0, c1}, T1 {c0, c1}, .., T3 {c0, c1};
    # row 8 the same lanes' {c2, c3}.
    ("m16n8k8.tf32", "c"): {
        (0, 0): (0, 0), (0, 1): (0, 1), (0, 2): (8, 0), (0, 3): (8, 1),
        (1, 0): (0, 2), (1, 1): (0, 3), (1, 2): (8, 2), (1, 3): (8, 3),
        (4, 0): (1, 0), (4, 3): (9, 1),
        (5, 1): (1, 3), (5, 2): (9, 2),
        (31, 0): (7, 6), (31, 1): (7, 7), (31, 2): (15, 6), (31, 3): (15, 7),
    },
    # Figure 79, MMA .m16n8k16 A with .f16/.bf16: row 0 reads T0 {a0, a1}, T1 {a0, a1}, .., T3 in cols
    # 0-7, then T0 {a4, a5} .. T3 {a4, a5} in cols 8-15; row 8 the same lanes' {a2, a3} and {a6, a7}.
    ("m16n8k16.16bit", "a"): {
        (0, 0): (0, 0), (0, 1): (0, 1), (0, 2): (8, 0), (0, 3): (8, 1),
        (0, 4): (0, 8), (0, 5): (0, 9), (0, 6): (8, 8), (0, 7): (8, 9),
        (1, 0): (0, 2), (1, 1): (0, 3), (1, 4): (0, 10), (1, 5): (0, 11),
        (4, 0): (1, 0), (4, 6): (9, 8),
        (5, 3): (9, 3), (5, 4): (1, 10),
        (31, 0): (7, 6), (31, 1): (7, 7), (31, 2): (15, 6), (31, 3): (15, 7),
        (31, 4): (7, 14), (31, 5): (7, 15), (31, 6): (15, 14), (31, 7): (15, 15),
    },
    # Figure 81, MMA .m16n8k16 B with .f16/.bf16 (rows are k): column n holds T4n..T4n+3; rows 0, 1 are
    # T4n's {b0, b1}, rows 2, 3 T4n+1's, .., rows 6, 7 T4n+3's; rows 8-15 likewise with {b2, b3}.
    ("m16n8k16.16bit", "b"): {
        (0, 0): (0, 0), (0, 1): (1, 0), (0, 2): (8, 0), (0, 3): (9, 0),
        (1, 0): (2, 0), (1, 1): (3, 0), (1, 2): (10, 0), (1, 3): (11, 0),
        (4, 0): (0, 1), (4, 3): (9, 1),
        (5, 1): (3, 1), (5, 2): (10, 1),
        (31, 0): (6, 7), (31, 1): (7, 7), (31, 2): (14, 7), (31, 3): (15, 7),
    },
    # Figure 83, MMA .m16n8k16 C/D: the same picture as Figure 77.
    ("m16n8k16.16bit", "c"): {
        (0, 0): (0, 0), (0, 1): (0, 1), (0, 2): (8, 0), (0, 3): (8, 1),
        (1, 0): (0, 2), (1, 3): (8, 3),
        (4, 1): (1, 1), (4, 2): (9, 0),
        (5, 0): (1, 2), (5, 3): (9, 3),
        (31, 0): (7, 6), (31, 1): (7, 7), (31, 2): (15, 6), (31, 3): (15, 7),
    },
    # Figure 104, ldmatrix fragment layout for one 8x8 matrix with 16-bit elements: row 0 reads
    # T0 {a0, a1}, T1 {a0, a1}, T2, T3; row 1 T4..T7; .. row 7 T28..T31.
    ("m8n8.b16", "a"): {
        (0, 0): (0, 0), (0, 1): (0, 1),
        (1, 0): (0, 2), (1, 1): (0, 3),
        (3, 1): (0, 7),
        (4, 0): (1, 0), (4, 1): (1, 1),
        (5, 0): (1, 2), (5, 1): (1, 3),
        (31, 0): (7, 6), (31, 1): (7, 7),
    },
}


def _at(ops, shape: str, operand: str, lane: int, element: int) -> tuple[int, int]:
    got = list(ops.fragment(shape, operand, lane, element))
    assert len(got) == 2, f"{shape} {operand} lane {lane} element {element}: got {got}"
    return got[0], got[1]


@pytest.mark.parametrize("shape, operand", list(FIGURES), ids=[f"{s}-{o}" for s, o in FIGURES])
def test_fragment_matches_the_isa_figure(ops, shape, operand):
    wrong = {}
    for (lane, element), where in FIGURES[shape, operand].items():
        got = _at(ops, shape, operand, lane, element)
        if got != where:
            wrong[lane, element] = f"figure says {where}, table says {got}"
    assert not wrong, f"{shape} {operand}: {wrong}"


@pytest.mark.parametrize("shape, operand, elements, rows, cols, formula", OPERANDS, ids=_IDS)
def test_fragment_matches_the_isa_formula(ops, shape, operand, elements, rows, cols, formula):
    wrong = {}
    for lane in range(32):
        for element in range(elements):
            got, want = _at(ops, shape, operand, lane, element), formula(lane, element)
            if got != want:
                wrong[lane, element] = f"ISA says {want}, table says {got}"
    assert not wrong, f"{shape} {operand}: {wrong}"


@pytest.mark.parametrize("shape, operand, elements, rows, cols, formula", OPERANDS, ids=_IDS)
def test_fragment_covers_the_matrix_exactly_once(ops, shape, operand, elements, rows, cols, formula):
    # The ISA distributes every element of the matrix to exactly one (thread, element) of the warp.
    assert 32 * elements == rows * cols
    seen: dict[tuple[int, int], tuple[int, int]] = {}
    for lane in range(32):
        for element in range(elements):
            row, col = _at(ops, shape, operand, lane, element)
            assert 0 <= row < rows and 0 <= col < cols, (lane, element, row, col)
            assert (row, col) not in seen, f"({row}, {col}) held by both {seen[row, col]} and {(lane, element)}"
            seen[row, col] = (lane, element)
    assert len(seen) == rows * cols


@pytest.mark.parametrize("shape, operand, elements, rows, cols, formula", OPERANDS, ids=_IDS)
def test_fragment_rejects_what_the_isa_does_not_define(ops, shape, operand, elements, rows, cols, formula):
    for lane, element in [(-1, 0), (32, 0), (1000, 0), (0, -1), (0, elements), (31, elements), (0, 99)]:
        assert list(ops.fragment(shape, operand, lane, element)) == [], (lane, element)


@pytest.mark.parametrize("shape, operand", [
    ("m16n8k8.tf32", "d"),        # D shares C's layout, but the op names it "c"
    ("m16n8k8.tf32", "A"),
    ("m16n8k8.f16", "a"),         # not a shape the host execution models
    ("m16n8k16.tf32", "a"),
    ("m16n8k16.f16", "a"),        # the op's name for the 16-bit shape is "m16n8k16.16bit"
    ("m8n8.b16", "b"),
    ("m8n8.b16", "c"),
    ("m8n8.b8", "a"),
    ("", "a"),
    ("m16n8k8.tf32", ""),
])
def test_fragment_rejects_unknown_shapes_and_operands(ops, shape, operand):
    for lane, element in [(0, 0), (5, 1), (31, 1)]:
        assert list(ops.fragment(shape, operand, lane, element)) == []


def test_ldmatrix_x4_delivers_the_m16n8k16_a_registers(ops):
    # Two ISA sections together: ldmatrix .x4 puts matrix j's fragment in destination register j,
    # and register j of the m16n8k16 A fragment holds {a2j, a2j+1} (low half first). With matrix j
    # taken at rows 8 (j % 2), cols 8 (j // 2) of A (the usual address pattern), the two agree.
    for lane in range(32):
        for j in range(4):
            for half in range(2):
                row, col = _at(ops, "m8n8.b16", "a", lane, half)
                want = (row + 8 * (j % 2), col + 8 * (j // 2))
                assert _at(ops, "m16n8k16.16bit", "a", lane, 2 * j + half) == want, (lane, j, half)


# ---- conversions ------------------------------------------------------------------------------------


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f32_from_bits(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u))[0]


def _torch_bits(x: float, dtype: torch.dtype) -> int:
    return int(torch.tensor(x, dtype=torch.float32).to(dtype).view(torch.int16).item()) & 0xFFFF


def _is_half_nan(h: int) -> bool:
    return (h & 0x7C00) == 0x7C00 and (h & 0x03FF) != 0


def _is_bf16_nan(b: int) -> bool:
    return (b & 0x7F80) == 0x7F80 and (b & 0x007F) != 0


# float32-exact inputs (every one survives the double -> float the op's schema implies unchanged)
HALF_CASES = [
    # value: IEEE binary16 bits, round to nearest even (cvt.rn.f16.f32)
    (0.0, 0x0000),
    (-0.0, 0x8000),
    (1.0, 0x3C00),
    (-2.0, 0xC000),
    (1 + 2**-11, 0x3C00),            # tie between 1 and 1 + 2^-10: to even (1)
    (1 + 3 * 2**-11, 0x3C02),        # tie between 1 + 2^-10 and 1 + 2^-9: to even (1 + 2^-9)
    (-(1 + 3 * 2**-11), 0xBC02),
    (1 + 2**-11 + 2**-23, 0x3C01),   # just past the tie
    (1 + 2**-11 - 2**-23, 0x3C00),   # just short of it
    (65504.0, 0x7BFF),               # largest finite half
    (65519.0, 0x7BFF),
    (65520.0, 0x7C00),               # tie between 65504 (odd) and 2^16: to even, i.e. inf
    (-65520.0, 0xFC00),
    (2.0**-14, 0x0400),              # smallest normal half
    (2.0**-24, 0x0001),              # smallest subnormal half
    (2.0**-25, 0x0000),              # tie between 0 and 2^-24: to even (0)
    (3 * 2.0**-25, 0x0002),          # tie between 2^-24 and 2^-23: to even (2^-23)
    (2.0**-25 + 2.0**-40, 0x0001),
    (-(2.0**-24), 0x8001),
    (5 * 2.0**-24, 0x0005),
    (2.0**-14 - 2.0**-24, 0x03FF),   # largest subnormal half
    (math.inf, 0x7C00),
    (-math.inf, 0xFC00),
    (2.0**-100, 0x0000),             # underflows to zero
    (3.140625, 0x4248),
]


@pytest.mark.parametrize("x, bits", HALF_CASES, ids=[repr(x) for x, _ in HALF_CASES])
def test_float_to_half_bits(ops, x, bits):
    assert f32_from_bits(f32_bits(x)) == x or math.isinf(x), "test value is not float32-exact"
    got = int(ops.float_to_half_bits(x))
    assert got == bits, f"{x!r}: expected {bits:#06x}, got {got:#06x}"
    assert got == _torch_bits(x, torch.float16)


def test_float_to_half_bits_overflow_edge(ops):
    # 65519.99 is float32 65519.9921875, below the tie at 65520: the largest finite half.
    assert int(ops.float_to_half_bits(65519.99)) == 0x7BFF == _torch_bits(65519.99, torch.float16)


def test_float_to_half_bits_matches_torch_on_many_values(ops):
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 2**32, (4000,), generator=g, dtype=torch.int64).tolist()
    # every float32 in the binade around the half subnormal/normal boundary, spaced to hit ties
    patterns += [f32_bits(k * 2.0**-30) for k in range(0, 2**17, 61)]
    # values straddling each half rounding boundary near 1 and near the top of the range
    patterns += [f32_bits(1.0) + d for d in range(0, 1 << 14, 97)]
    patterns += [f32_bits(60000.0) + d for d in range(0, 1 << 20, 4099)]
    mismatches = []
    for u in patterns:
        x = f32_from_bits(u)
        if math.isnan(x):
            continue
        got, want = int(ops.float_to_half_bits(x)), _torch_bits(x, torch.float16)
        if got != want:
            mismatches.append(f"{u:#010x}: {got:#06x} != torch {want:#06x}")
    assert not mismatches, mismatches[:10]


def test_float_to_half_bits_nan(ops):
    for u in (0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF):
        assert _is_half_nan(int(ops.float_to_half_bits(f32_from_bits(u)))), hex(u)


BF16_CASES = [
    (0.0, 0x0000),
    (-0.0, 0x8000),
    (1.0, 0x3F80),
    (1 + 2**-8, 0x3F80),             # tie between 1 and 1 + 2^-7: to even (1)
    (1 + 3 * 2**-8, 0x3F82),         # tie between 1 + 2^-7 and 1 + 2^-6: to even (1 + 2^-6)
    (-(1 + 2**-8), 0xBF80),
    (1 + 2**-8 + 2**-23, 0x3F81),
    (1 + 2**-8 - 2**-23, 0x3F80),
    (f32_from_bits(0x7F7F0000), 0x7F7F),                   # largest finite bfloat16
    (f32_from_bits(0x7F7F7FFF), 0x7F7F),                   # just short of the tie above it
    (f32_from_bits(0x7F7F8000), 0x7F80),                   # tie between 0x7f7f (odd) and inf: inf
    (f32_from_bits(0x7F7FFFFF), 0x7F80),                   # largest float32: inf
    (f32_from_bits(0xFF7FFFFF), 0xFF80),
    (f32_from_bits(0x00000001), 0x0000),                   # float32 subnormals
    (f32_from_bits(0x00008000), 0x0000),                   # tie between 0 and 0x0001: to even
    (f32_from_bits(0x00018000), 0x0002),                   # tie between 0x0001 and 0x0002: to even
    (f32_from_bits(0x00010000), 0x0001),
    (f32_from_bits(0x007FFFFF), 0x0080),                   # the largest subnormal rounds up to normal
    (math.inf, 0x7F80),
    (-math.inf, 0xFF80),
]


@pytest.mark.parametrize("x, bits", BF16_CASES, ids=[repr(x) for x, _ in BF16_CASES])
def test_float_to_bfloat16_bits(ops, x, bits):
    got = int(ops.float_to_bfloat16_bits(x))
    assert got == bits, f"{x!r}: expected {bits:#06x}, got {got:#06x}"
    assert got == _torch_bits(x, torch.bfloat16)


def test_float_to_bfloat16_bits_matches_torch_on_many_values(ops):
    g = torch.Generator().manual_seed(1)
    patterns = torch.randint(0, 2**32, (4000,), generator=g, dtype=torch.int64).tolist()
    patterns += [(k << 15) | low for k in range(0, 1 << 17, 257) for low in (0x0000, 0x7FFF, 0x8000, 0x8001)]
    mismatches = []
    for u in patterns:
        x = f32_from_bits(u)
        if math.isnan(x):
            continue
        got, want = int(ops.float_to_bfloat16_bits(x)), _torch_bits(x, torch.bfloat16)
        if got != want:
            mismatches.append(f"{u:#010x}: {got:#06x} != torch {want:#06x}")
    assert not mismatches, mismatches[:10]


def test_float_to_bfloat16_bits_nan(ops):
    for u in (0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0x7F80FFFF):
        assert _is_bf16_nan(int(ops.float_to_bfloat16_bits(f32_from_bits(u)))), hex(u)


# ---- cvt.rna.tf32.f32 ---------------------------------------------------------------------------------
# The ISA's .rna: the mantissa LSB rounds to nearest, ties away from zero. A .tf32 value has float32's
# sign and 8-bit exponent and 10 explicit mantissa bits; in its .b32 container the low 13 bits are zero.


def tf32_rna_model(u: int) -> int:
    """cvt.rna.tf32.f32 of the float32 with bits ``u`` (not NaN), from the rule in exact arithmetic."""
    x = f32_from_bits(u)
    if math.isinf(x):
        return u
    sign = -1 if u >> 31 else 1
    magnitude = Fraction(abs(x))
    if magnitude == 0:
        return u
    # the spacing of tf32 values at this magnitude: 10 mantissa bits below the leading one, and
    # float32's own subnormal exponent floor (2^-126) below the normal range
    exponent = max(math.floor(math.log2(magnitude)), -126)
    while Fraction(2) ** exponent > magnitude:  # log2 of a Fraction may round
        exponent -= 1
    while Fraction(2) ** (exponent + 1) <= magnitude:
        exponent += 1
    exponent = max(exponent, -126)
    ulp = Fraction(2) ** (exponent - 10)
    q = magnitude / ulp
    n = math.floor(q + Fraction(1, 2))  # nearest, and a tie (q = k + 1/2) goes up: away from zero
    rounded = n * ulp
    if rounded >= Fraction(2) ** 128:  # past the largest finite tf32: the rounding overflows
        return (0x80000000 if sign < 0 else 0) | 0x7F800000
    return f32_bits(sign * float(rounded))


TF32_CASES = {
    # input bits: result bits
    0x00000000: 0x00000000,
    0x80000000: 0x80000000,                    # -0.0 keeps its sign
    0x3F800000: 0x3F800000,                    # 1.0 is already tf32
    0x3F801000: 0x3F802000,                    # 1 + 2^-11: a tie; away from zero gives 1 + 2^-10 (RNE: 1)
    0xBF801000: 0xBF802000,                    # -(1 + 2^-11) -> -(1 + 2^-10)
    0x3F803000: 0x3F804000,                    # 1 + 3 2^-11: tie between 1 + 2^-10 and 1 + 2^-9: away
    0x3F805000: 0x3F806000,                    # 1 + 5 2^-11: tie, away gives 1 + 3 2^-10 (RNE: 1 + 2^-9)
    0xBF805000: 0xBF806000,
    0x3F800FFF: 0x3F800000,                    # 1 + 2^-11 - 2^-23: below the tie
    0x3F801001: 0x3F802000,                    # 1 + 2^-11 + 2^-23: above it
    0x3F802FFF: 0x3F802000,
    0x3FFFF000: 0x40000000,                    # 2 - 2^-11: a tie, away: up into the next binade (2.0)
    0x3FFFFFFF: 0x40000000,                    # the largest float32 below 2 rounds to 2.0
    0xBFFFFFFF: 0xC0000000,
    0x3FFFEFFF: 0x3FFFE000,                    # stays below the binade
    0x7F7FE000: 0x7F7FE000,                    # the largest finite tf32
    0x7F7FEFFF: 0x7F7FE000,
    0x7F7FF000: 0x7F800000,                    # its tie with 2^128 goes away from zero: inf
    0x7F7FFFFF: 0x7F800000,                    # the largest float32 rounds to inf
    0xFF7FFFFF: 0xFF800000,
    0x7F800000: 0x7F800000,                    # +inf stays
    0xFF800000: 0xFF800000,                    # -inf stays
    0x00000001: 0x00000000,                    # float32 subnormals round on the same 2^-136 grid
    0x00000FFF: 0x00000000,
    0x00001000: 0x00002000,                    # a subnormal tie: away
    0x80001000: 0x80002000,
    0x007FF000: 0x00800000,                    # the top subnormal tie rounds up to the smallest normal
    0x40490FDB: 0x40490000,                    # pi -> 3.140625
}


@pytest.mark.parametrize("u, want", list(TF32_CASES.items()), ids=[f"{u:#010x}" for u in TF32_CASES])
def test_cvt_rna_tf32(ops, u, want):
    assert tf32_rna_model(u) == want, "the model disagrees with the hand-worked value"
    got = int(ops.cvt_rna_tf32(f32_from_bits(u)))
    assert got == want, f"{u:#010x}: expected {want:#010x}, got {got:#010x}"


def test_cvt_rna_tf32_nan(ops):
    for u in (0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0x7F801000):
        got = int(ops.cvt_rna_tf32(f32_from_bits(u)))
        assert math.isnan(f32_from_bits(got)), f"{u:#010x} -> {got:#010x}"
        # still a NaN as the tf32 operand an mma reads (the register's upper 19 bits)
        assert (got & 0x7F800000) == 0x7F800000 and (got & 0x007FE000) != 0, f"{u:#010x} -> {got:#010x}"


_not_nan_bits = st.integers(0, 2**32 - 1).filter(lambda u: not math.isnan(f32_from_bits(u)))
# bits near rounding boundaries: any high 19 bits, low 13 bits at or beside the halfway point
_near_ties = st.builds(lambda hi, low: (hi << 13) | low, st.integers(0, 2**19 - 1),
                       st.sampled_from([0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x1FFF])
                       ).filter(lambda u: not math.isnan(f32_from_bits(u)))


@settings(max_examples=1500, deadline=None)
@given(u=st.one_of(_not_nan_bits, _near_ties))
def test_cvt_rna_tf32_property(ops, u):
    got = int(ops.cvt_rna_tf32(f32_from_bits(u)))
    assert got == tf32_rna_model(u), f"{u:#010x}: got {got:#010x}, model {tf32_rna_model(u):#010x}"
    assert got & 0x1FFF == 0
