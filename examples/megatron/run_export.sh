#!/usr/bin/env bash
# Export a checkpoint as a Hugging Face model folder that plain `transformers` loads, without this toolkit:
# config.json + model.safetensors + the model's code + the tokenizer + generation_config.json.
#
#   bash examples/megatron/run_export.sh CHECKPOINT OUT_DIR [--dtype float32|bfloat16|float16] [--overwrite]
#
#   CHECKPOINT  a run folder, its checkpoints folder or one tag folder (any expert-parallel size)
#   OUT_DIR     a new or empty folder
#
# Then, anywhere torch and transformers are installed (and jieba, for a jiebabpe model):
#   AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)
#   AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True)
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "error: usage: bash $0 CHECKPOINT OUT_DIR [--dtype float32|bfloat16|float16] [--overwrite]" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# Run from the caller's folder (relative paths keep their meaning) with the toolkit importable.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m launcher.export "$@"
