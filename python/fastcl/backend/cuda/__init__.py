"""The ``cuda`` backend: hand-written CUDA kernels in ``csrc/cuda/`` (torch-free device code ``*.cu``,
``*.cuh``, ``*.h``; host glue ``ops_cuda.cpp``, the prefix ops' in ``ops_cuda_prefixes.inc``, which it
includes) registered for the ``torch.ops.fastcl`` schemas under the CUDA key when ``fastcl._C`` is built
with ``FASTCL_CUDA_ARCHS`` (e.g. ``"80;90a"``); ``ops.py`` names them for the declaration. Ops: ``lse``,
``lse_exclude`` (the pairs each row lists left out too, as keyed pairs are: a bit per pair of the tile
in shared memory), ``lse_prefixes`` (Matryoshka CLIP / InfoNCE: K nested feature prefixes from one pass
over the features, each tile's accumulators grown segment by segment with every prefix's statistics or
gradient tile read off on the way; the gradient GEMMs per segment on the suffix sums of the K H blocks,
one loss's GEMM work whatever K), ``pointwise`` and ``pointwise_prefixes`` (Matryoshka SigLIP / MW: the
same pass, each prefix's loss and gradient tile of ``S^k + bias``, 3 GEMM-equivalents whatever K).

The same shape as the triton engine (``csrc/cuda/DESIGN.md``): S in blocks bounded by
``FASTCL_WORKSPACE_MB``; 128 x 128 tiles of S on tensor cores (3xTF32 for float32, about fp32
accuracy; fp16/bf16 on 16-bit MMAs with fp32 accumulation), each formed once in the forward (row
and column statistics together) and once in the backward, where the gradient tile G goes into the
block's buffer (float16 scaled by a power of two) and ATen GEMMs (cuBLAS) add ``G @ y`` and
``G.T @ x``: 4 GEMM-equivalents for CLIP, 3 for SigLIP/MW. Statistics, gradients and losses are
float32; 16-bit inputs reach the kernels as they are (rows not whole 16-byte chunks are padded
once). float64 is not supported. Partials are merged in a fixed order and blocks run in order:
results are deterministic. No symmetric kernels: ``lse(z, z)`` visits every tile.
``plan.py`` holds the launch parameters the performance model reads.
"""
