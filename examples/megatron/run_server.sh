#!/usr/bin/env bash
# Serve a trained GPT / GPT-MoE checkpoint over HTTP (the tutorial's online service, plus an OpenAI-style API):
#
#   bash examples/megatron/run_server.sh CHECKPOINT_PATH [PORT] [--flag value ...]
#   e.g. bash examples/megatron/run_server.sh runs/mine 8000 --host 0.0.0.0 --max-batch-size 16
#
#   curl -s localhost:8000/ -d '{"text": "def ", "max_length": 64, "top_k": 1}'          -> {"text": "..."}
#   curl -s localhost:8000/v1/completions -d '{"prompt": "def ", "max_tokens": 64, "temperature": 0.8}'
#   curl -s localhost:8000/health ; curl -s localhost:8000/metrics
#
# CHECKPOINT_PATH: a run folder, its checkpoints folder or a tag folder (any expert-parallel size). PORT
# defaults to 8000; the server listens on 127.0.0.1 unless --host says otherwise. Flags: --max-batch-size,
# --max-queue, --max-prompt-tokens, --max-new-tokens, --max-request-bytes, --threads, --device cuda, ...
# (all of them: python -m launcher.serve --help). SIGTERM or Ctrl-C: stop accepting, finish in-flight
# requests, exit 0.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ $# -lt 1 ]; then
    echo "usage: run_server.sh CHECKPOINT_PATH [PORT] [--flag value ...]" >&2
    exit 2
fi
CHECKPOINT="$1"
shift
PORT_ARGS=()
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then
    PORT_ARGS=(--port "$1")
    shift
fi
exec "$PYTHON" -m launcher.serve "$CHECKPOINT" "${PORT_ARGS[@]}" "$@"
