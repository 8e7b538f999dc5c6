"""Dispatch and combine, whose backward passes are written by hand, against the definition.

For every layout (capacity buffer with dropped routes, top-1 and top-2; expert choice, with tokens that
no expert takes; dropless routing in the grouped layout and in a capacity buffer with empty rows), an
expert-dependent function between dispatch and combine must give
    out[t] = sum over t's kept routes r of weight[r] * f_expert(r)(x[t]),
with the gradients of autograd on that formula, and pass torch.autograd.gradcheck in float64; dispatch
alone (empty rows are zeros) must pass gradcheck too.
"""
import pytest
import torch

from model.moe.dispatch import CapacityDispatcher, GroupedDispatcher
from model.moe.router import ExpertChoiceRouter, TopKRouter

T, D, E = 12, 3, 4


KINDS = ["top1", "top2", "ec", "ec-sparse", "dropless", "dropless-capacity"]


def _routing(kind: str):
    dropless = kind.startswith("dropless")
    common = dict(min_capacity=0, drop_tokens=not dropless)
    if kind.startswith("ec"):  # ec-sparse: 2 tokens per expert, so at least 4 of the 12 tokens have no route
        router = ExpertChoiceRouter(D, E, 0.5 if kind == "ec-sparse" else 2.0, capacity_factor=1.0,
                                    **common).train()
    else:
        k = 2 if kind in ("top2", "dropless", "dropless-capacity") else 1
        # capacity factor 0.5: half the routes cannot fit, so some are dropped
        router = TopKRouter(D, E, k, use_rts=False, capacity_factor=1.0 if dropless else 0.5, **common).train()
    with torch.no_grad():
        router.wg.weight.copy_(torch.randn(E, D) * 3)
    return router(torch.randn(T, D))


def _dispatcher(kind, routing):
    if kind == "dropless":
        return GroupedDispatcher(routing, T), routing.expert_R[routing.order_R]
    # dropless-capacity: the buffer an expert-parallel group uses for dropless routing, C = busiest expert
    capacity = int(routing.counts_E.max()) + 1 if kind == "dropless-capacity" else routing.capacity
    dispatcher = CapacityDispatcher(routing, E, capacity, T)
    return dispatcher, torch.arange(E).repeat_interleave(capacity)


SCALE_E = torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=torch.float64)


def _through(kind, routing):
    """x, weight -> dispatch -> tanh(scale[expert] * rows) -> combine."""
    dispatcher, expert_N = _dispatcher(kind, routing)

    def run(x_TD, weight_R):
        rows = dispatcher.dispatch(x_TD)
        shape = rows.shape
        y = torch.tanh(rows.reshape(-1, D) * SCALE_E[expert_N].unsqueeze(-1)).view(shape)
        return dispatcher.combine(y, weight_R)
    return run


def _reference(routing, x_TD, weight_R):
    kept_R = routing.position_R < routing.capacity if routing.capacity is not None else torch.ones_like(
        routing.token_R, dtype=torch.bool)
    y_RD = torch.tanh(x_TD[routing.token_R] * SCALE_E[routing.expert_R].unsqueeze(-1))
    out = torch.zeros(T, D, dtype=x_TD.dtype)
    return out.index_add(0, routing.token_R, y_RD * (weight_R * kept_R).unsqueeze(-1))


@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_combine_match_the_definition_and_gradcheck(kind):
    routing = _routing(kind)
    if kind in ("top1", "top2"):
        assert float(routing.dropped_fraction) > 0  # the case the hand-written backward must mask
    if kind == "ec-sparse":
        assert float(routing.dropped_fraction) > 0  # tokens no expert took
    run = _through(kind, routing)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = routing.weight_R.detach().double().requires_grad_()
    probe = torch.randn(T, D, dtype=torch.float64)

    out = run(x, w)
    want = _reference(routing, x, w)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad((out * probe).sum(), (x, w))
    want_grads = torch.autograd.grad((want * probe).sum(), (x, w))
    for got, expected, name in zip(grads, want_grads, ("x", "weight")):
        torch.testing.assert_close(got, expected, msg=name)
    assert torch.autograd.gradcheck(run, (x, w))


@pytest.mark.parametrize("kind", ["top1", "dropless-capacity"])
def test_dispatch_alone_gradcheck_with_empty_rows(kind):
    routing = _routing(kind)
    dispatcher, _ = _dispatcher(kind, routing)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    rows = dispatcher.dispatch(x).reshape(-1, D)
    empty = torch.ones(rows.shape[0], dtype=torch.bool)
    empty[dispatcher.rows.slot_R[dispatcher.rows.slot_R < rows.shape[0]]] = False
    assert empty.any() and not rows[empty].any()  # empty rows exist and hold zeros
    assert torch.autograd.gradcheck(dispatcher.dispatch, (x,))


def test_combine_sums_bf16_rows_in_fp32():
    """bf16 expert outputs: each token's weighted routes are summed in fp32 and rounded to bf16 once, not
    rounded after every product and sum; on random values the two differ, so this tells them apart."""
    routing = _routing("dropless")  # top-2 in the grouped layout: every token sums two routes
    dispatcher, _ = _dispatcher("dropless", routing)
    x = torch.randn(T, D).bfloat16().requires_grad_()
    rows = dispatcher.dispatch(x)
    y = torch.randn(rows.shape).bfloat16().requires_grad_()  # (R, D) expert outputs
    w = torch.rand(rows.shape[0], requires_grad=True)  # fp32 router weights, one per route
    out = dispatcher.combine(y, w)
    terms_KTD = (w.detach().unsqueeze(-1) * y.detach()[dispatcher.rows.slot_R].float()).view(2, T, D)
    in_fp32 = terms_KTD.sum(0).bfloat16()
    in_bf16 = terms_KTD.bfloat16().sum(0)  # rounded per product, then per sum
    assert not torch.equal(in_fp32, in_bf16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, in_fp32)
    (out.float() * torch.randn(T, D)).sum().backward()
    assert y.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
