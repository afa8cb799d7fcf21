"""Moved to ``fastcl.benchmark.harness`` (the ``fastcl bench`` command uses it); this shim keeps
``import harness`` working for the studies in bench/ that run as scripts from this folder."""
from pathlib import Path

from fastcl.benchmark.harness import (  # noqa: F401 - re-exported
    OOM_MARKERS,
    GiB,
    MiB,
    environment,
    is_oom,
    measure,
    paired_ratio,
    peak_extra_bytes,
    print_table,
    progress,
    run_isolated,
    summarize,
    time_interleaved,
    time_repeats,
    write_json,
)

REPO = Path(__file__).resolve().parent.parent
