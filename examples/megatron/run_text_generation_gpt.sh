#!/usr/bin/env bash
# Generate from a trained GPT / GPT-MoE checkpoint with the tutorial's positional arguments:
#
#   bash examples/megatron/run_text_generation_gpt.sh \
#       CHECKPOINT_PATH MODEL_SIZE MOE SP BATCH_SIZE SEQ_LEN TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN \
#       INPUT_FILE OUTPUT_FILE TIME [--flag value ...]
#   e.g. bash examples/megatron/run_text_generation_gpt.sh runs/mine tiny 8 1 8 128 40 64 64 prompts.txt out.jsonl none
#
# INPUT_FILE: .txt (a prompt a line), .tsv (first column) or .jsonl (`prompt` or `text`); `none` writes
# BATCH_SIZE unconditional samples (--num-samples N for more). OUTPUT_FILE: jsonl with prompt, generation,
# tokens, finish_reason. TIME: `none`, or anything else to print latency and tokens/s. MODEL_SIZE and MOE must
# describe the checkpoint. The checkpoint loads into one process whatever its expert-parallel size; routing
# is dropless and deterministic. Sampling follows the tutorial (temperature 1, top-p off, TOP_K); flags after
# the 12th argument override it: --temperature 0.7 --top-p 0.9 --repetition-penalty 1.2 --stop "\n" --seed 3
# --threads 1 --device cuda. All of them: python -m launcher.generate --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m launcher.generate --positional "$@"
