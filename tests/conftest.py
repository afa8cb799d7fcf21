import sys
from pathlib import Path

import pytest

from fastcl.backend import BackendUnavailableError
from fastcl.backend.triton.versions import TritonLimit

# Test helpers (cases.py) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A call refused because the installed Triton declares it cannot do it (an older Triton:
    fastcl/backend/triton/versions.py ``_LIMITS``) skips, naming the limit; any other refusal fails."""
    try:
        return (yield)
    except BackendUnavailableError as err:
        limits = [r for r in err.reasons if isinstance(r, TritonLimit)]
        if limits and len(limits) == len(err.reasons):
            pytest.skip(limits[0])
        raise


def pytest_terminal_summary(terminalreporter):
    """What the host execution of the CUDA kernels ran (tests/test_cuda_host.py), if it ran."""
    host = sys.modules.get("cuda_host")
    line = host.summary() if host is not None else ""
    if line:
        terminalreporter.write_line(line)
