"""The transformers wrapper: Auto* registration, state-dict prefix, generate() with a KV cache, save/load."""
import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from model import GPTMoEForCausalLM, GPTMoEHFConfig

from .conftest import build, nano


def _pair(**overrides):
    cfg = nano(router_type="top2", **overrides)
    model = build(cfg).eval()
    return model, GPTMoEForCausalLM.from_gpt_moe(model).eval()


def test_config_round_trip_and_registration(tmp_path):
    cfg = nano(router_type="expert_choice", expert_choice_k=2.0, num_layers=4, num_experts=[2, 4], use_residual=True)
    hf_cfg = GPTMoEHFConfig.from_gpt_moe_config(cfg)
    assert hf_cfg.model_type == "gpt_moe" and hf_cfg.num_hidden_layers == 4 and hf_cfg.expert_choice_k == 2.0
    assert hf_cfg.router_type == "expert_choice"  # by name in config.json
    assert hf_cfg.to_gpt_moe_config() == cfg
    hf_cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["router_type"] == "expert_choice"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GPTMoEHFConfig) and loaded.to_gpt_moe_config() == cfg


def test_config_saved_before_router_names_loads(tmp_path):
    """Earlier config.json files hold the router as the RT digit and expert choice's k as `moe_top_k`."""
    cfg = nano(router_type="expert_choice", expert_choice_k=2.0)
    GPTMoEHFConfig.from_gpt_moe_config(cfg).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["router_type"] = 1
    data["moe_top_k"] = data.pop("expert_choice_k")
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert AutoConfig.from_pretrained(tmp_path).to_gpt_moe_config() == cfg


def test_state_dict_is_gpt_moe_with_a_model_prefix():
    model, hf = _pair()
    want = {f"model.{k}" for k in model.state_dict()}
    assert set(hf.state_dict()) == want
    x = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(hf(x).logits, model(x).logits)


def test_labels_are_shifted_and_aux_loss_returned():
    model, hf = _pair()
    x = torch.randint(0, 97, (2, 9))
    out = hf(x, labels=x)
    ours = model(x[:, :-1], labels=x[:, 1:])
    torch.testing.assert_close(out.lm_loss, ours.loss)
    torch.testing.assert_close(out.aux_loss, model(x).aux_loss)  # routed over the same 9 tokens
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.z_loss)


def test_generate_with_kv_cache_save_and_auto_load(tmp_path):
    model, hf = _pair()
    prompt = torch.randint(0, 97, (2, 6))
    ours = model.generate(prompt, 8, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(theirs, ours)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(back, GPTMoEForCausalLM)
    assert torch.equal(back.generate(prompt, max_new_tokens=8, do_sample=False), ours)


def test_left_padded_batch_generates_like_each_prompt_alone():
    model, hf = _pair()
    prompts = torch.randint(0, 97, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # the second prompt is 4 tokens, left-padded
    batched = hf.generate(prompts, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(batched[0], model.generate(prompts[:1], 5, temperature=0)[0])
    assert torch.equal(batched[1, 6:], model.generate(prompts[1:, 2:], 5, temperature=0)[0, 4:])
