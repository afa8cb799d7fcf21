"""The ``cpu`` backend: fused C++ kernels in ``fastcl._C`` (``csrc/cpu/``), registered as
``torch.ops.fastcl.*`` under the CPU key when the extension is imported; ``ops.py`` names them for
the declaration. Every op: ``lse``, ``lse_symmetric``, ``lse_exclude``, ``lse_prefixes``, ``pointwise``,
``pointwise_prefixes``, ``maxsim``, ``topk``.

Each tile of S is computed by a GEMM into a thread-local buffer and reduced (online log-sum-exp,
pointwise losses, G) while it is in cache; tiles are scheduled so that results are bitwise
deterministic for any thread count (see ``csrc/cpu/grid.h``).
"""
