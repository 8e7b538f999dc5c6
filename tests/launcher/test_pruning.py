"""Choosing the experts to keep: counts of routed tokens and router probability on a calibration set."""
import pytest
import torch

from launcher.errors import UsageError
from launcher.pruning import choose_experts, count_expert_usage, parse_keep
from model import GPTMoE, GPTMoEConfig
from model.moe.layer import moe_layers

SUBSETS = [[1, 4, 6], [0, 2, 7]]  # the experts each MoE layer's router can reach


def _model_routing_to(subsets, router: str) -> GPTMoE:
    """A nano model whose MoE layers route every token to `subsets[i]`: the norm before each MoE layer gives
    feature 0 the constant 10 (scale 0, bias 10), and the router weighs it +1 for the subset's experts and -1 for
    the others, a margin of 20 logits that the other features' small random weights never close. Within the
    subset, those random weights spread the tokens."""
    torch.manual_seed(0)
    model = GPTMoE(GPTMoEConfig.from_size("nano", vocab_size=97, seq_len=32, num_layers=4, num_experts=8,
                                          router_type=router))
    with torch.no_grad():
        for block, layer, subset in zip(model.config.moe_layer_indices(), moe_layers(model), subsets):
            ln = model.blocks[block].ln2
            ln.weight[0], ln.bias[0] = 0.0, 10.0
            wg = layer.deepspeed_moe.gate.wg.weight  # (E, D)
            wg.normal_(0.0, 0.05)
            wg[:, 0] = -1.0
            wg[subset, 0] = 1.0
    return model


def _windows(n: int):
    gen = torch.Generator().manual_seed(1)
    # lengths 9..32: padded batches, whose padding must not be counted
    return [torch.randint(0, 97, (9 + (i * 7) % 24,), generator=gen).tolist() for i in range(n)]


@pytest.mark.parametrize("router", ["top1", "top2"])
def test_a_router_that_reaches_a_subset_keeps_exactly_that_subset(router):
    model = _model_routing_to(SUBSETS, router)
    windows = _windows(10)
    usage = count_expert_usage(model, iter(windows), batch_size=4)
    tokens = sum(len(w) for w in windows)
    k = 1 if router == "top1" else 2
    for layer, subset in zip(usage, SUBSETS):
        assert layer.tokens == tokens and int(layer.routes_E.sum()) == k * tokens
        assert set(torch.nonzero(layer.routes_E).flatten().tolist()) == set(subset)  # every subset expert used
        assert layer.probability_E.sum().item() == pytest.approx(tokens)
        assert layer.probability_E[subset].sum().item() == pytest.approx(tokens, rel=1e-6)
    for by in ("tokens", "probability"):
        assert choose_experts(usage, [3, 3], by) == SUBSETS
    # keeping fewer: the busiest of the subset, by the count asked for
    two = choose_experts(usage, [2, 2], "tokens")
    for kept, layer, subset in zip(two, usage, SUBSETS):
        routes = layer.routes_E.tolist()
        assert set(kept) < set(subset) and min(routes[e] for e in kept) >= max(
            routes[e] for e in set(subset) - set(kept))


def test_tokens_and_probability_can_rank_differently():
    """Expert 0 wins more tokens, expert 1 more probability mass (it is a close second everywhere)."""
    from launcher.pruning import LayerUsage

    usage = [LayerUsage(1, torch.tensor([6, 4, 0]), torch.tensor([4.0, 5.5, 0.5], dtype=torch.float64), 10)]
    assert choose_experts(usage, [1], "tokens") == [[0]]
    assert choose_experts(usage, [1], "probability") == [[1]]


def test_keep_counts():
    assert parse_keep("4", [8, 8]) == [4, 4]
    assert parse_keep("4,2", [8, 8]) == [4, 2]
    for text, message in (("9", "allowed: 1..8"), ("0", "allowed: 1..8"), ("4,4,4", "one per MoE layer"),
                          ("a", "--keep")):
        with pytest.raises(UsageError, match=message):
            parse_keep(text, [8, 8])
