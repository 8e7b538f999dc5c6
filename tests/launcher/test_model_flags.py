"""Every model setting is a flag, and each one reaches the model: dryrun resolves it into run_config.json, and
the model a training process builds from that file (as launcher.pretrain does) carries it."""
import dataclasses
import json

import pytest
import torch

from launcher.__main__ import main
from launcher.cli import FLAGS, build_run_config
from launcher.config import RunConfig, flag_name
from model.config import FIELDS, RouterKind
from model.gpt import GPTMoE
from model.moe.layer import moe_layers
from model.moe.router import ExpertChoiceRouter, TopKRouter

# nano: 2 layers (layer 1 is MoE), hidden 64, 4 heads; MoE-8 top-1 over 2 processes (EP=2)
NANO = "dryrun 2 gpt2bpe nano 8 0 2 1 none none 100".split()


def _gate(model):
    return moe_layers(model)[0].deepspeed_moe.gate


def _aux_weight(model):
    """aux_loss out of the model / the unweighted balancing loss its MoE layer reports."""
    out = model.train()(torch.randint(0, 100, (2, 16)))
    return float(out.aux_loss.detach() / out.moe_stats[0]["aux_loss"])


def _z_weight(model):
    out = model.train()(torch.randint(0, 100, (2, 16)))
    return float(out.z_loss.detach() / out.moe_stats[0]["z_loss"])


# flag and value(s) -> (GPTMoEConfig field, resolved value, what the built model shows)
CASES = {
    "vocab_size": (["--vocab-size", "1000"], 1000, lambda m: m.wte.num_embeddings == 1024),
    "seq_len": (["--seq-len", "32"], 32, lambda m: m.wpe.num_embeddings == 32),
    "num_layers": (["--num-layers", "4"], 4, lambda m: len(m.blocks) == 4 and len(moe_layers(m)) == 2),
    "hidden_size": (["--hidden-size", "128"], 128,
                    lambda m: m.wte.embedding_dim == 128 and m.blocks[0].mlp.fc1.out_features == 512),
    "num_heads": (["--num-attention-heads", "8"], 8, lambda m: m.blocks[0].attn.num_heads == 8),
    "ffn_hidden_size": (["--ffn-hidden-size", "96"], 96,
                        lambda m: m.blocks[0].mlp.fc1.out_features == 96
                        and moe_layers(m)[0].deepspeed_moe.experts.fc1_weight.shape[-1] == 96),
    "dropout": (["--dropout", "0.25"], 0.25, lambda m: m.drop.p == 0.25 and m.blocks[0].attn.core.dropout == 0.25),
    "num_experts": (["--num-experts", "4"], 4, lambda m: moe_layers(m)[0].num_experts == 4),
    "moe_layer_interval": (["--moe-interval", "1"], 1, lambda m: len(moe_layers(m)) == 2),
    "router_type": (["--router-type", "top2"], "top2", lambda m: isinstance(_gate(m), TopKRouter) and _gate(m).k == 2),
    "expert_choice_k": (["--router-type", "expert_choice", "--expert-choice-k", "2"], 2.0,
                        lambda m: isinstance(_gate(m), ExpertChoiceRouter) and _gate(m).top_k == 2.0),
    "capacity_factor": (["--capacity-factor", "1.5"], 1.5, lambda m: _gate(m).capacity_factor == 1.5),
    "eval_capacity_factor": (["--eval-capacity-factor", "2"], 2.0,
                             lambda m: moe_layers(m)[0].deepspeed_moe.eval_capacity_factor == 2.0),
    "min_capacity": (["--min-capacity", "0"], 0, lambda m: _gate(m).min_capacity == 0),
    "drop_tokens": (["--no-drop-tokens"], False, lambda m: _gate(m).drop_tokens is False),
    "aux_loss_coef": (["--aux-loss-coef", "0.5"], 0.5, lambda m: _aux_weight(m) == pytest.approx(0.5)),
    "z_loss_coef": (["--z-loss-coef", "0.25"], 0.25, lambda m: _z_weight(m) == pytest.approx(0.25)),
    "expert_bias": (["--expert-bias"], True,
                    lambda m: _gate(m).selection_bias is not None and _gate(m).expert_bias_rate == 1e-3),
    "expert_bias_rate": (["--expert-bias", "--expert-bias-rate", "0.01"], 0.01,
                         lambda m: _gate(m).expert_bias_rate == 0.01),
    "router_jitter": (["--router-jitter", "0.01"], 0.01, lambda m: _gate(m).jitter == 0.01),
    "use_rts": (["--use-rts", "false"], False, lambda m: _gate(m).use_rts is False),
    "top2_2nd_expert_sampling": (["--router-type", "top2", "--top2-2nd-expert-sampling"], True,
                                 lambda m: _gate(m).second_expert_sampling is True),
    "use_residual": (["--use-residual"], True, lambda m: hasattr(moe_layers(m)[0], "coefficient")),
    "expert_mlp_bias": (["--expert-mlp-bias"], True,
                        lambda m: moe_layers(m)[0].deepspeed_moe.experts.fc2_bias.shape == (8, 64)),
    "ep_size": (["--ep-size", "1"], 1, lambda m: moe_layers(m)[0].num_local_experts == 8),
    "init_std": (["--init-method-std", "0.02"], 0.02,
                 lambda m: float(m.wte.weight.detach().std()) == pytest.approx(0.02, rel=0.05)),
    "recompute": (["--recompute", "full"], "full", lambda m: m.blocks[0].recompute_layer),
    "tie_embeddings": (["--no-tie-embeddings"], False, lambda m: m.lm_head is not None),
    "layer_norm_eps": (["--layernorm-epsilon", "1e-6"], 1e-6, lambda m: m.blocks[0].ln1.eps == 1e-6),
    "vocab_pad_multiple": (["--vocab-size", "1000", "--make-vocab-size-divisible-by", "8"], 8,
                           lambda m: m.wte.num_embeddings == 1000),
}


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "SEQ_LEN", "DATA_PATH", "TRAIN_TOKENS",
                "WARMUP_TOKENS", "GLOBAL_BATCH_SIZE", "EP_SIZE", "PRECISION", "LOAD", "OFFLOAD", "SLURM_NNODES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OUTPUT_BASEPATH", str(tmp_path))
    return tmp_path


def _dryrun(out_dir, capsys, flags) -> tuple[RunConfig, str]:
    assert main([*NANO, *flags]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    [path] = out_dir.rglob("run_config.json")
    return RunConfig.read(path), text


def test_every_model_setting_has_a_flag_and_a_case():
    assert sorted(CASES) == sorted(FIELDS)
    for name in FIELDS:
        assert FLAGS[flag_name(name)[2:].replace("-", "_")] == name


@pytest.mark.parametrize("field", sorted(CASES))
def test_model_flag_reaches_the_model(out_dir, capsys, field):
    flags, value, shows = CASES[field]
    cfg, _ = _dryrun(out_dir, capsys, flags)
    resolved = getattr(cfg.model, field)
    assert resolved == (RouterKind(value) if field == "router_type" else value)
    default = getattr(build_run_config(NANO, {"OUTPUT_BASEPATH": str(out_dir)}).model, field)
    assert default != resolved, f"{field}: the case must change the default {default!r}"
    torch.manual_seed(0)
    mcfg = cfg.model_config()
    if field != "ep_size":  # all experts in this one process, so a forward needs no process group
        mcfg = dataclasses.replace(mcfg, ep_size=1)
    model = GPTMoE(mcfg, ep_rank=0)
    assert shows(model), f"{' '.join(flags)} resolved to {resolved!r} but the model built from it does not show it"


@pytest.mark.parametrize("positional, flags, expected", [
    ("8 0", [], {"init_std": 0.02, "expert_bias": True, "expert_bias_rate": 0.01, "capacity_factor": 2.0}),
    ("8 2", [], {"init_std": 0.02, "expert_bias": True, "capacity_factor": 2.0}),
    ("8 1", [], {"init_std": 0.02, "expert_bias": False, "capacity_factor": 1.0}),  # expert choice: c is its size
    ("none 0", [], {"init_std": 0.02, "expert_bias": False, "capacity_factor": 1.0}),
    ("8 0", ["--no-expert-bias", "--capacity-factor", "1.25", "--init-method-std", "0.006"],
     {"init_std": 0.006, "expert_bias": False, "capacity_factor": 1.25}),
])
def test_tiny_trains_with_its_own_router_defaults(out_dir, positional, flags, expected):
    """The demo size's defaults (launcher/presets.py); given flags win; other sizes keep the published ones."""
    cfg = build_run_config(f"dryrun 2 gpt2bpe tiny {positional} 8 1 none none 100".split() + flags,
                           {"OUTPUT_BASEPATH": str(out_dir)})
    assert {k: getattr(cfg.model, k) for k in expected} == expected
    nano = build_run_config(NANO, {"OUTPUT_BASEPATH": str(out_dir)}).model
    assert (nano.init_std, nano.expert_bias, nano.capacity_factor) == (0.006, False, 1.0)


def test_megatron_seq_length_is_seq_len(out_dir, capsys):
    cfg, _ = _dryrun(out_dir, capsys, ["--seq-length", "32"])
    assert cfg.model.seq_len == 32


@pytest.mark.parametrize("flags,shape", [
    (["--hidden-size", "128"], "nano with --hidden-size 128: 2 layers, hidden 128, 4 heads, ffn 512, seq 64"),
    (["--num-layers", "6", "--num-attention-heads", "8", "--ffn-hidden-size", "192"],
     "nano with --num-layers 6 --num-attention-heads 8 --ffn-hidden-size 192: 6 layers, hidden 64, 8 heads, ffn 192"),
    ([], "nano: 2 layers, hidden 64, 4 heads, ffn 256, seq 64"),
])
def test_dryrun_prints_the_shape_on_top_of_the_preset(out_dir, capsys, flags, shape):
    """Dense models of 2x and 4x a preset's size are a few shape flags away; dryrun says what was changed."""
    _, text = _dryrun(out_dir, capsys, flags)
    assert f"model        {shape}" in text


def test_shape_changes_name_the_run_folder(out_dir, capsys):
    """Two shapes of one preset never share a run folder (the second would resume the first)."""
    cfg, _ = _dryrun(out_dir, capsys, ["--hidden-size", "128", "--num-layers", "4"])
    assert cfg.run_name.startswith("gpt-nano-L4-h128-moe8-top1-")


@pytest.mark.parametrize("flags,message", [
    (["--hidden-size", "90"], "--num-attention-heads: got 4; allowed: a divisor of --hidden-size=90"),
    (["--num-layers", "0"], "--num-layers: got 0; allowed: an integer >= 1"),
    (["--num-layers", "1"], "--moe-interval: got 2; allowed: at most --num-layers=1"),
    (["--router-type", "2"], "--router-type: got '2'; allowed: top1 | expert_choice | top2"),
    (["--router-jitter", "1"], "--router-jitter: got 1.0; allowed: a number in [0, 1)"),
    (["--expert-choice-k", "9", "--router-type", "expert_choice"],
     "--expert-choice-k: got 9.0; allowed: --expert-choice-k * --capacity-factor <= the expert count 8"),
    (["--ep-size", "3"], "EP_SIZE: got 3; allowed: a divisor of the expert count MOE=8"),
])
def test_bad_model_flags_are_one_line_in_the_launchers_words(out_dir, capsys, flags, message):
    assert main([*NANO, *flags]) == 2
    _, err = capsys.readouterr()
    assert err == f"error: {message}\n" or (err.startswith(f"error: {message}") and err.count("\n") == 1), err
    assert not list(out_dir.rglob("*.json"))


def test_run_config_written_before_the_model_was_nested_reads(out_dir, tmp_path):
    """run_config.json of earlier versions: flat, the model's settings beside the run's, the router a digit,
    `moe_interval` for moe_layer_interval. It reads as the same run."""
    cfg = build_run_config([*NANO[:5], "2", *NANO[6:], "--use-residual", "--moe-interval", "1"],
                           {"OUTPUT_BASEPATH": str(out_dir)})
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("model", "finetune")}  # neither existed then
    m = cfg.model
    old.update(num_experts=m.num_experts, router_type=2, recompute=m.recompute, seq_len=m.seq_len,
               ep_size=m.ep_size, vocab_size=m.vocab_size, moe_interval=1, capacity_factor=m.capacity_factor,
               eval_capacity_factor=m.eval_capacity_factor, min_capacity=m.min_capacity, drop_tokens=m.drop_tokens,
               aux_loss_coef=m.aux_loss_coef, z_loss_coef=m.z_loss_coef, use_residual=True, dropout=m.dropout)
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(old))
    assert RunConfig.read(path) == cfg and cfg.model.router_type is RouterKind.TOP2
