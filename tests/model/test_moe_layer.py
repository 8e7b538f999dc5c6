"""What DeepSpeed's engine relies on, checked in one process: expert marks, optimizer groups, the
per-expert checkpoint layout, merging expert-parallel shards, and clear errors without a process group."""
import re
from pathlib import Path

import pytest
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

from model.checkpoint import merge_expert_parallel_state_dicts
from model.parallel import UlyssesAttention, apply_sequence_parallel, moe_layers

from .conftest import build, nano


def test_layers_are_deepspeed_moe_with_marked_expert_params():
    model = build(nano(num_layers=4, num_experts=[2, 4], ep_size=2), ep_rank=0)
    layers = moe_layers(model)
    assert [type(m).__mro__[1] for m in layers] == [MoE, MoE]
    assert [(m.num_experts, m.num_local_experts, m.expert_group_name) for m in layers] == [
        (2, 1, "ep_size_2"), (4, 2, "ep_size_2")]
    experts = [n for n, p in model.named_parameters() if is_moe_param(p)]
    assert experts and all(".deepspeed_moe.experts." in n for n in experts)
    assert all(p.group_name == "ep_size_2" for p in model.parameters() if is_moe_param(p))
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    assert [g.get("moe", False) for g in groups] == [False, True]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.parameters() if is_moe_param(p)}


def test_deepspeed_expert_file_layout_round_trip():
    model = build(nano(router_type="expert_choice", use_residual=True))
    layer = moe_layers(model)[0]
    alone = layer.state_dict()  # what the engine writes, one file per expert
    expert_keys = [k for k in alone if "expert" in k and "moe.gate.wg.weight" not in k]
    assert sorted(expert_keys) == sorted(f"deepspeed_moe.experts.deepspeed_experts.{i}.{w}.weight"
                                         for i in range(4) for w in ("fc1", "fc2"))
    assert alone["deepspeed_moe.experts.deepspeed_experts.1.fc1.weight"].shape == (256, 64)  # nn.Linear layout
    # inside the model the experts stay stacked, and the per-expert layout loads back
    assert "blocks.1.mlp.deepspeed_moe.experts.fc1_weight" in model.state_dict()
    other = build(nano(router_type="expert_choice", use_residual=True), seed=1)
    moe_layers(other)[0].load_state_dict(alone)
    moe_keys = [k for k in model.state_dict() if k.startswith("blocks.1.mlp.")]
    assert len(moe_keys) == 8  # gate, threshold, 2 stacked experts, residual MLP (2) and coefficient (2)
    for key in moe_keys:
        torch.testing.assert_close(other.state_dict()[key], model.state_dict()[key], equal_nan=True)


def test_merge_expert_parallel_shards_gives_the_full_model():
    full = build(nano(num_layers=4, num_experts=[2, 4])).state_dict()
    shards = [build(nano(num_layers=4, num_experts=[2, 4], ep_size=2), ep_rank=r).state_dict() for r in (0, 1)]
    merged = merge_expert_parallel_state_dicts(shards)
    assert merged.keys() == full.keys()
    for key, value in full.items():
        torch.testing.assert_close(merged[key], value)


def test_expert_parallel_without_a_group_fails_clearly():
    model = build(nano(ep_size=2), ep_rank=1)
    with pytest.raises(RuntimeError, match="ep_size=2 needs the expert-parallel group"):
        model(torch.randint(0, 97, (1, 8)))


class _Group:
    """Stands in for model.parallel.ExpertParallelGroup where only its size and rank matter."""

    def __init__(self, size, rank):
        self.size, self.rank = size, rank


def test_a_group_of_another_rank_or_size_is_refused():
    """The experts a model holds are fixed when it is built (ep_rank); a group that disagrees is an error, not
    a silent mix-up of experts between ranks."""
    layer = moe_layers(build(nano(ep_size=2), ep_rank=1))[0].deepspeed_moe
    for size, rank in ((2, 0), (4, 1)):
        with pytest.raises(ValueError, match=f"rank {rank} of {size}, but the experts were built for rank 1 of "
                                             "ep_size=2"):
            layer.set_expert_parallel(_Group(size, rank))
    layer.set_expert_parallel(group := _Group(2, 1))
    assert layer.ep is group


def test_only_model_parallel_touches_torch_distributed():
    """model/ is single-device code: process groups come in from model/parallel.py, nothing else in model/
    imports torch.distributed, creates a group or reads a rank."""
    root = Path(__file__).resolve().parents[2] / "model"
    uses = re.compile(r"^\s*(import|from) torch\.distributed|\bdist\.\w+\(|get_rank\(|new_group\(", re.M)
    users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if uses.search(p.read_text()))
    assert users == ["parallel.py"]


def test_apply_sequence_parallel_wraps_every_attention_core_once():
    model = build(nano(num_layers=4))
    apply_sequence_parallel(model, group := object())
    apply_sequence_parallel(model, group)
    cores = [b.attn.core for b in model.blocks]
    assert all(isinstance(c, UlyssesAttention) and c.dist_attn.spg is group for c in cores)
    assert not any(isinstance(c.dist_attn.local_attn, UlyssesAttention) for c in cores)
