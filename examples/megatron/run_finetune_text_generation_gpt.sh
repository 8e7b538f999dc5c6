#!/usr/bin/env bash
# Fine-tune a pretrained GPT / GPT-MoE on prompt<TAB>target pairs (loss on the targets only):
#
#   bash examples/megatron/run_finetune_text_generation_gpt.sh [MODE] \
#       TASK_NAME TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH \
#       MODEL_SIZE MOE RT BATCH_SIZE EPOCH SP AC ZERO SEQ_LEN [--flag value ...]
#   e.g. bash examples/megatron/run_finetune_text_generation_gpt.sh poetry poetry_train.tsv poetry_dev.tsv \
#            runs/pretrain 0.125B 8 0 4 3 1 sel z1 512 --lr 1e-4
#
# MODE is optional: `dryrun` prints what would run, writes the configs and starts nothing; `run` (the
# default) launches. Processes per node: GPUS_PER_NODE (default: the GPUs here, else 1); the cluster
# variables (PAI DLC's WORLD_SIZE = nodes, RANK, MASTER_ADDR, MASTER_PORT; SLURM's; --hostfile) and
# OUTPUT_BASEPATH, GLOBAL_BATCH_SIZE, EP_SIZE, PRECISION, LOAD, OFFLOAD are read as for pretraining.
# After each epoch: validation loss and perplexity on VALID, a checkpoint (the last and the best are
# kept), and samples/epoch_NNN.jsonl with generations for the first VALID prompts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m launcher.finetune "$@"
