"""The one launcher of fastcl's distributed tests and benchmarks (not part of the API): ``world``
gloo ranks on this machine, each in a fresh process, and what each returns."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(worker, world: int, timeout_s: float, *args, env: dict[str, str] | None = None) -> list:
    """``[worker(rank, world, *args) for every rank]``, each inside an initialised gloo group; a rank
    that raises raises here, a hang raises ``TimeoutError``. ``env``: more environment variables for
    the ranks, set before they start (``TRITON_INTERPRET`` must be there before Triton is imported)."""
    with tempfile.TemporaryDirectory() as out_dir:
        with _environment(env or {}):
            ctx = mp.start_processes(_rank, (worker, world, out_dir, args), nprocs=world, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{world} gloo ranks did not finish within {timeout_s} s (a hang)")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """``env`` in os.environ while the ranks start (a spawned process copies it), then as it was."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _rank(rank: int, worker, world: int, out_dir: str, args) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # 127.0.0.1
    # a file rendezvous: no port to pick, so no race with other processes for a free one
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    torch.save(worker(rank, world, *args), Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
