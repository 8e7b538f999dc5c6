"""Moving routed tokens to their experts and the results back.

Shape suffixes: T tokens, D model dim, E experts (global), L local experts, P expert-parallel ranks,
C capacity (slots per expert), R routes, N rows of the expert buffer.

Two layouts, one interface: `dispatch(x)` builds the experts' input, the experts run on it (the MoE layer
calls them, see `model/moe/layer.py`), `combine(y, weight_R)` brings their output back weighted by the
router's weights, which it takes as an argument. A dispatcher holds the layout only, built from a routing.

- `CapacityDispatcher`: an (E, C, D) buffer, C slots per expert. Fixed shapes let it ride an all-to-all
  when experts live on several ranks, and one batched GEMM computes all local experts. Used when routing
  has a capacity (token-dropping training, expert choice in training) and whenever EP > 1 (dropless then
  sizes C to the busiest expert across the expert-parallel group).
- `GroupedDispatcher`: the (R, D) routes sorted by expert, no padding (`rows_per_expert` says how many rows
  each expert's segment has); a grouped GEMM computes each segment. Used for dropless routing on one rank,
  which includes evaluation and generation.

Both describe the layout as a `RowMap` (which token feeds each buffer row, which row holds each route) and
move rows with two autograd functions whose backward passes are written out: `_Dispatch` gathers token
rows into the buffer, `_Combine` gathers buffer rows back and sums each token's routes weighted by the
router, in fp32. Written by hand, each backward is a gather rather than autograd's zero-fill plus
scatter-add, and the combine's two gradients share one gather (benchmarks/moe_layer.py times the layer).
Top-k routes come as K blocks of T tokens (every first choice, then every second choice), so each token's
bag holds K routes; with expert choice a token's bag holds any number of routes, or none.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .router import Routing


class RowMap:
    """Where routes sit in an expert buffer of N rows, and which routes belong to each token.

    Routes are grouped into one bag per token: `bag_I` lists route ids token by token (`offsets_T` where
    each token's bag starts, or None when every bag holds exactly K routes, as with top-k). Moving rows
    back to tokens is then one `embedding_bag` (a fused gather + weighted sum), for the combine and for
    the dispatch's gradient alike. A capacity buffer may have empty rows (`filled_N` marks the others);
    they hold zeros, as in DeepSpeed's one-hot dispatch, and carry no gradient.

    The autograd functions save the index tensors with `save_for_backward`, so under activation
    recomputation they are dropped after the forward and the backward uses the recomputed ones.
    """

    TENSORS = ("source_N", "filled_N", "slot_R", "kept_R", "read_R", "bag_I", "bag_rows_I", "offsets_T")

    def __init__(self, token_R: Tensor, slot_R: Tensor, num_rows: int, num_tokens: int, routes_per_token: int,
                 dropping: bool, padded: bool):
        self.num_rows, self.num_tokens, self.routes_per_token = num_rows, num_tokens, routes_per_token
        device = slot_R.device
        self.slot_R = slot_R  # row of each route; num_rows for a dropped route
        self.kept_R = slot_R < num_rows if dropping else None  # None: no route is dropped
        # Row each route reads: a dropped route reads the last row, with weight 0.
        self.read_R = slot_R.clamp(max=num_rows - 1) if dropping else slot_R
        self.source_N = self.by_row(token_R)  # token feeding each row (token 0 for an empty row)
        self.filled_N = self.by_row(torch.ones(slot_R.shape, device=device)) if padded else None
        k = routes_per_token
        if k:  # routes are K blocks of T tokens: token t's bag is routes t, T + t, ..., (K-1)T + t
            self.bag_I = torch.arange(k * num_tokens, device=device).view(k, num_tokens).t().reshape(-1)
            self.offsets_T = None
            self.bag_rows_I = self.read_R.index_select(0, self.bag_I).view(num_tokens, k)
        else:  # expert choice: a token has any number of routes, none included
            self.bag_I = torch.sort(token_R, stable=True).indices
            self.offsets_T = torch.searchsorted(token_R.index_select(0, self.bag_I),
                                                torch.arange(num_tokens, device=device))
            self.bag_rows_I = self.read_R.index_select(0, self.bag_I)

    def pack(self) -> tuple[RowMap, tuple]:
        """(a copy without tensors, the tensors) for ctx / save_for_backward."""
        skeleton = copy.copy(self)
        for name in self.TENSORS:
            setattr(skeleton, name, None)
        return skeleton, tuple(getattr(self, name) for name in self.TENSORS)

    def unpack(self, tensors) -> RowMap:
        rows = copy.copy(self)
        for name, tensor in zip(self.TENSORS, tensors):
            setattr(rows, name, tensor)
        return rows

    def by_row(self, values_R: Tensor) -> Tensor:
        """Route values laid out by row; 0 for empty rows (dropped routes write a scratch entry past the end)."""
        return values_R.new_zeros(self.num_rows + 1).scatter_(0, self.slot_R, values_R)[:-1]

    def rows_from_tokens(self, x_TD: Tensor) -> Tensor:
        """Row n = x[source_N[n]]; an empty row is zeros."""
        if self.filled_N is None:
            return x_TD.index_select(0, self.source_N)
        return F.embedding_bag(self.source_N.unsqueeze(1), x_TD, mode="sum",
                               per_sample_weights=self.filled_N.to(x_TD.dtype).unsqueeze(1))

    def sum_per_token(self, rows_ND: Tensor, weight_R: Tensor | None) -> Tensor:
        """out[t] = sum over t's routes r of weight_R[r] * rows[row of r]  (T, D)."""
        weights = None if weight_R is None else weight_R.index_select(0, self.bag_I).view_as(self.bag_rows_I)
        return F.embedding_bag(self.bag_rows_I, rows_ND, self.offsets_T, mode="sum", per_sample_weights=weights)


class _Dispatch(torch.autograd.Function):
    """x_TD -> buffer rows x_ND (row n is token source_N[n], or zeros if no route fills it)."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, rows: RowMap) -> Tensor:
        ctx.rows, tensors = rows.pack()
        ctx.save_for_backward(*tensors)
        return rows.rows_from_tokens(x_TD)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND: Tensor):
        rows = ctx.rows.unpack(ctx.saved_tensors)  # each token's gradient: the sum of its kept rows'
        kept_R = None if rows.kept_R is None else rows.kept_R.to(grad_ND.dtype)
        return rows.sum_per_token(grad_ND, kept_R), None


class _Combine(torch.autograd.Function):
    """Buffer rows y_ND -> (T, D): out[t] = sum over t's kept routes r of weight_R[r] * y[row of r], in fp32."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, weight_R: Tensor, rows: RowMap) -> Tensor:
        ctx.rows, tensors = rows.pack()
        ctx.save_for_backward(y_ND, weight_R, *tensors)
        ctx.dtype = torch.promote_types(y_ND.dtype, torch.float32)  # bf16 sums lose precision
        weight_R = weight_R.to(ctx.dtype)
        if rows.kept_R is not None:  # a dropped route reads some other route's row: never with its weight
            weight_R = weight_R * rows.kept_R
        return rows.sum_per_token(y_ND.to(ctx.dtype), weight_R).to(y_ND.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD: Tensor):
        y_ND, weight_R, *tensors = ctx.saved_tensors
        rows = ctx.rows.unpack(tensors)
        grad_ND = grad_TD.index_select(0, rows.source_N).to(ctx.dtype)  # each row's token gradient
        grad_weight_R = None
        if ctx.needs_input_grad[1]:
            grad_weight_R = torch.linalg.vecdot(grad_ND, y_ND.to(ctx.dtype)).index_select(0, rows.read_R)
            if rows.kept_R is not None:
                grad_weight_R = grad_weight_R * rows.kept_R
            grad_weight_R = grad_weight_R.to(weight_R.dtype)
        grad_y_ND = grad_ND.mul_(rows.by_row(weight_R.to(ctx.dtype)).unsqueeze(-1)).to(y_ND.dtype)
        return grad_y_ND, grad_weight_R, None


class GroupedDispatcher:
    """Dropless routes on one rank: (T, D) -> (R, D) sorted by expert -> (T, D)."""

    def __init__(self, routing: Routing, num_tokens: int):
        order_R = routing.order_R  # row n holds route order_R[n]
        slot_R = torch.empty_like(order_R)
        slot_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        self.rows = RowMap(routing.token_R, slot_R, order_R.numel(), num_tokens, routing.routes_per_token,
                           dropping=False, padded=False)
        self.rows_per_expert = routing.counts_E  # (E,) the length of each expert's segment

    def dispatch(self, x_TD: Tensor) -> Tensor:
        return _Dispatch.apply(x_TD, self.rows)  # (R, D), grouped by expert

    def combine(self, y_RD: Tensor, weight_R: Tensor) -> Tensor:
        return _Combine.apply(y_RD, weight_R, self.rows)


class CapacityDispatcher:
    """Routes in C slots per expert: (T, D) -> (E, C, D), or (L, P*C, D) on each of P expert-parallel ranks
    holding L experts each -> (T, D). `ep`: the model.parallel.ExpertParallelGroup when P > 1."""

    rows_per_expert = None  # every expert has C rows

    def __init__(self, routing: Routing, num_experts: int, capacity: int, num_tokens: int, ep=None):
        self.num_experts, self.capacity, self.num_tokens = num_experts, capacity, num_tokens
        self.ep = ep if ep is not None and ep.size > 1 else None
        num_rows = num_experts * capacity
        slot_R = torch.where(routing.position_R < capacity, routing.expert_R * capacity + routing.position_R,
                             num_rows)
        # Expert choice in training fills exactly C rows per expert; token choice may leave rows empty, and
        # drops routes when the routing has a capacity (dropless routing sized C to the busiest expert).
        full = routing.routes_per_token == 0 and routing.capacity is not None
        self.rows = RowMap(routing.token_R, slot_R, num_rows, num_tokens, routing.routes_per_token,
                           dropping=routing.capacity is not None and not full, padded=not full)

    def dispatch(self, x_TD: Tensor) -> Tensor:
        x_ECD = _Dispatch.apply(x_TD, self.rows).view(self.num_experts, self.capacity, -1)
        if self.ep is None:
            return x_ECD
        # Rank p holds experts p*L .. p*L+L-1: send each rank its block, receive every rank's tokens for ours.
        d = x_TD.shape[-1]
        x_PLCD = self.ep.all_to_all(x_ECD).view(self.ep.size, -1, self.capacity, d)
        return x_PLCD.transpose(0, 1).reshape(x_PLCD.shape[1], -1, d)  # (L, P*C, D)

    def combine(self, y_ECD: Tensor, weight_R: Tensor) -> Tensor:
        d = y_ECD.shape[-1]
        if self.ep is not None:
            y_PLCD = y_ECD.view(y_ECD.shape[0], self.ep.size, self.capacity, d).transpose(0, 1)
            y_ECD = self.ep.all_to_all(y_PLCD.reshape(self.num_experts, self.capacity, d))
        return _Combine.apply(y_ECD.reshape(-1, d), weight_R, self.rows)
