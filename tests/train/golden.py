"""The golden loss curve: the first 20 LM losses of the nano reference run, committed beside this file.

A silent numeric change anywhere (data order, tokenization, init, routing, the optimizer, the schedule) moves
these losses; `test_golden_loss_curve` catches it. After a deliberate change, regenerate and commit the file
on its own, saying why:

    make golden            # = .venv/bin/python tests/train/golden.py --write

The run: `run 1 gpt2bpe nano 8 0 2 1 none none 1000` (MoE-8, top-1, one process, fp32 on CPU, one thread,
seed 1234, the nano preset's 20 iterations of 8 x 64 tokens) on a corpus generated here from a seeded
word-level Markov chain, so it is the same on every machine and Python version (the standard library's
sources, which the other training tests read, differ between Python versions).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GOLDEN = HERE / "golden_nano_losses.json"
POSITIONAL = "run 1 gpt2bpe nano 8 0 2 1 none none 1000"
ITERATIONS = 20
# Relative tolerance per loss: rounding differences between CPUs (vector widths, BLAS kernels) stay below 1e-5
# over 20 steps; a changed data order, init or routing moves the early losses by 1e-2 or more.
RTOL = 1e-4


def synthetic_texts(documents: int = 400, seed: int = 0) -> list[str]:
    """Documents from a seeded Markov chain over a small vocabulary: learnable structure, no external text.
    random.Random(seed).random() and .randrange() give the same sequence on every Python version."""
    rng = random.Random(seed)
    words = ["the", "expert", "router", "token", "layer", "model", "sends", "takes", "learns", "drops", "each",
             "every", "capacity", "of", "to", "a", "batch", "loss", "gate", "weight", "(", ")", "=", "+", "1", "2"]
    follow = {w: [words[rng.randrange(len(words))] for _ in range(3)] for w in words}
    texts = []
    for _ in range(documents):
        word, out = words[rng.randrange(len(words))], []
        for _ in range(20 + rng.randrange(60)):
            out.append(word)
            word = follow[word][rng.randrange(3)] if rng.random() < 0.9 else words[rng.randrange(len(words))]
        texts.append(" ".join(out) + ".")
    return texts


def build_corpus(out_dir: Path) -> tuple[str, str]:
    """(dataset prefix, tokenizer dir): a 512-token byte-level BPE trained on the synthetic documents."""
    from launcher.data.indexed import IndexedDatasetWriter, best_dtype
    from launcher.data.tokenizer import train_tokenizer

    texts = synthetic_texts()
    tokenizer = train_tokenizer("gpt2bpe", texts, 512, out_dir=out_dir / "tokenizer")
    prefix = out_dir / "golden_text_document"
    with IndexedDatasetWriter(prefix, dtype=best_dtype(tokenizer.vocab_size), vocab_size=tokenizer.vocab_size) as w:
        for text in texts:
            w.add_document(tokenizer.encode(text) + [tokenizer.eod_id])
    return str(prefix), str(out_dir / "tokenizer")


def run_losses(work: Path) -> list[float]:
    """Train the reference run in `work` and return its LM loss at iterations 1..20."""
    prefix, tokenizer = build_corpus(work)
    keep = ("PATH", "HOME", "TMPDIR", "TORCH_EXTENSIONS_DIR", "LANG")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(DATA_PATH=prefix, OUTPUT_BASEPATH=str(work / "out"), PRECISION="fp32", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONHASHSEED="0", DS_ACCELERATOR="cpu")
    from launcher.cluster import free_port

    env["MASTER_PORT"] = str(free_port())
    cmd = ["bash", str(ROOT / "examples" / "megatron" / "dlc_run_pretrain_megatron_gpt.sh"), *POSITIONAL.split(),
           "--tokenizer-path", tokenizer, "--log-interval", "1", "--eval-iters", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    [metrics] = (work / "out").glob("*/metrics.jsonl")
    losses = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            losses[record["iteration"]] = record["lm_loss"]
    return [losses[i] for i in range(1, ITERATIONS + 1)]


def compare(expected: list[float], got: list[float], rtol: float = RTOL) -> list[str]:
    """One line per iteration whose loss is off by more than `rtol` (relative)."""
    return [f"iteration {i}: golden {e:.6f}, this run {g:.6f} ({(g - e) / e:+.2e})"
            for i, (e, g) in enumerate(zip(expected, got), start=1) if abs(g - e) > rtol * abs(e)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN.name} (else compare with it)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        got = run_losses(Path(work))
    if args.write:
        GOLDEN.write_text(json.dumps({"run": POSITIONAL, "iterations": ITERATIONS, "lm_loss": got}, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    bad = compare(json.loads(GOLDEN.read_text())["lm_loss"], got)
    print("\n".join(bad) or "the loss curve matches the golden file")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
