"""The ``chunked`` backend's tiles of ``S = scale * x @ y.T``, shared by its ``lse`` and ``pointwise``
kernels: S only exists one tile at a time,

    tile [br, bc] = scale * x[rows] @ y[cols].T     (+ row_bias[rows] for pointwise)

Two scratch tiles are reused across a pass, so the peak extra memory is two tiles of at most
``TILE_ELEMENTS`` whatever M and N are. Keyed pairs are described by index vectors and turned into a
bool tile on the fly, never stored whole.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

# One S tile holds at most this many elements (8 MiB in float32).
TILE_ELEMENTS = 1 << 21
# Column blocks are capped so that row blocks stay tall enough for an efficient GEMM.
MAX_TILE_COLS = 8192


def _tile_shape(m: int, n: int, elements: int | None = None) -> tuple[int, int]:
    bc = min(n, MAX_TILE_COLS)
    return max(1, min(m, (TILE_ELEMENTS if elements is None else elements) // bc)), bc


def each_tile(m: int, n: int, elements: int | None = None) -> Iterator[tuple[slice, slice]]:
    """The tiles of an ``[m, n]`` S of at most ``elements`` (None: ``TILE_ELEMENTS``) each, row block by
    row block."""
    br, bc = _tile_shape(m, n, elements)
    for r0 in range(0, m, br):
        for c0 in range(0, n, bc):
            yield slice(r0, min(r0 + br, m)), slice(c0, min(c0 + bc, n))


class Scratch:
    """Tile buffers (two unless told) reused across a pass: no allocation (and no page faults) per tile."""

    def __init__(self, like: torch.Tensor, m: int, n: int, count: int = 2, elements: int | None = None):
        shape = _tile_shape(m, n, elements)
        self.tiles = [like.new_empty(shape) for _ in range(count)]

    def views(self, rs: slice, cs: slice) -> list[torch.Tensor]:
        r, c = rs.stop - rs.start, cs.stop - cs.start
        return [t[:r, :c] for t in self.tiles]


def keyed_mask(row_keys, col_keys, rs: slice, cs: slice) -> torch.Tensor | None:
    """Bool tile marking the keyed pairs."""
    return None if row_keys is None else row_keys[rs, None] == col_keys[None, cs]


def logits_into(out, x, y, scale, rs, cs) -> torch.Tensor:
    return torch.mm(x[rs], y[cs].T, out=out).mul_(scale)
