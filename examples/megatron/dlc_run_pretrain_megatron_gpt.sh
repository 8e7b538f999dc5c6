#!/usr/bin/env bash
# Pretrain a GPT / GPT-MoE with DeepSpeed from positional arguments:
#
#   bash examples/megatron/dlc_run_pretrain_megatron_gpt.sh \
#       MODE GPUS_PER_NODE TOKENIZER MODEL_SIZE MOE RT BATCH_SIZE SP AC ZERO SAVE_INTERVAL [--flag value ...]
#   e.g. bash examples/megatron/dlc_run_pretrain_megatron_gpt.sh run 1 jiebabpe 0.125B 8 0 1 1 sel none 10000
#
# Cluster variables (PAI DLC: WORLD_SIZE = nodes, RANK = node rank, MASTER_ADDR, MASTER_PORT), SLURM's,
# a DeepSpeed hostfile (--hostfile PATH) and the overrides SEQ_LEN, DATA_PATH, OUTPUT_BASEPATH, TRAIN_TOKENS,
# WARMUP_TOKENS, GLOBAL_BATCH_SIZE, EP_SIZE, PRECISION, LOAD, OFFLOAD are read by the Python launcher,
# which owns parsing, validation and launching. `MODE=dryrun` prints what would run and starts nothing.
# `--config FILE` reads settings from a YAML run file by flag name; positional arguments it holds may be left
# off (`run --config RUN_DIR/run_config.yaml` repeats a run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m launcher "$@"
