"""dryrun's analytic parameter counts equal an instantiated model's."""
import pytest

from launcher.cli import build_run_config


@pytest.mark.parametrize("moe,rt,flags", [
    ("none", "0", []), ("8", "0", []), ("8", "1", []), ("4", "2", ["--use-residual"]),
    ("8", "0", ["--moe-interval", "1"]),
])
def test_dryrun_counts_match_instantiated_model(moe, rt, flags):
    from model.gpt import GPTMoE

    cfg = build_run_config(f"dryrun 1 gpt2bpe nano {moe} {rt} 1 1 none none 10".split() + flags,
                           {"GLOBAL_BATCH_SIZE": "8"})
    mcfg = cfg.model_config()
    model = GPTMoE(mcfg)
    counts = mcfg.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    if moe == "none":
        # the dense-GPT formula: 12 L h^2 + 13 L h + (V + S) h + 2 h, with biases and tied embeddings
        L, h, V, S = mcfg.num_layers, mcfg.hidden_size, mcfg.padded_vocab_size, mcfg.seq_len
        assert counts["total"] == 12 * L * h * h + 13 * L * h + (V + S) * h + 2 * h
        assert counts["active"] == counts["total"]
    else:
        assert counts["active"] < counts["total"]
