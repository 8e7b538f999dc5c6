"""The transformers wrapper: Auto* registration, state-dict prefix, generate() with a KV cache, save/load.

Generation tests use weights for which context matters (init std 0.3): at the default init a nano model
repeats one token whatever came before, so a cache that loses the context would go unnoticed.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast, pipeline

from model import GPTMoEForCausalLM, GPTMoEHFConfig

from .conftest import build, nano


def _pair(router_type="top2", **overrides):
    cfg = nano(router_type=router_type, init_std=0.3, **overrides)
    model = build(cfg).eval()
    return model, GPTMoEForCausalLM.from_gpt_moe(model).eval()


def _assert_context_matters(model, prompts):
    """The next token after the whole prompt differs from the one after its last token alone, for some row."""
    with torch.no_grad():
        whole = model(prompts).logits[:, -1].argmax(-1)
        last_only = model(prompts[:, -1:]).logits[:, -1].argmax(-1)
    assert (whole != last_only).any()


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


def test_import_model_alone_lets_the_auto_classes_load_a_saved_folder(tmp_path):
    """A fresh interpreter that imports `model` and nothing of it by name loads a save_pretrained folder with
    AutoModelForCausalLM, without trust_remote_code, as the toolkit's class, and generates what it generated."""
    model, hf = _pair()
    prompt = torch.randint(0, 97, (1, 6))
    expected = model.generate(prompt, 6, temperature=0)[0].tolist()
    hf.save_pretrained(tmp_path)
    code = ("import json, sys, torch, model\n"
            "from transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
            "out = m.generate(torch.tensor([json.loads(sys.argv[2])]), max_new_tokens=6, do_sample=False)\n"
            "print(json.dumps([type(m).__module__, out[0].tolist()]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), json.dumps(prompt[0].tolist())],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["model.hf", expected]


def test_left_padded_batch_generates_like_each_prompt_alone():
    model, hf = _pair()
    prompts = torch.randint(0, 97, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # the second prompt is 4 tokens, left-padded
    batched = hf.generate(prompts, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(batched[0], model.generate(prompts[:1], 5, temperature=0)[0])
    assert torch.equal(batched[1, 6:], model.generate(prompts[1:, 2:], 5, temperature=0)[0, 4:])


@pytest.mark.parametrize("router_type", ["top1", "expert_choice", "top2"])
def test_kv_cache_changes_nothing_in_greedy_generate(router_type):
    """generate() with the cache == without it == GPTMoE.generate, whatever name transformers gives the cache
    (`cache` in 5.x, `past_key_values` in 4.x); left-padded rows, chunked prefill and beams too."""
    model, hf = _pair(router_type)
    prompts = torch.randint(0, 97, (3, 7))
    _assert_context_matters(model, prompts)
    ours = model.generate(prompts, 12, temperature=0)
    cached = hf.generate(prompts, max_new_tokens=12, do_sample=False)
    uncached = hf.generate(prompts, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(uncached, ours)
    assert torch.equal(cached, ours)

    mask = torch.ones_like(prompts)
    mask[1, :3] = 0
    mask[2, :5] = 0
    left_padded = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    uncached = hf.generate(prompts, use_cache=False, **left_padded)
    assert torch.equal(hf.generate(prompts, **left_padded), uncached)
    if hasattr(GenerationConfig(), "prefill_chunk_size"):  # transformers >= 4.52
        assert torch.equal(hf.generate(prompts, prefill_chunk_size=3, **left_padded), uncached)
    for row, pad in enumerate((0, 3, 5)):
        alone = model.generate(prompts[row:row + 1, pad:], 10, temperature=0)
        assert torch.equal(uncached[row, 7:], alone[0, 7 - pad:])
    beams = dict(left_padded, num_beams=3)
    assert torch.equal(hf.generate(prompts, **beams), hf.generate(prompts, use_cache=False, **beams))


def test_forward_takes_the_cache_under_either_name():
    model, hf = _pair()
    prompt = torch.randint(0, 97, (2, 9))
    full = hf(prompt).logits[:, -1]
    torch.testing.assert_close(hf(prompt, logits_to_keep=1).logits[:, -1], full)
    for name in ("cache", "past_key_values"):
        out = hf(prompt[:, :-1], use_cache=True)
        cache = out.past_key_values
        assert cache.get_seq_length() == 8
        step = hf(prompt[:, -1:], **{name: cache}, use_cache=True)
        torch.testing.assert_close(step.logits[:, -1], full)


def _word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Token i is the word "w<i>": a tokenizer built in memory, nothing downloaded."""
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=words, eos_token="w96", pad_token="w96")


def test_text_generation_pipeline_continues_with_context():
    model, hf = _pair()
    tokenizer = _word_tokenizer(97)
    prompts = ["w5 w9 w13 w40", "w71 w2 w13 w40"]  # same last tokens, different context
    generate = pipeline("text-generation", model=hf, tokenizer=tokenizer)
    texts = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        ours = model.generate(ids, 8, temperature=0, eos_id=tokenizer.eos_token_id)[0]
        want = tokenizer.decode(ours, skip_special_tokens=True)
        got = generate(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
        # Versions differ in the space they put after the prompt; every word starts with "w", so no ambiguity.
        assert got.replace(" ", "") == want.replace(" ", "")
        texts.append(tokenizer.decode(ours[ids.shape[1]:]))
    assert texts[0] != texts[1]
