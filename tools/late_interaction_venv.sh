#!/usr/bin/env bash
# Make the virtual environment tests/test_late_interaction_packages.py runs PyLate's and
# colpali-engine's own losses in (default .venv-late-interaction at the repository root; the test
# looks there, or at $FASTCL_LATE_INTERACTION_PYTHON):
#
#   . .venv/bin/activate && tools/late_interaction_venv.sh [DIR]   # 12 s on a busy 2-core machine, 11 MB of wheels
#
# Neither installs into the test environment: PyLate 1.6.0 pins sentence-transformers 5.3.0 (the test
# environment has 6.x, and pip's resolver otherwise falls back to PyLate 1.0.0, which does not import
# with it), and colpali-engine needs torchvision, whose PyPI wheels carry CUDA ops that do not load
# against a CPU torch (see tools/open_clip_venv.sh). As that script does, this one makes a venv whose
# site-packages list the active environment's after their own (a .pth file), so the layer's
# sentence-transformers wins over the base's, and installs only what the base lacks: colpali-engine with
# its dependencies and the test environment's torch pinned (requirements/colpali.txt), then PyLate and
# sentence-transformers 5.3.0 without theirs (requirements/pylate.txt says why). Nothing of the active
# environment is changed: pip does not remove packages outside its own venv.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/layered_venv.sh
layered_venv "${1:-.venv-late-interaction}"
"$dest/bin/python" -m pip install -q -c <(echo "torch==$torch") -r requirements/colpali.txt
"$dest/bin/python" -m pip install -q --no-deps -r requirements/pylate.txt
layer_report tools/late_interaction_venv.sh
