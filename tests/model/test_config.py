"""GPTMoEConfig: validation, sizes, persistence and analytic parameter counts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed.moe.utils import is_moe_param

from model import SIZES, GPTMoEConfig
from model.config import RouterKind
from model.moe.layer import moe_layers

from .conftest import build, nano


@pytest.mark.parametrize("name", [n for n in SIZES if n.endswith("B")])
def test_public_sizes_have_the_parameters_their_names_say(name):
    """A dense GPT of each public size (GPT-2's 50304-row padded vocabulary, 2048 positions) has the count its
    name gives, within 2.5%: a wrong layer count, width or head count in the table would miss it."""
    cfg = GPTMoEConfig.from_size(name, vocab_size=50257, seq_len=2048)
    assert cfg.param_counts()["total"] == pytest.approx(float(name[:-1]) * 1e9, rel=0.025)
    assert cfg.ffn_hidden_size == 4 * cfg.hidden_size


def test_cpu_sizes_are_smaller_than_every_public_size():
    counts = {name: GPTMoEConfig.from_size(name).param_counts()["total"] for name in SIZES}
    assert counts["nano"] < counts["tiny"] < min(v for k, v in counts.items() if k.endswith("B"))


def test_from_size_errors_list_what_is_allowed():
    with pytest.raises(ValueError, match=r"'1B'.*0\.125B \| 0\.35B"):
        GPTMoEConfig.from_size("1B")
    with pytest.raises(ValueError, match="unknown fields.*'n_layer'"):
        GPTMoEConfig.from_size("nano", n_layer=3)


@pytest.mark.parametrize("field, value, words", [
    ("router_type", 3, "router_type.*3.*top1 \\| expert_choice \\| top2"),
    ("router_type", "top3", "router_type.*'top3'.*top1 \\| expert_choice \\| top2"),
    ("num_heads", 5, "num_heads.*5.*divisor of hidden_size=64"),
    ("num_experts", -1, "num_experts.*-1"),
    ("num_experts", [4, 4], "num_experts.*a list of 1 counts"),
    ("ep_size", 3, "ep_size.*3.*divisor"),
    ("recompute", "some", "recompute.*'some'.*none \\| sel \\| full"),
    ("dropout", 1.0, "dropout.*\\[0, 1\\)"),
    ("capacity_factor", 0, "capacity_factor"),
    ("expert_choice_k", 0, "expert_choice_k.*a number > 0"),
    ("drop_tokens", "yes", "drop_tokens.*True \\| False"),
    ("moe_layer_interval", 0, "moe_layer_interval.*>= 1"),
    ("router_jitter", 1.5, "router_jitter"),
    ("expert_bias_rate", -0.1, "expert_bias_rate.*a finite number >= 0"),
    ("expert_bias", 1, "expert_bias.*True \\| False"),
])
def test_validation_names_field_value_and_allowed(field, value, words):
    with pytest.raises(ValueError, match=words) as err:
        nano(**{field: value})
    assert "\n" not in str(err.value) and f"GPTMoEConfig.{field}" in str(err.value)


def test_expert_bias_is_for_token_choice_routers():
    assert nano(expert_bias=True, router_type="top2").expert_bias
    with pytest.raises(ValueError, match="expert_bias.*True.*expert_choice"):
        nano(expert_bias=True, router_type="expert_choice")


def test_derived_fields_and_moe_layer_indices():
    cfg = GPTMoEConfig.from_size("0.125B", num_experts=8)
    assert cfg.moe_layer_indices() == [1, 3, 5, 7, 9, 11]
    assert cfg.experts_per_moe_layer() == [8] * 6
    assert GPTMoEConfig.from_size("0.125B").moe_layer_indices() == []  # dense
    assert GPTMoEConfig.from_size("0.35B", num_experts=8, moe_layer_interval=1).moe_layer_indices() == list(range(24))
    assert nano(router_type="top2").experts_per_token() == 2 and nano(router_type="top1").experts_per_token() == 1
    assert nano(router_type="top2", expert_choice_k=3.0).experts_per_token() == 2  # read by expert choice only
    assert nano(router_type="top2").router_type is RouterKind.TOP2
    assert nano(router_type="expert_choice").experts_per_token() == 1.0
    assert nano(router_type="expert_choice", expert_choice_k=2).experts_per_token() == 2.0
    assert nano(router_type="expert_choice", capacity_factor=2.0).experts_per_token() == 2.0
    assert GPTMoEConfig(vocab_size=50257).padded_vocab_size == 50304


def test_dict_round_trip_is_json_safe():
    cfg = nano(num_layers=4, num_experts=[2, 4], router_type="expert_choice", expert_choice_k=2.0, use_residual=True)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert GPTMoEConfig.from_dict(data) == cfg
    assert data["router_type"] == "expert_choice"
    with pytest.raises(ValueError, match="unknown fields.*'bogus'"):
        GPTMoEConfig.from_dict({**data, "bogus": 1})


@pytest.mark.parametrize("digit, kind", [(0, RouterKind.TOP1), (1, RouterKind.EXPERT_CHOICE), (2, RouterKind.TOP2)])
def test_model_config_saved_before_router_names_loads(digit, kind):
    """model_config.json files written earlier hold the RT digit and a `top_k` (expert choice's k)."""
    top_k = {0: 1, 1: 2.0, 2: 2}[digit]
    old = {**nano().to_dict(), "router_type": digit, "top_k": top_k}
    del old["expert_choice_k"]
    cfg = GPTMoEConfig.from_dict(old)
    assert cfg.router_type is kind
    assert cfg.experts_per_token() == top_k
    with pytest.raises(ValueError, match="router_type.*3.*0 \\(top-1\\) \\| 1 \\(expert choice\\) \\| 2"):
        GPTMoEConfig.from_dict({**old, "router_type": 3})


def _active_from_module_tree(model, cfg):
    """The counting rule applied to real modules: every non-expert parameter, plus each MoE layer's expert
    parameters times experts_per_token / experts."""
    active = sum(p.numel() for p in model.parameters() if not is_moe_param(p))
    for layer in moe_layers(model):
        expert = sum(p.numel() for p in layer.parameters() if is_moe_param(p))
        active += expert * cfg.experts_per_token() / layer.num_experts
    return round(active)


@pytest.mark.parametrize("overrides", [
    dict(num_experts=0),
    dict(num_experts=4),
    dict(num_experts=4, router_type="top2", tie_embeddings=False),
    dict(num_experts=4, router_type="expert_choice", expert_choice_k=2.0, use_residual=True),
    dict(num_layers=4, num_experts=[2, 8], router_type="top2", use_residual=True, ffn_hidden_size=96),
])
def test_param_counts_match_an_instantiated_model(overrides):
    cfg = nano(**overrides)
    model = build(cfg)
    counts = cfg.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["expert"] == sum(p.numel() for p in model.parameters() if is_moe_param(p))
    assert counts["active"] == _active_from_module_tree(model, cfg)
    assert counts["embedding"] == model.wte.weight.numel() + model.wpe.weight.numel() + (
        0 if model.lm_head is None else model.lm_head.weight.numel())


def test_public_sizes_count_like_the_papers():
    dense = GPTMoEConfig.from_size("0.125B").param_counts()
    assert 120e6 < dense["total"] < 130e6
    moe = GPTMoEConfig.from_size("0.35B", num_experts=128).param_counts()  # DeepSpeed-MoE's 350M+MoE-128
    assert 12e9 < moe["total"] < 14e9
    # a token's active set: the dense model, plus 12 gates, minus the 12 FFN biases experts do not have
    dense = GPTMoEConfig.from_size("0.35B").param_counts()["total"]
    assert moe["active"] == dense + 12 * 1024 * 128 - 12 * (4096 + 1024)


def test_model_package_never_imports_launcher():
    root = Path(__file__).resolve().parents[2] / "model"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import launcher" not in text and "from launcher" not in text, path


def test_import_model_leaves_transformers_until_the_wrapper_is_asked_for():
    """`import model` does not pay for transformers (model/__init__.py); asking for the wrapper imports it and
    registers the gpt_moe type with the Auto classes. A fresh interpreter: this one imported transformers."""
    code = ("import sys, model\n"
            "assert 'transformers' not in sys.modules, 'import model imported transformers'\n"
            "from model import GPTMoE, GPTMoEConfig, GPTMoEForCausalLM, GPTMoEHFConfig\n"
            "from transformers import AutoConfig\n"
            "assert type(AutoConfig.for_model('gpt_moe')) is GPTMoEHFConfig\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2], env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
