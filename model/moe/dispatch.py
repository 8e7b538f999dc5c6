"""Moving routed tokens to their experts and the results back.

Shape suffixes: T tokens, D model dim, E experts (global), L local experts, P expert-parallel ranks,
C capacity (slots per expert), R routes, N rows of the expert buffer.

Two layouts, one interface (dispatch -> compute -> combine):

- `CapacityDispatcher`: an (E, C, D) buffer, C slots per expert. Fixed shapes let it ride an all-to-all
  when experts live on several ranks, and one batched GEMM computes all local experts. Used when routing
  has a capacity (token-dropping training, expert choice in training) and whenever EP > 1 (dropless then
  sizes C to the busiest expert across the expert-parallel group).
- `GroupedDispatcher`: the (R, D) routes sorted by expert, no padding; a grouped GEMM computes each
  expert's segment. Used for dropless routing on one rank, which includes evaluation and generation.

Both describe the layout as a `RowMap` (which token feeds each buffer row, which row holds each route) and
move rows with two autograd functions whose backward passes are written out: `_Dispatch` gathers token
rows into the buffer, `_Combine` gathers buffer rows back and sums each token's routes weighted by the
router, in fp32. Written by hand, each backward is a gather rather than autograd's zero-fill plus
scatter-add, and the combine's two gradients share one gather; on a CPU this halves the time spent outside
the expert GEMMs. Top-k routes come as K blocks of T tokens (every first choice, then every second
choice), so a token's gradient is a sum of K gathered rows; expert choice, where a token may sit in many
rows or none, scatter-adds.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .router import Routing


class RowMap:
    """Where routes sit in an expert buffer of N rows, and which routes belong to each token.

    Routes are grouped into one bag per token: `bag_I` lists route ids token by token (`offsets_T` where
    each token's bag starts, or None when every bag holds exactly K routes, as with top-k). Moving rows
    back to tokens is then one `embedding_bag` (a fused gather + weighted sum), for the combine and for
    the dispatch's gradient alike.
    """

    def __init__(self, token_R: Tensor, slot_R: Tensor, num_rows: int, num_tokens: int, routes_per_token: int,
                 dropping: bool):
        self.num_rows, self.num_tokens = num_rows, num_tokens
        self.slot_R = slot_R  # row of each route; num_rows for a dropped route
        self.kept_R = slot_R < num_rows if dropping else None  # None: no route is dropped
        # Row each route reads: a dropped route reads the last row, with weight 0.
        self.read_R = slot_R.clamp(max=num_rows - 1) if dropping else slot_R
        # Token feeding each row; empty rows read token 0, a finite row whose output nobody reads.
        source = torch.zeros(num_rows + 1, dtype=torch.long, device=slot_R.device)
        self.source_N = source.scatter_(0, slot_R, token_R)[:-1]  # dropped routes write the scratch entry
        k = routes_per_token
        if k:  # routes are K blocks of T tokens: token t's bag is routes t, T + t, ..., (K-1)T + t
            self.bag_I = torch.arange(k * num_tokens, device=slot_R.device).view(k, num_tokens).t().reshape(-1)
            self.offsets_T = None
        else:  # expert choice: a token has any number of routes
            self.bag_I = torch.sort(token_R, stable=True).indices
            counts_T = torch.bincount(token_R, minlength=num_tokens)
            self.offsets_T = torch.cumsum(counts_T, dim=0) - counts_T
        self.bag_rows_I = self.read_R.index_select(0, self.bag_I)
        if k:
            self.bag_rows_I = self.bag_rows_I.view(num_tokens, k)

    def weight_N(self, weight_R: Tensor) -> Tensor:
        """Route weights laid out by row; 0 for empty rows."""
        out = weight_R.new_zeros(self.num_rows + 1)  # + a scratch entry that dropped routes write to
        return out.scatter_(0, self.slot_R, weight_R)[:-1]

    def sum_per_token(self, rows_ND: Tensor, weight_R: Tensor | None) -> Tensor:
        """out[t] = sum over t's routes r of weight_R[r] * rows[row of r]  (T, D)."""
        weights = None if weight_R is None else weight_R.index_select(0, self.bag_I).view_as(self.bag_rows_I)
        return F.embedding_bag(self.bag_rows_I, rows_ND, self.offsets_T, mode="sum", per_sample_weights=weights)


class _Dispatch(torch.autograd.Function):
    """x_TD -> buffer rows x_ND (row n is token source_N[n])."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, rows: RowMap) -> Tensor:
        ctx.rows = rows
        return x_TD.index_select(0, rows.source_N)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        rows = ctx.rows  # each token's gradient is the sum of its kept rows' gradients
        kept_R = None if rows.kept_R is None else rows.kept_R.to(grad_ND.dtype)
        return rows.sum_per_token(grad_ND, kept_R), None


class _Combine(torch.autograd.Function):
    """Buffer rows y_ND -> (T, D): out[t] = sum over t's routes r of weight_R[r] * y[row of r], in fp32."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, weight_R: Tensor, rows: RowMap) -> Tensor:
        ctx.rows = rows
        ctx.save_for_backward(y_ND, weight_R)
        ctx.dtype = torch.promote_types(y_ND.dtype, torch.float32)  # bf16 sums lose precision
        weight_R = weight_R.to(ctx.dtype)
        if rows.kept_R is not None:  # a dropped route reads some other route's row: never with its weight
            weight_R = weight_R * rows.kept_R
        return rows.sum_per_token(y_ND.to(ctx.dtype), weight_R).to(y_ND.dtype)

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        rows = ctx.rows
        y_ND, weight_R = ctx.saved_tensors
        grad_ND = grad_TD.index_select(0, rows.source_N).to(ctx.dtype)  # each row's token gradient
        grad_weight_R = torch.linalg.vecdot(grad_ND, y_ND.to(ctx.dtype)).index_select(0, rows.read_R)
        if rows.kept_R is not None:
            grad_weight_R = grad_weight_R * rows.kept_R
        grad_y_ND = grad_ND.mul_(rows.weight_N(weight_R.to(ctx.dtype)).unsqueeze(-1)).to(y_ND.dtype)
        return grad_y_ND, grad_weight_R.to(weight_R.dtype), None


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


class GroupedDispatcher:
    def __init__(self, routing: Routing, num_tokens: int):
        self.routing = routing
        order_R = routing.order_R  # row n holds route order_R[n]
        slot_R = torch.empty_like(order_R)
        slot_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        self.rows = RowMap(routing.token_R, slot_R, order_R.numel(), num_tokens, routing.routes_per_token,
                           dropping=False)

    def dispatch(self, x_TD: Tensor) -> Tensor:
        return _Dispatch.apply(x_TD, self.rows)  # (R, D), grouped by expert

    def compute(self, experts, x_RD: Tensor) -> Tensor:
        return experts.forward_grouped(x_RD, self.routing.counts_E)

    def combine(self, y_RD: Tensor) -> Tensor:
        return _Combine.apply(y_RD, self.routing.weight_R, self.rows)


class CapacityDispatcher:
    def __init__(self, routing: Routing, num_experts: int, capacity: int, num_tokens: int,
                 ep_group=None, ep_size: int = 1):
        self.routing = routing
        self.num_experts, self.capacity, self.num_tokens = num_experts, capacity, num_tokens
        self.ep_group, self.ep_size = ep_group, ep_size
        num_rows = num_experts * capacity
        slot_R = torch.where(routing.position_R < capacity, routing.expert_R * capacity + routing.position_R,
                             num_rows)
        # Only token choice with a capacity drops routes; expert choice fills exactly C rows per expert.
        dropping = routing.capacity is not None and routing.routes_per_token > 0
        self.rows = RowMap(routing.token_R, slot_R, num_rows, num_tokens, routing.routes_per_token, dropping)

    def dispatch(self, x_TD: Tensor) -> Tensor:
        x_ECD = _Dispatch.apply(x_TD, self.rows).view(self.num_experts, self.capacity, -1)
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
        return _Combine.apply(y_ECD.reshape(-1, d), self.routing.weight_R, self.rows)
