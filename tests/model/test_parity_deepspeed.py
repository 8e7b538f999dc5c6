"""Our MoE layer against deepspeed.moe.layer.MoE with identical weights.

With random token selection and second-expert sampling off and capacity ample enough that nothing is
dropped, both compute the same function, so outputs, the balancing loss and every gradient must agree.
"""
import pytest
import torch
from deepspeed.moe.layer import MoE

from model.moe import MLP, MoELayer

from .conftest import nano

D, F, E, T = 16, 32, 4, 24


def _pair(k: int, drop_tokens: bool, use_residual: bool):
    cfg = nano(hidden_size=D, num_heads=2, ffn_hidden_size=F, num_experts=E, router_type="top1" if k == 1 else "top2",
               capacity_factor=float(E), min_capacity=0, drop_tokens=drop_tokens, use_rts=False,
               use_residual=use_residual)
    torch.manual_seed(0)
    ds = MoE(D, MLP(D, F, bias=False), num_experts=E, ep_size=1, k=k, capacity_factor=float(E),
             eval_capacity_factor=float(E), min_capacity=0, use_residual=use_residual, drop_tokens=drop_tokens,
             use_rts=False, top2_2nd_expert_sampling=False)
    for p in ds.parameters():  # DeepSpeed copies one expert E times; make them differ
        torch.nn.init.normal_(p, std=0.3)
    ours = MoELayer(cfg, E)
    ours.load_state_dict(ds.state_dict())  # DeepSpeed's per-expert names load into our stacked experts
    return ds, ours


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("use_residual", [False, True])
def test_same_outputs_and_gradients_as_deepspeed(k, drop_tokens, use_residual):
    ds, ours = _pair(k, drop_tokens, use_residual)
    x = torch.randn(2, T // 2, D)
    x_ds, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    probe = torch.randn(2, T // 2, D)

    y_ds, aux_ds, counts_ds = ds(x_ds)
    out = ours(x_ours)
    torch.testing.assert_close(out.hidden, y_ds)
    torch.testing.assert_close(out.aux_loss, aux_ds)
    torch.testing.assert_close(out.expert_counts, counts_ds.to(out.expert_counts.dtype))
    assert float(out.dropped_fraction) == 0.0

    ((y_ds * probe).sum() + aux_ds).backward()
    ((out.hidden * probe).sum() + out.aux_loss).backward()
    torch.testing.assert_close(x_ours.grad, x_ds.grad)
    torch.testing.assert_close(ours.deepspeed_moe.gate.wg.weight.grad, ds.deepspeed_moe.gate.wg.weight.grad)
    ds_experts = ds.deepspeed_moe.experts.deepspeed_experts
    for name in ("fc1", "fc2"):
        want = torch.stack([getattr(e, name).weight.grad.t() for e in ds_experts])  # (E, in, out)
        torch.testing.assert_close(getattr(ours.deepspeed_moe.experts, f"{name}_weight").grad, want)
    if use_residual:
        torch.testing.assert_close(ours.coefficient.weight.grad, ds.coefficient.weight.grad)
        torch.testing.assert_close(ours.mlp.fc1.weight.grad, ds.mlp.fc1.weight.grad)


def test_layer_alone_saves_in_deepspeed_expert_layout():
    ds, ours = _pair(1, True, True)
    assert set(ours.state_dict()) == set(ds.state_dict())
    for key, value in ds.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
