"""What a user watches: a progress bar, one line per log interval, tensorboard scalars and metrics.jsonl.

Only rank 0 writes. Losses arrive here already averaged over every rank; expert counts are summed over the
interval on each rank and over the ranks when an interval is reported.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from launcher.files import write_text_atomic
from launcher.training.distributed import all_reduce_sum

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from model.config import GPTMoEConfig


def flops_per_token(mcfg: GPTMoEConfig, seq_len: int) -> float:
    """Model FLOPs of one token's forward and backward: 6 x active parameters (the matmuls a token goes
    through: dense layers, the experts it visits, the output layer), plus attention's scores and weighted sum
    (2 x 2 x T x D per layer forward, x3 with backward). Recomputation is not counted: these are model FLOPs."""
    return 6.0 * mcfg.param_counts()["active"] + 12.0 * mcfg.num_layers * mcfg.hidden_size * seq_len


def _layer_stats(moe_stats, layer_ids: list[int]):
    """The model's moe_stats (one dict per MoE layer, in layer order) as (layer index, stats) pairs."""
    return [(stats.get("layer", layer), stats) for layer, stats in zip(layer_ids, moe_stats or [])]


@dataclass
class ExpertLoad:
    """Tokens routed to each expert, the fraction dropped and the router entropy, per MoE layer, over one log
    interval.

    Imbalance is max/mean tokens per expert of each micro batch, averaged: summing counts over the interval
    first would hide a router that sends every token to one expert, a different one each step.

    The counts may be one rank's or already summed over its expert-parallel group (the model does that when
    EP > 1): summing again over every rank scales all of a layer's counts alike, so the ratios stay right."""
    layer_ids: list[int]
    counts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (E,) tokens per expert
    # layer -> (dropped fraction, max/mean load, router entropy), each summed over micro batches
    per_batch: dict[int, torch.Tensor] = field(default_factory=dict)
    batches: int = 0

    def add(self, moe_stats) -> None:
        pairs = _layer_stats(moe_stats, self.layer_ids)
        for layer, stats in pairs:
            # Kept on the device: summed here, read once per log interval.
            counts = stats["expert_counts"].detach().to(torch.float64)
            as64 = lambda v: torch.as_tensor(v, device=counts.device).detach().to(torch.float64)  # noqa: E731
            mean = counts.mean()
            imbalance = torch.where(mean > 0, counts.max() / mean.clamp(min=1e-12), torch.ones_like(mean))
            entropy = stats.get("entropy")
            values = torch.stack([as64(stats["dropped_fraction"]), imbalance,
                                  as64(float("nan") if entropy is None else entropy)])
            self.counts[layer] = counts if layer not in self.counts else self.counts[layer] + counts
            self.per_batch[layer] = values if layer not in self.per_batch else self.per_batch[layer] + values
        if pairs:
            self.batches += 1

    def reduce(self, device) -> dict:
        """Collective: every rank calls it. {layer: {imbalance: max/mean tokens per expert, dropped: fraction,
        entropy: mean router entropy in nats, load: tokens per expert / all tokens}}."""
        if not self.counts:
            return {}
        layers = sorted(self.counts)
        flat = torch.cat([self.counts[i].to(device) for i in layers]
                         + [self.per_batch[i].to(device) for i in layers]
                         + [torch.tensor([self.batches], dtype=torch.float64, device=device)])
        flat = all_reduce_sum(flat, device).cpu()
        batches = max(1.0, float(flat[-1]))
        out, offset = {}, 0
        for layer in layers:
            e = self.counts[layer].numel()
            counts = flat[offset:offset + e]
            offset += e
            total = float(counts.sum())
            out[layer] = {"load": [round(float(c) / total, 5) if total else 0.0 for c in counts]}
        for layer in layers:
            dropped, imbalance, entropy = (float(v) / batches for v in flat[offset:offset + 3])
            offset += 3
            out[layer] = {"imbalance": imbalance, "dropped": dropped, "entropy": entropy, **out[layer]}
        self.counts.clear()
        self.per_batch.clear()
        self.batches = 0
        return out


class MetricsWriter:
    """Rank 0's outputs. Every method is a no-op on the other ranks."""

    def __init__(self, cfg: RunConfig, enabled: bool, start_iteration: int):
        self.enabled = enabled
        self.total = cfg.train_iters
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        _truncate_after(path, start_iteration)  # a resumed run rewrites what came after its checkpoint
        self.jsonl = open(path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_iteration or None)
        except ImportError:  # tensorboard is an install requirement; a broken install must not stop training
            print("warning: tensorboard is not importable; scalars go to metrics.jsonl only", file=sys.stderr)
        if sys.stderr.isatty():
            # Only on a terminal: in a job's log file a redrawn bar is noise; the log lines carry the ETA.
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train_iters, initial=start_iteration, unit="it", dynamic_ncols=True,
                            file=sys.stderr, desc="train", smoothing=0.1)

    def step(self, tokens_per_s: float, lm_loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {lm_loss:.3f}, {tokens_per_s:,.0f} tok/s", refresh=False)
            self.bar.update(1)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)
        sys.stdout.flush()

    def record(self, kind: str, iteration: int, values: dict) -> None:
        """One JSON line and the scalars under `kind/`; lists (expert load) go to the JSON line only."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": kind, "iteration": iteration, "time": round(time.time(), 3),
                                     **values}) + "\n")
        if self.tb is not None:
            for name, value in _scalars(values):
                self.tb.add_scalar(f"{kind}/{name}", value, iteration)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _scalars(values: dict, prefix: str = ""):
    for name, value in values.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield prefix + name, value


def _truncate_after(path, iteration: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
    write_text_atomic("".join(keep), path)


def format_train_line(iteration: int, total: int, v: dict) -> str:
    parts = [f"iter {iteration:>{len(str(total))}}/{total}",
             f"lm loss {v['lm_loss']:.4f}", f"aux {v['aux_loss']:.4f}"]
    if v.get("z_loss"):
        parts.append(f"z {v['z_loss']:.4f}")
    parts += [f"lr {v['lr']:.3e}", f"grad norm {v['grad_norm']:.3f}", f"{v['tokens_per_s']:,.0f} tok/s",
              f"{v['tflops_per_process']:.4f} TFLOP/s/proc", f"eta {_clock(v['eta_s'])}"]
    if v.get("skipped_steps"):
        parts.append(f"skipped {v['skipped_steps']}")
    experts = v.get("experts")
    if experts:
        dropped = sum(e["dropped"] for e in experts.values()) / len(experts)
        imbalance = " ".join(f"L{layer}:{e['imbalance']:.2f}" for layer, e in experts.items())
        parts += [f"dropped {100 * dropped:.1f}%", f"load max/mean {imbalance}"]
        entropies = [e["entropy"] for e in experts.values() if math.isfinite(e.get("entropy", float("nan")))]
        if entropies:
            parts.append(f"router entropy {sum(entropies) / len(entropies):.3f}")
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
