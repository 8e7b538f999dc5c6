#!/usr/bin/env bash
# Tokenize text into an mmap indexed dataset (PREFIX.bin + PREFIX.idx) for pretraining.
#
#   bash examples/megatron/run_preprocess.sh INPUT OUTPUT_PREFIX [TOKENIZER] [VOCAB_SIZE] [extra flags...]
#
#   INPUT          a text file, a folder of them, a .jsonl (field "text") or a .tsv; or "stdlib" for the
#                  embedded corpus (Python's standard library), built under OUTPUT_PREFIX as a folder
#   OUTPUT_PREFIX  writes OUTPUT_PREFIX.bin / .idx; a tokenizer is trained into its folder/tokenizer
#   TOKENIZER      jiebabpe (Chinese) or gpt2bpe (English/code), default gpt2bpe
#   VOCAB_SIZE     default 32000 (4096 for stdlib)
#   extra flags    passed on, e.g. --json-key content, --workers 8, --tokenizer DIR (use an existing one)
#
# Examples:
#   bash examples/megatron/run_preprocess.sh ../shared/data/zh-poetry/songci.jsonl data/songci jiebabpe 16000
#   bash examples/megatron/run_preprocess.sh stdlib data/stdlib
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "error: usage: bash $0 INPUT OUTPUT_PREFIX [TOKENIZER] [VOCAB_SIZE] [flags...] (see the script's header)" >&2
    exit 2
fi
INPUT=$1
OUTPUT_PREFIX=$2
shift 2
TOKENIZER=gpt2bpe
VOCAB_SIZE=
# The optional positionals stop at the first flag.
if [ $# -gt 0 ] && [[ $1 != -* ]]; then TOKENIZER=$1; shift; fi
if [ $# -gt 0 ] && [[ $1 != -* ]]; then VOCAB_SIZE=$1; shift; fi

# An existing tokenizer among the extra flags replaces training one.
TRAIN=(--vocab-size)
for flag in "$@"; do
    case $flag in --tokenizer|--vocab-file|--vocab) TRAIN=() ;; esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# Run from the caller's folder (relative paths keep their meaning) with the toolkit importable.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "$INPUT" = "stdlib" ]; then
    exec "$PYTHON" -m launcher.preprocess --stdlib --output-dir "$OUTPUT_PREFIX" \
        --tokenizer-type "$TOKENIZER" --vocab-size "${VOCAB_SIZE:-4096}" "$@"
fi
[ ${#TRAIN[@]} -eq 0 ] || TRAIN+=("${VOCAB_SIZE:-32000}")
exec "$PYTHON" -m launcher.preprocess --input "$INPUT" --output-prefix "$OUTPUT_PREFIX" \
    --tokenizer-type "$TOKENIZER" ${TRAIN[@]+"${TRAIN[@]}"} "$@"
