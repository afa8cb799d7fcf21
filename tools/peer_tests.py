"""Run lightly's, pytorch-metric-learning's, open_clip's and sentence-transformers' own loss tests
against fastcl's drop-ins.

    python tools/peer_tests.py                                  # cpu and chunked, the default mirrors
    python tools/peer_tests.py --backend chunked --pml ~/src/pytorch-metric-learning
    python tools/peer_tests.py --unsupported peer -- -x         # extra pytest arguments after --
    python tools/peer_tests.py --only sentence-transformers --stock   # the peer's own classes: the baseline

The peers' test files are not fastcl's to ship: this script copies them out of each peer's git
repository (``git show <rev>:<path>``; a bare mirror or a clone) into a temporary directory and
runs pytest there, one process per peer and backend, with fastcl's classes in their place:

- lightly and open_clip are not installed (their packages import torchvision, timm and more, whose
  wheels would replace the CPU torch): a stand-in package of the same name, first on ``sys.path``,
  holds only the names the tests import, each fastcl's drop-in on the chosen backend.
- pytorch-metric-learning is installed (fastcl's tests use it): its ``NTXentLoss`` and
  ``SupConLoss`` are replaced in ``pytorch_metric_learning.losses``, so its wrappers
  (``SelfSupervisedLoss``, ``CrossBatchMemory``) and its other losses stay its own.
- sentence-transformers is installed (requirements/dev.txt): fastcl.integrations.sentence_transformers'
  five classes replace its own in ``sentence_transformers.sentence_transformer.losses`` (and the
  modules defining them) as subclasses taking ``backend=``; its other losses, and its subclasses of
  the five (the symmetric MNRL shims), stay its own. The nine loss test files that build one of them
  run offline (``HF_HUB_OFFLINE=1``): the fixtures that download a model get a tiny random one of
  the same shapes instead (tools/peer_fixtures_sentence_transformers.py, written as the nearer
  conftest). A fastcl refusal (``NotImplementedError``, also in ``forward``) counts as unsupported,
  and so does a ``MatryoshkaLoss`` around a loss fastcl does not replace. On 2026-12-05, the
  repository's cad211983f (6.1.0.dev0; the PyPI sdist has no loss tests) against 6.3.0, cpu and
  chunked alike: 101 passed, 19 failed, 29 skipped (``--stock``: 141, 6, 2). The failures that
  cannot pass: 5 fail stock too (3 download distilbert themselves; 2 are of the snapshot's
  mixed-modality batching, not 6.3.0's); 14 test sentence-transformers' implementation rather than
  the loss: 10 build the object with ``Class.__new__`` and set its attributes by hand, then call its
  ``calculate_loss`` or ``forward``; 3 call its gradcache mixin's ``embed_minibatch``; 1 checks
  what that mixin's hook holds. Skipped: Matryoshka around other losses (14), ``mini_batch_num_tokens``
  (7), ``hardness_strength > 0`` (6), MPS (2). The run, by test:
  bench/results/2026-12-05-peer-tests-sentence-transformers.txt. Also tests/multi_vector_encoder/
  losses/test_misc.py, with fastcl's three multi-vector classes substituted in
  ``sentence_transformers.multi_vector_encoder.losses`` (2026-12-06, that file alone, cpu): 17 passed,
  26 failed, 2 skipped (``--stock``: 17, 28, 0); none fails here that passes stock. The snapshot's stub
  models lack what 6.3.0 reads (``similarity``, ``similarity_fn_name``); given those (an experiment,
  not kept), the two that fail here only fake a 2-rank gather by patching the peer's own
  ``all_gather_padded`` and ``get_world_size``, which fastcl's losses do not call.

A test that reaches a feature fastcl does not implement (``UnsupportedFeatureError``, listed in the
README) is reported as skipped with that reason. ``--unsupported peer`` builds pytorch-metric-learning's
own class in that case instead and counts the test normally, listing the fallbacks: the rest of such
a test then still checks fastcl. Needs pytest-mock (lightly's tests use its ``mocker``).
Prints a pass/fail/skip table per backend with every skip and failure reason (for
sentence-transformers also how many tests built a fastcl class); exits 1 on a failure.
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
    ours: tuple[tuple[str, str], ...] = ()  # (path among the peer's files, a file of tools/ written there)


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
    # sentence-transformers' loss tests that build one of the five classes fastcl replaces (or wrap
    # MNRL: AdaptiveLayerLoss, MegaBatchMarginLoss's comparisons); its Hub fixtures are replaced by
    # tiny random models (tools/peer_fixtures_sentence_transformers.py), and nothing is downloaded.
    Peer("sentence-transformers", "sentence-transformers", "/work/.mirror/huggingface+sentence-transformers/repo",
         tuple(f"tests/sentence_transformer/losses/test_{name}.py" for name in (
             "cmnrl", "cached_mnsrl", "gist_embed", "cached_gist_embed", "matryoshka", "gradcache",
             "merged_forward", "adaptive_layer", "mega_batch_margin"))
         + ("tests/multi_vector_encoder/losses/test_misc.py",),
         ("tests/__init__.py", "tests/conftest.py", "tests/utils.py", "tests/sentence_transformer/__init__.py",
          "tests/sentence_transformer/losses/__init__.py", "tests/sentence_transformer/losses/utils.py",
          "tests/multi_vector_encoder/__init__.py", "tests/multi_vector_encoder/losses/__init__.py"),
         (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")),
         ours=(("tests/sentence_transformer/conftest.py", "peer_fixtures_sentence_transformers.py"),)),
)

# --- what goes into the temporary directory (fastcl's code, not the peers') ---------------------

SUBSTITUTE = '''\
"""fastcl's drop-ins in place of the peers' classes (written by tools/peer_tests.py)."""
import contextlib
import os

from fastcl.nn import UnsupportedFeatureError

BACKEND = os.environ["FASTCL_PEER_BACKEND"]
FALL_BACK = os.environ.get("FASTCL_PEER_UNSUPPORTED") == "peer"
FALLBACKS = []  # this test's constructions that went to the peer's own class
BUILT = []  # this test's constructions of fastcl's classes (sentence-transformers: names only)


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


@contextlib.contextmanager
def refusal_as_unsupported(name):
    try:
        yield
    except UnsupportedFeatureError:
        raise
    except NotImplementedError as e:  # fastcl.integrations.sentence_transformers' refusals
        raise UnsupportedFeatureError(f"{name}: {e}") from e


ST_NAMES = ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss", "GISTEmbedLoss",
            "CachedGISTEmbedLoss", "MatryoshkaLoss")
ST_MV_NAMES = ("MultiVectorMultipleNegativesRankingLoss", "CachedMultiVectorMultipleNegativesRankingLoss",
               "MultiVectorMatryoshkaLoss")  # in sentence_transformers.multi_vector_encoder.losses


def replace_sentence_transformers():
    """fastcl's classes in sentence_transformers.sentence_transformer.losses and the modules defining
    them, as subclasses (the peer's tests call ``Class.__new__(Class)`` and read class attributes)
    that take BACKEND and report fastcl's refusals (NotImplementedError; a MatryoshkaLoss around a
    loss fastcl does not replace) as unsupported. The peer's own subclasses (the symmetric MNRL
    shims) and its other losses stay its own."""
    import importlib

    import sentence_transformers.multi_vector_encoder.losses as mv_losses
    import sentence_transformers.sentence_transformer.losses as losses

    from fastcl.integrations import sentence_transformers as ours

    wrapped = {"MatryoshkaLoss": ours._FASTCL_LOSSES,
               "MultiVectorMatryoshkaLoss": (ours.MultiVectorMultipleNegativesRankingLoss,
                                             ours.CachedMultiVectorMultipleNegativesRankingLoss)}

    def subclass(name):
        base = getattr(ours, name)

        def __init__(self, *args, **kwargs):
            if name in wrapped:
                loss = kwargs.get("loss", args[1] if len(args) > 1 else None)
                if not isinstance(loss, wrapped[name]):
                    raise UnsupportedFeatureError(f"{name} around {type(loss).__name__}")
            else:
                kwargs["backend"] = BACKEND
            BUILT.append(name)
            with refusal_as_unsupported(name):
                base.__init__(self, *args, **kwargs)

        def forward(self, *args, **kwargs):  # refusals that depend on the data (GIST's guide)
            with refusal_as_unsupported(name):
                return base.forward(self, *args, **kwargs)

        return type(name, (base,), {"__init__": __init__, "forward": forward, "__module__": base.__module__})

    for namespace, names in ((losses, ST_NAMES), (mv_losses, ST_MV_NAMES)):
        for name in names:
            original, replacement = getattr(namespace, name), subclass(name)
            setattr(namespace, name, replacement)
            setattr(importlib.import_module(original.__module__), name, replacement)
'''

CONFTEST = '''\
"""Substitutes fastcl's drop-ins, turns UnsupportedFeatureError into a skip and records every
outcome (written by tools/peer_tests.py)."""
import json
import os

import pytest

import _fastcl_substitute as sub

if os.environ.get("FASTCL_PEER_STOCK"):
    pass  # --stock: the installed peer's own classes
elif os.environ["FASTCL_PEER"] == "pytorch-metric-learning":
    sub.replace_pytorch_metric_learning()
elif os.environ["FASTCL_PEER"] == "sentence-transformers":
    sub.replace_sentence_transformers()

RESULTS = os.environ["FASTCL_PEER_RESULTS"]


def pytest_runtest_setup(item):
    sub.FALLBACKS.clear()
    sub.BUILT.clear()


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
                                "fallbacks": sorted(set(sub.FALLBACKS)), "built": sorted(set(sub.BUILT))}) + "\\n")
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
    for rel, ours in peer.ours:
        (where / rel).write_text((Path(__file__).parent / ours).read_text())
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
           **({"FASTCL_PEER_STOCK": "1"} if args.stock else {}),
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
    built = collections.defaultdict(collections.Counter)  # peer -> outcome counts of tests that built ours
    for name, results in rows.items():
        for r in results:
            counts[f"{name}@{commits[name][:10]} {r['test'].split('::')[0]}"][r["outcome"]] += 1
            if r.get("built"):
                built[name][r["outcome"]] += 1
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
    for name, c in built.items():  # sentence-transformers': its files also test its other losses
        print(f"  {name}: {sum(c.values())} tests built fastcl's classes: {c['passed']} passed, "
              f"{c['failed'] + c['error']} failed, {c['skipped']} skipped")
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
    parser.add_argument("--stock", action="store_true",
                        help="run the installed peers' own classes (pytorch-metric-learning, sentence-transformers: "
                             "the baseline, what fails without fastcl)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("pytest_mock") is None:
        raise SystemExit("lightly's tests need pytest-mock: pip install pytest-mock")
    peers = [p for p in PEERS if not args.only or p.name in args.only.split(",")]
    if args.stock and (stand_ins := [p.name for p in peers if p.name in ("lightly", "open_clip")]):
        raise SystemExit(f"--stock: {', '.join(stand_ins)} run through stand-in packages only (--only to leave out)")
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
