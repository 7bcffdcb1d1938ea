#!/usr/bin/env bash
# Sets up the ORIGINAL PyTorch HRDecoder (public GitHub repository CVIU-CSU/HRDecoder) on a CPU-only machine,
# for the tools of launch/reference/ (fixture export, timing, same-recipe training). Development only: the
# package never imports the original or anything made here.
#
#   git clone https://github.com/CVIU-CSU/HRDecoder SRC          # or any clone / bare mirror of it
#   bash launch/reference/setup_original.sh SRC                  # idempotent: a second run only re-checks
#   FORCE=1 bash launch/reference/setup_original.sh SRC          # rebuild the environment from scratch
#
# SRC may also be given as HRD_ORIGINAL_SOURCE, and may be a git URL (then it is cloned bare into the
# destination). Everything goes into one folder, HRD_ORIGINAL (default: <system temp dir>/hrdecoder-original):
#   src/    the repository's files at HRD_ORIGINAL_COMMIT (default: the commit every fixture was made with);
#           exported afresh on every run, never edited
#   venv/   Python 3.11 environment: CPU torch 2.13.0, mmcv 1.7.1 without compiled ops, mmengine 0.10.3,
#           numpy < 2 and the other packages the original imports, each pinned
#   stubs/  two stand-ins, found only after everything installed (see step 3)
# The tools find that folder through HRD_ORIGINAL (or their --original flag) and run with venv/bin/python.
set -euo pipefail

COMMIT_PINNED=cfc6c88d82cd3a4ae3f0744e8133848054c68b69
TMPROOT=$(dirname "$(mktemp -u)")      # the system temp dir ($TMPDIR or its default)
SOURCE=${1:-${HRD_ORIGINAL_SOURCE:-}}
DEST=${HRD_ORIGINAL:-$TMPROOT/hrdecoder-original}
COMMIT=${HRD_ORIGINAL_COMMIT:-$COMMIT_PINNED}
PY=${PYTHON:-python3}
# On this project's machines `torch==2.13.0` resolves to the CPU wheel kept on the local disk. Elsewhere,
# point TORCH_SPEC at a CPU-only wheel of torch 2.13.0 (a file or a pinned requirement); never leave torch
# unpinned, which would pull a multi-GB CUDA build and a version the fixtures were not made with.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
FORCE=${FORCE:-0}
SETUP_VERSION=1   # raise when the pins below change: the next run rebuilds venv/

if [ -z "$SOURCE" ]; then
  echo "usage: setup_original.sh SRC   (SRC: a clone, a bare mirror or the URL of CVIU-CSU/HRDecoder)" >&2
  exit 2
fi
mkdir -p "$DEST"

# ------------------------------------------------------------------ 1. the repository at the pinned commit
if [ -d "$SOURCE" ]; then
  GITDIR=$SOURCE
else                                   # a URL: keep a bare clone beside the rest, refreshed on each run
  GITDIR=$DEST/mirror.git
  if [ -d "$GITDIR" ]; then git -C "$GITDIR" fetch --quiet origin; else git clone --quiet --bare "$SOURCE" "$GITDIR"; fi
fi
if ! git -C "$GITDIR" cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
  echo "commit $COMMIT is not in $SOURCE (fetch it, or set HRD_ORIGINAL_COMMIT)" >&2
  exit 1
fi
rm -rf "$DEST/src.new"
mkdir -p "$DEST/src.new"
git -C "$GITDIR" archive "$COMMIT" | tar -x -C "$DEST/src.new"
rm -rf "$DEST/src"
mv "$DEST/src.new" "$DEST/src"
echo "$COMMIT" > "$DEST/src/.commit"
echo "original at $COMMIT -> $DEST/src"

# ------------------------------------------------------------------ 2. the environment
VENV=$DEST/venv
STAMP=$VENV/.setup_original_v$SETUP_VERSION
if [ "$FORCE" != 1 ] && [ -f "$STAMP" ] && "$VENV/bin/python" -c 'import torch, mmcv, mmengine' 2>/dev/null; then
  echo "environment $VENV is set up already"
else
  rm -rf "$VENV"
  "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 needed (torch 2.13.0 CPU wheel, cp311)"'
  "$PY" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install --quiet)
  "${PIP[@]}" "$TORCH_SPEC"
  # mmcv 1.7.1 comes as source only; its setup.py imports pkg_resources, which setuptools 70+ no longer ships
  # in a usable form, so build it against this setuptools and without build isolation.
  "${PIP[@]}" setuptools==69.5.1 wheel==0.48.0
  # What the original imports at run time, pinned to the versions every fixture was made with. numpy < 2:
  # mmcv 1.x and the mmseg 0.16 fork predate numpy 2. OpenCV: the headless 4.x build (no GUI libraries).
  "${PIP[@]}" numpy==1.26.4 opencv-python-headless==4.9.0.80 scipy==1.17.1 scikit-learn==1.9.1 \
    addict==2.4.0 PyYAML==6.0.4 yapf==0.40.1 platformdirs==4.14.8 tomli==2.5.0 importlib_metadata==10.2.0 \
    zipp==4.1.2 packaging==26.4 pillow==13.0.0 matplotlib==3.11.2 rich==15.0.0 termcolor==3.3.0 \
    prettytable==3.18.0 terminaltables==3.1.10
  # mmcv "lite": MMCV_WITH_OPS=0 skips the C++/CUDA operators (the HRDecoder models use none of them).
  # --no-deps: its metadata asks for opencv-python, which would bring OpenCV 5 and numpy 2.
  MMCV_WITH_OPS=0 "${PIP[@]}" --no-deps --no-build-isolation mmcv==1.7.1
  # The fork's HRNet imports mmengine.model.BaseModule; 0.10.3 is the version its requirements name.
  # --no-deps: mmengine's own dependencies are among the pins above.
  "${PIP[@]}" --no-deps mmengine==0.10.3
  touch "$STAMP"
fi

# ------------------------------------------------------------------ 3. stand-ins for two unused imports
# The tools append stubs/ to the END of sys.path, so a real installed module always wins over its stand-in.
#  * torchvision: mmcv/runner/checkpoint.py runs `import torchvision` when mmcv.runner is imported, only to
#    resolve `torchvision://` checkpoint names; nothing here loads such a checkpoint. A real torchvision
#    must be the build paired with this exact torch wheel (CPU 2.13.0); the stand-in avoids that dependency.
#  * tkinter: the fork's mmseg/core/evaluation/lesion_metric.py runs `from tkinter import Label` and never
#    uses it; Python builds without Tk (many servers, slim containers) have no tkinter.
STUBS=$DEST/stubs
mkdir -p "$STUBS/torchvision/models" "$STUBS/tkinter"
cat > "$STUBS/torchvision/__init__.py" <<'EOF'
"""Stand-in for torchvision: mmcv.runner imports it at load time; only torchvision:// checkpoints use it."""
__version__ = "0.0.0+stand-in"
EOF
echo '"""Stand-in: mmcv.runner.checkpoint lists this package when resolving torchvision:// names."""' \
  > "$STUBS/torchvision/models/__init__.py"
cat > "$STUBS/tkinter/__init__.py" <<'EOF'
"""Stand-in for tkinter: the original's lesion_metric.py imports Label and never uses it."""
Label = None
EOF

# ------------------------------------------------------------------ 4. the original imports and builds
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$VENV/bin/python" "$HERE/original.py" --original "$DEST" check
echo "ready: HRD_ORIGINAL=$DEST $VENV/bin/python $HERE/original.py --help"
