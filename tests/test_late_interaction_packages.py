"""fastcl.integrations.pylate and .colpali against the released PyLate and colpali-engine classes
themselves: loss and gradients, float64 (both originals run in it) and a few float32 cases.

The packages run in the environment ``tools/late_interaction_venv.sh`` makes (.ci/run makes it before
the tests; PyLate 1.6.0 on sentence-transformers 5.3.0, colpali-engine 0.3.18 with torchvision and
peft; neither installs into the test environment, that script says why); the test looks at
``$FASTCL_LATE_INTERACTION_PYTHON``, else ``.venv-late-interaction`` at the repository root, and is
skipped, saying how to make it, where neither is. One process of ``tests/late_interaction_run.py``
computes every case, the original's result and fastcl's on each CPU backend (that file lists the
cases); this file compares them. tests/test_integrations_late_interaction.py keeps the restated
formulas, which run everywhere, and the checks that need no original.
"""
from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import fastcl
from tolerances import assert_close, tol

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(os.environ.get("FASTCL_LATE_INTERACTION_PYTHON",
                             ROOT / ".venv-late-interaction" / "bin" / "python"))
pytestmark = pytest.mark.skipif(not PYTHON.exists(), reason=f"no PyLate / colpali-engine environment at {PYTHON}: "
                                "make it with tools/late_interaction_venv.sh (or set FASTCL_LATE_INTERACTION_PYTHON)")

COLPALI = ["ColbertLoss", "ColbertPairwiseCELoss", "ColbertSigmoidLoss", "ColbertNegativeCELoss",
           "ColbertPairwiseNegativeCELoss"]
PYLATE = ["Contrastive", "CachedContrastive"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("late_interaction") / "result.pt"
    # the fastcl this test imported: a source tree's goes first on the path; an installed one (CI) is in
    # the test environment's site-packages, which the layer already lists after its own. Put first, that
    # folder would hide the layer's sentence-transformers 5.x behind the environment's 6.x.
    here = Path(fastcl.__file__).resolve().parents[1]
    installed = here == Path(sysconfig.get_paths()["purelib"]).resolve()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (None if installed else str(here), os.environ.get("PYTHONPATH"))
                                         if p)}
    proc = subprocess.run([str(PYTHON), str(ROOT / "tests" / "late_interaction_run.py"), str(path)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, f"tests/late_interaction_run.py exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return torch.load(path, weights_only=True)


def cases(result, prefix):
    found = {key: case for key, case in result["cases"].items() if key.startswith(prefix + " ")}
    assert found, f"no case for {prefix}"
    return found


def tolerance(key):
    return tol("peer") if key.endswith("float64") else tol("peer package float32", torch.float32)


def assert_same(got, want, key, what):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert loss.dtype == ref_loss.dtype, f"{key} ({what}): loss dtype {loss.dtype} vs {ref_loss.dtype}"
    assert_close(loss, ref_loss, tolerance(key), f"{key} ({what}): loss")
    assert_close(grads, ref_grads, tolerance(key), f"{key} ({what}): gradients")


def test_the_originals_ran_from_their_environment(result):
    assert result["versions"]["pylate"] == "1.6.0" and result["versions"]["colpali-engine"] == "0.3.18"
    assert result["versions"]["sentence-transformers"].startswith("5.")  # the layer's, not the test environment's
    layer = str(PYTHON.parents[1])
    for name in ("pylate", "colpali", "sentence_transformers"):
        assert result["files"][name].startswith(layer), (name, result["files"][name], layer)
    assert result["files"]["fastcl"] == fastcl.__file__  # the one under test
    assert result["versions"]["torch"] == torch.__version__
    assert result["backends"] == fastcl.backends("cpu", torch.float64, op="maxsim")


@pytest.mark.parametrize("name", COLPALI)
def test_colpali_losses_equal_colpali_engine(result, name):
    found = cases(result, f"colpali {name}")
    # normalised or raw, filtered or not, offsets 0 and 2 (the sigmoid loss: 0), float64; one float32
    assert len(found) == (4 if name == "ColbertSigmoidLoss" else 8) + 1
    for key, case in found.items():
        for backend, got in case["fastcl"].items():
            assert_same(got, case["stock"], key, backend)


@pytest.mark.parametrize("name", PYLATE)
def test_pylate_losses_equal_pylate(result, name):
    """Equal, except one thing fastcl does not copy: PyLate 1.6.0's ``CachedContrastive`` with
    ``size_average=True`` returns the mean but backpropagates ``B`` times its gradient (each chunk's
    summed cross-entropy is backpropagated before the division by ``B``); its gradients are checked
    to be exactly ``B`` times fastcl's, so a fix in PyLate shows up here."""
    found = cases(result, f"pylate {name}")
    assert len(found) == 8 + 1  # query mask or expansion, mean or sum, 2 or 3 columns, float64; one float32
    for key, case in found.items():
        want = case["stock"]
        scaled = name == "CachedContrastive" and " mean " in key
        for backend, (loss, grads) in case["fastcl"].items():
            if scaled:
                grads = [g * case["batch"] for g in grads]
            what = f"{backend}, gradients times B = {case['batch']}" if scaled else backend
            assert_same((loss, grads), want, key, what)
        if scaled:
            with pytest.raises(AssertionError):  # ... and not equal to fastcl's own
                assert_close(case["fastcl"]["reference"][1], want[1], tolerance(key))


def test_pylate_query_mask_and_expansion_differ(result):
    """The inputs reach what the options change: padded queries score differently with PyLate's query
    mask than with query expansion (no mask), in PyLate itself."""
    for name in PYLATE:
        masked = result["cases"][f"pylate {name} query-mask mean 3-columns float64"]["stock"][0]
        expanded = result["cases"][f"pylate {name} query-expansion mean 3-columns float64"]["stock"][0]
        assert abs(masked.item() - expanded.item()) > 1e-3, (name, masked, expanded)


def test_colpali_options_change_the_originals_loss(result):
    """Filtering, normalisation and the offset each change colpali's own loss on these inputs."""
    for name in COLPALI:
        base = result["cases"][f"colpali {name} normalized offset0 float64"]["stock"][0].item()
        for other in ("normalized filtered offset0", "raw offset0", "normalized offset2"):
            key = f"colpali {name} {other} float64"
            if key in result["cases"]:
                assert abs(result["cases"][key]["stock"][0].item() - base) > 1e-3, key


def test_a_perturbed_temperature_breaks_every_comparison(result):
    """Each family's check can fail: the original with its temperature 1% off is not within the
    tolerance of fastcl's (nor of itself at the right temperature)."""
    perturbed = {key: case for key, case in result["cases"].items() if "perturbed" in case}
    assert {key.split()[1] for key in perturbed} == set(COLPALI + PYLATE)
    for key, case in perturbed.items():
        with pytest.raises(AssertionError):
            assert_same(case["fastcl"]["reference"], case["perturbed"], key, "perturbed")
        with pytest.raises(AssertionError):
            assert_close(case["perturbed"][1], case["stock"][1], tolerance(key))
