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
python -m pip check
puzzle --version
