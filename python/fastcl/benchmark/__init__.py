"""``fastcl bench``: time and peak memory of the losses' forward+backward against naive PyTorch, the
anchors (open_clip, Inf-CL) and the GEMM floor, swept over batch size.

``harness`` measures one case in a fresh process, ``cases`` builds the steps, ``sweep`` plans and
runs them, ``plot`` draws the rows, ``cli`` is the command line; ``sass`` reads what a compiled
kernel's main loop executes, without a GPU. Nothing here is imported by
``fastcl`` itself, so rich and matplotlib stay optional (``pip install 'fastcl[bench]'``).
"""
