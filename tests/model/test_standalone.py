"""The standalone transformers code (model/standalone, copied into exported folders) against the training
model: same logits in eval mode for every router and option, KV cache, left padding, loss; same settings."""
import ast
import dataclasses

import pytest
import torch

from model import GPTMoEConfig, GPTMoEForCausalLM
from model.moe.layer import moe_layers
from model.standalone import CODE_FILES, HERE
from model.standalone.configuration_gpt_moe import GPTMoEHFConfig as StandaloneConfig
from model.standalone.modeling_gpt_moe import GPTMoEForCausalLM as Standalone

from .conftest import build, nano

# Every router and every option that changes inference, each in at least one case.
CASES = {
    "top1": dict(router_type="top1"),
    "top2": dict(router_type="top2"),
    "top2-expert-bias": dict(router_type="top2", expert_bias=True),
    "expert-choice": dict(router_type="expert_choice", expert_choice_k=2.0),
    "expert-choice-uncalibrated": dict(router_type="expert_choice", expert_choice_k=1.5, capacity_factor=2.0),
    "pr-moe-pyramid": dict(router_type="top2", use_residual=True, num_layers=4, num_experts=[2, 4]),
    "every-layer-moe-untied": dict(router_type="top1", moe_layer_interval=1, tie_embeddings=False),
    "dense": dict(num_experts=0),
    "mlp-bias-pruned-pyramid": dict(router_type="top1", expert_mlp_bias=True, use_residual=True, num_layers=6,
                                    num_experts=[4, 0, 2]),  # upcycled (expert biases), then pruned
    "shapes": dict(router_type="expert_choice", ffn_hidden_size=96, layer_norm_eps=1e-3, vocab_pad_multiple=7,
                   num_heads=8),
}


def _pair(case: str, seed: int = 0, **overrides):
    """(training model in eval mode, the standalone model with its weights), loaded as a folder would be."""
    cfg = nano(**CASES[case], **overrides)
    model = build(cfg, seed)
    if "uncalibrated" not in case:  # one training forward calibrates expert-choice thresholds
        model.train()
        model(torch.randint(0, cfg.vocab_size, (4, cfg.seq_len)))
    if "expert-bias" in case:  # a bias that changes which experts are chosen
        for layer in moe_layers(model):
            layer.deepspeed_moe.gate.selection_bias.copy_(torch.randn(layer.num_experts))
    if "mlp-bias" in case:  # biases that change the experts' outputs
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "experts.fc" in name and "bias" in name or ".mlp.mlp." in name and "bias" in name:
                    p.normal_(0.0, 0.5)
    model.eval()
    hf = GPTMoEForCausalLM.from_gpt_moe(model)
    standalone = Standalone(StandaloneConfig(**hf.config.to_dict())).eval()
    standalone.load_state_dict(hf.state_dict(), strict=True)
    return model, standalone


@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_match_the_training_model(case):
    model, standalone = _pair(case)
    gate = next((m.deepspeed_moe.gate for m in moe_layers(model)), None)
    if case.startswith("expert-choice"):
        assert bool(torch.isnan(gate.ec_threshold).any()) == ("uncalibrated" in case)
    x = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        ours = model(x[:, :-1], labels=x[:, 1:])  # the training model's labels come aligned
        theirs = standalone(x[:, :-1]).logits
        theirs_loss = standalone(x, labels=x).loss  # transformers' convention: shifted inside
    torch.testing.assert_close(theirs, ours.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs_loss, ours.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["top2", "expert-choice", "pr-moe-pyramid"])
def test_kv_cache_and_left_padding(case):
    from transformers import DynamicCache

    model, standalone = _pair(case)
    v = model.config.vocab_size
    x = torch.randint(0, v, (2, 12))
    with torch.no_grad():
        full = standalone(x).logits
        cache = DynamicCache()
        steps = [standalone(x[:, :6], cache=cache, use_cache=True).logits]
        steps += [standalone(x[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(6, 9)]
        steps.append(standalone(x[:, 9:], cache=cache, use_cache=True).logits)  # several new tokens at once
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)

    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # the second prompt is 7 tokens, left-padded
    with torch.no_grad():
        padded = standalone(x, attention_mask=mask).logits
        alone = model(x[1:, 5:]).logits
    torch.testing.assert_close(padded[1, 5:], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[0], full[0], rtol=1e-5, atol=1e-5)


def test_generate_greedy_matches_the_training_model():
    # Large init weights: the continuation depends on the context, so a cache or position bug changes it.
    model, standalone = _pair("expert-choice", seed=3, init_std=0.3)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    ours = model.generate(prompt, 10, temperature=0)
    assert len(set(ours[0, 5:].tolist())) > 3
    theirs = standalone.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(theirs, ours)


def test_positions_beyond_the_context_are_refused():
    _, standalone = _pair("top1")
    with pytest.raises(ValueError, match="beyond the model's seq_len=32"):
        standalone(torch.zeros(1, 33, dtype=torch.long))


def test_bf16_routes_in_fp32():
    model, standalone = _pair("top2")
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        ours = model.to(torch.bfloat16)(x).logits.float()
        theirs = standalone.to(torch.bfloat16)(x).logits.float()
    torch.testing.assert_close(theirs, ours, rtol=0.02, atol=0.02)


def test_every_setting_inference_reads_has_the_same_name_and_default():
    """The standalone config declares every setting inference depends on, with the training config's default;
    the training-only ones travel through config.json untouched."""
    import inspect

    from model.standalone.configuration_gpt_moe import router_kind

    training_only = {"dropout", "eval_capacity_factor", "min_capacity", "drop_tokens", "aux_loss_coef",
                     "z_loss_coef", "router_jitter", "use_rts", "top2_2nd_expert_sampling", "ep_size", "recompute",
                     "expert_bias_rate"}
    declared = {name: p.default for name, p in inspect.signature(StandaloneConfig.__init__).parameters.items()
                if name not in ("self", "kwargs")}
    ours = {f.name: f.default for f in dataclasses.fields(GPTMoEConfig) if f.name not in training_only}
    assert set(declared) == set(ours)
    ours["router_type"] = router_kind(ours["router_type"])
    assert {name: StandaloneConfig().__dict__[name] for name in declared} == {
        **ours, "ffn_hidden_size": 4 * ours["hidden_size"]}


def test_standalone_code_imports_only_torch_and_transformers():
    allowed = {"__future__", "math", "torch", "transformers"}
    for name in CODE_FILES:
        tree = ast.parse((HERE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"." if node.level else node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed | {"."}, (name, roots)


def test_import_model_registers_and_a_saved_folder_carries_its_code(tmp_path):
    """`import model` alone registers "gpt_moe" (without importing transformers' model classes until
    transformers does); a save_pretrained folder carries the standalone code, its auto_map and token ids."""
    import json
    import os
    import subprocess
    import sys

    model, _ = _pair("top2")
    GPTMoEForCausalLM.from_gpt_moe(model, eos_token_id=5, pad_token_id=5, bos_token_id=5).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == config["pad_token_id"] == 5
    assert config["auto_map"] == {"AutoConfig": "configuration_gpt_moe.GPTMoEHFConfig",
                                  "AutoModelForCausalLM": "modeling_gpt_moe.GPTMoEForCausalLM"}
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                    *CODE_FILES}
    x = torch.arange(12)[None] % 90
    with torch.no_grad():
        want = model(x).logits
    torch.save(x, tmp_path / "x.pt")
    code = f"""
import sys
import torch
import model
assert "transformers.modeling_utils" not in sys.modules
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained({str(tmp_path)!r})
loaded = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
with torch.no_grad():
    torch.save(loaded(torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "y.pt")!r})
print(type(config).__module__, type(loaded).__module__, config.eos_token_id)
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["model.hf_config", "model.hf", "5"]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want)
