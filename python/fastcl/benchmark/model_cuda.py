"""The performance model's counts for ``--backend cuda``: the cuda engine's launches, from
``fastcl/backend/cuda/plan.py`` (the mirror of ``csrc/cuda/params.h`` and ``csrc/cuda/plan.h``), for the
plain losses (``_cuda_kernels``) and Matryoshka's one pass (``_cuda_prefix_kernels``); ``model.py`` times them."""
from __future__ import annotations

import torch

from .model_common import Kernel, _matrix_rate, _shape


def _add_tiles(kern: Kernel, m: int, cols: int, block, features: int, row_bytes: int, exps_per_pair: int,
               g_bytes: int = 0, launches_per_block: int = 1) -> None:
    """One cuda tile kernel's launches over ``m`` x ``cols`` pairs in blocks of ``block`` (rows, columns):
    each CTA tile's pairs padded to BLOCK_A x BLOCK_B and ``features`` deep; ``row_bytes`` read per row and
    per column of a block, ``g_bytes`` stored per pair."""
    from ..backend.cuda import plan as cp

    br, bc = block
    for r0 in range(0, m, br):
        for c0 in range(0, cols, bc):
            r, c = min(br, m - r0), min(bc, cols - c0)
            pairs = cp.cdiv(r, cp.BLOCK_A) * cp.BLOCK_A * cp.cdiv(c, cp.BLOCK_B) * cp.BLOCK_B
            kern.add(flops=2 * pairs * features, exps=exps_per_pair * pairs, launches=launches_per_block,
                     hbm_bytes=(r + c) * row_bytes + r * c * g_bytes)


def _cuda_prefix_kernels(loss: str, n: int, dims: list[int], tdtype: torch.dtype, budget: int, normalize: bool):
    """The cuda engine's lse_prefixes / pointwise_prefixes launches (csrc/cuda/prefixes.cuh, prefix_grad.cuh,
    launch.cu, ops_cuda_prefixes.inc), from cuda/plan.py: K prefixes per launch up to MAX_PREFIXES (larger K: groups,
    each from feature 0). Their main loops are read from prefixes_<type>.cu's own kernels (compiled.CUDA_FUNCTIONS:
    the forward at a launch's shared memory for its group of prefixes; the gradient tile of the loss's kind)."""
    from ..backend.cuda import plan as cp

    m, cols, kind, rows_on, cols_on = _shape(loss, n)
    elem = cp.element_bytes(tdtype)
    g_elem = cp.element_bytes(cp.g_dtype(tdtype))
    k, d = len(dims), dims[-1]
    group = cp.prefix_group(k)
    ends = cp.prefix_ends(dims, elem)
    copy = ends != list(dims)
    d_al = ends[-1] if copy else cp.aligned_features(d, elem)
    # each launch's segments in whole 32-feature stages (the pipeline restarts per segment); a later
    # group's first segment runs from feature 0
    features = 0
    for q0 in range(0, k, group):
        q1 = min(k, q0 + group)
        starts = [0] + ends[q0:q1 - 1]
        features += sum(cp.cdiv(e - s, cp.BLOCK_K) * cp.BLOCK_K for s, e in zip(starts, ends[q0:q1]))
    matrix = _matrix_rate(tdtype)
    steps = features / cp.BLOCK_K
    directions = int(rows_on) + int(cols_on)

    def tiles(kern: Kernel, block, exps_per_pair, g_bytes=0, launches_per_block=1):
        # every group's launch reads the rows and columns again
        _add_tiles(kern, m, cols, block, features, d_al * elem * cp.cdiv(k, group), exps_per_pair, g_bytes,
                   launches_per_block)

    pointwise = kind == "pointwise"
    kernels = []
    if not pointwise:
        fwd = Kernel(f"lse_prefixes forward ({k} prefixes, {cp.BLOCK_A} x {cp.BLOCK_B} tiles)", matrix=matrix,
                     code=("cuda", "prefix_forward", steps, group))
        fblock = cp.forward_block(m, cols, budget, group)
        tiles(fwd, fblock, k * directions, launches_per_block=cp.cdiv(k, group) + k * directions)
        kernels.append(fwd)
    gblock = cp.gradient_block(m, cols, tdtype, budget, group)
    # H: K slots stored; the suffix pass reads and rewrites K - 1 of them in the CTA (L2). Pointwise: the
    # loss and its gradient tile from the one pass, 3 transcendentals per pair and prefix
    exps = 3 * k if pointwise else k * directions
    grad = Kernel(f"{'pointwise' if pointwise else 'lse'}_prefixes gradient tile ({k} H slots)", matrix=matrix,
                  code=("cuda", "prefix_grad_siglip" if pointwise else "prefix_grad", steps))
    tiles(grad, gblock, exps, g_bytes=k * g_elem, launches_per_block=cp.cdiv(k, group))
    gemms = Kernel("gradient GEMMs per segment (ATen mm: H-suffix @ y, H-suffix.T @ x)",
                   matrix="fp32" if tdtype == torch.float32 else "tc16")
    br, bc = gblock
    for r0 in range(0, m, br):
        for c0 in range(0, cols, bc):
            r, c = min(br, m - r0), min(bc, cols - c0)
            for q0 in range(0, k, group):
                q1 = min(k, q0 + group)
                starts = [0] + list(dims[q0:q1 - 1])
                for lo, hi in zip(starts, dims[q0:q1]):
                    w = hi - lo
                    for p, kk in ((r, c), (c, r)):
                        # into the product buffer, then copied or added into the segment's columns
                        gemms.add(flops=2 * p * kk * w, hbm_bytes=r * c * g_elem + kk * w * elem + p * w * 4 * 4,
                                  launches=2)
    forward_ws = 0 if pointwise else cp.forward_workspace_bytes(m, cols, rows_on, cols_on, budget, k)
    r, c = gblock
    grad_ws = (group * r * c * g_elem + max(r, c) * d * 4
               + 4 * group * ((3 if pointwise else 1) * r * cp.cdiv(c, cp.BLOCK_B) + cp.cdiv(r, cp.BLOCK_A) * c))
    workspace = max(forward_ws, grad_ws) + (((m + cols) * d_al * elem) if copy else cp.padding_bytes(m, cols, d,
                                                                                                      tdtype))
    # beside the kernels, as triton's (losses/_matryoshka.py, primitives/)
    library = (0 if pointwise else 2 * m * d * k) + (2 * (m + cols) * d * k if normalize else 0) + 2 * m * d
    return [*kernels, grad, gemms], workspace, library, kind, m, cols, exps, g_elem


def _cuda_kernels(loss: str, n: int, d: int, tdtype: torch.dtype, budget: int):
    """The cuda engine's launches (csrc/cuda/launch.cu, csrc/cuda/ops_cuda.cpp), from cuda/plan.py."""
    from ..backend.cuda import plan as cp

    m, cols, kind, rows_on, cols_on = _shape(loss, n)
    elem = cp.element_bytes(tdtype)
    g_elem = cp.element_bytes(cp.g_dtype(tdtype))
    d_al = cp.aligned_features(d, elem)
    d_k = cp.cdiv(d_al, cp.BLOCK_K) * cp.BLOCK_K  # the K loop runs whole 32-feature stages
    matrix = _matrix_rate(tdtype)
    steps = d_k / cp.BLOCK_K  # main-loop steps per tile

    def tiles(k: Kernel, block, exps_per_pair, g_bytes=0, launches_per_block=1):
        _add_tiles(k, m, cols, block, d_k, d_al * elem, exps_per_pair, g_bytes, launches_per_block)

    kernels = []
    workspace = cp.padding_bytes(m, cols, d, tdtype)
    pointwise = kind == "pointwise"
    if not pointwise:
        fwd = Kernel(f"lse forward ({cp.BLOCK_A} x {cp.BLOCK_B} tiles)", matrix=matrix,
                     code=("cuda", "lse_forward", steps))
        fblock = cp.forward_block(m, cols, budget)
        # the tile kernel, then one fold of the partials per direction
        tiles(fwd, fblock, int(rows_on) + int(cols_on), launches_per_block=1 + int(rows_on) + int(cols_on))
        kernels.append(fwd)
        forward_ws = cp.forward_workspace_bytes(m, cols, rows_on, cols_on, budget)
    gblock = cp.gradient_block(m, cols, tdtype, budget)
    grad = Kernel("pointwise tile" if pointwise else "lse gradient tile", matrix=matrix,
                  code=("cuda", "pair_grad", steps))
    tiles(grad, gblock, 3 if pointwise else int(rows_on) + int(cols_on), g_bytes=g_elem)
    kernels.append(grad)
    gemm_matrix = "fp32" if tdtype == torch.float32 else "tc16"
    gemms = Kernel("gradient GEMMs (ATen mm: G @ y, G.T @ x)", matrix=gemm_matrix)
    br, bc = gblock
    for r0 in range(0, m, br):
        for c0 in range(0, cols, bc):
            r, c = min(br, m - r0), min(bc, cols - c0)
            for p, kk, first in ((r, c, c0 == 0), (c, r, r0 == 0)):
                # mm into the output rows, or into the product buffer and add_ (read, read, write)
                out_bytes = p * d * 4 * (1 if first else 4)
                gemms.add(flops=2 * p * kk * d, hbm_bytes=r * c * g_elem + kk * d * elem + out_bytes,
                          launches=1 if first else 2)
    kernels.append(gemms)
    grad_ws = cp.gradient_workspace_bytes(m, cols, d, tdtype, budget, pointwise)
    workspace += grad_ws if pointwise else max(forward_ws, grad_ws)
    library = 2 * m * d if pointwise else 2 * 2 * m * d
    return kernels, workspace, library, kind, m, cols
