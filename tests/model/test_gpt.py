"""The decoder: causality, determinism and batch independence in eval, recompute, KV cache, loss convention."""
import pytest
import torch
import torch.nn.functional as F

import model.moe.layer as moe_layer

from .conftest import build, nano

ROUTERS = [dict(router_type="top1"), dict(router_type="expert_choice", expert_choice_k=2.0), dict(router_type="top2"),
           dict(router_type="top2", use_residual=True, num_layers=4, num_experts=[2, 4])]


def _trained_once(cfg, seed=0):
    """A model whose expert-choice thresholds are calibrated by one training forward."""
    model = build(cfg, seed)
    model.train()
    model(torch.randint(0, cfg.vocab_size, (4, cfg.seq_len)))
    return model.eval()


@pytest.mark.parametrize("router", ROUTERS)
def test_changing_future_tokens_never_changes_earlier_logits(router):
    cfg = nano(**router)
    model = _trained_once(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, cfg.vocab_size, (3, 8))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("router", ROUTERS)
def test_eval_is_deterministic_and_independent_of_the_batch(router):
    # drop_tokens and random token selection are on: neither may act in eval mode.
    cfg = nano(**router, drop_tokens=True, use_rts=True, router_jitter=0.1, capacity_factor=0.5)
    model = _trained_once(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16))
    others = torch.randint(0, cfg.vocab_size, (5, 16))
    others[:, :] = others[0]  # batch mates that all want the same experts: heavy overflow if capacity applied
    with torch.no_grad():
        alone = model(prompt).logits
        again = model(prompt).logits
        batched = model(torch.cat([others[:2], prompt, others[2:]])).logits[2:3]
    assert torch.equal(alone, again)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_labels_are_already_aligned_and_minus_100_is_ignored():
    cfg = nano()
    model = build(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    labels = torch.randint(0, cfg.vocab_size, (2, 10))
    labels[0, :3] = -100
    out = model(x, labels=labels)
    want = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    assert out.logits.shape == (2, 10, cfg.vocab_size)  # vocabulary padding never shows
    torch.testing.assert_close(out.total_loss, out.loss + out.aux_loss + out.z_loss)


def test_losses_and_stats():
    cfg = nano(aux_loss_coef=0.5, z_loss_coef=0.25, num_layers=4)
    model = build(cfg).train()
    out = model(torch.randint(0, cfg.vocab_size, (2, 16)))
    assert [s["layer"] for s in out.moe_stats] == [1, 3]
    torch.testing.assert_close(out.aux_loss, 0.5 * sum(s["aux_loss"] for s in out.moe_stats))
    torch.testing.assert_close(out.z_loss, 0.25 * sum(s["z_loss"] for s in out.moe_stats))
    for s in out.moe_stats:
        assert s["expert_counts"].shape == (4,) and int(s["expert_counts"].sum()) == 32
        assert 0.0 <= float(s["dropped_fraction"]) < 1.0
    dense = build(nano(num_experts=0))
    out = dense(torch.randint(0, 97, (2, 8)))
    assert out.moe_stats == [] and float(out.aux_loss) == 0.0 and out.aux_loss.dim() == 0


@pytest.mark.parametrize("router", [dict(router_type=kind) for kind in ("top1", "expert_choice", "top2")])
def test_recompute_gives_the_same_gradients(router):
    # Dropout, router jitter and random token selection all draw random numbers: recompute must replay them.
    grads, thresholds = {}, {}
    x = torch.randint(0, 97, (2, 24))
    for mode in ("none", "sel", "full"):
        cfg = nano(**router, recompute=mode, dropout=0.1, router_jitter=0.05, use_rts=True, capacity_factor=0.8)
        model = build(cfg).train()
        torch.manual_seed(1)
        out = model(x, labels=x)
        out.total_loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
        thresholds[mode] = [b.clone() for n, b in model.named_buffers() if n.endswith("ec_threshold")]
    for mode in ("sel", "full"):
        assert grads[mode].keys() == grads["none"].keys()
        for name, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], g, msg=f"{mode}: {name}")
        for a, b in zip(thresholds[mode], thresholds["none"]):
            torch.testing.assert_close(a, b)  # recomputation does not calibrate twice


@pytest.mark.parametrize("router", ROUTERS[:3])
def test_kv_cache_matches_the_full_forward(router):
    cfg = nano(**router)
    model = _trained_once(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(x).logits
        first = model(x[:, :7], use_cache=True)
        cache = first.past_key_values
        steps = [model(x[:, t:t + 1], past_key_values=cache).logits for t in range(7, 10)]
        chunk = model(x[:, 10:], past_key_values=cache).logits  # several new tokens at once
    got = torch.cat([first.logits] + steps + [chunk], dim=1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_kv_cache_writes_new_positions_in_place_and_matches_concatenation():
    """Decoding steps append into a buffer (no copy of the whole cache per step); the values are what
    concatenating would give, also after the Decoder replaces a layer's tensors (rows dropped)."""
    from model.gpt import KVCache

    torch.manual_seed(0)
    cache, expected = KVCache(max_length=64), None
    for step in range(20):
        k, v = torch.randn(3, 2, 5 if step == 0 else 1, 4), torch.randn(3, 2, 5 if step == 0 else 1, 4)
        expected = (k, v) if expected is None else (torch.cat([expected[0], k], 2), torch.cat([expected[1], v], 2))
        got = cache.update(k, v, 0)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        if step == 1:
            storage = got[0].untyped_storage().data_ptr()
        elif 1 < step < 7:  # 6 positions after the first decode step: a buffer of 12, no reallocation up to 12
            assert got[0].untyped_storage().data_ptr() == storage, f"step {step}: the cache was copied"
    assert cache.get_seq_length() == 24 and cache.keys[0].shape[2] <= 64
    # The Decoder drops rows by assigning new tensors; the next update starts a fresh buffer from them.
    cache.keys[0], cache.values[0] = cache.keys[0][[0, 2]], cache.values[0][[0, 2]]
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    got = cache.update(k, v, 0)
    assert torch.equal(got[0], torch.cat([expected[0][[0, 2]], k], 2))
    assert torch.equal(got[1], torch.cat([expected[1][[0, 2]], v], 2))
    # Under autograd the cache concatenates, so backward sees the tensors it saved unchanged.
    k = torch.randn(2, 2, 1, 4, requires_grad=True)
    keys, _ = cache.update(k, torch.randn(2, 2, 1, 4), 0)
    keys.sum().backward()
    assert torch.equal(k.grad, torch.ones_like(k))


def test_generate_greedy_equals_recomputing_everything():
    cfg = nano(router_type="top2")
    model = _trained_once(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    out = model.generate(prompt, 6, temperature=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(6):
            tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, tokens)
    assert model.training is False
    model.train()
    sampled = model.generate(prompt, 6, temperature=0.8, top_k=5, top_p=0.9,
                             generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 11) and model.training  # mode restored
    eos = int(out[0, 5])
    stopped = model.generate(prompt[:1], 6, temperature=0, eos_id=eos)
    assert stopped.shape == (1, 6) and int(stopped[0, -1]) == eos
    with pytest.raises(ValueError, match="seq_len"):
        model.generate(prompt, cfg.seq_len)


def test_grouped_and_capacity_layouts_agree(monkeypatch):
    """Dropless routing on one rank: the grouped GEMM and the capacity buffer + bmm compute the same."""
    cfg = nano(router_type="top2", drop_tokens=False)
    model = build(cfg).train()
    x = torch.randint(0, 97, (2, 16))

    def run():
        model.zero_grad()
        out = model(x, labels=x)
        out.total_loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want_logits, want_grads = run()
    monkeypatch.setattr(moe_layer, "grouped_mm_supported", lambda x: False)
    logits, grads = run()
    torch.testing.assert_close(logits, want_logits)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, msg=name)


def test_bf16_keeps_router_math_in_fp32():
    cfg = nano(router_type="top2")
    model = build(cfg).to(torch.bfloat16).train()
    layer = moe_layer.moe_layers(model)[0]
    h = torch.randn(2, 8, cfg.hidden_size, dtype=torch.bfloat16)
    routing = layer.deepspeed_moe.gate(h.reshape(-1, cfg.hidden_size))
    assert routing.weight_R.dtype == torch.float32 and routing.aux_loss.dtype == torch.float32
    out = model(torch.randint(0, 97, (2, 8)), labels=torch.randint(0, 97, (2, 8)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.total_loss)
    out.total_loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), name
    assert layer.deepspeed_moe.gate.wg.weight.grad.abs().sum() > 0  # the fp32 router math passes gradients back


def test_same_seed_same_model_whatever_the_expert_parallel_rank_layout():
    """Experts are seeded by global id: rank r of an EP=2 model holds exactly rows r*E/2.. of the EP=1 model."""
    full = build(nano(num_experts=4)).state_dict()
    for rank in (0, 1):
        part = build(nano(num_experts=4, ep_size=2), ep_rank=rank).state_dict()
        for key, value in part.items():
            if key.endswith(("fc1_weight", "fc2_weight")):
                torch.testing.assert_close(value, full[key][2 * rank:2 * rank + 2])
            else:
                torch.testing.assert_close(value, full[key], msg=key)
        # and a full-size state dict loads into the EP=2 model, keeping this rank's experts
        model = build(nano(num_experts=4, ep_size=2), seed=5, ep_rank=rank)
        model.load_state_dict(full)
        for key, value in part.items():
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)
