"""Memory per process, estimated before a job is queued.

Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020): weights, gradients, and Adam's
states (fp32 master copy with half precision, plus momentum and variance), with ZeRO-1 partitioning the
optimizer states and ZeRO-2 the gradients as well. Dense parameters are partitioned over every rank that
holds a replica of them (data x sequence parallel = the world); expert parameters exist on one rank of each
expert-parallel group and are partitioned over the expert-data-parallel ranks (world / EP).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"): per layer s*b*h*(34 + 5*a*s/h) bytes in half precision, of which 19*s*b*h is the MLP (scaled here
by the experts a token visits) and 5*a*s^2*b the attention scores (not kept by flash attention on GPUs, nor
under selective recompute).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from model.config import GPTMoEConfig

GIB = 1024**3


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    host_offload: float  # bytes moved to host memory by ZeRO-Offload
    device_total: float
    device_name: str

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.device_total


def device_memory(cfg: RunConfig) -> tuple[float, str]:
    """Bytes available to one process, and a name for the device."""
    if cfg.device_memory_gib:
        return cfg.device_memory_gib * GIB, f"{cfg.device_memory_gib:g} GiB (--device-memory-gib)"
    if cfg.device == "cuda":
        try:
            import torch

            props = torch.cuda.get_device_properties(0)
            return float(props.total_memory), props.name
        except Exception:
            pass
        return 80 * GIB, "GPU (assumed 80 GiB: none visible here)"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / cfg.gpus_per_node, f"host memory / {cfg.gpus_per_node} processes"


def estimate_memory(cfg: RunConfig, mcfg: GPTMoEConfig) -> MemoryEstimate:
    """cfg: RunConfig; mcfg: the GPTMoEConfig it trains."""
    counts = mcfg.param_counts()
    half = cfg.precision in ("bf16", "fp16")
    expert = counts["expert"]
    dense = counts["total"] - expert
    local = dense + expert / cfg.model.ep_size
    # Partitioned over: dense params -> world; each local expert param -> world / EP ranks that share it.
    edp = cfg.world_size // cfg.model.ep_size
    partitioned = dense / cfg.world_size + expert / cfg.model.ep_size / edp

    weights = local * (2 if half else 4)
    grad_bytes = 2 if half else 4
    gradients = (partitioned if cfg.zero_stage >= 2 else local) * grad_bytes
    opt_bytes = 12 if half else 8  # (fp32 master +) Adam momentum and variance
    optimizer = (partitioned if cfg.zero_stage >= 1 else local) * opt_bytes
    host = 0.0
    if cfg.offload == "cpu":
        host = optimizer + (gradients if cfg.zero_stage >= 2 else 0.0)
        optimizer = 0.0
        if cfg.zero_stage >= 2:
            gradients = 0.0

    activations = _activations(cfg, mcfg)
    overhead = (1.5 if cfg.device == "cuda" else 0.5) * GIB  # runtime context, allocator slack, buffers
    total, name = device_memory(cfg)
    return MemoryEstimate(weights, gradients, optimizer, activations, overhead, host, total, name)


def _activations(cfg: RunConfig, mcfg: GPTMoEConfig) -> float:
    layers, h, a = mcfg.num_layers, mcfg.hidden_size, mcfg.num_heads
    s, b = cfg.model.seq_len // cfg.sp_size, cfg.micro_batch
    scale = 1.0 if cfg.precision in ("bf16", "fp16") else 2.0  # the formula counts 2-byte activations
    # The attention scores: never kept by flash attention (GPU); on CPU dropped by selective recompute, but
    # rebuilt, one layer at a time, under full recompute.
    scores = 0.0 if (cfg.device == "cuda" or cfg.model.recompute == "sel") else 5 * a * s * s * b
    moe_layers = set(mcfg.moe_layer_indices())

    def layer(moe: bool) -> float:
        mlp = 19 * mcfg.experts_per_token() + 4 if moe else 19  # + dispatch/combine buffers
        return ((15 + mlp) * s * b * h + scores) * scale

    per_layer = [layer(i in moe_layers) for i in range(layers)]
    if cfg.model.recompute == "full":
        # Only each layer's input is kept; one layer is rebuilt at a time during backward.
        body = layers * 2 * s * b * h * scale + max(per_layer)
    else:
        body = sum(per_layer)
    logits = s * b * mcfg.vocab_size * (2 * scale + 4)  # logits in model precision + fp32 softmax for the loss
    return body + logits + 2 * s * b * h * scale
