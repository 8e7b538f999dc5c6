"""Routers on hand-made scores: with D = E and wg = I, the router logits are the inputs themselves."""
import math

import pytest
import torch

from model.moe.router import (ExpertChoiceRouter, TopKRouter, apply_expert_load, expert_capacity,
                              load_balancing_loss, pending_expert_load, router_z_loss)


def _router(cls, num_experts, *args, **kw):
    kw.setdefault("capacity_factor", 1.0)
    kw.setdefault("min_capacity", 0)
    kw.setdefault("drop_tokens", True)
    r = cls(num_experts, num_experts, *args, **kw)
    with torch.no_grad():
        r.wg.weight.copy_(torch.eye(num_experts))
    return r


def _routes(routing):
    """{(token, expert): weight} of the routes that were kept."""
    kept = routing.position_R < (routing.capacity if routing.capacity is not None else 1 << 62)
    return {(int(t), int(e)): float(w) for t, e, w, k in
            zip(routing.token_R, routing.expert_R, routing.weight_R.detach(), kept) if k}


def test_top1_capacity_drops_overflow_first_come_first_served():
    logits = torch.tensor([[2.0, 0.0]] * 6 + [[0.0, 1.0]] * 2)  # 6 tokens want expert 0, 2 want expert 1
    r = _router(TopKRouter, 2, 1, use_rts=False).train()
    routing = r(logits)
    assert routing.capacity == 4  # ceil(8 tokens / 2 experts * 1.0)
    p0 = math.exp(2) / (math.exp(2) + 1)
    p1 = math.exp(1) / (math.exp(1) + 1)
    assert _routes(routing) == pytest.approx({(0, 0): p0, (1, 0): p0, (2, 0): p0, (3, 0): p0, (6, 1): p1,
                                              (7, 1): p1})
    assert routing.weight_R[4] == 0 and routing.weight_R[5] == 0  # dropped: pass through the residual
    assert float(routing.dropped_fraction) == pytest.approx(2 / 8)
    assert routing.counts_E.tolist() == [6, 2]  # demand, before the capacity limit


def test_capacity_formula_and_min_capacity():
    assert expert_capacity(4096, 8, 1.0, 4, 4096) == 512
    assert expert_capacity(2 * 4096, 64, 1.25, 4, 4096) == 160  # top-2 doubles the routes
    assert expert_capacity(10, 8, 1.0, 4, 10) == 4  # min capacity
    assert expert_capacity(3, 8, 1.0, 4, 3) == 3  # never more slots than tokens


def test_random_token_selection_keeps_random_tokens_in_training_only():
    logits = torch.tensor([[1.0, 0.0]] * 8)  # everyone wants expert 0; capacity 4
    r = _router(TopKRouter, 2, 1, use_rts=True).train()
    kept_sets = set()
    for seed in range(6):
        torch.manual_seed(seed)
        kept_sets.add(frozenset(t for t, _ in _routes(r(logits))))
    assert all(len(s) == 4 for s in kept_sets) and len(kept_sets) > 1
    r.eval()
    assert len(_routes(r(logits))) == 8  # eval is dropless


def test_top2_renormalises_and_first_choices_outrank_second():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]]))
    r = _router(TopKRouter, 3, 2, use_rts=False, drop_tokens=False).train()
    routes = _routes(r(logits))
    assert routes == pytest.approx({(0, 0): 0.6 / 0.9, (0, 1): 0.3 / 0.9, (1, 0): 0.5 / 0.9, (1, 2): 0.4 / 0.9,
                                    (2, 1): 0.7 / 0.9, (2, 0): 0.2 / 0.9, (3, 2): 0.7 / 0.9, (3, 1): 0.2 / 0.9})
    # With 3 slots per expert (ceil(8 routes / 3 * 1.0)), expert 0 gets first choices 0, 1 and second
    # choice of token 2 but not the second choice... all fit; shrink capacity to 2 to force an overflow:
    r = _router(TopKRouter, 3, 2, use_rts=False, capacity_factor=0.75).train()  # ceil(8/3*.75) = 2
    routing = r(logits)
    assert routing.capacity == 2
    routes = _routes(routing)
    # Expert 0: first choices of tokens 0 and 1 fill it, so token 2's second choice (0) is dropped and
    # token 2's remaining route is renormalised to weight 1.
    assert (2, 0) not in routes and routes[(2, 1)] == pytest.approx(1.0)
    assert routes[(0, 0)] == pytest.approx(0.6 / 0.9)


def test_balancing_loss_equals_switch_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    first = probs.argmax(dim=1)  # experts 0, 0, 1, 2 -> f = [1/2, 1/4, 1/4]
    p_mean = [(0.7 + 0.6 + 0.1 + 0.3) / 4, (0.2 + 0.3 + 0.8 + 0.3) / 4, (0.1 + 0.1 + 0.1 + 0.4) / 4]
    want = 3 * (0.5 * p_mean[0] + 0.25 * p_mean[1] + 0.25 * p_mean[2])
    assert float(load_balancing_loss(probs, first)) == pytest.approx(want)
    uniform = torch.full((6, 3), 1 / 3)
    assert float(load_balancing_loss(uniform, torch.tensor([0, 1, 2, 0, 1, 2]))) == pytest.approx(1.0)
    # the router reports the same value for these probabilities
    r = _router(TopKRouter, 3, 1, drop_tokens=False).train()
    assert float(r(torch.log(probs)).aux_loss.detach()) == pytest.approx(want)


def test_z_loss_formula():
    logits = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    want = ((math.log(math.e + math.e**2)) ** 2 + (math.log(1 + math.exp(-1))) ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(want)
    r = _router(TopKRouter, 2, 1)
    assert float(r(logits).z_loss.detach()) == pytest.approx(want)


def test_expert_choice_each_expert_takes_its_top_tokens():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45], [0.3, 0.7], [0.5, 0.5]])
    r = _router(ExpertChoiceRouter, 2, 1.0).train()
    routing = r(torch.log(probs))
    assert routing.capacity == 3  # ceil(6 tokens * 1 / 2 experts)
    # expert 0 ranks tokens 0 (.9), 1 (.8), 3 (.55); expert 1 ranks 4 (.7), 2 (.6), 5 (.5)
    assert _routes(routing) == pytest.approx({(0, 0): 0.9, (1, 0): 0.8, (3, 0): 0.55, (4, 1): 0.7, (2, 1): 0.6,
                                              (5, 1): 0.5})
    assert routing.counts_E.tolist() == [3, 3] and float(routing.aux_loss) == 0.0
    # Unequal preferences: a token may be taken by several experts, or by none.
    probs = torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.4, 0.1, 0.5], [0.2, 0.2, 0.6], [0.3, 0.45, 0.25],
                          [0.35, 0.35, 0.3]])
    routing = _router(ExpertChoiceRouter, 3, 1.0).train()(torch.log(probs))  # C = ceil(6 / 3) = 2
    assert set(_routes(routing)) == {(0, 0), (2, 0), (4, 1), (0, 1), (1, 2), (3, 2)}
    assert float(routing.dropped_fraction) == pytest.approx(1 / 6)  # token 5


def test_expert_choice_inference_is_per_token_against_calibrated_thresholds():
    r = _router(ExpertChoiceRouter, 2, 1.0)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45], [0.3, 0.7], [0.5, 0.5]])
    r.eval()
    # Not calibrated yet: each token's round(top_k * capacity_factor) = 1 best expert.
    assert set(_routes(r(torch.log(probs)))) == {(0, 0), (1, 0), (2, 1), (3, 0), (4, 1), (5, 0)}
    r.train()
    r.calibrate(r(torch.log(probs)).calibration_E)  # expert 0 accepted down to .55, expert 1 down to .5
    torch.testing.assert_close(r.ec_threshold, torch.tensor([0.55, 0.5]))
    r.eval()
    routing = r(torch.log(torch.tensor([[0.56, 0.44], [0.5, 0.5], [0.54, 0.46]])))
    assert routing.capacity is None
    assert set(_routes(routing)) == {(0, 0), (1, 1)}  # token 2 reaches neither threshold
    # Each token alone gives the same decision: no dependence on the rest of the batch.
    alone = r(torch.log(torch.tensor([[0.56, 0.44]])))
    assert set(_routes(alone)) == {(0, 0)}


@pytest.mark.parametrize("make", [
    lambda: _router(TopKRouter, 4, 1, use_rts=True, jitter=0.1),
    lambda: _router(TopKRouter, 4, 2, use_rts=True, jitter=0.1, second_expert_sampling=True),
    lambda: _router(ExpertChoiceRouter, 4, 2.0, jitter=0.1),
])
def test_eval_is_deterministic_dropless_and_draws_no_random_numbers(make):
    r = make()
    x = torch.randn(64, 4) * 3
    x[:, 0] += 5  # heavy overflow of expert 0 if capacity applied
    r.eval()
    state = torch.get_rng_state()
    a, b = r(x), r(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.capacity is None
    for f in ("token_R", "expert_R", "weight_R"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    if isinstance(r, TopKRouter):
        assert a.token_R.numel() == 64 * r.k  # nobody dropped


def test_jitter_only_in_training():
    r = _router(TopKRouter, 3, 1, jitter=0.2)
    x = torch.randn(5, 3)
    r.eval()
    torch.testing.assert_close(r.logits(x), x)
    r.train()
    assert not torch.allclose(r.logits(x), x)


def test_dropless_training_keeps_every_route():
    logits = torch.tensor([[3.0, 0.0, 0.0]] * 10)
    for k in (1, 2):
        routing = _router(TopKRouter, 3, k, drop_tokens=False).train()(logits)
        assert routing.capacity is None and len(_routes(routing)) == 10 * k
        assert float(routing.dropped_fraction) == 0.0


# ------------------------------------------------------------------ auxiliary-loss-free balancing (expert bias)
def test_expert_bias_selects_experts_but_does_not_weight_them():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    r = _router(TopKRouter, 3, 1, drop_tokens=False, expert_bias_rate=0.1).train()
    with torch.no_grad():
        r.selection_bias.copy_(torch.tensor([-1.0, 0.0, 0.0]))  # log 0.6 - 1 < log 0.3: token 0 goes to expert 1
    routing = r(torch.log(probs))
    assert _routes(routing) == pytest.approx({(0, 1): 0.3, (1, 1): 0.7})  # weights: the unbiased probabilities
    # the balancing loss and entropy still see the router's own distribution
    assert float(routing.entropy) == pytest.approx(float(-(probs * probs.log()).sum(1).mean()), rel=1e-5)
    top2 = _router(TopKRouter, 3, 2, drop_tokens=False, expert_bias_rate=0.1).train()
    with torch.no_grad():
        top2.selection_bias.copy_(torch.tensor([0.0, -2.0, 1.0]))  # expert 2 chosen by both tokens, 1 by neither
    assert set(_routes(top2(torch.log(probs)))) == {(0, 0), (0, 2), (1, 0), (1, 2)}


def test_expert_bias_moves_towards_balance_on_a_skewed_load():
    """Every token prefers expert 0 a little: the bias lowers expert 0 and raises the others, step by step,
    until the load spreads; the update follows the load summed over ranks, not one rank's."""
    torch.manual_seed(0)
    x = torch.randn(256, 4) * 0.2
    x[:, 0] += 0.5  # a common direction: every token's logit for expert 0 is higher
    rate = 0.02
    r = _router(TopKRouter, 4, 1, use_rts=False, expert_bias_rate=rate).train()
    first = r(x)
    assert int(first.counts_E[0]) > 200 and float(first.dropped_fraction) > 0.5
    assert r.step_load.tolist() == first.counts_E.tolist()
    apply_expert_load(r, pending_expert_load(r))
    # -rate for the busy expert, +rate for the others, then centred
    torch.testing.assert_close(r.selection_bias, torch.tensor([-1.5, 0.5, 0.5, 0.5]) * rate)
    assert r.step_load.tolist() == [0, 0, 0, 0]  # consumed
    for _ in range(20):
        r(x)
        apply_expert_load(r, pending_expert_load(r))
    balanced = r(x)
    assert float(balanced.dropped_fraction) < 0.06 and int(balanced.counts_E.max()) < 1.15 * 64
    assert -0.5 < float(r.selection_bias[0] - r.selection_bias[1:].mean()) < -0.4  # it cancelled most of the common 0.5

    # Two ranks: one sees only expert 0's tokens, the other mostly expert 1's. The step's load is their sum
    # (expert 1 busiest), and both ranks' biases move alike, by that sum.
    ranks = [_router(TopKRouter, 4, 1, drop_tokens=False, expert_bias_rate=rate).train() for _ in range(2)]
    ranks[0](torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 10))
    ranks[1](torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 30 + [[0.0, 0.0, 1.0, 0.0]] * 2))
    total = pending_expert_load(ranks[0]) + pending_expert_load(ranks[1])  # what the all-reduce computes
    assert total.tolist() == [10, 30, 2, 0]
    for router in ranks:
        apply_expert_load(router, total)
    torch.testing.assert_close(ranks[0].selection_bias, ranks[1].selection_bias)
    assert ranks[0].selection_bias.tolist() == pytest.approx([0.01, -0.03, 0.01, 0.01])  # mean load 10.5


def test_expert_bias_is_frozen_and_deterministic_in_eval_and_saved():
    r = _router(TopKRouter, 4, 1, expert_bias_rate=0.1)
    with torch.no_grad():
        r.selection_bias.copy_(torch.tensor([0.3, -0.1, -0.1, -0.1]))
    x = torch.randn(64, 4)
    r.eval()
    state = torch.get_rng_state()
    a, b = r(x), r(x)
    assert torch.equal(torch.get_rng_state(), state)
    for f in ("token_R", "expert_R", "weight_R"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert r.step_load.tolist() == [0, 0, 0, 0]  # eval forwards are not counted
    assert r.selection_bias.tolist() == pytest.approx([0.3, -0.1, -0.1, -0.1])
    assert torch.equal(a.expert_R, (x + r.selection_bias).argmax(1))  # selection uses the bias in eval too
    # the bias is part of the state dict (checkpoints), the pending load is not
    assert set(r.state_dict()) == {"wg.weight", "selection_bias"}
    other = _router(TopKRouter, 4, 1, expert_bias_rate=0.1).eval()
    other.load_state_dict(r.state_dict())
    assert torch.equal(other(x).expert_R, a.expert_R)
    # without the option there is no bias in the state dict, so older checkpoints load as before
    assert set(_router(TopKRouter, 4, 1).state_dict()) == {"wg.weight"}


@pytest.mark.parametrize("cast", [torch.nn.Module.bfloat16, torch.nn.Module.half])
def test_router_state_stays_float32_when_the_model_is_cast(cast):
    """DeepSpeed's bf16 and fp16 engines cast the model; the router's weight follows, its counters and bias do
    not: in bf16 a load of 257 routes reads 256 and a bias step of 1e-3 next to a bias of 0.3 is lost."""
    from model.moe.router import Router

    from .conftest import build, nano

    model = cast(build(nano(router_type="top1", expert_bias=True, expert_bias_rate=1e-3, num_layers=4)))
    ec = cast(build(nano(router_type="expert_choice", num_layers=4)))
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers and all(r.wg.weight.dtype != torch.float32 for r in routers)
    for r in routers:
        assert r.selection_bias.dtype == r.step_load.dtype == torch.float32
    assert all(r.ec_threshold.dtype == torch.float32 for r in ec.modules() if isinstance(r, ExpertChoiceRouter))
    r = routers[0].train()
    with torch.no_grad():
        r.selection_bias.copy_(torch.tensor([0.3, -0.1, -0.1, -0.1]))
    r.count_load(torch.tensor([257, 1, 1, 1]))
    assert r.step_load.tolist() == [257, 1, 1, 1]
    r.update_expert_bias(r.step_load.clone())
    assert r.selection_bias.tolist() == pytest.approx([0.2985, -0.0995, -0.0995, -0.0995], abs=1e-7)  # step, centred
    model.train()(torch.randint(0, 97, (2, 16)))  # a cast model still runs, with its float32 router state
