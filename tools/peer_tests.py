"""Run lightly's, pytorch-metric-learning's and open_clip's own loss tests against fastcl's drop-ins.

    python tools/peer_tests.py                                  # cpu and chunked, the default mirrors
    python tools/peer_tests.py --backend chunked --pml ~/src/pytorch-metric-learning
    python tools/peer_tests.py --unsupported peer -- -x         # extra pytest arguments after --

The peers' test files are not fastcl's to ship: this script copies them out of each peer's git
repository (``git show <rev>:<path>``; a bare mirror or a clone) into a temporary directory and
runs pytest there, one process per peer and backend, with fastcl's classes in their place:

- lightly and open_clip are not installed (their packages import torchvision, timm and more, whose
  wheels would replace the CPU torch): a stand-in package of the same name, first on ``sys.path``,
  holds only the names the tests import, each fastcl's drop-in on the chosen backend.
- pytorch-metric-learning is installed (fastcl's tests use it): its ``NTXentLoss`` and
  ``SupConLoss`` are replaced in ``pytorch_metric_learning.losses``, so its wrappers
  (``SelfSupervisedLoss``, ``CrossBatchMemory``) and its other losses stay its own.

A test that reaches a feature fastcl does not implement (``UnsupportedFeatureError``, listed in the
README) is reported as skipped with that reason. ``--unsupported peer`` builds pytorch-metric-learning's
own class in that case instead and counts the test normally, listing the fallbacks: the rest of such
a test then still checks fastcl. Needs pytest-mock (lightly's tests use its ``mocker``).
Prints a pass/fail/skip table per backend with every skip and failure reason; exits 1 on a failure.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Peer:
    name: str
    flag: str                  # the command-line option naming its repository
    mirror: str                # default repository path
    tests: tuple[str, ...]     # the test files to run
    support: tuple[str, ...]   # files they import (package __init__s, helpers)
    env: tuple[tuple[str, str], ...] = ()
    rev: str = "HEAD"          # the revision to take the tests from, unless --rev says


PEERS = (
    # lightly's tests as of PR #2021 (lightly 1.6: a memory bank size without the feature dimension
    # raises, as fastcl's does; lightly 1.5's tests pass bare sizes), its branch head in the mirror
    Peer("lightly", "lightly", "/work/.mirror/lightly-ai+lightly/repo",
         ("tests/loss/test_ntx_ent_loss.py", "tests/loss/test_dcl_loss.py"), (),
         rev="26f99dce13acfc9bb767475006e370610e8d24ae"),
    Peer("pytorch-metric-learning", "pml", "/work/.mirror/KevinMusgrave+pytorch-metric-learning/repo",
         ("tests/losses/test_ntxent_loss.py", "tests/losses/test_self_supervised_loss.py"),
         ("tests/__init__.py", "tests/losses/__init__.py", "tests/losses/utils.py",
          "tests/zzz_testing_utils/__init__.py", "tests/zzz_testing_utils/testing_utils.py"),
         (("TEST_DEVICE", "cpu"),)),  # its default is cuda; TEST_DTYPES stays float16,float32,float64
    Peer("open_clip", "open-clip", "/work/.mirror/mlfoundations+open_clip/repo",
         ("tests/test_siglip_chunked_loss.py",), ()),
)

# --- what goes into the temporary directory (fastcl's code, not the peers') ---------------------

SUBSTITUTE = '''\
"""fastcl's drop-ins in place of the peers' classes (written by tools/peer_tests.py)."""
import os

from fastcl.nn import UnsupportedFeatureError

BACKEND = os.environ["FASTCL_PEER_BACKEND"]
FALL_BACK = os.environ.get("FASTCL_PEER_UNSUPPORTED") == "peer"
FALLBACKS = []  # this test's constructions that went to the peer's own class


def substitute(ours, peer=None):
    """Build ``ours`` on BACKEND; for a feature it lacks, the peer's class if FALL_BACK allows."""
    def build(*args, **kwargs):
        try:
            return ours(*args, backend=BACKEND, **kwargs)
        except UnsupportedFeatureError as e:
            if peer is None or not FALL_BACK:
                raise
            FALLBACKS.append(str(e))
            return peer(*args, **kwargs)

    build.__name__ = build.__qualname__ = ours.__name__
    return build


def replace_pytorch_metric_learning():
    import pytorch_metric_learning.losses as losses
    from pytorch_metric_learning.losses import ntxent_loss, supcon_loss

    import fastcl.metric_learning as ours

    for module, name in ((ntxent_loss, "NTXentLoss"), (supcon_loss, "SupConLoss")):
        replacement = substitute(getattr(ours, name), peer=getattr(module, name))
        setattr(module, name, replacement)
        setattr(losses, name, replacement)
'''

CONFTEST = '''\
"""Substitutes fastcl's drop-ins, turns UnsupportedFeatureError into a skip and records every
outcome (written by tools/peer_tests.py)."""
import json
import os

import pytest

import _fastcl_substitute as sub

if os.environ["FASTCL_PEER"] == "pytorch-metric-learning":
    sub.replace_pytorch_metric_learning()

RESULTS = os.environ["FASTCL_PEER_RESULTS"]


def pytest_runtest_setup(item):
    sub.FALLBACKS.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(sub.UnsupportedFeatureError):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           f"Skipped: fastcl does not support {call.excinfo.value}")


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else (
            report.longreprtext.strip().splitlines()[-1] if report.failed and report.longreprtext else "")
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"test": report.nodeid, "outcome": outcome, "reason": reason,
                                "fallbacks": sorted(set(sub.FALLBACKS))}) + "\\n")
'''

STAND_INS = {  # relative path -> module text: only the names the peers' tests import
    "lightly/__init__.py": '"""fastcl stand-in for lightly (tools/peer_tests.py)."""\n',
    "lightly/loss/__init__.py": (
        "from .dcl_loss import DCLLoss, DCLWLoss\nfrom .ntx_ent_loss import NTXentLoss\n\n"
        '__all__ = ["DCLLoss", "DCLWLoss", "NTXentLoss"]\n'),
    "lightly/loss/ntx_ent_loss.py": (
        "import fastcl.nn\nfrom _fastcl_substitute import substitute\n\n"
        "NTXentLoss = substitute(fastcl.nn.NTXentLoss)\n"),
    "lightly/loss/dcl_loss.py": (
        "import fastcl.nn\nfrom _fastcl_substitute import substitute\n"
        "from fastcl.nn import negative_mises_fisher_weights\n\n"
        "DCLLoss = substitute(fastcl.nn.DCLLoss)\nDCLWLoss = substitute(fastcl.nn.DCLWLoss)\n"
        '__all__ = ["DCLLoss", "DCLWLoss", "negative_mises_fisher_weights"]\n'),
    "open_clip/__init__.py": '"""fastcl stand-in for open_clip (tools/peer_tests.py)."""\n',
    "open_clip/loss.py": (
        "import fastcl.nn\nfrom _fastcl_substitute import substitute\n\n"
        "ClipLoss = substitute(fastcl.nn.ClipLoss)\nSigLipLoss = substitute(fastcl.nn.SigLipLoss)\n"),
}


# --- running ---------------------------------------------------------------------------------

def git_show(repo: str, rev: str, path: str) -> str:
    return subprocess.run(["git", "-C", repo, "show", f"{rev}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def prepare(root: Path, peer: Peer, repo: str, rev: str) -> tuple[Path, str]:
    """The peer's files under ``root/<peer>``, fastcl's conftest beside them; returns the directory
    and the commit the files came from."""
    where = root / peer.name
    for rel in peer.tests + peer.support:
        target = where / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(git_show(repo, rev, rel))
    (where / "conftest.py").write_text(CONFTEST)
    (where / "pytest.ini").write_text("[pytest]\n")  # neither fastcl's settings nor the peer's
    commit = subprocess.run(["git", "-C", repo, "rev-parse", rev], check=True, capture_output=True,
                            text=True).stdout.strip()
    return where, commit


def run(where: Path, peer: Peer, backend: str, args, shims: Path) -> list[dict]:
    results = where / f"results-{backend}.jsonl"
    results.unlink(missing_ok=True)
    env = {**os.environ, **dict(peer.env), "FASTCL_PEER": peer.name, "FASTCL_PEER_BACKEND": backend,
           "FASTCL_PEER_UNSUPPORTED": args.unsupported, "FASTCL_PEER_RESULTS": str(results),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(shims), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(where / "pytest.ini"),
           "--rootdir", str(where), *peer.tests, *args.pytest_args]
    proc = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True)
    if not results.exists():  # pytest stopped before any test ran: show why
        sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{peer.name} on {backend}: pytest exited {proc.returncode} without running a test")
    return [json.loads(line) for line in results.read_text().splitlines()]


def report(backend: str, rows: dict[str, list[dict]], commits: dict[str, str]) -> int:
    """Print the table for one backend; returns the number of failures and errors."""
    counts = collections.defaultdict(collections.Counter)  # "peer@commit file" -> outcome counts
    reasons, fallbacks, failures = collections.Counter(), collections.Counter(), []
    for name, results in rows.items():
        for r in results:
            counts[f"{name}@{commits[name][:10]} {r['test'].split('::')[0]}"][r["outcome"]] += 1
            if r["outcome"] == "skipped":
                reasons[(name, r["reason"])] += 1
            elif r["outcome"] in ("failed", "error"):
                failures.append(f"{name}: {r['test']}: {r['reason']}")
            for f in r["fallbacks"]:
                fallbacks[(name, f)] += 1
    counts["total"] = sum(counts.values(), collections.Counter())
    width = max(map(len, counts))
    header = f"{'backend=' + backend:<{width}} {'passed':>7} {'failed':>7} {'skipped':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for label, c in counts.items():
        print(f"{label:<{width}} {c['passed']:>7} {c['failed'] + c['error']:>7} {c['skipped']:>8}")
    for (name, reason), n in sorted(reasons.items()):
        print(f"  skipped {n:>4}  {name}: {reason}")
    for (_name, f), n in sorted(fallbacks.items()):
        print(f"  {n:>4} tests built pytorch-metric-learning's own class for: {f}")
    for line in failures:
        print(f"  FAILED {line}")
    return counts["total"]["failed"] + counts["total"]["error"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu,chunked",
                        help="comma-separated fastcl backends (default: %(default)s)")
    for peer in PEERS:
        parser.add_argument(f"--{peer.flag}", metavar="REPO", default=peer.mirror,
                            help=f"{peer.name}'s git repository, bare or not (default: %(default)s)")
    parser.add_argument("--rev", help="revision to take every peer's tests from (default: each peer's own: HEAD, "
                                      "lightly's PR #2021)")
    parser.add_argument("--only", help="comma-separated peers to run (default: all)")
    parser.add_argument("--unsupported", choices=("skip", "peer"), default="skip",
                        help="a test that needs what fastcl lacks is skipped, or uses pytorch-metric-learning's "
                             "own class for that construction (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("pytest_mock") is None:
        raise SystemExit("lightly's tests need pytest-mock: pip install pytest-mock")
    peers = [p for p in PEERS if not args.only or p.name in args.only.split(",")]
    root = Path(tempfile.mkdtemp(prefix="fastcl-peers-"))
    try:
        shims = root / "stand-ins"
        for rel, text in STAND_INS.items():
            (shims / rel).parent.mkdir(parents=True, exist_ok=True)
            (shims / rel).write_text(text)
        (shims / "_fastcl_substitute.py").write_text(SUBSTITUTE)
        prepared = {p.name: prepare(root, p, getattr(args, p.flag.replace("-", "_")), args.rev or p.rev)
                    for p in peers}
        commits = {name: commit for name, (_, commit) in prepared.items()}
        bad = 0
        for backend in args.backend.split(","):
            rows = {p.name: run(prepared[p.name][0], p, backend, args, shims) for p in peers}
            bad += report(backend, rows, commits)
    finally:
        if args.keep:
            print(f"\nfiles kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
