# Sourced by tools/open_clip_venv.sh and tools/late_interaction_venv.sh: the venv layer both make on
# the active test environment, and the line that reports what went into it.
#
#   layered_venv DEST   make DEST, a venv whose site-packages list the active environment's after
#                       their own (a .pth file); sets $torch (the environment's torch version) and
#                       $layer (DEST's site-packages). Nothing of the active environment is changed:
#                       pip does not remove packages outside its own venv.
#   layer_report NAME   check DEST kept that torch and print what the layer holds.

layered_venv() {
  dest=$1
  start=$SECONDS
  python -c 'import sys; assert sys.prefix != sys.base_prefix, "activate the test environment first"'
  local base
  base=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  torch=$(python -c 'import torch; print(torch.__version__)')
  python -m venv "$dest"
  layer=$("$dest/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir, not a bare path: the base environment's own .pth files (editable installs) apply too
  echo "import site; site.addsitedir('$base')" > "$layer/_fastcl_base_environment.pth"
}

layer_report() {
  "$dest/bin/python" -c 'import torch; assert torch.__version__ == "'"$torch"'", torch.__version__'
  echo "$1: $dest on torch $torch in $((SECONDS - start)) s: $("$dest/bin/python" -m pip list \
    --path "$layer" --format freeze 2>/dev/null | grep -v '^pip=\|^setuptools=' | tr '\n' ' ')"
}
