"""Generated and shipped DeepSpeed configs all pass DeepSpeed's own parser."""
import itertools
import json
from pathlib import Path

import pytest

from launcher.cli import build_run_config
from launcher.ds_config import build_ds_config, check_ds_config
from launcher.errors import UsageError

TEMPLATES = sorted((Path(__file__).resolve().parents[2] / "ds_configs").glob("*.json"))


# template -> the launch whose generated config it shows (GPU runs: overlap_comm and pinned memory on)
TEMPLATE_RUNS = {
    "zero0_fp32_cpu.json": ("dryrun 1 gpt2bpe nano 8 0 1 1 none none 100", {"PRECISION": "fp32"}, "cpu"),
    "zero1_bf16.json": ("dryrun 8 gpt2bpe 1.3B 8 0 1 1 sel z1 100", {"PRECISION": "bf16"}, "cuda"),
    "zero2_bf16_full_recompute.json": ("dryrun 8 gpt2bpe 1.3B 8 0 1 1 full z2 100", {"PRECISION": "bf16"}, "cuda"),
    "zero2_offload_fp16.json": ("dryrun 8 gpt2bpe 1.3B 8 0 1 1 sel z2 100", {"PRECISION": "fp16", "OFFLOAD": "cpu"},
                                "cuda"),
}


@pytest.mark.parametrize("name", sorted(TEMPLATE_RUNS))
def test_each_template_is_what_the_launcher_writes_for_its_run(name):
    """The examples stay true to the launcher: same ZeRO, precision, offload and recompute sections."""
    assert sorted(p.name for p in TEMPLATES) == sorted(TEMPLATE_RUNS), "a template without a run, or the reverse"
    positional, env, device = TEMPLATE_RUNS[name]
    generated = build_ds_config(build_run_config(positional.split() + ["--device", device], env))
    template = json.loads((TEMPLATES[0].parent / name).read_text())
    for section in ("zero_optimization", "bf16", "fp16", "activation_checkpointing"):
        assert template.get(section) == generated.get(section), section


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_every_shipped_template_parses(path):
    check_ds_config(json.loads(path.read_text()))


@pytest.mark.parametrize("zero,precision,recompute,offload", [
    (z, p, r, o) for z, p, r, o in itertools.product(["none", "z1", "z2"], ["fp32", "bf16", "fp16"],
                                                     ["none", "sel", "full"], ["none", "cpu"])
    if not (o == "cpu" and z == "none")])
def test_generated_configs_parse(zero, precision, recompute, offload):
    cfg = build_run_config(f"dryrun 2 gpt2bpe nano 8 0 2 1 {recompute} {zero} 100".split(),
                           {"PRECISION": precision, "OFFLOAD": offload, "GLOBAL_BATCH_SIZE": "16"})
    ds = build_ds_config(cfg)
    check_ds_config(ds)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == {"none": 0, "z1": 1, "z2": 2}[zero]
    assert ds["gradient_clipping"] == 1.0
    assert ("bf16" in ds) == (precision == "bf16")
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert ("activation_checkpointing" in ds) == (recompute == "full")
    assert ("offload_optimizer" in ds["zero_optimization"]) == (offload == "cpu")


def test_parser_errors_become_usage_errors():
    with pytest.raises(UsageError, match="DeepSpeed rejects the generated config"):
        check_ds_config({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
                         "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 9}})
    with pytest.raises(UsageError, match="not a multiple of micro batch x accumulation"):
        check_ds_config({"train_batch_size": 5, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2})
