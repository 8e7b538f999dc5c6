"""The MoE feed-forward layer: route, dispatch, expert compute, combine.

Shape suffixes: B batch, S sequence, T tokens (B*S), D model dim, E experts (global), L local experts.

`MoELayer` subclasses `deepspeed.moe.layer.MoE`, so DeepSpeed's engine treats it as one of its own:
it counts it in `has_moe_layers`, calls `set_deepspeed_parallelism()` to create the expert-parallel group,
reduces expert gradients over the expert-data-parallel group only, and writes/reads one checkpoint file per
expert. It keeps the attributes those paths read (`num_experts`, `num_local_experts`, `ep_size`,
`expert_group_name`, `deepspeed_moe.experts`, `deepspeed_moe.gate.wg`, `deepspeed_moe._set_ep_group`) but
replaces DeepSpeed's gate (which samples in eval mode) with our routers, and its per-expert module loop
with stacked experts.

The expert-parallel group comes in from outside, as a `model.parallel.ExpertParallelGroup` (DeepSpeed's
engine hands its group to `_set_ep_group`; `model.parallel.set_expert_parallel_group` attaches any group):
this layer calls its two collectives and never creates a group, reads a rank or imports torch.distributed.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from ..config import GPTMoEConfig, RouterKind
from .dispatch import CapacityDispatcher, GroupedDispatcher
from .experts import GroupedExperts, gelu, grouped_mm_supported, split_stacked
from .router import ExpertChoiceRouter, Routing, TopKRouter


def moe_layers(model: nn.Module) -> list["MoELayer"]:
    """MoE layers in module order (DeepSpeed numbers its expert checkpoint files in this order)."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


class MLP(nn.Module):
    """Dense two-layer GELU MLP (D -> F -> D). Bias-free when used as PR-MoE's residual branch or as the
    template of one expert (DeepSpeed's per-expert layout), with biases as a GPT feed-forward layer."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(gelu(self.fc1(x)))


class MoEOutput(NamedTuple):
    hidden: Tensor  # (B, S, D) like the input
    aux_loss: Tensor  # balancing loss, before its coefficient
    z_loss: Tensor  # router z-loss, before its coefficient
    expert_counts: Tensor  # (E,) routes assigned to each expert, summed over the expert-parallel group
    dropped_fraction: Tensor  # see Routing.dropped_fraction
    entropy: Tensor  # see Routing.entropy


class MoECore(nn.Module):
    """Gate + local experts + the expert-parallel group: what DeepSpeed keeps in `MoE.deepspeed_moe`
    (its checkpoint writer looks for expert weights under `deepspeed_moe.experts.` and skips
    `deepspeed_moe.gate.wg.weight`)."""

    def __init__(self, gate: nn.Module, experts: GroupedExperts, num_experts: int, ep_size: int, ep_rank: int,
                 eval_capacity_factor: float, min_capacity: int, experts_per_token: float):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.ep = None  # model.parallel.ExpertParallelGroup, attached from outside when ep_size > 1
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.experts_per_token = experts_per_token

    def set_expert_parallel(self, ep) -> None:
        """Attach the expert-parallel group (a model.parallel.ExpertParallelGroup) this layer's experts span."""
        if (ep.size, ep.rank) != (self.ep_size, self.ep_rank):
            raise ValueError(f"expert-parallel group: rank {ep.rank} of {ep.size}, but the experts were built for "
                             f"rank {self.ep_rank} of ep_size={self.ep_size}; build the model with "
                             f"GPTMoE(config, ep_rank={ep.rank}) and ep_size={ep.size}")
        self.ep = ep

    def _set_ep_group(self, group) -> None:
        """DeepSpeed's hook: `MoE.set_deepspeed_parallelism` hands over the group it created."""
        from ..parallel import ExpertParallelGroup  # model.parallel imports this module

        self.set_expert_parallel(ExpertParallelGroup(group))

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Routing, Tensor]:
        # 1. route: which experts see each token, and with what weight
        routing = self.gate(x_TD)
        counts_E, dispatcher = self._plan(routing, x_TD)
        # 2. dispatch: gather each expert's tokens (and exchange them between ranks when EP > 1)
        expert_in = dispatcher.dispatch(x_TD)
        # 3. expert compute: all local experts in one batched (capacity) or grouped (dropless) GEMM per projection
        if dispatcher.rows_per_expert is None:
            expert_out = self.experts(expert_in)
        else:
            expert_out = self.experts.forward_grouped(expert_in, dispatcher.rows_per_expert)
        # 4. combine: bring results back and sum each token's routes, weighted by the router
        y_TD = dispatcher.combine(expert_out, routing.weight_R)
        return y_TD, routing, counts_E

    def _plan(self, routing: Routing, x_TD: Tensor):
        """Bookkeeping between routing and dispatch: with EP > 1, agree with the other ranks on counts,
        buffer size and expert-choice calibration (one all-reduce); then pick the dispatch layout."""
        num_tokens = x_TD.shape[0]
        counts_E, capacity, calibration_E = routing.counts_E, routing.capacity, routing.calibration_E
        if self.ep_size > 1:
            if self.ep is None:
                raise RuntimeError(f"ep_size={self.ep_size} needs the expert-parallel group: run under "
                                   "deepspeed.initialize, or call model.parallel.setup_expert_parallel first")
            counts_PE, calibration_E = self._exchange(counts_E, calibration_E)
            counts_E = counts_PE.sum(dim=0)  # global, for the stats
            if capacity is None:  # dropless: size the buffer for the busiest expert on any rank
                capacity = int(counts_PE.max())
                if not self.training:
                    # A floor keeps eval buffers the same size from step to step; never a limit.
                    share = num_tokens * self.experts_per_token / self.num_experts
                    capacity = max(capacity, math.ceil(share * self.eval_capacity_factor), self.min_capacity)
                capacity = max(capacity, 1)
        if calibration_E is not None:
            self.gate.calibrate(calibration_E)
        if capacity is None and grouped_mm_supported(x_TD):
            return counts_E, GroupedDispatcher(routing, num_tokens)
        if capacity is None:
            capacity = max(int(counts_E.max()), 1)
        return counts_E, CapacityDispatcher(routing, self.num_experts, capacity, num_tokens, self.ep)

    def _exchange(self, counts_E: Tensor, calibration_E: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """All ranks' expert counts (P, E), and the group's mean calibration sample, in one all-reduce."""
        e = counts_E.numel()
        width = e if calibration_E is None else 2 * e
        table = torch.zeros(self.ep_size, width, dtype=torch.float64, device=counts_E.device)
        table[self.ep_rank, :e] = counts_E
        if calibration_E is not None:
            table[self.ep_rank, e:] = calibration_E
        self.ep.all_reduce_sum(table)
        mean_calibration = None if calibration_E is None else table[:, e:].mean(dim=0).to(calibration_E.dtype)
        return table[:, :e].round().long(), mean_calibration


class MoELayer(MoE):
    """A GPT feed-forward layer made of experts, optionally with PR-MoE's residual dense MLP.

    `MoE.__init__` is not called: it would build DeepSpeed's gate and per-expert module copies, which this
    layer replaces. The engine-facing attributes and methods are set and inherited instead.
    """

    def __init__(self, config: GPTMoEConfig, num_experts: int, ep_rank: int = 0, seed: int | None = None):
        nn.Module.__init__(self)
        ep = config.ep_size
        if num_experts % ep or not 0 <= ep_rank < ep:
            raise ValueError(f"MoELayer: {num_experts} experts over ep_size={ep} at ep_rank={ep_rank}; "
                             "allowed: ep_size divides the expert count and 0 <= ep_rank < ep_size")
        self.num_experts = num_experts
        self.ep_size = ep
        self.num_local_experts = num_experts // ep
        self.expert_group_name = f"ep_size_{ep}"  # DeepSpeed's group naming, shared by layers of equal EP
        self.enable_expert_tensor_parallelism = False
        self.use_residual = config.use_residual
        self.ep_rank = ep_rank
        # Experts are initialised from per-expert generators derived from this seed (see GroupedExperts).
        self.seed = int(torch.randint(2**62, (), device="cpu")) if seed is None else seed

        h, f = config.hidden_size, config.ffn_hidden_size
        common = dict(capacity_factor=config.capacity_factor, min_capacity=config.min_capacity,
                      drop_tokens=config.drop_tokens, jitter=config.router_jitter)
        if config.router_type is RouterKind.EXPERT_CHOICE:
            gate = ExpertChoiceRouter(h, num_experts, config.expert_choice_k, **common)
        else:
            gate = TopKRouter(h, num_experts, config.router_type.top_k, use_rts=config.use_rts,
                              second_expert_sampling=config.top2_2nd_expert_sampling,
                              expert_bias_rate=config.expert_bias_rate if config.expert_bias else 0.0, **common)
        experts = GroupedExperts(self.num_local_experts, h, f, group_name=self.expert_group_name,
                                 num_experts=num_experts, first_expert=ep_rank * self.num_local_experts,
                                 bias=config.expert_mlp_bias)
        self.deepspeed_moe = MoECore(gate, experts, num_experts, ep, ep_rank, config.eval_capacity_factor,
                                     config.min_capacity, config.experts_per_token())
        if self.use_residual:
            self.mlp = MLP(h, f, bias=config.expert_mlp_bias)
            self.coefficient = nn.Linear(h, 2)  # per-token mix of expert and dense outputs

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.deepspeed_moe.gate.wg.weight, 0.0, std)
        self.deepspeed_moe.experts.reset_parameters(std, out_std, self.seed)
        if self.use_residual:
            nn.init.normal_(self.mlp.fc1.weight, 0.0, std)
            nn.init.normal_(self.mlp.fc2.weight, 0.0, out_std)
            nn.init.normal_(self.coefficient.weight, 0.0, std)
            nn.init.zeros_(self.coefficient.bias)

    def forward(self, hidden_states: Tensor) -> MoEOutput:
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        y_TD, routing, counts_E = self.deepspeed_moe(x_TD)
        if self.use_residual:
            # PR-MoE (Rajbhandari et al. 2022): a dense MLP every token takes, mixed with the experts' output.
            coef_T2 = torch.softmax(self.coefficient(x_TD), dim=-1)
            y_TD = y_TD * coef_T2[:, :1] + self.mlp(x_TD) * coef_T2[:, 1:]
        return MoEOutput(y_TD.view_as(hidden_states), routing.aux_loss, routing.z_loss, counts_E.detach(),
                         routing.dropped_fraction.detach(), routing.entropy)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """Called on this layer alone, as DeepSpeed's engine does when it writes one file per expert, the
        experts come out in DeepSpeed's per-expert names (`deepspeed_moe.experts.deepspeed_experts.{i}.*`,
        local numbering, which the engine turns global). Inside a model's state_dict they stay stacked."""
        alone = destination is None and not args
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if alone:
            split_stacked(out, prefix + "deepspeed_moe.experts.")
        return out
