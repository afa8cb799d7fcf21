"""The ``triton`` backend: every op in Triton, the default on CUDA.

Tiles of S are formed in registers with ``tl.dot``: once in the forward (row and column statistics
together), once in the backward, where each tile's gradient G goes to a bounded workspace and two
Triton GEMMs add ``G @ y`` and ``G.T @ x`` into the gradients: the floor of four x @ y.T products
(three for SigLIP/MW) at any D. The workspace is ``FASTCL_WORKSPACE_MB`` (default 256 MiB) beyond
O((M + N) * D); ``plan.py`` states the formula, ``DESIGN.md`` why.

16-bit inputs reach the kernels as they are (fp32 accumulation, no upcast copy), statistics and
gradients are float32 (float64 for float64 inputs). Every output element is owned by one program
and blocks run in a fixed order: no atomics, deterministic results.

The ops: ``lse.py`` (the masked row / column log-sum-exp and its backward), ``prefixes.py`` (the
same, and the pointwise losses, at K nested feature prefixes from one pass: Matryoshka),
``pointwise.py`` (SigLIP / MW with their gradients), ``maxsim.py``, ``topk.py``; ``gemm.py`` the
gradient GEMMs, ``tiles.py`` what the kernels share. ``plan.py`` (how a problem is cut) and
``versions.py`` (the supported Tritons and what older ones cannot do) need no Triton; ``aot.py``
compiles every variant ahead of time. On CPU tensors the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported), which is how the tests check them without a
GPU. This package imports no Triton itself: the op modules do, when a call first runs on them.
"""
