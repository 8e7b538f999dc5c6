"""Training-step speed of a GPT-MoE against its dense base, through the same DeepSpeed engine as pretraining.

    .venv/bin/python benchmarks/train_step.py                    # tiny, dense vs MoE-8 top-1, 2 CPU processes
    .venv/bin/python benchmarks/train_step.py --procs 1 --experts 16 --precision bf16

For each variant the script starts its own processes (torchrun when --procs > 1; EP = min(experts, procs)),
builds the model, optimizer groups and engine as `launcher.pretrain` does, runs --warmup untimed steps on
random tokens, then times --steps steps (forward, backward, optimizer), each between barriers, and keeps
the median; each variant is launched --repeat times, alternating, and the fastest launch is kept. Per process it
reports tokens/s, model TFLOP/s (6 x active parameters + attention, per token) and peak memory (max RSS
on CPU, max allocated on GPUs). The figure that matters is the MoE's step time over the dense one's: top-1
routing gives each token one expert of the dense FFN's size, so the MoE should cost about what its base
costs. The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--router", type=int, default=0, choices=(0, 1, 2))
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: the size's preset")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"))
    p.add_argument("--recompute", default="none", choices=("none", "sel", "full"))
    p.add_argument("--zero", default="none", choices=("none", "z1", "z2"))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=2, help="launches per variant, alternating; the fastest is kept")
    p.add_argument("--worker", choices=("dense", "moe"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_config(args, variant: str):
    from launcher.cli import build_run_config

    moe = str(args.experts) if variant == "moe" else "none"
    env = {"GLOBAL_BATCH_SIZE": str(args.micro_batch * args.procs), "TRAIN_TOKENS": str(10**12)}
    if args.seq_len:
        env["SEQ_LEN"] = str(args.seq_len)
    if args.precision:
        env["PRECISION"] = args.precision
    positional = f"run {args.procs} gpt2bpe {args.size} {moe} {args.router} {args.micro_batch} 1 {args.recompute} " \
                 f"{args.zero} 1000"
    return build_run_config(positional.split(), env)


def worker(args) -> None:
    """One process of one variant: time training steps, rank 0 writes the figures to --out."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from launcher.ds_config import build_ds_config
    from launcher.training.distributed import init_distributed, shutdown_distributed
    from launcher.training.metrics import flops_per_token
    from launcher.training.optim import build_optimizer
    from launcher.training.trainer import build_model

    cfg = run_config(args, args.worker)
    placement = init_distributed(cfg)
    mcfg = cfg.model_config()
    model = build_model(cfg, mcfg, placement)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=build_ds_config(cfg))
    gen = torch.Generator().manual_seed(placement.rank)
    tokens = torch.randint(0, mcfg.vocab_size, (args.warmup + args.steps, cfg.micro_batch, cfg.model.seq_len + 1),
                           generator=gen).to(placement.device)

    def step(i):
        out = engine(tokens[i, :, :-1], labels=tokens[i, :, 1:])
        engine.backward(out.loss + out.aux_loss + out.z_loss)
        engine.step()
        return out.loss

    for i in range(args.warmup):
        step(i)
    if cfg.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        float(step(i).detach())  # waits for the device
        dist.barrier()
        times.append(time.perf_counter() - start)
    # The median step: other processes on a shared machine make single steps slow, not the typical one.
    step_s = sorted(times)[len(times) // 2]
    if cfg.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    peak = torch.tensor([float(peak)], dtype=torch.float64, device=placement.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tokens_per_s = cfg.micro_batch * cfg.model.seq_len / step_s  # per process
    counts = mcfg.param_counts()
    if placement.is_main:
        Path(args.out).write_text(json.dumps({
            "step_ms": round(step_s * 1e3, 2), "tokens_per_s_per_process": round(tokens_per_s, 1),
            "tflops_per_process": round(tokens_per_s * flops_per_token(mcfg, cfg.model.seq_len) / 1e12, 5),
            "peak_memory_mib_per_process": round(float(peak) / 2**20, 1),
            "params_total": counts["total"], "params_active": counts["active"], "ep_size": cfg.model.ep_size,
            "seq_len": cfg.model.seq_len, "precision": cfg.precision, "device": cfg.device}))
    shutdown_distributed()


def launch(args, variant: str, out: str) -> dict:
    """Start the variant's processes (a fresh set each, so peak memory is the variant's own)."""
    from launcher.cluster import cpu_threads_per_process, free_port

    me = [str(Path(__file__).resolve()), *sys.argv[1:], "--worker", variant, "--out", out]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_process(args.procs)))
    if args.procs == 1:
        cmd = [sys.executable, *me]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.procs),
               "--master_addr", "127.0.0.1", "--master_port", env["MASTER_PORT"], *me]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"{variant} run failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return json.loads(Path(out).read_text())


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    cfg = run_config(args, "moe")
    report = {"benchmark": "train_step", "size": args.size, "experts": args.experts, "router": args.router,
              "procs": args.procs, "micro_batch": args.micro_batch, "recompute": args.recompute, "zero": args.zero,
              "steps": args.steps, "omp_threads": int(os.environ.get("OMP_NUM_THREADS") or
                                                       max(1, (os.cpu_count() or 1) // args.procs)),
              # Other processes on the machine slow every figure: the load when we started says how much.
              "load_avg_1min": round(os.getloadavg()[0], 2)}
    print(f"{args.size}: seq {cfg.model.seq_len}, micro batch {args.micro_batch}, {args.procs} process(es) "
          f"[{cfg.device}, {cfg.precision}], load average {report['load_avg_1min']}")
    variants = (("dense", "dense"), ("moe", f"moe{args.experts}"))
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        for _ in range(args.repeat):  # alternating, so a burst of load elsewhere hits both variants alike
            for variant, name in variants:
                r = launch(args, variant, os.path.join(tmp, f"{variant}.json"))
                if name not in report or r["step_ms"] < report[name]["step_ms"]:
                    report[name] = r
        for variant, name in variants:
            r = report[name]
            print(f"{name:>7}: {r['step_ms']:8.1f} ms/step  {r['tokens_per_s_per_process']:9,.0f} tokens/s/process  "
                  f"{r['tflops_per_process']:.4f} TFLOP/s/process  "
                  f"peak {r['peak_memory_mib_per_process']:,.0f} MiB/process  "
                  f"(params {r['params_total']:,} total, {r['params_active']:,} active, EP {r['ep_size']})")
    moe = report[f"moe{args.experts}"]
    report["moe_over_dense_step_time"] = round(moe["step_ms"] / report["dense"]["step_ms"], 3)
    print(f"MoE-{args.experts} / dense step time: {report['moe_over_dense_step_time']:.2f}x")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
