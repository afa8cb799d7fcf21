"""Contrastive losses forward+backward: naive PyTorch vs every fastcl backend vs the GEMM floor.

The benchmark is ``fastcl bench`` (``python/fastcl/benchmark/``); this script forwards its arguments there:

    python bench/losses.py --n 8192 --d 512 --out-dir bench/results/   # same as: fastcl bench ...
"""
import sys

from fastcl.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
