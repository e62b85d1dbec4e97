#!/usr/bin/env bash
# Install torch for this machine, into the active environment, and say which build:
# - an NVIDIA GPU (nvidia-smi lists one): PyPI's default build, which on Linux is CUDA's;
# - otherwise, on Linux: the CPU build from PyTorch's CPU wheel index, which is a few
#   hundred MB where PyPI's default is the multi-GB CUDA build, falling back to the default
#   index when the CPU index cannot be reached (then pip takes what it finds: a CPU wheel
#   already on disk through find-links, or else PyPI's CUDA build);
# - elsewhere (macOS, Windows): PyPI's default build, which is the CPU one there.
# Used by scripts/quickstart.sh and .ci/run. TORCH_CPU_INDEX overrides the index (tests).
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

reachable() {  # the index answers within 10 seconds (pip itself would retry for minutes)
  python3 - "$1" <<'PY' >/dev/null 2>&1
import sys
import urllib.request

urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).close()
PY
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  echo "torch $TORCH_VERSION: an NVIDIA GPU is present, installing the default (CUDA) build"
  pip install -q "torch==$TORCH_VERSION"
elif [ "$(uname -s)" != Linux ]; then
  echo "torch $TORCH_VERSION: installing the default build (CPU-only on $(uname -s))"
  pip install -q "torch==$TORCH_VERSION"
elif reachable "$CPU_INDEX"; then
  echo "torch $TORCH_VERSION: no GPU found, installing the CPU build from $CPU_INDEX"
  pip install -q "torch==$TORCH_VERSION" --index-url "$CPU_INDEX"
else
  echo "torch $TORCH_VERSION: no GPU found, but $CPU_INDEX cannot be reached: installing" \
       "from the default index (a CPU wheel on disk where pip finds one, else the CUDA build)"
  pip install -q "torch==$TORCH_VERSION"
fi
