"""Parallelism applied from outside the single-device model: the only module of `model/` that knows about
torch.distributed.

Expert parallelism. An MoE layer whose experts are spread over `ep_size` processes needs the group of those
processes; it gets it as an `ExpertParallelGroup`, which holds the group and the two collectives the layer
runs over it: one all-reduce of per-expert token counts (so every rank sizes the all-to-all buffers alike)
and the all-to-all that moves tokens to their experts and back. Nothing in model/moe creates a group or
reads a rank: the rank a process holds experts for is passed to `GPTMoE(config, ep_rank=...)`
(`expert_parallel_rank`) and checked against the group when it is attached.
  - Under `deepspeed.initialize` the engine creates DeepSpeed's groups and attaches them through each
    layer's `set_deepspeed_parallelism` (DeepSpeed's hook, which wraps the group here).
  - Without the engine: `setup_expert_parallel` (DeepSpeed's groups; needs `deepspeed.init_distributed()`)
    or `set_expert_parallel_group` (any group).

Sequence parallelism (DeepSpeed-Ulysses): `apply_sequence_parallel` wraps each block's attention core in
`deepspeed.sequence.layer.DistributedAttention`. Each rank then holds S/P positions of every sequence and
passes their `position_ids`; attention all-to-alls to H/P heads over all S positions and back.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .gpt import CausalSelfAttention
from .moe.layer import moe_layers


def expert_parallel_rank(rank: int, ep_size: int) -> int:
    """A process's rank in its expert-parallel group, from its global rank. DeepSpeed's layout: groups are
    blocks of consecutive ranks ([0..ep-1], [ep..2ep-1], ...), so rank r holds expert slice r % ep."""
    return rank % ep_size


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0; its gradient is the same exchange in reverse."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAll.apply(grad, ctx.group), None


class ExpertParallelGroup:
    """The processes sharing one MoE layer's experts, and the collectives the layer runs over them."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group=group)
        self.rank = dist.get_rank(group=group)

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        """x summed over the group, in place."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_to_all(self, x: Tensor) -> Tensor:
        """Block p of x (split along dim 0 into `size` equal blocks) goes to rank p; differentiable."""
        return _AllToAll.apply(x, self.group)


def set_expert_parallel_group(model: nn.Module, group) -> None:
    """Give every MoE layer the expert-parallel process group it exchanges tokens over."""
    ep = ExpertParallelGroup(group)
    for layer in moe_layers(model):
        layer.deepspeed_moe.set_expert_parallel(ep)


def setup_expert_parallel(model: nn.Module, use_data_before_expert_parallel: bool = False) -> None:
    """Create DeepSpeed's expert- and expert-data-parallel groups and attach them, as the engine would."""
    for layer in moe_layers(model):
        layer.set_deepspeed_parallelism(use_data_before_expert_parallel)


class UlyssesAttention(nn.Module):
    """A block's attention core behind DeepSpeed's DistributedAttention: (B, S/P, H, Dh) in and out."""

    def __init__(self, core: nn.Module, sp_group):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        # scatter heads (dim 2), gather the sequence (dim 1): the layout AttentionCore takes
        self.dist_attn = DistributedAttention(core, sp_group, scatter_idx=2, gather_idx=1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = True) -> Tensor:
        if attn_mask is not None:
            raise ValueError("sequence parallelism runs plain causal attention only (no KV cache, no padding mask)")
        return self.dist_attn(q, k, v, 0, None, attn_mask=None, is_causal=is_causal)


def apply_sequence_parallel(model: nn.Module, sp_group) -> nn.Module:
    """Wrap every attention core of `model` (a GPTMoE or anything holding its blocks) for Ulysses."""
    for module in list(model.modules()):
        if isinstance(module, CausalSelfAttention) and not isinstance(module.core, UlyssesAttention):
            module.core = UlyssesAttention(module.core, sp_group)
    return model


def sequence_shard(x: Tensor, rank: int, world: int, dim: int = 1) -> tuple[Tensor, Tensor]:
    """This rank's contiguous slice of the sequence dimension, and its position ids (1, S/P)."""
    n = x.shape[dim]
    if n % world:
        raise ValueError(f"sequence length {n} is not divisible by the sequence-parallel size {world}")
    step = n // world
    return x.narrow(dim, rank * step, step), torch.arange(rank * step, (rank + 1) * step, device=x.device)[None]
