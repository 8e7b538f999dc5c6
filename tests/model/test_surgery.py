"""Weight surgery: pruning experts (outputs as the router restricted to the kept experts gives them; a layer
keeping one expert becomes a dense layer computing the same), per router."""
import pytest
import torch

from model import GPTMoE
from model.moe.layer import moe_layers
from model.surgery import prune_experts, prune_state_dict

from .conftest import build, nano

ROUTERS = ["top1", "top2", "expert_choice"]


def _trained_like(model: GPTMoE) -> GPTMoE:
    """Weights of a trained model's scale where init leaves them flat: biases and norms away from 0 and 1,
    routers sharp enough that experts win different tokens, expert choice's thresholds calibrated."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith("wg.weight"):
                p.normal_(0.0, 0.3, generator=gen)
            elif "experts" in name:
                p.mul_(20.0)
            elif name.startswith(("wte", "wpe")):
                p.mul_(50.0)  # tokens that differ by more than the biases do
        for layer in moe_layers(model):
            gate = layer.deepspeed_moe.gate
            if hasattr(gate, "ec_threshold"):
                gate.ec_threshold.copy_(torch.linspace(0.15, 0.3, gate.ec_threshold.numel()))
    return model.eval()


def _masked_reference(model: GPTMoE, keep, monkeypatch) -> GPTMoE:
    """`model` whose routers give the experts not in `keep` a logit of -inf: routing and weights over the
    kept experts only, computed by the unpruned model."""
    for layer, kept in zip(moe_layers(model), keep):
        gate = layer.deepspeed_moe.gate
        dropped = torch.ones(layer.num_experts, dtype=torch.bool)
        dropped[list(kept)] = False
        logits = gate.logits
        monkeypatch.setattr(gate, "logits", lambda x, f=logits, d=dropped: f(x).masked_fill(d, float("-inf")))
    return model


@pytest.mark.parametrize("router", ROUTERS)
def test_keeping_every_expert_changes_nothing(router):
    model = _trained_like(build(nano(num_layers=4, num_experts=[4, 6], router_type=router, use_residual=True)))
    x = torch.randint(0, 97, (3, 20))
    pruned = prune_experts(model, [range(4), range(6)])
    assert pruned.config.num_experts == [4, 6]
    assert pruned.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(pruned(x).logits, model(x).logits)


@pytest.mark.parametrize("router", ROUTERS)
def test_pruned_model_routes_over_the_kept_experts(router, monkeypatch):
    """Layer 1 keeps 3 of 6 experts, layer 3 keeps one and becomes dense: the outputs are the unpruned model's
    with the other experts' router logits at -inf, so with one expert left its weight is 1 (the softmax of one
    logit) and the dense layer needs no other factor."""
    cfg = nano(num_layers=4, num_experts=6, router_type=router, expert_choice_k=2.0 if router == "expert_choice" else 1.0)
    model = _trained_like(build(cfg))
    keep = [[5, 0, 3], [4]]
    pruned = prune_experts(model, keep)
    assert pruned.config.num_experts == [3, 0] and pruned.config.moe_layer_indices() == [1]
    assert [type(b.mlp).__name__ for b in pruned.blocks] == ["MLP", "MoELayer", "MLP", "MLP"]
    assert pruned.config.param_counts()["total"] == sum(p.numel() for p in pruned.parameters())
    experts = [p for name, p in pruned.named_parameters() if ".experts." in name]
    assert experts and all(p.allreduce is False and p.group_name for p in experts)  # DeepSpeed's expert marks
    x = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        unpruned = model(x)
        out = pruned(x).logits
        reference = _masked_reference(model, keep, monkeypatch)(x).logits
    assert all((s["expert_counts"] > 0).sum() >= 4 for s in unpruned.moe_stats)  # tokens spread over the experts
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert (out - unpruned.logits).abs().max() > 1e-2  # the pruning does change the model


def test_pruning_cuts_tensors_shaped_like_the_weights():
    """Adam's moments are pruned as the weights are: the same function applied to any tensors by those names."""
    model = build(nano(num_layers=4, num_experts=4))
    moments = {name: torch.randn(p.shape) for name, p in model.named_parameters()}
    cut = prune_state_dict(moments, model.config, [[1, 3], [2]])
    pruned = prune_experts(model, [[1, 3], [2]])
    assert cut.keys() == {name for name, _ in pruned.named_parameters()}
    experts = "blocks.1.mlp.deepspeed_moe.experts."
    torch.testing.assert_close(cut[experts + "fc1_weight"], moments[experts + "fc1_weight"][[1, 3]])
    torch.testing.assert_close(cut["blocks.3.mlp.fc2.weight"], moments["blocks.3.mlp.deepspeed_moe.experts.fc2_weight"][2].t())
