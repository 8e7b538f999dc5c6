"""dryrun's memory estimate moves the right way with ZeRO, offload, EP and recompute."""
from launcher.cli import build_run_config
from launcher.memory import GIB, estimate_memory


def estimate(args, **env):
    cfg = build_run_config(args.split(), {"GLOBAL_BATCH_SIZE": "64", "PRECISION": "bf16", "SEQ_LEN": "2048", **env})
    return cfg, estimate_memory(cfg, cfg.model_config())


def test_zero_stages_partition_model_states():
    _, z0 = estimate("dryrun 8 gpt2bpe 1.3B 8 0 1 1 sel none 100")
    _, z1 = estimate("dryrun 8 gpt2bpe 1.3B 8 0 1 1 sel z1 100")
    _, z2 = estimate("dryrun 8 gpt2bpe 1.3B 8 0 1 1 sel z2 100")
    assert z0.weights == z1.weights == z2.weights
    assert z1.optimizer < z0.optimizer and z1.gradients == z0.gradients
    assert z2.gradients < z1.gradients and z2.optimizer == z1.optimizer


def test_dense_zero0_bf16_is_16_bytes_per_parameter():
    cfg, m = estimate("dryrun 1 gpt2bpe 0.125B none 0 1 1 sel none 100")
    params = cfg.model_config().param_counts()["total"]
    assert m.weights + m.gradients + m.optimizer == 16 * params  # 2 + 2 + 12 (ZeRO paper)


def test_offload_moves_optimizer_states_to_host():
    _, on_gpu = estimate("dryrun 8 gpt2bpe 1.3B 8 0 1 1 sel z2 100")
    _, offloaded = estimate("dryrun 8 gpt2bpe 1.3B 8 0 1 1 sel z2 100", OFFLOAD="cpu")
    assert offloaded.optimizer == 0 and offloaded.gradients == 0
    assert offloaded.host_offload == on_gpu.optimizer + on_gpu.gradients


def test_expert_parallelism_shrinks_expert_weights():
    _, ep1 = estimate("dryrun 8 gpt2bpe 0.35B 64 0 1 1 sel none 100", EP_SIZE="1")
    _, ep8 = estimate("dryrun 8 gpt2bpe 0.35B 64 0 1 1 sel none 100", EP_SIZE="8")
    assert ep8.weights < ep1.weights / 4


def test_recompute_and_sequence_parallel_shrink_activations():
    acts = {ac: estimate(f"dryrun 1 gpt2bpe 0.35B 8 0 4 1 {ac} none 100")[1].activations
            for ac in ("none", "sel", "full")}
    assert acts["full"] < acts["sel"] < acts["none"]  # on CPU the attention scores are kept without recompute
    _, sp2 = estimate("dryrun 2 gpt2bpe 0.35B 8 0 4 2 sel none 100")
    assert sp2.activations < acts["sel"]


def test_fit_verdict_against_device_memory():
    cfg = build_run_config("dryrun 1 gpt2bpe 13B none 0 1 1 full none 100 --device-memory-gib 80".split(),
                           {"GLOBAL_BATCH_SIZE": "64", "PRECISION": "bf16"})
    m = estimate_memory(cfg, cfg.model_config())
    assert not m.fits and m.total > 80 * GIB  # 13B x 16 bytes does not fit one 80 GiB GPU without ZeRO
    cfg = build_run_config("dryrun 1 gpt2bpe nano none 0 1 1 none none 100 --device-memory-gib 80".split(), {})
    assert estimate_memory(cfg, cfg.model_config()).fits
