"""The experts of one MoE layer, stored stacked so that all of them are computed in one call.

Shape suffixes: E local experts, C capacity (slots per expert), D model dim, F expert hidden dim,
R routes sorted by expert.

DeepSpeed's `Experts` keeps one module per expert and loops over them in Python, a handful of kernels
and autograd nodes per expert. Here each projection is one parameter of shape (E, in, out), computed by
one `torch.bmm` on an (E, C, D) capacity buffer, or by one grouped GEMM on routes sorted by expert (no
padding computed), whatever the number of local experts.
(E, in, out) rather than nn.Linear's (out, in): the weight is the GEMM's right operand as stored, and its
gradient comes out of the backward GEMM in the parameter's own layout, with no transposing copy.

The parameters carry DeepSpeed's expert marks (`allreduce=False`, `group_name`), so the engine reduces
their gradients over the expert-data-parallel group only and
`split_params_into_different_moe_groups_for_optimizer` puts them in their own optimizer groups.

Experts are bias-free by default, like Switch/ST-MoE experts: a per-expert bias on sorted routes costs a
gather per projection (and a segmented reduction in backward), for no measurable quality. `bias=True` gives
each expert fc1/fc2 biases (`fc1_bias` (E, F), `fc2_bias` (E, D)): a model upcycled from a dense checkpoint
needs them to start as exactly that model (model/surgery.py).

Checkpoint layout. `state_dict()` of a model holds the stacked tensors (`...experts.fc1_weight`, E_local
rows). DeepSpeed's per-expert files hold one nn.Linear-style expert each,
`...experts.deepspeed_experts.{i}.fc1.weight` = fc1_weight[i].T; `split_stacked` and the load hook below
convert between the two, so either layout loads, and a full-size stacked tensor (all experts, from an EP=1
model) loads into an EP>1 model by keeping this rank's rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# stacked parameter -> name of the same weight inside one DeepSpeed expert module (biases: experts with bias)
PER_EXPERT_NAMES = {"fc1_weight": "fc1.weight", "fc2_weight": "fc2.weight", "fc1_bias": "fc1.bias",
                    "fc2_bias": "fc2.bias"}
DS_EXPERTS = "deepspeed_experts"

def gelu(x: Tensor) -> Tensor:
    return F.gelu(x)  # exact (erf) GELU, as Megatron; cheaper than the tanh form on CPU


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense: the CPU grouped GEMM's backward rejects
    broadcast (stride-0) gradients such as the one `out.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_supported(x: Tensor) -> bool:
    """Whether torch's grouped GEMM runs here: any dtype on CPU, bf16 on CUDA from sm80 (per its docs)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


def grouped_mm(x_RI: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor:
    """Rows offsets[e-1]:offsets[e] of x times w[e], for every e, in one call."""
    return _ContiguousGrad.apply(torch._grouped_mm(x_RI, w_EIO, offs=offsets_E))


class GroupedExperts(nn.Module):
    """E_local two-layer GELU MLPs (D -> F -> D), computed together."""

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int, *, group_name: str,
                 num_experts: int | None = None, first_expert: int = 0, bias: bool = False):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.num_experts = num_experts or num_local_experts  # across the expert-parallel group
        self.first_expert = first_expert  # global id of local expert 0
        self.fc1_weight = nn.Parameter(torch.empty(num_local_experts, hidden_size, ffn_hidden_size))  # (E, D, F)
        self.fc2_weight = nn.Parameter(torch.empty(num_local_experts, ffn_hidden_size, hidden_size))  # (E, F, D)
        self.fc1_bias = nn.Parameter(torch.zeros(num_local_experts, ffn_hidden_size)) if bias else None  # (E, F)
        self.fc2_bias = nn.Parameter(torch.zeros(num_local_experts, hidden_size)) if bias else None  # (E, D)
        for p in self.parameters():
            p.allreduce = False
            p.group_name = group_name
        self.register_load_state_dict_pre_hook(_accept_other_layouts)

    def forward(self, x_ECD: Tensor) -> Tensor:
        """Capacity layout: (E, C, D) -> (E, C, D)."""
        if self.fc1_bias is None:
            h_ECF = gelu(torch.bmm(x_ECD, self.fc1_weight))
            return torch.bmm(h_ECF, self.fc2_weight)
        h_ECF = gelu(torch.baddbmm(self.fc1_bias.unsqueeze(1), x_ECD, self.fc1_weight))
        return torch.baddbmm(self.fc2_bias.unsqueeze(1), h_ECF, self.fc2_weight)

    def forward_grouped(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """Grouped layout: routes sorted by expert, counts_E[e] rows each -> (R, D); no padding computed."""
        if x_RD.shape[0] == 0:
            return x_RD.new_zeros(x_RD.shape)
        offsets_E = torch.cumsum(counts_E, dim=0).to(torch.int32)
        h_RF = grouped_mm(x_RD, self.fc1_weight, offsets_E)
        if self.fc1_bias is None:
            return grouped_mm(gelu(h_RF), self.fc2_weight, offsets_E)
        # the expert of each row, without a host sync (output_size is known)
        expert_R = torch.repeat_interleave(torch.arange(counts_E.numel(), device=x_RD.device), counts_E,
                                           output_size=x_RD.shape[0])
        h_RF = gelu(h_RF + self.fc1_bias.index_select(0, expert_R))
        return grouped_mm(h_RF, self.fc2_weight, offsets_E) + self.fc2_bias.index_select(0, expert_R)

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float, seed: int) -> None:
        """Normal init, each expert from its own generator seeded by (seed, global expert id), so the same
        seed builds the same experts whatever the expert-parallel size and rank."""
        for bias in (self.fc1_bias, self.fc2_bias):
            if bias is not None and not bias.is_meta:
                bias.zero_()
        for local in range(self.num_local_experts):
            for weight, s in ((self.fc1_weight, std), (self.fc2_weight, out_std)):
                if weight.is_meta:
                    continue
                gen = torch.Generator(device=weight.device)
                gen.manual_seed((seed + 1_000_003 * (self.first_expert + local) + (weight is self.fc2_weight))
                                % (2**63))
                weight[local].normal_(0.0, s, generator=gen)


def split_stacked(state_dict: dict, prefix: str = "") -> dict:
    """Stacked expert tensors under `prefix` -> DeepSpeed's per-expert nn.Linear keys (local numbering), in place."""
    for name, per_expert in PER_EXPERT_NAMES.items():
        key = prefix + name
        if key in state_dict:
            for i, weight in enumerate(state_dict.pop(key).unbind(0)):
                state_dict[f"{prefix}{DS_EXPERTS}.{i}.{per_expert}"] = weight.t().contiguous()  # a bias: as is
    return state_dict


def _accept_other_layouts(module: GroupedExperts, state_dict, prefix, *args) -> None:
    """Load hook: stack DeepSpeed per-expert keys; slice a full-size stacked tensor to this rank's experts."""
    n = module.num_local_experts
    for name, per_expert in PER_EXPERT_NAMES.items():
        key = prefix + name
        ds_keys = [f"{prefix}{DS_EXPERTS}.{i}.{per_expert}" for i in range(n)]
        if key not in state_dict and all(k in state_dict for k in ds_keys):
            state_dict[key] = torch.stack([state_dict.pop(k).t() for k in ds_keys])
        elif key in state_dict and n != module.num_experts and state_dict[key].shape[0] == module.num_experts:
            state_dict[key] = state_dict[key][module.first_expert:module.first_expert + n]
