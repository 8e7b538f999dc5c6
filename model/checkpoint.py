"""Loading DeepSpeed checkpoints at any expert-parallel size.

DeepSpeed writes a checkpoint `<dir>/<tag>/` as
    mp_rank_00_model_states.pt                    every non-expert weight (under "module")
    layer_<L>_expert_<e>_mp_rank_00_model_states.pt  one file per expert, L = MoE layer in module order,
                                                  e = global expert id, keys `...deepspeed_experts.<e>.*`
so experts are numbered globally whatever EP size wrote them. `load_deepspeed_checkpoint` reads the
files of the experts `model` holds (all of them at EP=1) and loads them: train at EP=8, generate at EP=1.

Plain `model.state_dict()` files hold stacked local experts; `merge_expert_parallel_state_dicts` joins
the shards of all EP ranks into one full (EP=1) state dict.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .moe.experts import DS_EXPERTS, PER_EXPERT_NAMES
from .parallel import moe_layers


def latest_tag(load_dir: str | os.PathLike) -> str:
    latest = Path(load_dir) / "latest"
    if not latest.exists():
        raise FileNotFoundError(f"{load_dir}: no 'latest' file; pass the checkpoint tag")
    return latest.read_text().strip()


def read_deepspeed_checkpoint(model: nn.Module, load_dir: str | os.PathLike, tag: str | None = None) -> dict:
    """The state dict `model` needs, gathered from a DeepSpeed checkpoint written at any EP size."""
    ckpt = Path(load_dir) / (tag or latest_tag(load_dir))
    # The main file pickles DeepSpeed's config objects beside the weights: trusted input only.
    state = dict(torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"])
    for layer_id, layer in enumerate(moe_layers(model)):
        first = layer.ep_rank * layer.num_local_experts
        for local in range(layer.num_local_experts):
            path = ckpt / f"layer_{layer_id}_expert_{first + local}_mp_rank_00_model_states.pt"
            if not path.exists():
                raise FileNotFoundError(f"{path}: missing; the checkpoint has fewer experts than the model "
                                        f"({layer.num_experts} in MoE layer {layer_id})")
            for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
                # global -> local expert id, which the layer's load hook stacks
                state[key.replace(f".{DS_EXPERTS}.{first + local}.", f".{DS_EXPERTS}.{local}.")] = value
    return state


def load_deepspeed_checkpoint(model: nn.Module, load_dir: str | os.PathLike, tag: str | None = None,
                              strict: bool = True):
    """Load a DeepSpeed checkpoint (any EP size) into `model` (any EP size, typically 1)."""
    return model.load_state_dict(read_deepspeed_checkpoint(model, load_dir, tag), strict=strict)


def merge_expert_parallel_state_dicts(shards: list[dict]) -> dict:
    """State dicts of EP ranks 0..P-1 (stacked local experts) -> one state dict with every expert."""
    merged = dict(shards[0])
    for key in merged:
        if key.rsplit(".", 1)[-1] in PER_EXPERT_NAMES:
            merged[key] = torch.cat([shard[key] for shard in shards], dim=0)
    return merged
