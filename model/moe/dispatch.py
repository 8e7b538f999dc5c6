"""Moving routed tokens to their experts and the results back.

Shape suffixes: T tokens, D model dim, E experts (global), L local experts, P expert-parallel ranks,
C capacity (slots per expert), R routes.

Two layouts, one interface (dispatch -> compute -> combine):

- `CapacityDispatcher`: an (E, C, D) buffer, C slots per expert. Fixed shapes let it ride an all-to-all
  when experts live on several ranks, and one batched GEMM computes all local experts. Used when routing
  has a capacity (token-dropping training, expert choice in training) and whenever EP > 1 (dropless then
  sizes C to the busiest expert across the expert-parallel group).
- `GroupedDispatcher`: the (R, D) routes sorted by expert, no padding; a grouped GEMM computes each
  expert's segment. Used for dropless routing on one rank, which includes evaluation and generation.

Both gather token rows by index (no dense (T, E, C) one-hot einsum) and combine in fp32: top-k routes
come as K blocks of T tokens and are summed block-wise; expert choice, where a token may have many routes
or none, scatter-adds over tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .router import Routing


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


def _combine(y_RD: Tensor, routing: Routing, num_tokens: int) -> Tensor:
    """Weighted sum of each token's expert outputs; y_RD in route order. In fp32: bf16 sums lose precision."""
    weighted_RD = y_RD.float() * routing.weight_R.unsqueeze(-1)
    k = routing.routes_per_token
    if k:
        out_TD = weighted_RD.view(k, num_tokens, -1).sum(dim=0) if k > 1 else weighted_RD
    else:
        out_TD = torch.zeros(num_tokens, y_RD.shape[-1], dtype=torch.float32, device=y_RD.device)
        out_TD.index_add_(0, routing.token_R, weighted_RD)
    return out_TD.to(y_RD.dtype)


class GroupedDispatcher:
    def __init__(self, routing: Routing, num_tokens: int):
        self.routing = routing
        self.num_tokens = num_tokens
        self.token_R = routing.token_R[routing.order_R]  # sources in expert order

    def dispatch(self, x_TD: Tensor) -> Tensor:
        return x_TD.index_select(0, self.token_R)  # (R, D), grouped by expert

    def compute(self, experts, x_RD: Tensor) -> Tensor:
        return experts.forward_grouped(x_RD, self.routing.counts_E)

    def combine(self, y_RD: Tensor) -> Tensor:
        # back from expert order to route order
        rank_R = torch.empty_like(self.routing.order_R)
        rank_R[self.routing.order_R] = torch.arange(rank_R.numel(), device=rank_R.device)
        return _combine(y_RD.index_select(0, rank_R), self.routing, self.num_tokens)


class CapacityDispatcher:
    def __init__(self, routing: Routing, num_experts: int, capacity: int, num_tokens: int,
                 ep_group=None, ep_size: int = 1):
        self.routing = routing
        self.num_experts, self.capacity, self.num_tokens = num_experts, capacity, num_tokens
        self.ep_group, self.ep_size = ep_group, ep_size
        kept_R = routing.position_R < capacity
        # Dropped routes all land on one scratch slot past the buffer, which is never read back.
        scratch = num_experts * capacity
        self.slot_R = torch.where(kept_R, routing.expert_R * capacity + routing.position_R, scratch)
        # Dropped routes have weight 0, so combine may read any row for them: slot 0 avoids padding.
        self.read_R = torch.where(kept_R, self.slot_R, 0)

    def dispatch(self, x_TD: Tensor) -> Tensor:
        # Name each slot's source token; empty slots read token 0, a finite row whose output nobody reads.
        source = torch.zeros(self.num_experts * self.capacity + 1, dtype=torch.long, device=x_TD.device)
        source.scatter_(0, self.slot_R, self.routing.token_R)
        x_ECD = x_TD.index_select(0, source[:-1]).view(self.num_experts, self.capacity, -1)
        if self.ep_size == 1:
            return x_ECD
        # Rank p holds experts p*L .. p*L+L-1: send each rank its block, receive every rank's tokens for ours.
        x_PLCD = _AllToAll.apply(x_ECD, self.ep_group).view(self.ep_size, -1, self.capacity, x_TD.shape[-1])
        return x_PLCD.transpose(0, 1).reshape(x_PLCD.shape[1], -1, x_TD.shape[-1])  # (L, P*C, D)

    def compute(self, experts, x_ECD: Tensor) -> Tensor:
        return experts(x_ECD)

    def combine(self, y_ECD: Tensor) -> Tensor:
        d = y_ECD.shape[-1]
        if self.ep_size > 1:
            y_PLCD = y_ECD.view(y_ECD.shape[0], self.ep_size, self.capacity, d).transpose(0, 1)
            y_ECD = _AllToAll.apply(y_PLCD.reshape(self.num_experts, self.capacity, d), self.ep_group)
        y_RD = y_ECD.reshape(-1, d).index_select(0, self.read_R)
        return _combine(y_RD, self.routing, self.num_tokens)
