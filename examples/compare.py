"""`make compare`: does MoE buy quality for the same compute? Dense and MoE GPTs on the embedded corpus.

Trains, at equal training tokens and in one data order, on 2 CPU processes through the positional launch
script: a dense base (the `tiny` size narrowed to hidden 64), the same base with 8 experts on every other
layer routed top-1, expert choice and top-2, and dense models of about 2x and 4x the base's active parameters
(wider, by --hidden-size). The base and MoE-8 top-1 train with two seeds (initialisation and data order), which shows
the noise. Every model is then evaluated on the whole validation split and on the project's zero-shot tasks.

Writes OUT/compare.md (the table, the compute-to-target ratio, the seed spread, the settings and the machine's
load) and OUT/compare.png (validation loss against training FLOPs, one curve per model), and prints one JSON
line with the headline numbers last.

    python examples/compare.py          # every model: about 30 minutes on 2 quiet cores
    python examples/compare.py --models moe8-ec moe8-top2     # a subset (always with the dense base and MoE-8
                                                              # top-1, which the ratio needs)
    python examples/compare.py --tokens 204800 --out /tmp/cmp --runs /tmp/cmp-runs   # a quick check

Runs go under RUNS (default runs/compare) and are reused when trained by the same command (a run trained
with other settings or tokens is an error naming it): delete the folder to retrain.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCRIPT = ROOT / "examples" / "megatron" / "dlc_run_pretrain_megatron_gpt.sh"
# 90% of the corpus's files for training: the validation tenth is ~70 files, none above ~8% of its tokens (a
# 2% split is 15 files, one of them half of the tokens), so the loss measures the corpus, not a few files.
SPLIT = "90,10,0"
SEEDS = (1234, 4321)
PROCESSES = 2
MICRO_BATCH = 8  # sequences per process; the tiny preset's global batch is 16 x 128 tokens
# The base: `tiny` (4 layers, 4 heads) at hidden 64, FFN 256. At hidden 128 the MoE gain was smaller than its
# seed-to-seed noise at these token counts (-0.060 and -0.016 nats with 1.6M tokens), and each run took half
# as long again; at hidden 64 MoE-8 top-1 gained 0.099 nats at 1.6M tokens and 0.085 at 3.3M (one seed).
BASE_HIDDEN = 64
EVAL_POINTS = 16  # validation evaluations along each run: the curves of the plot and of compute-to-target
EVAL_ITERS = 20  # micro batches per evaluation along the run: 20 x 8 x 2 sequences of 128 tokens


@dataclass
class Model:
    key: str
    label: str
    moe: str = "none"  # expert count or none
    rt: str = "0"  # router: 0 top-1, 1 expert choice, 2 top-2
    flags: list[str] = field(default_factory=list)
    seeds: tuple[int, ...] = SEEDS[:1]
    color: str = "black"


MODELS = [
    Model("dense", "dense base", seeds=SEEDS, flags=["--hidden-size", str(BASE_HIDDEN)], color="black"),
    Model("moe8-top1", "MoE-8 top-1", moe="8", rt="0", seeds=SEEDS, flags=["--hidden-size", str(BASE_HIDDEN)],
          color="tab:red"),
    Model("moe8-ec", "MoE-8 expert choice", moe="8", rt="1", flags=["--hidden-size", str(BASE_HIDDEN)],
          color="tab:orange"),
    Model("moe8-top2", "MoE-8 top-2", moe="8", rt="2", flags=["--hidden-size", str(BASE_HIDDEN)],
          color="tab:purple"),
    # 0.96M and 1.91M active parameters against the base's 0.47M (embeddings included)
    Model("dense-2x", "dense 2x (hidden 104)", flags=["--hidden-size", "104"], color="tab:blue"),
    Model("dense-4x", "dense 4x (hidden 160)", flags=["--hidden-size", "160"], color="tab:green"),
]


# ---------------------------------------------------------------------------------------------- running
def run_name(model: Model, seed: int) -> str:
    return f"{model.key}-seed{seed}"


def train(model: Model, seed: int, args) -> dict:
    """Train one model (or find it trained with the same command); returns {"run": folder, "wall_s": training
    wall time, "load": the load average while it trained}."""
    from launcher.cluster import free_port

    run = args.runs / run_name(model, seed)
    iters = args.tokens // args.tokens_per_iter
    interval = max(1, iters // EVAL_POINTS)
    cmd = ["bash", str(SCRIPT), "run", str(PROCESSES), "gpt2bpe", "tiny", model.moe, model.rt, str(MICRO_BATCH),
           "1", "none", "none", str(iters), "--run-name", run.name, "--seed", str(seed), "--split", SPLIT,
           "--eval-interval", str(interval), "--eval-iters", str(EVAL_ITERS), "--log-interval", str(interval),
           *model.flags]
    record = run / "compare_run.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("command") != cmd[2:]:
            sys.exit(f"error: {run} was trained by another command than this comparison's "
                     f"({' '.join(cmd[2:])}); delete it to train it again")
        print(f"[compare] {run.name}: trained before ({saved['wall_s']:.0f} s), reused", flush=True)
        return {"run": run, "wall_s": saved["wall_s"], "load": saved.get("load")}
    env = {k: v for k, v in os.environ.items() if k not in ("LOAD", "EP_SIZE", "SEQ_LEN", "GLOBAL_BATCH_SIZE")}
    env.update(OUTPUT_BASEPATH=str(args.runs), TRAIN_TOKENS=str(iters * args.tokens_per_iter),
               MASTER_PORT=str(free_port()),
               PYTHONUNBUFFERED="1")
    print(f"[compare] {run.name}: {' '.join(cmd[2:])}", flush=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    log = args.runs / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: training {run.name} failed (exit {proc.returncode}); see {log}")
    load = round((load_before + os.getloadavg()[0]) / 2, 2)
    record.write_text(json.dumps({"tokens": args.tokens, "command": cmd[2:], "wall_s": wall, "load": load}) + "\n")
    print(f"[compare] {run.name}: {wall:.0f} s (load average {load})", flush=True)
    return {"run": run, "wall_s": wall, "load": load}


def evaluate(run: Path) -> dict:
    """Loss on the whole validation split and the project's zero-shot tasks (evaluation.json, reused)."""
    from launcher.evaluation import evaluate_checkpoint

    tag = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    saved = tag / "evaluation.json"
    if saved.is_file():
        results = json.loads(saved.read_text())
        if results.get("validation") and results.get("tasks"):
            return results
    return evaluate_checkpoint(run, tasks=["stdlib"], threads=PROCESSES, batch_size=32)


def summarise(model: Model, seed: int, trained: dict) -> dict:
    """Sizes, FLOPs, the validation curve and the final scores of one run."""
    from launcher.training.metrics import flops_per_token
    from model.config import GPTMoEConfig

    run = trained["run"]
    tag = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    mcfg = GPTMoEConfig.from_dict(json.loads((tag / "model_config.json").read_text()))
    settings = json.loads((run / "run_config.json").read_text())
    tokens_per_iter = settings["global_batch"] * mcfg.seq_len
    per_token = flops_per_token(mcfg, mcfg.seq_len)
    curve = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "valid":
            curve.append((record["iteration"] * tokens_per_iter * per_token, record["loss"]))
    curve.sort()
    results = evaluate(run)
    (validation,) = results["validation"].values()
    tasks = {name: entry["acc"] for name, entry in results["tasks"].items()}
    counts = mcfg.param_counts()
    tokens = curve[-1][0] / per_token if curve else 0
    return {"key": model.key, "label": model.label, "seed": seed, "color": model.color,
            "total_params": counts["total"], "active_params": counts["active"], "flops": tokens * per_token,
            "tokens": tokens, "valid_loss": validation["loss"], "curve": curve, "tasks": tasks,
            "wall_s": trained["wall_s"], "load": trained.get("load")}


# ---------------------------------------------------------------------------------------------- analysis
def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Training FLOPs at which a validation curve first reaches `target`: linear in log FLOPs between the two
    evaluations around the crossing; None if it never does."""
    previous = None
    for flops, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return flops
            (f0, l0), (f1, l1) = previous, (flops, loss)
            t = (l0 - target) / (l0 - l1)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
        previous = (flops, loss)
    return None


def compute_to_target(dense: dict, moe: dict) -> tuple[float | None, bool]:
    """FLOPs the dense base needs for its own final (curve) loss / FLOPs the MoE needs to reach it.
    Second: whether the MoE reached it; if not, the ratio is an upper bound (its whole budget)."""
    target_flops, target = dense["curve"][-1]
    reached = flops_to_reach(moe["curve"], target)
    if reached is None:
        return target_flops / moe["curve"][-1][0], False
    return target_flops / reached, True


def analyse(rows: list[dict]) -> dict:
    by = {}
    for row in rows:
        by.setdefault(row["key"], []).append(row)
    dense = {r["seed"]: r for r in by["dense"]}
    moe = {r["seed"]: r for r in by["moe8-top1"]}
    seeds = [seed for seed in SEEDS if seed in dense and seed in moe]
    diffs = [moe[seed]["valid_loss"] - dense[seed]["valid_loss"] for seed in seeds]  # paired: same data order
    ratios = [compute_to_target(dense[seed], moe[seed]) for seed in seeds]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    # None with one seed: a spread needs two
    spread = lambda rs: max(r["valid_loss"] for r in rs) - min(r["valid_loss"] for r in rs) if len(rs) > 1 else None  # noqa: E731
    base = dense[seeds[0]]
    return {"seeds": seeds, "moe_minus_dense": diffs, "moe_minus_dense_mean": mean(diffs),
            "ratio": [r for r, _ in ratios], "ratio_reached": [ok for _, ok in ratios],
            "ratio_mean": mean([r for r, _ in ratios]),
            "dense_seed_spread": spread(list(dense.values())), "moe_seed_spread": spread(list(moe.values())),
            "diff_seed_spread": max(diffs) - min(diffs) if len(diffs) > 1 else None,
            "others": {key: compute_to_target(base, group[0])[0] for key, group in by.items()
                       if key not in ("dense", "moe8-top1")}}


# ---------------------------------------------------------------------------------------------- outputs
def plot(rows: list[dict], dense_target: float, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from launcher.files import write_bytes_atomic

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in rows:
        flops, losses = zip(*row["curve"])
        second = row["seed"] != SEEDS[0]
        ax.plot(flops, losses, color=row["color"], linestyle="--" if second else "-", marker=".",
                label=f"{row['label']}" + (f" (seed {row['seed']})" if len([r for r in rows if r['key'] == row['key']]) > 1 else ""))
    ax.axhline(dense_target, color="gray", linestyle=":", linewidth=1, label="dense base's final loss")
    ax.set(xscale="log", xlabel="training FLOPs (model FLOPs: 6 x active parameters x tokens + attention)",
           ylabel="validation loss (nats/token)", title="Validation loss against training compute")
    low = min(min(loss for _, loss in row["curve"]) for row in rows)
    ax.set_ylim(low - 0.1, low + 2.0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(png.getvalue(), path)


def _nats(value: float | None) -> str:
    return "n/a (one seed)" if value is None else f"{value:.3f} nats"


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def report(rows: list[dict], summary: dict, args, started: dict, finished: dict) -> str:
    task_names = sorted({t for row in rows for t in row["tasks"]})
    head = ["model", "seed", "params total", "params active", "training FLOPs", "valid loss",
            *[t.replace("stdlib_", "") + " acc" for t in task_names], "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"], str(row["seed"]), _m(row["total_params"]), _m(row["active_params"]),
                 f"{row['flops']:.3g}", f"{row['valid_loss']:.3f}",
                 *[f"{row['tasks'].get(t, math.nan):.3f}" for t in task_names], f"{row['wall_s'] / 60:.1f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    s = summary
    ratio_text = ", ".join(f"{r:.2f}x" + ("" if ok else " (not reached: at most)")
                           for r, ok in zip(s["ratio"], s["ratio_reached"]))
    others = ", ".join(f"{next(r['label'] for r in rows if r['key'] == k)} {v:.2f}x" for k, v in s["others"].items())
    done = {(r["key"], r["seed"]) for r in rows}
    missing = [m.label + (f" seed {seed}" if len(m.seeds) > 1 else "")
               for m in MODELS for seed in m.seeds if (m.key, seed) not in done]
    loads = [row["load"] for row in rows if row.get("load") is not None]
    return "\n".join([
        "# Dense vs MoE at equal training tokens",
        "",
        f"Written by `make compare` (`python examples/compare.py`) on {started['date']}: {args.tokens:,} training "
        f"tokens per model (one data order per seed), base: the `tiny` preset at hidden {BASE_HIDDEN} (4 layers, "
        f"4 heads, FFN {4 * BASE_HIDDEN}, sequences of 128 tokens, global batch 16), gpt2bpe 4096-token "
        f"vocabulary, the embedded stdlib corpus with "
        f"`--split {SPLIT}`, {PROCESSES} CPU processes per run (expert parallel over both for MoE), the tiny "
        f"preset's learning rate and init std (0.02) for every model, its router defaults for MoE (top-1 and "
        f"top-2: expert bias, capacity factor 2; expert choice: capacity factor 1). Validation loss: the whole validation split (~10% of the "
        f"corpus's files); zero-shot: the project's stdlib tasks (accuracy, 500 examples each).",
        "",
        *lines,
        "",
        f"- MoE-8 top-1 minus dense base, final validation loss: "
        + ", ".join(f"{d:+.3f}" for d in s["moe_minus_dense"]) + f" nats (seeds {', '.join(map(str, s['seeds']))}; "
        f"mean {s['moe_minus_dense_mean']:+.3f})",
        f"- Compute-to-target ratio (FLOPs the dense base needs to reach its final validation loss / FLOPs "
        f"MoE-8 top-1 needs to reach it, on the curves below, per seed): {ratio_text}; mean "
        f"{s['ratio_mean']:.2f}x."
        + (f" Same ratio for the other models against the dense base (seed {s['seeds'][0]}): {others}."
           if others else ""),
        f"- Seed-to-seed spread of the final validation loss: dense base {_nats(s['dense_seed_spread'])}, MoE-8 "
        f"top-1 {_nats(s['moe_seed_spread'])}; of MoE-8 top-1 minus dense base (each seed's pair trains on the "
        f"same sequences in the same order) {_nats(s['diff_seed_spread'])}.",
        *([f"- Not run here: {', '.join(missing)} (`--models`)."] if missing else []),
        f"- Machine: load average {started['load']:.2f} at the start, {finished['load']:.2f} at the end "
        f"(per run, mean of its start and end: {min(loads):.1f}-{max(loads):.1f}); "
        f"{os.cpu_count()} cores. Wall times include the periodic validation along each run.",
        "",
        "![validation loss against training FLOPs](compare.png)",
        "",
        f"The curves: validation loss every 1/{EVAL_POINTS} of training, on {EVAL_ITERS * MICRO_BATCH * PROCESSES} "
        f"validation sequences (the same for every model and seed); the table's loss is the whole split.",
        "",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_048_000, help="training tokens per model (1000 global batches)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for compare.md and compare.png")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "compare", help="run folders")
    parser.add_argument("--models", nargs="+", choices=[m.key for m in MODELS],
                        help="a subset (dense and moe8-top1 are always trained: the ratio needs them)")
    parser.add_argument("--seeds", type=int, choices=(1, 2), default=2,
                        help="seeds of the dense base and MoE-8 top-1 (2 shows the noise)")
    args = parser.parse_args(argv)
    args.tokens_per_iter = 16 * 128
    if args.tokens < args.tokens_per_iter * EVAL_POINTS:
        print(f"error: --tokens: got {args.tokens}; allowed: at least {args.tokens_per_iter * EVAL_POINTS} "
              f"({EVAL_POINTS} global batches of {args.tokens_per_iter} tokens)", file=sys.stderr)
        return 2
    args.runs = args.runs.resolve()
    keys = set(args.models or [m.key for m in MODELS]) | {"dense", "moe8-top1"}
    models = [m for m in MODELS if m.key in keys]
    started = {"date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()[0]}
    print(f"[compare] load average {started['load']:.2f}; {len(models)} models, {args.tokens:,} tokens each",
          flush=True)
    # Seed-first order: the dense/MoE pair of each seed first, so an interrupted run still has the headline.
    jobs = [(m, s) for s in SEEDS[:args.seeds] for m in models if s in m.seeds]
    jobs.sort(key=lambda job: (job[0].key not in ("dense", "moe8-top1"), SEEDS.index(job[1])))
    rows = []
    for model, seed in jobs:
        trained = train(model, seed, args)
        rows.append(summarise(model, seed, trained))
        print(f"[compare] {rows[-1]['key']} seed {seed}: validation loss {rows[-1]['valid_loss']:.4f}", flush=True)
    order = {m.key: i for i, m in enumerate(MODELS)}
    rows.sort(key=lambda r: (order[r["key"]], SEEDS.index(r["seed"])))
    summary = analyse(rows)
    finished = {"load": os.getloadavg()[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    dense_target = next(r for r in rows if r["key"] == "dense" and r["seed"] == SEEDS[0])["curve"][-1][1]
    plot(rows, dense_target, args.out / "compare.png")
    from launcher.files import write_text_atomic

    write_text_atomic(report(rows, summary, args, started, finished), args.out / "compare.md")
    print(f"[compare] wrote {args.out / 'compare.md'} and {args.out / 'compare.png'}")
    print(json.dumps({"moe_minus_dense": summary["moe_minus_dense"], "ratio": summary["ratio"],
                      "dense_seed_spread": summary["dense_seed_spread"], "moe_seed_spread": summary["moe_seed_spread"],
                      "diff_seed_spread": summary["diff_seed_spread"],
                      "load_start": started["load"], "load_end": finished["load"],
                      "valid_loss": {f"{r['key']}-{r['seed']}": round(r["valid_loss"], 4) for r in rows}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
