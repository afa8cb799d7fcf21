#!/usr/bin/env bash
# Make the virtual environment tests/test_open_clip_train.py runs open_clip_train in (default
# .venv-open-clip at the repository root; the test looks there, or at $FASTCL_OPEN_CLIP_PYTHON):
#
#   . .venv/bin/activate && tools/open_clip_venv.sh [DIR]      # 28 s on a busy 2-core machine, 12 MB of wheels
#
# open_clip needs torchvision, and PyPI's torchvision wheels are built against PyPI's CUDA torch: its
# compiled ops (_C.so) link libtorch_cuda.so and do not load against a CPU torch. torchvision imports
# without them except for two fake-kernel registrations (tests/open_clip_train_run.py supplies their
# schemas), but other packages of the test environment look for torchvision when it is installed
# (transformers' image processing), so it goes in a layer of its own: a venv whose site-packages
# list the active environment's after their own (a .pth file), with only what that one lacks.
# Nothing of the active environment is changed: pip does not remove packages outside its own venv.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/layered_venv.sh
layered_venv "${1:-.venv-open-clip}"
"$dest/bin/python" -m pip install -q -c <(echo "torch==$torch") -r requirements/open-clip.txt
layer_report tools/open_clip_venv.sh
