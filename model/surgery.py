"""Weight surgery between model shapes: pruning experts away, and upcycling a dense model into an MoE one.

Shape suffixes: E experts of a layer, K kept experts, D model dim, F feed-forward dim.

Pruning (`prune_experts`): keep some experts of each MoE layer and drop the rest, with their router rows
and every other per-expert router entry (expert choice's calibrated thresholds, any per-expert router bias).
The router's softmax then runs over the kept experts only, so a token's weights are renormalised among them:
exactly the model that routes over those experts and no others, with no code of its own at inference.
A layer that keeps one expert routes every token to it with weight 1 (the softmax of one logit), whichever
router it has; such a layer becomes a plain dense feed-forward layer with the expert's weights (and its
biases, or zero biases), which computes the same function without a router, and leaves the expert-parallel
size free for the other layers. With PR-MoE's residual MLP (`use_residual`) the layer mixes the expert
with the MLP per token, which no single MLP computes, so it stays an MoE layer of one expert.

Upcycling (`upcycle_state_dict`, Komatsuzaki et al. 2022): every expert of an MoE layer starts as that
layer's dense feed-forward weights (biases included: the model needs `expert_mlp_bias`), the router starts
fresh, the rest is copied. So that the first forward equals the dense model's, the router weight is folded
into the experts: router rows start with logits of ~1e-6, so every expert's probability is 1/E to within
fp32 rounding, and each expert's output projection is multiplied by `upcycle_fold` = 1 / (the combine weight
a token gets in total at uniform probabilities): E for top-1 (weight 1/E), 1 for top-2 (two weights
renormalised to sum to one), E / (experts per token) for expert choice (exact in eval mode before its
thresholds are calibrated, when expert_choice_k x capacity_factor is whole; in training a token's output
scales with how many experts took it). PR-MoE's residual MLP is a copy too and its mixing coefficient starts
at 1/2 : 1/2. In training, token dropping (a capacity) still drops the routes of overflowing experts.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from .config import GPTMoEConfig, RouterKind
from .gpt import GPTMoE
from .moe.layer import moe_layers

# Upcycled routers: logits of about this size, so a softmax over them is uniform to within fp32 rounding
# while the experts a token prefers still differ from token to token (the first steps route at random).
UPCYCLE_ROUTER_LOGIT_STD = 1e-6

EXPERT_PARTS = ("deepspeed_moe.gate.", "deepspeed_moe.experts.")  # tensors with one row per expert


# ---------------------------------------------------------------------------------------------- pruning
def pruned_config(config: GPTMoEConfig, keep: Sequence[Sequence[int]]) -> GPTMoEConfig:
    """The config of `config` pruned to `keep` (expert ids per MoE layer): one expert -> a dense slot (unless
    use_residual); the expert-parallel size 1. Raises ConfigError (e.g. expert choice keeping fewer experts
    than a token visits)."""
    counts = iter([len(k) for k in keep])
    slots = []
    for n in config.experts_per_moe_slot():
        kept = next(counts) if n else 0
        slots.append(0 if kept == 1 and not config.use_residual else kept)
    if not any(slots):
        num_experts: int | list[int] = 0
    elif all(n == slots[0] for n in slots):
        num_experts = slots[0]
    else:
        num_experts = slots
    return dataclasses.replace(config, num_experts=num_experts, ep_size=1)


def _check_keep(model: GPTMoE, keep: Sequence[Sequence[int]]) -> None:
    layers = moe_layers(model)
    if len(keep) != len(layers):
        raise ValueError(f"prune_experts: {len(keep)} lists of experts to keep for {len(layers)} MoE layers")
    for i, (layer, kept) in enumerate(zip(layers, keep)):
        if layer.ep_size != 1:
            raise ValueError("prune_experts: the model must hold every expert (ep_size=1)")
        if not kept or len(set(kept)) != len(kept) or not all(0 <= e < layer.num_experts for e in kept):
            raise ValueError(f"prune_experts: MoE layer {i} keeps {list(kept)}; allowed: distinct expert ids "
                             f"0..{layer.num_experts - 1}, at least one")


@torch.no_grad()
def prune_experts(model: GPTMoE, keep: Sequence[Sequence[int]]) -> GPTMoE:
    """A new model holding only the experts `keep[i]` (global ids, in the order given) of MoE layer i."""
    _check_keep(model, keep)
    config = pruned_config(model.config, keep)
    state = prune_state_dict(model.state_dict(), model.config, keep)
    # Built, then copied into: parameters assigned from elsewhere (load_state_dict(assign=True), to_empty from
    # meta) would lose the expert marks (allreduce, group_name) that DeepSpeed's engine reads.
    first = next(model.parameters())
    pruned = GPTMoE(config).to(device=first.device, dtype=first.dtype)
    pruned.load_state_dict(state)
    return pruned.train(model.training)


def prune_state_dict(source: dict, config: GPTMoEConfig, keep: Sequence[Sequence[int]]) -> dict:
    """`source` (tensors by a `config` model's names: its state dict, or anything shaped like its parameters,
    as Adam's moments) cut to the experts `keep` (see `prune_experts`); keys it lacks stay absent."""
    blocks = config.moe_layer_indices()
    state = {k: v.clone() for k, v in source.items() if not any(k.startswith(f"blocks.{b}.mlp.") for b in blocks)}
    for block, num_experts, kept in zip(blocks, config.experts_per_moe_layer(), keep):
        prefix = f"blocks.{block}.mlp."
        index = torch.tensor(list(kept), dtype=torch.long)
        if len(kept) == 1 and not config.use_residual:
            state.update(_dense_from_expert(source, prefix, int(index[0])))
            continue
        for key in (k for k in source if k.startswith(prefix)):
            value = source[key]
            per_expert = key[len(prefix):].startswith(EXPERT_PARTS) and value.dim() and value.shape[0] == num_experts
            state[key] = value.index_select(0, index).clone() if per_expert else value.clone()
    return state


def _dense_from_expert(source: dict, prefix: str, expert: int) -> dict:
    """The nn.Linear weights of a dense MLP computing expert `expert` of the layer under `prefix` (zero biases
    for a bias-free expert)."""
    experts = prefix + "deepspeed_moe.experts."
    w1_DF, w2_FD = source[experts + "fc1_weight"][expert], source[experts + "fc2_weight"][expert]
    b1_F = source.get(experts + "fc1_bias")
    b2_D = source.get(experts + "fc2_bias")
    return {prefix + "fc1.weight": w1_DF.t().contiguous(), prefix + "fc2.weight": w2_FD.t().contiguous(),
            prefix + "fc1.bias": w1_DF.new_zeros(w1_DF.shape[1]) if b1_F is None else b1_F[expert].clone(),
            prefix + "fc2.bias": w2_FD.new_zeros(w2_FD.shape[1]) if b2_D is None else b2_D[expert].clone()}


# ---------------------------------------------------------------------------------------------- upcycling
# What must agree between a dense checkpoint and the MoE model it starts: the weights' shapes, and the norm
# epsilon (or the first forward would differ).
UPCYCLE_FIELDS = ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "padded_vocab_size", "seq_len",
                  "tie_embeddings", "layer_norm_eps")


def upcycle_mismatches(dense: GPTMoEConfig, moe: GPTMoEConfig) -> list[tuple[str, object, object]]:
    """(field, dense value, MoE value) for every field that must agree and does not; also the basic kinds."""
    out = [(name, getattr(dense, name), getattr(moe, name)) for name in UPCYCLE_FIELDS
           if getattr(dense, name) != getattr(moe, name)]
    if dense.is_moe:
        out.insert(0, ("num_experts", dense.num_experts, "0 (a dense checkpoint)"))
    return out


def upcycle_fold(config: GPTMoEConfig, num_experts: int) -> float:
    """What an expert's output is multiplied by so that, at uniform router probabilities (1/E each), a token's
    routes sum to the dense layer's output."""
    if config.router_type is RouterKind.TOP2:
        return 1.0  # the two weights are renormalised to sum to one
    return num_experts / config.experts_per_token()


@torch.no_grad()
def upcycle_state_dict(dense_state: dict, model: GPTMoE) -> dict:
    """The state dict that starts `model` (an MoE model with `expert_mlp_bias`, any ep_size and rank) from
    `dense_state` (a dense GPTMoE's state dict of the same shape): see the module docstring."""
    config = model.config
    if not config.expert_mlp_bias:
        raise ValueError("upcycle_state_dict: the MoE model needs expert_mlp_bias=True to carry the dense biases")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moe_prefixes = [f"blocks.{b}.mlp." for b in config.moe_layer_indices()]
    for key in state:
        if any(key.startswith(p) for p in moe_prefixes):
            continue
        if key not in dense_state:
            raise KeyError(f"upcycle: the dense checkpoint has no {key}")
        if dense_state[key].shape != state[key].shape:
            raise ValueError(f"upcycle: {key} is {tuple(dense_state[key].shape)} in the dense checkpoint, "
                             f"{tuple(state[key].shape)} in this model")
        state[key] = dense_state[key].to(state[key].dtype).clone()
    std = UPCYCLE_ROUTER_LOGIT_STD / config.hidden_size ** 0.5
    for prefix, layer in zip(moe_prefixes, moe_layers(model)):
        w1_FD, b1_F = dense_state[prefix + "fc1.weight"], dense_state[prefix + "fc1.bias"]
        w2_DF, b2_D = dense_state[prefix + "fc2.weight"], dense_state[prefix + "fc2.bias"]
        fold = upcycle_fold(config, layer.num_experts)
        local = layer.num_local_experts
        experts = prefix + "deepspeed_moe.experts."
        state[experts + "fc1_weight"] = _copies(w1_FD.t(), local)  # (L, D, F)
        state[experts + "fc1_bias"] = _copies(b1_F, local)  # (L, F)
        state[experts + "fc2_weight"] = _copies(w2_DF.t() * fold, local)  # (L, F, D)
        state[experts + "fc2_bias"] = _copies(b2_D * fold, local)  # (L, D)
        gate = prefix + "deepspeed_moe.gate.wg.weight"
        state[gate] = _rescaled(state[gate], std)
        if layer.use_residual:
            for name, value in (("fc1.weight", w1_FD), ("fc1.bias", b1_F), ("fc2.weight", w2_DF), ("fc2.bias", b2_D)):
                state[prefix + "mlp." + name] = value.clone()
            state[prefix + "coefficient.weight"] = _rescaled(state[prefix + "coefficient.weight"], std)
            state[prefix + "coefficient.bias"].zero_()
    return {k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}


def _copies(value: Tensor, n: int) -> Tensor:
    return value.unsqueeze(0).repeat(n, *([1] * value.dim())).contiguous()


def _rescaled(fresh: Tensor, std: float) -> Tensor:
    """A freshly initialised weight scaled to standard deviation `std` (its random pattern kept)."""
    return fresh * (std / fresh.float().std().clamp(min=1e-30))
