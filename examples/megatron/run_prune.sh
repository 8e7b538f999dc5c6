#!/usr/bin/env bash
# Prune experts for inference: keep, in each MoE layer, the experts a calibration set routes most tokens to.
#
#   bash examples/megatron/run_prune.sh CHECKPOINT OUT_DIR KEEP [BY] [flags...]
#
#   CHECKPOINT   a run folder, its checkpoints folder or one tag folder (any expert-parallel size)
#   OUT_DIR      the pruned run's folder (new): generate, evaluate, fine-tuning and export take it, and
#                training resumes from it (`run --config OUT_DIR/run_config.yaml` with a larger TRAIN_TOKENS)
#   KEEP         experts to keep per MoE layer: N, or N1,N2,... one per MoE layer (1: a dense layer)
#   BY           tokens (routed tokens, the default) | probability (router probability mass)
#   flags        passed on: --calibration PATH... (default: the run's validation split), --calibration-limit N,
#                --eval-data PATH...|none, --eval-limit N, --batch-size N, --threads N
#
# Prints the kept experts and their shares of tokens per layer, the parameters, validation loss and
# perplexity before and after; the same in OUT_DIR/pruning.json.
# Examples:
#   bash examples/megatron/run_prune.sh runs/demo/tiny-moe8 runs/demo/tiny-moe8-keep4 4
#   bash examples/megatron/run_prune.sh runs/mine runs/mine-pyramid 8,4,2 probability --calibration held.jsonl
set -euo pipefail

if [ $# -lt 3 ] || [[ $1 == -* ]] || [[ $2 == -* ]] || [[ $3 == -* ]]; then
    echo "error: usage: bash $0 CHECKPOINT OUT_DIR KEEP [BY] [flags...] (see the script's header)" >&2
    exit 2
fi
ARGS=("$1" "$2" --keep "$3")
shift 3
if [ $# -gt 0 ] && [[ $1 != -* ]]; then ARGS+=(--by "$1"); shift; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# Run from the caller's folder (relative paths keep their meaning) with the toolkit importable.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m launcher.prune "${ARGS[@]}" "$@"
