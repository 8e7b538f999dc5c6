#!/usr/bin/env bash
# Evaluate a trained checkpoint: held-out loss and perplexity, zero-shot tasks, optionally lm-eval.
#
#   bash examples/megatron/run_evaluate.sh CHECKPOINT [DATA] [TASKS] [extra flags...]
#
#   CHECKPOINT   a run folder, its checkpoints folder or one tag folder (any expert-parallel size loads)
#   DATA         an indexed dataset prefix (its validation split), a text/jsonl file, 'run' (the run's own
#                data, the default) or 'none'
#   TASKS        comma-separated task .jsonl files, 'stdlib' (the project's own tasks, written into
#                data/tasks on first use), 'none', or 'auto' (default: stdlib when the run trained on the
#                embedded corpus)
#   extra flags  passed on: --limit N, --batch-size N, --threads N, --lm-eval, --data-split test, --split ...
#
# Results: a table on stdout, and merged into evaluation.json in the checkpoint's tag folder.
# Examples:
#   bash examples/megatron/run_evaluate.sh runs/demo/tiny-moe8
#   bash examples/megatron/run_evaluate.sh runs/mine data/mine_text_document stdlib,my_task.jsonl --lm-eval
set -euo pipefail

if [ $# -lt 1 ] || [[ $1 == -* ]]; then
    echo "error: usage: bash $0 CHECKPOINT [DATA] [TASKS] [flags...] (see the script's header)" >&2
    exit 2
fi
CHECKPOINT=$1
shift
DATA=run
TASKS=auto
# The optional positionals stop at the first flag.
if [ $# -gt 0 ] && [[ $1 != -* ]]; then DATA=$1; shift; fi
if [ $# -gt 0 ] && [[ $1 != -* ]]; then TASKS=$1; shift; fi

ARGS=("$CHECKPOINT")
[ "$DATA" = run ] || ARGS+=(--data "$DATA")
if [ "$TASKS" != auto ]; then
    IFS=, read -r -a TASK_LIST <<< "$TASKS"
    ARGS+=(--tasks "${TASK_LIST[@]}")
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# Run from the caller's folder (relative paths keep their meaning) with the toolkit importable.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m launcher.evaluate "${ARGS[@]}" "$@"
