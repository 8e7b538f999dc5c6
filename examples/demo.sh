#!/usr/bin/env bash
# `make demo`: tokenize the embedded corpus (the Python standard library's sources) with a freshly trained
# 4096-token BPE, pretrain a tiny GPT-MoE on it (4 layers, hidden 128, 8 experts with top-1 routing on every
# other layer, expert parallelism over 2 CPU processes) through the positional launch script, then print
# the validation perplexity and a sample. About 5 minutes on a 2-core machine.
#
# The run folder is runs/demo/tiny-moe8 (OUTPUT_BASEPATH overrides runs/demo). Run again and it resumes, or
# reports the finished run; delete the folder to train from scratch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export OUTPUT_BASEPATH="${OUTPUT_BASEPATH:-runs/demo}"
RUN="$OUTPUT_BASEPATH/tiny-moe8"
START=$(date +%s)

#   MODE GPUS_PER_NODE TOKENIZER MODEL_SIZE MOE RT BATCH_SIZE SP AC ZERO SAVE_INTERVAL
bash examples/megatron/dlc_run_pretrain_megatron_gpt.sh \
    run 2 gpt2bpe tiny 8 0 8 1 none none 500 \
    --run-name tiny-moe8 --log-interval 50 --eval-interval 250

echo
echo "=== demo: $(( $(date +%s) - START )) s; run folder $RUN ==="
"$PYTHON" - "$RUN/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in records if r["kind"] == "train"]
valid = [r for r in records if r["kind"] == "valid"]
print(f"train LM loss   {train[0]['lm_loss']:.3f} (iteration {train[0]['iteration']}) -> "
      f"{train[-1]['lm_loss']:.3f} (iteration {train[-1]['iteration']})")
print(f"validation      loss {valid[-1]['loss']:.3f}, perplexity {valid[-1]['ppl']:.1f} at iteration "
      f"{valid[-1]['iteration']} (first evaluation: perplexity {valid[0]['ppl']:.1f})")
# Router balance: the mean over MoE layers of each log interval's dropped fraction and busiest/mean load.
routed = [(r["iteration"], sum(e["dropped"] for e in r["experts"].values()) / len(r["experts"]),
           max(e["imbalance"] for e in r["experts"].values())) for r in train if r.get("experts")]
if routed:
    late = [(it, d) for it, d, _ in routed if it >= 100]
    shown = [r for r in routed if r[0] in (routed[0][0], 100, 200, 500)] + routed[-1:]
    print("router          dropped " + ", ".join(f"{100 * d:.1f}% (iter {it})" for it, d, _ in shown)
          + (f"; at most {100 * max(d for _, d in late):.1f}% from iteration 100 on" if late else "")
          + f"; busiest expert {routed[-1][2]:.2f}x the mean load at the end")
PY
if [ -n "$(grep -m1 '"experts": {"' "$RUN/metrics.jsonl")" ]; then
    "$PYTHON" -m launcher.plot_router "$RUN"    # dropped fraction, load and router entropy per layer
fi
echo "sample          (prompt 'def', temperature 0.8, top-k 40):"
"$PYTHON" -m launcher.generate "$RUN" --prompt "def" --max-new-tokens 80 --temperature 0.8 --top-k 40
