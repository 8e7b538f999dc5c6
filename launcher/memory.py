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

Step buffers are what the optimizer step allocates on top, read from DeepSpeed 0.19's
runtime/zero/stage_1_and_2.py and fp16/{fused,unfused}_optimizer.py:
- ZeRO 1/2 steps one parameter group at a time (dense and expert groups apart): it flattens the group's
  gradient partition (a copy, in the gradient dtype) and casts it to an fp32 gradient partition, then runs the
  optimizer on it. Under bf16/fp16 both copies live at once: 2 + 4 bytes per element of the largest group's
  partition (the "fp32 gradient partition" that puts ZeRO-1 with many local experts near the edge of a GPU).
- ZeRO 0 under bf16/fp16: DeepSpeed's mixed-precision optimizer keeps an fp32 copy of every gradient (4 bytes
  per local parameter) during the step.
- torch's AdamW (the CPU optimizer here) computes each update through two temporaries of the tensor stepped
  (sqrt, then the division): 8 bytes per element of the largest tensor it steps. DeepSpeed's FusedAdam has none.
- ZeRO 1/2 reduce gradients through a bucket of `reduce_bucket_size` elements (two with overlap_comm); ZeRO 0
  all-reduces through a flat copy of each group's gradients (up to 5e8 elements), freed before the step.
The step happens after the backward pass has released the activations, so the peak holds the larger of the
two, not both.
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
    step_buffers: float  # the optimizer step's temporaries (see the module docstring)
    overhead: float
    host_offload: float  # bytes moved to host memory by ZeRO-Offload
    device_total: float
    device_name: str

    @property
    def total(self) -> float:
        # Activations (backward) and the step's buffers are not alive at the same time.
        return self.weights + self.gradients + self.optimizer + max(self.activations, self.step_buffers) \
            + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.device_total


def device_memory(cfg: RunConfig) -> tuple[float, str]:
    """Bytes available to one process, and where that figure comes from."""
    if cfg.device_memory_gib:
        return cfg.device_memory_gib * GIB, f"--device-memory-gib {cfg.device_memory_gib:g}"
    if cfg.device == "cuda":
        if _cuda_visible():
            import torch

            props = torch.cuda.get_device_properties(0)
            return float(props.total_memory), props.name
        return 80 * GIB, "80 GiB assumed: no GPU visible here"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / cfg.gpus_per_node, f"host memory / {cfg.gpus_per_node} processes"


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken driver must not stop a dryrun
        return False


def planning_note(cfg: RunConfig) -> str:
    """What the estimate was planned for, and how to plan for another device."""
    if cfg.device == "cuda":  # the memory figure's source is on the line above, in parentheses
        note = f"planned for GPUs, {cfg.precision}; --device-memory-gib N plans for GPUs of N GiB"
        if cfg.precision == "fp32" and not _cuda_visible():
            note += "; PRECISION=bf16 for the usual mixed precision (fp32 is the default where no GPU is visible)"
        return note
    return (f"planned for CPU processes, {cfg.precision}; to plan a GPU job from here: --device cuda "
            "--device-memory-gib 80 with PRECISION=bf16")


def estimate_memory(cfg: RunConfig, mcfg: GPTMoEConfig) -> MemoryEstimate:
    """cfg: RunConfig; mcfg: the GPTMoEConfig it trains."""
    counts = mcfg.param_counts()
    half = cfg.precision in ("bf16", "fp16")
    expert = counts["expert"]
    dense = counts["total"] - expert
    local = dense + expert / mcfg.ep_size
    # Partitioned over: dense params -> world; each local expert param -> world / EP ranks that share it.
    edp = cfg.world_size // mcfg.ep_size
    dense_part, expert_part = dense / cfg.world_size, expert / mcfg.ep_size / edp
    partitioned = dense_part + expert_part

    weights = local * (2 if half else 4)
    grad_bytes = 2 if half else 4
    gradients = (partitioned if cfg.zero_stage >= 2 else local) * grad_bytes
    opt_bytes = 12 if half else 8  # (fp32 master +) Adam momentum and variance
    optimizer = (partitioned if cfg.zero_stage >= 1 else local) * opt_bytes
    host = 0.0
    if cfg.offload == "cpu":
        host = optimizer + (gradients if cfg.zero_stage >= 2 else 0.0) + 4 * partitioned  # + fp32 grad partition
        optimizer = 0.0
        if cfg.zero_stage >= 2:
            gradients = 0.0

    activations = _activations(cfg, mcfg)
    step = _step_buffers(cfg, mcfg, local, max(dense, expert / mcfg.ep_size), max(dense_part, expert_part), half)
    overhead = (1.5 if cfg.device == "cuda" else 0.5) * GIB  # runtime context, allocator slack, buffers
    if cfg.device != "cuda":
        # On CPU the launcher keeps freed memory in the process heap (MALLOC_MMAP_MAX_=0: ~7% faster steps),
        # and the first step creates Adam's states between the step's temporaries: the heap keeps the holes.
        # Measured on 0.125B runs (fp32 ZeRO-0, bf16 ZeRO-1 on 1 and 2 processes): about half the step
        # buffers again.
        overhead += step / 2
    total, name = device_memory(cfg)
    return MemoryEstimate(weights, gradients, optimizer, activations, step, overhead, host, total, name)


def _step_buffers(cfg: RunConfig, mcfg: GPTMoEConfig, local: float, largest_group: float,
                  largest_group_partition: float, half: bool) -> float:
    """Bytes the optimizer step allocates (module docstring), reduce buckets included."""
    torch_adamw = cfg.device != "cuda" and cfg.offload != "cpu"  # the optimizer launcher/training/optim.py picks
    adam_temporaries = 8 if torch_adamw else 0
    if cfg.zero_stage >= 1:
        from launcher.ds_config import build_ds_config

        zero = build_ds_config(cfg)["zero_optimization"]
        buckets = min(zero.get("reduce_bucket_size", 5e8), local) * (2 if half else 4) \
            * (2 if zero.get("overlap_comm") else 1)
        if cfg.offload == "cpu":
            return buckets  # the fp32 partition and the step live in host memory
        at_cast = (2 + 4) if half else 4  # flat copy in the gradient dtype (+ its fp32 cast under half)
        in_step = 4 + adam_temporaries  # the fp32 gradient partition + the optimizer's temporaries
        return max(at_cast, in_step) * largest_group_partition + buckets
    h, f = mcfg.hidden_size, mcfg.ffn_hidden_size
    experts = max(mcfg.experts_per_moe_layer(), default=0) // mcfg.ep_size
    largest_tensor = max(mcfg.padded_vocab_size * h, h * f, experts * h * f)
    # The engine all-reduces gradients through flat copies of up to 5e8 elements per group (dense, experts),
    # then the step runs: DeepSpeed's fp16/bf16 optimizer casts every gradient to fp32 first.
    reduce_copy = min(5e8, largest_group) * (2 if half else 4)
    fp32_grads = 4 * local if half else 0.0
    return max(reduce_copy, fp32_grads + adam_temporaries * largest_tensor)


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
