"""Weight surgery: pruning experts (outputs as the router restricted to the kept experts gives them; a layer
keeping one expert becomes a dense layer computing the same) and upcycling a dense model (the first forward
equals the dense model's), per router."""
import pytest
import torch

from model import GPTMoE
from model.moe.layer import moe_layers
from model.surgery import prune_experts, prune_state_dict, upcycle_mismatches, upcycle_state_dict

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
    model = build(nano(num_layers=4, num_experts=4, expert_mlp_bias=True))
    moments = {name: torch.randn(p.shape) for name, p in model.named_parameters()}
    cut = prune_state_dict(moments, model.config, [[1, 3], [2]])
    pruned = prune_experts(model, [[1, 3], [2]])
    assert cut.keys() == {name for name, _ in pruned.named_parameters()}
    experts = "blocks.1.mlp.deepspeed_moe.experts."
    torch.testing.assert_close(cut[experts + "fc1_weight"], moments[experts + "fc1_weight"][[1, 3]])
    torch.testing.assert_close(cut["blocks.3.mlp.fc2.weight"], moments["blocks.3.mlp.deepspeed_moe.experts.fc2_weight"][2].t())
    torch.testing.assert_close(cut["blocks.3.mlp.fc1.bias"], moments["blocks.3.mlp.deepspeed_moe.experts.fc1_bias"][2])


def _dense_trained_like():
    dense = build(nano(num_layers=4, num_experts=0), seed=3)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)  # the biases an upcycled model must carry
            elif "mlp" in name:
                p.mul_(20.0)  # feed-forward output that matters to the logits
            elif name.startswith(("wte", "wpe")):
                p.mul_(50.0)
    return dense.eval()


@pytest.mark.parametrize("router,residual", [("top1", False), ("top2", False), ("expert_choice", False),
                                             ("top1", True)])
def test_upcycled_model_starts_as_the_dense_model(router, residual):
    """Experts copied (top-1: the router weight 1/E folded into their output projections), routers with logits
    of ~1e-6: the first forward equals the dense model's to fp32 rounding, while tokens already pick different
    experts. Eval mode, and top-1 training mode without token dropping, alike."""
    dense = _dense_trained_like()
    moe = build(nano(num_layers=4, num_experts=8, router_type=router, expert_mlp_bias=True, use_residual=residual,
                     drop_tokens=False), seed=5)
    moe.load_state_dict(upcycle_state_dict(dense.state_dict(), moe))
    x = torch.randint(0, 97, (4, 32))
    with torch.no_grad():
        reference = dense(x).logits
        assert reference.std() > 0.5
        out = moe.eval()(x)
        torch.testing.assert_close(out.logits, reference, rtol=1e-5, atol=1e-5)
        if router == "top1":
            torch.testing.assert_close(moe.train()(x).logits, reference, rtol=1e-5, atol=1e-5)
            assert (out.moe_stats[0]["expert_counts"] > 0).sum() >= 6  # not all tokens on one expert
    experts = moe.blocks[1].mlp.deepspeed_moe.experts
    assert torch.equal(experts.fc1_weight[0], experts.fc1_weight[7])


def test_upcycling_fills_each_expert_parallel_rank_and_names_mismatches():
    dense = _dense_trained_like()
    cfg = nano(num_layers=4, num_experts=4, expert_mlp_bias=True, ep_size=2)
    rank1 = build(cfg, ep_rank=1)
    state = upcycle_state_dict(dense.state_dict(), rank1)
    assert state["blocks.1.mlp.deepspeed_moe.experts.fc1_weight"].shape == (2, 64, 256)
    torch.testing.assert_close(state["blocks.1.mlp.deepspeed_moe.experts.fc1_bias"][1], dense.state_dict()["blocks.1.mlp.fc1.bias"])
    wide = nano(num_layers=4, num_experts=4, hidden_size=128, num_heads=4)
    assert [m[0] for m in upcycle_mismatches(dense.config, wide)] == ["hidden_size", "ffn_hidden_size"]
    assert upcycle_mismatches(cfg, cfg)[0][0] == "num_experts"  # an MoE checkpoint is not a dense one
    with pytest.raises(ValueError, match="expert_mlp_bias"):
        upcycle_state_dict(dense.state_dict(), build(nano(num_layers=4, num_experts=4)))
