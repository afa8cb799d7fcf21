"""``fastcl.distributed`` with ``backend="triton"`` under Triton's interpreter: 2 gloo ranks, float32
and bfloat16, allgather and ring, against one process on the same backend and dtype, the kernels
getting 16-bit blocks as they travel (not upcast copies)."""
from __future__ import annotations

import importlib.util
import traceback

import pytest
import torch

from distributed_cases import CASES, TIMEOUT_S, _run_case, check_against_reference, single_process
from fastcl.distributed._spawn import run_ranks
from sessions import skip_unless_triton_runs
from tolerances import assert_close, tol

TRITON_CASES = [c for c in CASES if c.id in ("clip", "siglip", "mw-labels-none", "supcon",
                                            "infonce-decoupled-positives-keys-none", "infonce-guide")]
TRITON_DTYPES = [torch.float32, torch.bfloat16]
TRITON_STRATEGIES = ["allgather", "ring"]


class _KernelDtypes:
    """The triton backend's lse, lse_exclude and pointwise kernels (its declared op modules), wrapped
    in place to note the dtypes of the features each call gets."""

    def __init__(self):
        from fastcl.backend import registry

        self.seen = set()
        for op in ("lse", "lse_exclude", "pointwise"):
            module = registry.kernels("triton", op)
            for name in registry.OPS[op].functions:
                setattr(module, name, self._noting(getattr(module, name)))

    def _noting(self, kernel):
        def call(x, y, *args):
            self.seen.add((x.dtype, y.dtype))
            return kernel(x, y, *args)
        return call


def _triton_worker(rank, world):
    """Each triton case over the group, with the dtypes its kernels got; rank 0 also runs it in one
    process on the whole batch. Runs under TRITON_INTERPRET=1 (set before the ranks start)."""
    torch.set_num_threads(1)
    kernels = _KernelDtypes()
    results = {}
    for case in TRITON_CASES:
        for dtype in TRITON_DTYPES:
            for strategy in TRITON_STRATEGIES:
                kernels.seen = set()
                try:
                    results[case.id, dtype, strategy] = (_run_case(case, world, rank, strategy, "triton", dtype),
                                                         kernels.seen)
                except Exception:  # noqa: BLE001
                    results[case.id, dtype, strategy] = traceback.format_exc()
            if rank == 0:
                try:
                    results[case.id, dtype, "one process"] = single_process(case, world, "triton", dtype)
                except Exception:  # noqa: BLE001
                    results[case.id, dtype, "one process"] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def triton_ranks():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    return run_ranks(_triton_worker, 2, TIMEOUT_S, env={"TRITON_INTERPRET": "1"})


@pytest.mark.parametrize("strategy", TRITON_STRATEGIES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.id)
def test_triton_matches_single_process_triton(triton_ranks, case, dtype, strategy):
    """2 ranks against one process on the same backend and dtype (outputs in the dtype, so within its
    rounding: the "low precision" tolerance, in norm); the kernels took the blocks as they travelled (bfloat16 as
    it is, accumulated in float32 by the kernels), not upcast copies."""
    skip_unless_triton_runs(dtype)
    what = f"{case.id} {strategy} triton {dtype}"
    single = triton_ranks[0][case.id, dtype, "one process"]
    assert not isinstance(single, str), f"{what}: the single-process run raised\n{single}"
    per_rank = [res[case.id, dtype, strategy] for res in triton_ranks]
    for r, res in enumerate(per_rank):
        assert not isinstance(res, str), f"{what}: rank {r} raised\n{res}"
    low = tol("low precision", dtype)
    check_against_reference(case, 2, [res[0] for res in per_rank], what, want=single,
                            close=lambda got, want, where: assert_close(got, want, low, where))
    for r, (_, seen) in enumerate(per_rank):
        assert seen == {(dtype, dtype)}, f"{what}: rank {r}'s kernels got features of dtypes {seen}"
