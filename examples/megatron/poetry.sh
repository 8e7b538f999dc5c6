#!/usr/bin/env bash
# Chinese poetry end to end, the tutorial's downstream task on CPU sizes:
#
#   bash examples/megatron/poetry.sh DATA_DIR
#
# DATA_DIR holds songci.jsonl and yuanqu.jsonl (Song ci and Yuan qu, one poem a line, field "text") and
# poetry_train.tsv / poetry_dev.tsv (tune·author<TAB>poem), e.g. converted from the chinese-poetry collection.
#   1. pretraining text: the Song ci and Yuan qu, leaving out every poem that is a poetry_dev.tsv target, so
#      the dev perplexity is measured on poems no stage has seen;
#   2. a jiebabpe tokenizer (jieba words + byte-level BPE, 8000 tokens) trained on it, and the indexed data;
#   3. pretraining: tiny GPT-MoE (4 layers, hidden 128, 8 experts with top-1 routing on every other layer),
#      2 CPU processes with the experts split over them, about one pass over the text;
#   4. fine-tuning on poetry_train.tsv (title·author -> poem, loss on the poem only), validated on
#      poetry_dev.tsv before the first step and after each epoch;
#   5. the dev perplexity before and after fine-tuning, and generations for the first dev prompts.
# About 14 minutes on a quiet 2-core machine. Everything goes under OUTPUT_BASEPATH (default runs/poetry); run it
# again and each stage that is done is skipped (data) or reports that it is (training).
# Sizes can be changed: POETRY_VOCAB, POETRY_PRETRAIN_TOKENS, POETRY_EPOCHS, POETRY_SAMPLES.
set -euo pipefail
if [ $# -ne 1 ] || [[ $1 == -* ]]; then
    echo "error: usage: bash $0 DATA_DIR (with songci.jsonl, yuanqu.jsonl, poetry_train.tsv, poetry_dev.tsv)" >&2
    exit 2
fi
DATA_DIR=$1
for name in songci.jsonl yuanqu.jsonl poetry_train.tsv poetry_dev.tsv; do
    if [ ! -f "$DATA_DIR/$name" ]; then
        echo "error: DATA_DIR: $DATA_DIR/$name not found; allowed: a folder with songci.jsonl, yuanqu.jsonl," \
             "poetry_train.tsv and poetry_dev.tsv" >&2
        exit 2
    fi
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OUTPUT_BASEPATH="${OUTPUT_BASEPATH:-runs/poetry}"
# DeepSpeed's compiled CPU ops live with the venv, as `make` keeps them: the default ~/.cache/torch_extensions
# is shared by every checkout, and a build killed there leaves a lock that stalls every later run.
if [ -z "${TORCH_EXTENSIONS_DIR:-}" ] && [ -d "$ROOT/.venv" ]; then export TORCH_EXTENSIONS_DIR="$ROOT/.venv/torch_extensions"; fi
OUT=$OUTPUT_BASEPATH
VOCAB=${POETRY_VOCAB:-8000}
SEQ=256
EPOCHS=${POETRY_EPOCHS:-2}
SAMPLES=${POETRY_SAMPLES:-8}
START=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - START )) s) ==="; }
# One machine: each launch takes a port nobody listens on (the default 29500 may be another job's), unless
# MASTER_PORT is given.
port() { [ -n "${MASTER_PORT:-}" ] && echo "$MASTER_PORT" || "$PYTHON" -c 'from launcher.cluster import free_port; print(free_port())'; }

stage "1. pretraining text"
mkdir -p "$OUT/data"
if [ ! -f "$OUT/data/pretrain.jsonl" ]; then
    "$PYTHON" - "$DATA_DIR" "$OUT/data/pretrain.jsonl" <<'PY'
import json, sys
from pathlib import Path
from launcher.files import write_text_atomic

data, out = Path(sys.argv[1]), sys.argv[2]
held_out = {line.rstrip("\n").split("\t", 1)[1] for line in open(data / "poetry_dev.tsv", encoding="utf-8")}
kept, dropped = [], 0
for name in ("songci.jsonl", "yuanqu.jsonl"):
    for line in open(data / name, encoding="utf-8"):
        text = json.loads(line)["text"]
        if text.replace("\n", "") in held_out:  # the tsv joins a poem's lines
            dropped += 1
        else:
            kept.append(json.dumps({"text": text}, ensure_ascii=False) + "\n")
write_text_atomic("".join(kept), out)
print(f"{out}: {len(kept)} poems; {dropped} left out (poetry_dev.tsv targets)")
PY
fi

stage "2. jiebabpe tokenizer and indexed data"
if [ ! -f "$OUT/data/poetry.idx" ]; then
    bash "$ROOT/examples/megatron/run_preprocess.sh" "$OUT/data/pretrain.jsonl" "$OUT/data/poetry" jiebabpe "$VOCAB"
fi

stage "3. pretraining"
#   MODE GPUS_PER_NODE TOKENIZER MODEL_SIZE MOE RT BATCH_SIZE SP AC ZERO SAVE_INTERVAL
DATA_PATH="$OUT/data/poetry" SEQ_LEN=$SEQ GLOBAL_BATCH_SIZE=16 TRAIN_TOKENS=${POETRY_PRETRAIN_TOKENS:-2400000} \
WARMUP_TOKENS=80000 MASTER_PORT=$(port) bash "$ROOT/examples/megatron/dlc_run_pretrain_megatron_gpt.sh" \
    run 2 jiebabpe tiny 8 0 8 1 none none 250 \
    --run-name pretrain --split 99,1,0 --log-interval 50 --eval-interval 250 --eval-iters 4

stage "4. fine-tuning"
#   TASK_NAME TRAIN VALID PRETRAIN_CHECKPOINT_PATH MODEL_SIZE MOE RT BATCH_SIZE EPOCH SP AC ZERO SEQ_LEN
GPUS_PER_NODE=2 MASTER_PORT=$(port) bash "$ROOT/examples/megatron/run_finetune_text_generation_gpt.sh" \
    poetry "$DATA_DIR/poetry_train.tsv" "$DATA_DIR/poetry_dev.tsv" "$OUT/pretrain" tiny 8 0 8 "$EPOCHS" 1 none none $SEQ \
    --run-name finetune --pack --lr 1e-3 --min-lr 1e-4 --log-interval 50 --samples 4 --sample-tokens 100

stage "5. dev perplexity and generations"
"$PYTHON" - "$OUT/finetune/metrics.jsonl" "$OUT/pretrain/metrics.jsonl" <<'PY'
import json, sys
finetune = [json.loads(line) for line in open(sys.argv[1])]
pretrain = [json.loads(line) for line in open(sys.argv[2])]
valid = [r for r in finetune if r["kind"] == "valid"]
best = min(valid[1:], key=lambda r: r["loss"])
last_pretrain = [r for r in pretrain if r["kind"] == "valid"][-1]
print(f"pretraining: validation perplexity {last_pretrain['ppl']:.1f} on held-out Song ci / Yuan qu text "
      f"(iteration {last_pretrain['iteration']})")
print(f"poetry_dev.tsv perplexity per poem token: before fine-tuning {valid[0]['ppl']:.1f} (loss {valid[0]['loss']:.3f})"
      f" -> after {best['ppl']:.1f} (loss {best['loss']:.3f}, epoch {best['epoch']:g})")
PY
head -n "$SAMPLES" "$DATA_DIR/poetry_dev.tsv" > "$OUT/dev_prompts.tsv"
#   CHECKPOINT_PATH MODEL_SIZE MOE SP BATCH_SIZE SEQ_LEN TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN INPUT_FILE OUTPUT_FILE TIME
bash "$ROOT/examples/megatron/run_text_generation_gpt.sh" \
    "$OUT/finetune/checkpoints/best" tiny 8 1 8 $SEQ 10 32 160 "$OUT/dev_prompts.tsv" "$OUT/dev_generations.jsonl" none \
    --temperature 0.8 --repetition-penalty 1.1 --seed 1
"$PYTHON" - "$OUT/dev_generations.jsonl" "$OUT/dev_prompts.tsv" <<'PY'
import json, sys
targets = [line.rstrip("\n").split("\t", 1)[1] for line in open(sys.argv[2], encoding="utf-8")]
for record, target in zip(map(json.loads, open(sys.argv[1], encoding="utf-8")), targets):
    print(f"\n{record['prompt']}\n  generated: {record['generation']}\n  original:  {target}")
PY
stage "done: $OUT"
