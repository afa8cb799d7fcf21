"""Start `world` gloo ranks of a test's worker in fresh processes and collect what each saved:
`worker(rank, world, out_dir)` writes `out_dir/rank{r}.pt`. A hang fails the test instead of
stalling the suite."""
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def run_ranks(worker, world: int, out_dir: str, timeout_s: float) -> list:
    ctx = mp.start_processes(worker, args=(world, out_dir), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world} gloo ranks did not finish within {timeout_s} s (a hang)")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
