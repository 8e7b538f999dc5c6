"""Routers: which experts process which tokens, and with what weight.

Shape suffixes: T tokens (batch x sequence, flattened), D model dim, E experts (global), K routes per token,
C expert capacity, R routes (token-expert pairs).

A router turns hidden states into a `Routing`: R routes, each a (token, expert, weight) triple plus the
route's rank among the routes of its expert, in priority order. The rank is the route's slot in its
expert's capacity buffer; routes ranked at or beyond the capacity are dropped (their token passes through
the residual connection). Token-choice routers lay routes out K-major (every first choice, then every
second choice), so first choices claim capacity first, as in GShard.

All router math is fp32 whatever the model precision: the softmax over experts and the balancing losses
lose too much in bf16 (Switch Transformer, section 2.4).

Randomness (jitter, random token selection, second-expert sampling) exists only in training. In eval mode
every router is deterministic and dropless, so a token's routing depends on that token alone.

Auxiliary-loss-free balancing (token choice, `expert_bias_rate > 0`; DeepSeek-V3, section 2.1.2): a
per-expert bias is added to the router logits when experts are selected, never to the combine weights, and
after each optimizer step it moves by the rate towards balance: down for experts that got more than the mean
load over the whole step (every micro batch of every data-parallel rank), up for the others
(`apply_expert_load`). It is a buffer, not a parameter: no gradient, saved in checkpoints, frozen in eval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Expert choice calibrates its inference thresholds with an exponential moving average over training steps.
EC_THRESHOLD_MOMENTUM = 0.99


@dataclass
class Routing:
    token_R: Tensor  # long: the token each route carries
    expert_R: Tensor  # long: the (global) expert it goes to
    weight_R: Tensor  # fp32: its combine weight (0 for a dropped route)
    position_R: Tensor  # long: its rank among its expert's routes, in priority order
    order_R: Tensor  # long: route ids sorted by expert, then priority (the grouped layout)
    counts_E: Tensor  # long: routes assigned to each expert, before any capacity limit
    capacity: int | None  # slots per expert; None = dropless (no route is dropped)
    aux_loss: Tensor  # fp32 scalar, not yet weighted by its coefficient
    z_loss: Tensor  # fp32 scalar, not yet weighted by its coefficient
    dropped_fraction: Tensor  # fp32 scalar: token choice: routes over capacity; expert choice: tokens no expert took
    # expert choice in training: each expert's lowest accepted score, to calibrate inference thresholds with
    # (averaged over the expert-parallel group first, so every rank keeps the same thresholds)
    calibration_E: Tensor | None = None
    # K when routes are K-major blocks over all T tokens (token_R = arange(T) repeated K times, top-k
    # routers), so every token has exactly K routes. 0 otherwise (expert choice).
    routes_per_token: int = 0
    # fp32 scalar: mean over tokens of the entropy (nats) of the router's distribution over experts; log E is
    # uniform, 0 is certain. Detached: a statistic, not a loss.
    entropy: Tensor | None = None


def count(index: Tensor, n: int) -> Tensor:
    """How often each of 0..n-1 occurs in `index` (long). Unlike `torch.bincount`, no host sync on CUDA."""
    return torch.zeros(n, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))


def load_balancing_loss(probs_TE: Tensor, first_choice_T: Tensor) -> Tensor:
    """Switch Transformer (Fedus et al. 2021, eq. 4-6); GShard's l_aux counts first choices the same way.

        loss = E * sum_e f_e * P_e,  f_e = fraction of tokens whose first choice is e,
                                     P_e = mean router probability of e.

    It is 1.0 when routing is uniform and grows as load concentrates; only P carries a gradient.
    """
    num_tokens, num_experts = probs_TE.shape
    f_E = count(first_choice_T, num_experts).to(probs_TE.dtype) / num_tokens
    p_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E * p_E)


def router_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of -sum_e p log p (nats), detached."""
    probs_TE = probs_TE.detach()
    return -(probs_TE * probs_TE.clamp(min=torch.finfo(probs_TE.dtype).tiny).log()).sum(dim=-1).mean()


def in_recomputation() -> bool:
    """True inside backward, where activation recomputation replays a forward: statistics that a training
    step feeds into state (expert-choice thresholds, expert-bias load) must count each step once."""
    return getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def expert_capacity(num_routes: int, num_experts: int, factor: float, min_capacity: int, num_tokens: int) -> int:
    """Slots per expert: ceil(routes / experts * factor), at least min_capacity, at most the token count
    (an expert never holds the same token twice, so more slots would stay empty)."""
    return max(1, min(max(math.ceil(num_routes / num_experts * factor), min_capacity), num_tokens))


def expert_softmax(logits_TE: Tensor) -> Tensor:
    """Softmax over experts. torch's CPU kernel runs scalar code when the softmaxed dim is shorter than one
    SIMD vector (16 fp32 lanes with AVX-512), so with few experts the softmax runs along the token axis of the
    transposed scores instead (benchmarks/moe_layer.py times both)."""
    if logits_TE.device.type == "cpu" and logits_TE.shape[-1] < 16:
        return torch.softmax(logits_TE.t().contiguous(), dim=0).t()
    return torch.softmax(logits_TE, dim=-1)


def rank_within_experts(expert_R: Tensor, num_experts: int, shuffle_levels: int = 0):
    """Sort routes by expert and rank each among its expert's routes.

    Without shuffling, priority is route order (first come, first served). With `shuffle_levels=K` (random
    token selection), the routes form K levels of equal size (first choices, second choices, ...) and each
    level is shuffled, so overflow drops random tokens rather than the batch's last ones, while a first
    choice still outranks every second choice.
    Returns (order_R, position_R, counts_E).
    """
    num_routes = expert_R.numel()
    if shuffle_levels:
        per_level = num_routes // shuffle_levels
        priority_R = torch.cat([torch.randperm(per_level, device=expert_R.device) + level * per_level
                                for level in range(shuffle_levels)])
        order_R = priority_R[torch.sort(expert_R[priority_R], stable=True).indices]
    else:
        order_R = torch.sort(expert_R, stable=True).indices
    counts_E = count(expert_R, num_experts)
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E
    position_R = torch.empty_like(order_R)
    position_R[order_R] = torch.arange(num_routes, device=expert_R.device) - starts_E[expert_R[order_R]]
    return order_R, position_R, counts_E


class Router(nn.Module):
    """Shared part of every router: the gate projection `wg` (DeepSpeed's name, which its checkpoint writer
    recognises as not an expert weight) and fp32 logits with optional multiplicative jitter."""

    def __init__(self, hidden_size: int, num_experts: int, *, capacity_factor: float, min_capacity: int,
                 drop_tokens: bool, jitter: float = 0.0, expert_bias_rate: float = 0.0):
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.jitter = jitter
        self.expert_bias_rate = expert_bias_rate
        if expert_bias_rate > 0:
            # Only with the option on, so checkpoints of routers without it load unchanged. Not named
            # "expert_...": DeepSpeed's checkpoint writer takes every state key with "expert" in it for an
            # expert weight.
            self.register_buffer("selection_bias", torch.zeros(num_experts))
            # Routes each expert was chosen for since the last update, this rank's micro batches (not saved:
            # an update consumes it within the step that filled it).
            self.register_buffer("step_load", torch.zeros(num_experts), persistent=False)
        else:
            self.selection_bias = self.step_load = None

    # Router state that is not a weight: the expert bias, its load counts and expert choice's thresholds.
    # They stay float32 when the model is cast (DeepSpeed's bf16/fp16 engines call .bfloat16() / .half()):
    # in bf16, counts above 256 round and a bias step of 1e-3 vanishes next to a bias of 0.2.
    FP32_BUFFERS = ("selection_bias", "step_load", "ec_threshold")

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers.pop(name) for name in self.FP32_BUFFERS if self._buffers.get(name) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in kept.items():
                # fn on an empty tensor tells where it sends tensors; the buffer follows there in float32
                device = fn(buf.new_empty(0)).device
                self._buffers[name] = buf.to(device=device, dtype=torch.float32)
        return self

    def logits(self, x_TD: Tensor) -> Tensor:
        x_TD = x_TD.float()
        if self.training and self.jitter > 0:
            # Switch Transformer's input jitter: x * U(1 - eps, 1 + eps), training only.
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        return F.linear(x_TD, self.wg.weight.float())  # (T, E) fp32

    def count_load(self, counts_E: Tensor) -> None:
        """Accumulate a training micro batch's routes per expert for the next expert-bias update."""
        if self.step_load is not None and self.training and torch.is_grad_enabled() and not in_recomputation():
            self.step_load += counts_E.to(self.step_load.dtype)

    @torch.no_grad()
    def update_expert_bias(self, load_E: Tensor) -> None:
        """One step of the bias towards balance, from the step's load over every rank that routes tokens:
        +rate for experts below the mean load, -rate above it (DeepSeek-V3's sign update). The bias is kept
        centred (selection does not change when every expert's bias moves alike)."""
        load_E = load_E.to(self.selection_bias)
        self.selection_bias += self.expert_bias_rate * torch.sign(load_E.mean() - load_E)
        self.selection_bias -= self.selection_bias.mean()
        self.step_load.zero_()


def expert_bias_routers(model: nn.Module) -> list[Router]:
    """The routers of `model` that balance with an expert bias, in module order."""
    return [m for m in model.modules() if isinstance(m, Router) and m.selection_bias is not None]


def pending_expert_load(model: nn.Module) -> Tensor | None:
    """This rank's load since the last update, every expert-bias router's concatenated (float64), or None.
    Sum it over every rank that routes tokens (the data-parallel world, which holds the expert-parallel
    groups) and hand the sum to `apply_expert_load`, once per optimizer step."""
    routers = expert_bias_routers(model)
    return torch.cat([r.step_load.double() for r in routers]) if routers else None


def apply_expert_load(model: nn.Module, load: Tensor) -> None:
    """Update every expert-bias router from its slice of the summed `pending_expert_load` vector. Every rank
    applies the same sums, so the biases stay identical on all ranks."""
    offset = 0
    for router in expert_bias_routers(model):
        router.update_expert_bias(load[offset:offset + router.num_experts])
        offset += router.num_experts


class TopKRouter(Router):
    """Token choice: each token picks its k best experts (k=1 Switch, k=2 GShard).

    Top-1 weights a token's expert output by the router probability (Switch); top-2 renormalises the two
    probabilities to sum to one after capacity drops (GShard, as DeepSpeed does). In training with
    `drop_tokens`, an expert takes at most C = ceil(k*T/E * capacity_factor) routes (at least min_capacity);
    the rest are dropped. Otherwise (and always in eval mode) routing is dropless. With an expert bias, the
    experts are the k best of logits + bias; their weights are still the unbiased probabilities.
    """

    def __init__(self, hidden_size: int, num_experts: int, k: int, *, use_rts: bool = True,
                 second_expert_sampling: bool = False, **kw):
        super().__init__(hidden_size, num_experts, **kw)
        if k not in (1, 2):
            raise ValueError(f"TopKRouter.k: got {k!r}; allowed: 1 | 2")
        self.k = k
        self.use_rts = use_rts
        self.second_expert_sampling = second_expert_sampling

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = expert_softmax(logits_TE)
        num_tokens, num_experts = probs_TE.shape
        # The first choice from the logits (plus any selection bias), not the probabilities: the same expert,
        # except that logits a softmax rounds to equal probabilities (a router started near zero, as an upcycled
        # one) stay apart.
        select_TE = logits_TE.detach() if self.selection_bias is None else logits_TE.detach() + self.selection_bias
        first_T = select_TE.argmax(dim=-1)  # (T,)
        first_gate_T = probs_TE.gather(1, first_T.unsqueeze(1)).squeeze(1)
        if self.k == 1:
            expert_KT, gate_KT = first_T.unsqueeze(0), first_gate_T.unsqueeze(0)
        else:
            second_logits_TE = select_TE
            if self.training and self.second_expert_sampling:
                # Gumbel-max: sample the second expert in proportion to its probability (training only).
                second_logits_TE = second_logits_TE - torch.empty_like(second_logits_TE).exponential_().log()
            second_T = second_logits_TE.scatter(1, first_T.unsqueeze(1), float("-inf")).max(dim=-1).indices
            expert_KT = torch.stack([first_T, second_T])
            gate_KT = torch.stack([first_gate_T, probs_TE.gather(1, second_T.unsqueeze(1)).squeeze(1)])

        dropping = self.training and self.drop_tokens
        expert_R = expert_KT.flatten()
        order_R, position_R, counts_E = rank_within_experts(
            expert_R, num_experts, shuffle_levels=self.k if dropping and self.use_rts else 0)
        self.count_load(counts_E)
        capacity = None
        if dropping:
            capacity = expert_capacity(expert_R.numel(), num_experts, self.capacity_factor, self.min_capacity,
                                       num_tokens)
            kept_KT = (position_R < capacity).view_as(gate_KT)
            gate_KT = gate_KT * kept_KT
            dropped = 1.0 - kept_KT.float().mean()
        else:
            dropped = probs_TE.new_zeros(())
        if self.k == 2:
            gate_KT = gate_KT / gate_KT.sum(dim=0, keepdim=True).clamp(min=torch.finfo(gate_KT.dtype).eps)

        return Routing(
            token_R=torch.arange(num_tokens, device=x_TD.device).repeat(self.k), expert_R=expert_R,
            weight_R=gate_KT.flatten(), position_R=position_R, order_R=order_R, counts_E=counts_E,
            capacity=capacity, aux_loss=load_balancing_loss(probs_TE, first_T), z_loss=router_z_loss(logits_TE),
            dropped_fraction=dropped, routes_per_token=self.k, entropy=router_entropy(probs_TE))


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by router probability.

    C = ceil(T * top_k / E * capacity_factor), so a token visits top_k * capacity_factor experts on average;
    load is balanced by construction (no balancing loss), a token may be taken by several experts or by none,
    and its output is the probability-weighted sum of the experts that took it.

    Causality. In training an expert ranks all T tokens of the micro-batch, later positions and other
    sequences included, so whether a token is processed depends on tokens it may not attend to. That is
    how the method is defined and trained (the leak is only through the routing decision, not through
    values), and we keep it for training. Inference must not do this: a generated token cannot wait for
    future tokens, and a prompt's logits must not depend on its batch mates. So in eval mode the router
    decides per token, against per-expert thresholds calibrated in training: `ec_threshold[e]` is a
    moving average of the score of the C-th (last) token expert e accepted in each training batch (the MoE
    layer feeds `calibrate` once per step, averaged over the expert-parallel group). A token
    goes to expert e iff its probability for e reaches that threshold, which admits the same share of tokens
    per expert as training did, in expectation. This is causal, batch-independent, deterministic and dropless.
    Before any training step has calibrated the thresholds (NaN), eval falls back to each token's
    round(top_k * capacity_factor) best experts.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: float, **kw):
        super().__init__(hidden_size, num_experts, **kw)
        self.top_k = top_k
        self.register_buffer("ec_threshold", torch.full((num_experts,), float("nan")))

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = expert_softmax(logits_TE)
        num_tokens, num_experts = probs_TE.shape
        device = x_TD.device
        if self.training:
            capacity = expert_capacity(round(num_tokens * self.top_k), num_experts, self.capacity_factor,
                                       self.min_capacity, num_tokens)
            score_EC, token_EC = probs_TE.t().topk(capacity, dim=1)  # each expert's best C tokens
            calibration_E = score_EC[:, -1].detach()
            token_R, weight_R = token_EC.flatten(), score_EC.flatten()
            expert_R = torch.arange(num_experts, device=device).repeat_interleave(capacity)
            # Routes already come grouped by expert, one full buffer row each.
            order_R = torch.arange(token_R.numel(), device=device)
            position_R = torch.arange(capacity, device=device).repeat(num_experts)
            counts_E = torch.full((num_experts,), capacity, dtype=torch.long, device=device)
        else:
            capacity, calibration_E = None, None
            if torch.isnan(self.ec_threshold).any():
                k = max(1, min(num_experts, round(self.top_k * self.capacity_factor)))
                chosen_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(
                    1, probs_TE.topk(k, dim=-1).indices, True)
            else:
                chosen_TE = probs_TE >= self.ec_threshold
            token_R, expert_R = chosen_TE.nonzero(as_tuple=True)
            weight_R = probs_TE[token_R, expert_R]
            order_R, position_R, counts_E = rank_within_experts(expert_R, num_experts)
        taken_T = torch.zeros(num_tokens, dtype=torch.bool, device=device).index_fill_(0, token_R, True)
        return Routing(
            token_R=token_R, expert_R=expert_R, weight_R=weight_R, position_R=position_R, order_R=order_R,
            counts_E=counts_E, capacity=capacity, aux_loss=probs_TE.new_zeros(()), z_loss=router_z_loss(logits_TE),
            dropped_fraction=1.0 - taken_T.float().mean(), calibration_E=calibration_E,
            entropy=router_entropy(probs_TE))

    @torch.no_grad()
    def calibrate(self, last_accepted_E: Tensor) -> None:
        """Fold one training batch's lowest accepted scores into the inference thresholds."""
        if in_recomputation():  # count each step once
            return
        fresh = torch.isnan(self.ec_threshold)
        blended = EC_THRESHOLD_MOMENTUM * self.ec_threshold + (1 - EC_THRESHOLD_MOMENTUM) * last_accepted_E
        self.ec_threshold.copy_(torch.where(fresh, last_accepted_E, blended))
