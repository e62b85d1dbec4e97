#!/usr/bin/env bash
# The GPU run in one command: on whatever device is here, (1) the device test subset,
# (2) training throughput of configs/base.yaml and configs/deepseek-v3-mini.yaml at the
# seed's batch and at one that fills the device, eager and compiled, with MFU against the
# matmul peak measured here, beside transformers' DeepseekV3ForCausalLM, (3) a timed real
# training run on the staged TinyStories text scored on held-out text, (4) decoding
# tokens/s at batch 1, 8, 64 and speculative against plain; JSON per stage and a summary
# under --out. Each stage has its share of --minutes and runs as its own process: one
# that fails or runs out of time is recorded and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() {
  cat <<'USAGE'
usage: bash scripts/gpu_check.sh --out DIR [--small] [--minutes N] [--data DIR] [--work DIR]
       bash scripts/gpu_check.sh --stage [--from DIR]

  --out DIR      folder for tests.json, throughput.json, train.json, decode.json,
                 summary.json, summary.txt and log.txt (created)
  --minutes N    the whole run's time budget (default 9); the stages share it:
                 tests 20%, throughput 33%, train 22%, decode 10%
  --small        CPU-sized models and a few tests, seconds a stage (what CI runs)
  --data DIR     staged text (train.txt, heldout.txt); default: .gpu-stage/data
  --work DIR     scratch for the training run and caches (default: a temporary folder;
                 kept out of --out, whose files come back from the GPU machine)
  --stage        build .gpu-stage/ here (the TinyStories sample split into train and
                 held-out text, the SmolLM2 tokenizer) and exit; carry .gpu-stage
  --from DIR     --stage: the TinyStories folder (default ../shared/data/tinystories)
  -h, --help     this text
USAGE
}

OUT="" SMALL=0 MINUTES=9 DATA="" WORK="" STAGE=0 FROM="../shared/data/tinystories"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --minutes) MINUTES=$2; shift 2 ;;
    --small) SMALL=1; shift ;;
    --data) DATA=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --stage) STAGE=1; shift ;;
    --from) FROM=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
export PYTHONPATH="$ROOT/src:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$STAGE" = 1 ]; then
  exec "$PYTHON" "$ROOT/scripts/gpu_stage.py" --from "$FROM" --to "$ROOT/.gpu-stage"
fi
if [ -z "$OUT" ]; then echo "gpu_check.sh: --out DIR is required (see --help)" >&2; exit 2; fi
case "$MINUTES" in ''|*[!0-9.]*) echo "gpu_check.sh: --minutes takes a number" >&2; exit 2 ;; esac

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "$WORK" ]; then WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX"); fi
mkdir -p "$WORK"
if [ -z "$DATA" ] && [ -d "$ROOT/.gpu-stage/data" ]; then DATA="$ROOT/.gpu-stage/data"; fi
LOG="$OUT/log.txt"
: >"$LOG"
: >"$WORK/status.jsonl"

TOTAL=$("$PYTHON" -c "print(int(float('$MINUTES') * 60))")
share() { "$PYTHON" -c "print(max(int($TOTAL * $1), $2))"; }
SMALL_FLAG=()
if [ "$SMALL" = 1 ]; then SMALL_FLAG=(--small); fi

{
  echo "gpu_check: $(date -u +%FT%TZ), budget ${TOTAL} s, out $OUT, work $WORK, data ${DATA:-none}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null \
    || echo "no nvidia-smi: CPU run"
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} >>"$LOG" 2>&1

# run_stage NAME SECONDS ARGS...: the stage in its own process, killed 30 s past its
# share; its exit status and time go to status.jsonl whatever happens.
run_stage() {
  local name=$1 seconds=$2; shift 2
  local start end code
  start=$(date +%s)
  echo "=== stage $name (${seconds} s)" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=15 $((seconds + 30)) \
    "$PYTHON" "$ROOT/benchmarks/training/gpu_check.py" "$name" --out "$OUT" --work "$WORK" \
    --seconds "$seconds" "${SMALL_FLAG[@]}" "$@" >>"$LOG" 2>&1
  code=$?
  end=$(date +%s)
  echo "{\"stage\": \"$name\", \"exit_code\": $code, \"seconds\": $((end - start)), \"budget_s\": $seconds}" \
    >>"$WORK/status.jsonl"
  echo "    exit $code after $((end - start)) s" | tee -a "$LOG"
}

if [ "$SMALL" = 1 ]; then
  # tiny tensors: a second thread only waits on a busy CI machine
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  run_stage tests "$(share 0.15 60)"
  run_stage throughput "$(share 0.35 20)" --step-seconds 0.2 --fill-cap 8
  run_stage train "$(share 0.25 20)" --score-seconds 10
  run_stage decode "$(share 0.12 10)" --new-tokens 8 --repeats 1
else
  run_stage tests "$(share 0.20 60)"
  run_stage throughput "$(share 0.33 60)"
  run_stage train "$(share 0.22 60)" ${DATA:+--data "$DATA"}
  run_stage decode "$(share 0.10 30)"
fi
"$PYTHON" "$ROOT/benchmarks/training/gpu_check.py" summary --out "$OUT" --work "$WORK" \
  "${SMALL_FLAG[@]}" 2>>"$LOG"
