"""The ``chunked`` backend: every op in plain PyTorch tiles of ``S = scale * x @ y.T``.

The portable fallback (any device torch runs on) and the executable description of the algorithm
every compiled kernel follows: ``lse.py`` and ``pointwise.py`` (the primitives, over ``tiles.py``),
``maxsim.py`` and ``topk.py``. Extra memory is a few tiles, whatever the sizes.
"""
