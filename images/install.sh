#!/bin/sh
# Build the puzzle wheel from a source tree and install it: the one install command both images
# (Dockerfile.gpu, Dockerfile.cpu) run, so the GPU and CPU steps run the same package the same way.
#
#   sh images/install.sh [SOURCE_DIR]        (default: the current directory)
#
# PIP_EXTRA_INDEX_URL / PIP_INDEX_URL are honoured by pip itself; the CPU image uses them to take the
# CPU-only torch wheel instead of the CUDA one. The wheel is built in a temporary directory and removed.
set -eu

src="${1:-.}"
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT

python -m pip wheel --no-deps --wheel-dir "$wheels" "$src"
python -m pip install --no-cache-dir "$wheels"/puzzle_k8s-*.whl
# Our own requirements must be met. Other packages' conflicts on a shared machine (CI's image ships
# some) are not ours to fail on, so only lines about this package count.
if python -m pip check 2>&1 | grep -i '^puzzle-k8s '; then
  echo "install.sh: puzzle-k8s's requirements are not met (above)" >&2
  exit 1
fi
puzzle --version
