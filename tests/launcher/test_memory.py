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
    cfg, _ = estimate("dryrun 8 gpt2bpe 1.3B 8 0 1 1 sel z2 100", OFFLOAD="cpu")
    counts = cfg.model_config().param_counts()
    fp32_grad_partition = 4 * ((counts["total"] - counts["expert"]) / 8 + counts["expert"] / 8 / 1)
    assert offloaded.host_offload == on_gpu.optimizer + on_gpu.gradients + fp32_grad_partition


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


def test_step_buffers_hold_the_fp32_gradient_partition_of_zero_1_2():
    """6.7B+MoE-128 on 128 GPUs, ZeRO-1 bf16: each rank steps its 16 local experts' 2.15B parameters (one
    expert-data-parallel rank each) through an fp32 gradient partition plus the flat bf16 copy it is cast
    from: 6 bytes per element, ~12 GiB, which the estimate must carry."""
    cfg_gpu = build_run_config("dryrun 8 gpt2bpe 6.7B 128 0 1 1 sel z1 100 --device cuda --device-memory-gib 80".split(),
                               {"WORLD_SIZE": "16", "PRECISION": "bf16", "GLOBAL_BATCH_SIZE": "1024"})
    m = estimate_memory(cfg_gpu, cfg_gpu.model_config())
    counts = cfg_gpu.model_config().param_counts()
    local_experts = counts["expert"] / cfg_gpu.model.ep_size
    assert cfg_gpu.model.ep_size == 128 and cfg_gpu.world_size == 128
    assert m.step_buffers >= 6 * local_experts >= 12 * GIB
    assert m.total == m.weights + m.gradients + m.optimizer + max(m.activations, m.step_buffers) + m.overhead
    assert m.total > 60 * GIB  # without the step's buffers it looked like 60 GiB with room to spare
    fp32 = build_run_config("dryrun 8 gpt2bpe 6.7B 128 0 1 1 sel z1 100 --device cuda".split(),
                            {"WORLD_SIZE": "16", "PRECISION": "fp32", "GLOBAL_BATCH_SIZE": "1024"})
    assert estimate_memory(fp32, fp32.model_config()).step_buffers < 5 * local_experts  # no bf16 copy to cast


def test_zero_0_half_precision_keeps_fp32_gradients_during_the_step():
    cfg = build_run_config("dryrun 1 gpt2bpe 0.35B none 0 1 1 sel none 100 --device cuda".split(),
                           {"PRECISION": "bf16", "GLOBAL_BATCH_SIZE": "8"})
    m = estimate_memory(cfg, cfg.model_config())
    assert m.step_buffers >= 4 * cfg.model_config().param_counts()["total"]


def test_dryrun_says_what_it_planned_for_and_how_to_plan_a_gpu_job(tmp_path, capsys, monkeypatch):
    from launcher.__main__ import main

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for var in ("WORLD_SIZE", "RANK", "DATA_PATH", "PRECISION", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OUTPUT_BASEPATH", str(tmp_path))
    assert main("dryrun 1 jiebabpe 0.125B 8 0 1 1 sel none 10000".split()) == 0
    out = capsys.readouterr().out
    assert "GiB (host memory / 1 processes): fits" in out and "planned for CPU processes, fp32" in out
    assert "--device cuda --device-memory-gib 80 with PRECISION=bf16" in out
    assert "no DATA_PATH: the embedded corpus" in out and "jiebabpe segments Chinese" in out
    assert "DATA_PATH=data/mine" in out
    monkeypatch.setenv("PRECISION", "bf16")
    assert main("dryrun 128 jiebabpe 6.7B 128 0 1 1 sel z1 1000 --device cuda --device-memory-gib 80".split()) == 0
    out = capsys.readouterr().out
    assert "of 80.00 GiB (--device-memory-gib 80)" in out and "planned for GPUs, bf16" in out
