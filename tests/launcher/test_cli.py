"""The positional launcher: every value of every argument in dryrun, and the bad-input table."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.__main__ import main
from launcher.cli import build_run_config
from launcher.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "megatron" / "dlc_run_pretrain_megatron_gpt.sh"
TUTORIAL = "run 1 jiebabpe 0.125B 8 0 1 1 sel none 10000".split()
NANO = "dryrun 2 gpt2bpe nano 8 0 2 1 none none 100".split()


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No cluster variables from the machine running the tests; output under tmp_path."""
    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "SEQ_LEN", "DATA_PATH", "TRAIN_TOKENS",
                "WARMUP_TOKENS", "GLOBAL_BATCH_SIZE", "EP_SIZE", "PRECISION", "LOAD", "OFFLOAD", "SLURM_NNODES",
                "SLURM_NODEID", "SLURM_JOB_NODELIST", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OUTPUT_BASEPATH", str(tmp_path / "out"))
    return tmp_path / "out"


def dryrun(args, capsys):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_tutorial_line_dryrun_through_the_bash_script(clean_env):
    env = {**os.environ, "PRECISION": "fp32"}
    proc = subprocess.run(["bash", str(SCRIPT), "dryrun", *TUTORIAL[1:]], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "12 layers, hidden 768, 12 heads" in out
    assert "8 per MoE layer on 6 of 12 layers" in out
    assert "top-1" in out
    assert "micro 1, accumulation 256, global 256 sequences x 2048" in out
    assert "recompute    sel" in out
    assert "zero         stage 0" in out
    assert "every 10,000 iterations" in out
    assert "total " in out and "active per token" in out
    assert "launch       " in out and "launcher.pretrain" in out
    memory = re.search(r"= ([\d.]+) GiB of ([\d.]+) GiB \(.*\): (fits|DOES NOT FIT)$", out, re.M)
    assert memory, out
    assert (memory[3] == "fits") == (float(memory[1]) <= float(memory[2])), memory[0]
    ds_files = list(clean_env.rglob("ds_config.json"))
    assert len(ds_files) == 1
    ds = json.loads(ds_files[0].read_text())
    assert ds["train_batch_size"] == 256 and ds["train_micro_batch_size_per_gpu"] == 1
    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig(ds)  # one process: micro 1 x accumulation 256 x 1 rank


def test_tutorial_counts_match_the_model_config(clean_env, capsys):
    cfg = build_run_config(["dryrun", *TUTORIAL[1:]], {"OUTPUT_BASEPATH": str(clean_env)})
    mcfg = cfg.model_config()
    counts = mcfg.param_counts()
    assert counts["active"] < counts["total"]
    code, out, _ = dryrun(["dryrun", *TUTORIAL[1:]], capsys)
    assert code == 0
    assert f"({counts['total']:,})" in out and f"({counts['active']:,})" in out


POSITIONAL_VALUES = {
    0: ["dryrun"],
    1: ["1", "2", "8"],
    2: ["jiebabpe", "gpt2bpe"],
    3: ["0.125B", "0.35B", "0.76B", "1.3B", "2.7B", "3.6B", "6.7B", "13B", "nano", "tiny"],
    4: ["none", "8", "16", "64", "128"],
    5: ["0", "1", "2"],
    6: ["1", "2", "4"],
    7: ["1", "2"],
    8: ["none", "sel", "full"],
    9: ["none", "z1", "z2", "0", "1", "2", "do"],
    10: ["1", "10000"],
}


@pytest.mark.parametrize("position,value", [(p, v) for p, vs in POSITIONAL_VALUES.items() for v in vs])
def test_every_positional_value_dryruns(clean_env, capsys, monkeypatch, position, value):
    args = list(NANO)
    args[position] = value
    monkeypatch.setenv("GLOBAL_BATCH_SIZE", "64")  # divisible by every micro batch x data-parallel size here
    code, out, err = dryrun(args, capsys)
    assert code == 0, err
    assert err == ""
    assert "launch       " in out
    assert len(list(clean_env.rglob("ds_config.json"))) == 1


BAD = [
    (0, "train", "MODE: got 'train'; allowed: run | dryrun"),
    (1, "0", "GPUS_PER_NODE: got '0'"),
    (1, "two", "GPUS_PER_NODE: got 'two'; allowed: an integer >= 1"),
    (2, "sentencepiece", "TOKENIZER: got 'sentencepiece'; allowed: jiebabpe | gpt2bpe"),
    (3, "7B", "MODEL_SIZE: got '7B'; allowed: "),
    (4, "0", "MOE: got '0'; allowed: an integer >= 1"),
    (4, "-8", "MOE: got '-8'"),
    (4, "eight", "MOE: got 'eight'"),
    (5, "3", "RT: got '3'; allowed: 0 (top-1) | 1 (expert choice) | 2 (top-2)"),
    (6, "0", "BATCH_SIZE: got '0'"),
    (6, "1.5", "BATCH_SIZE: got '1.5'"),
    (7, "0", "SP: got '0'"),
    (7, "3", "SP: got 3; allowed: a divisor of the world size 2"),
    (8, "selective", "AC: got 'selective'; allowed: none | sel | full"),
    (9, "z4", "ZERO: got 'z4'; allowed: none | z1 | z2 | do | 0 | 1 | 2"),
    (9, "z3", "ZERO: stage 3 is not supported with MoE"),
    (10, "0", "SAVE_INTERVAL: got '0'"),
    (10, "often", "SAVE_INTERVAL: got 'often'"),
]


@pytest.mark.parametrize("position,value,message", BAD)
def test_bad_positional_gives_one_line_and_exit_2(clean_env, capsys, position, value, message):
    args = list(NANO)
    args[position] = value
    code, out, err = dryrun(args, capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not clean_env.exists(), "nothing may be written on bad input"


@pytest.mark.parametrize("env,message", [
    ({"EP_SIZE": "3"}, "EP_SIZE: got 3; allowed: a divisor of the expert count MOE=8"),
    ({"EP_SIZE": "4"}, "EP_SIZE: got 4; allowed: a divisor of the world size 2"),
    ({"GLOBAL_BATCH_SIZE": "7"}, "GLOBAL_BATCH_SIZE: got 7 sequences; allowed: a multiple of micro batch x "
                                 "data-parallel size = 2 x 1 = 2"),
    ({"SEQ_LEN": "63", "GLOBAL_BATCH_SIZE": "8"}, "SP: got 2; allowed: a divisor of SEQ_LEN=63"),
    ({"PRECISION": "fp8"}, "PRECISION: got 'fp8'; allowed: fp32 | bf16 | fp16"),
    ({"OFFLOAD": "nvme"}, "OFFLOAD: got 'nvme'; allowed: none | cpu"),
    ({"TRAIN_TOKENS": "10"}, "TRAIN_TOKENS: got 10; allowed: at least one global batch"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK (node rank): got 2; allowed: 0..1"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT: got 'http'"),
])
def test_bad_environment(clean_env, capsys, monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = list(NANO)
    args[7] = "2"  # SP=2 over 2 processes
    code, out, err = dryrun(args, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err
    assert not clean_env.exists()


def test_sp_must_divide_heads(clean_env, capsys):
    args = "dryrun 8 gpt2bpe nano 8 0 1 8 none none 100".split()  # nano has 4 heads
    code, _, err = dryrun(args, capsys)
    assert code == 2 and "SP: got 8; allowed: a divisor of the head count 4 (--num-attention-heads)" in err


def test_offload_needs_zero(clean_env, capsys, monkeypatch):
    monkeypatch.setenv("OFFLOAD", "cpu")
    code, _, err = dryrun(NANO, capsys)
    assert code == 2 and "OFFLOAD: cpu needs ZeRO stage 1 or 2" in err


def test_too_few_arguments_prints_usage(clean_env, capsys):
    code, out, err = dryrun(NANO[:5], capsys)
    assert code == 2
    assert "expected 11 positional arguments, got 5" in err and "usage: dlc_run_pretrain_megatron_gpt.sh" in err
    assert not clean_env.exists()


def test_script_without_arguments_prints_usage():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_flags_and_environment_override_defaults(clean_env):
    cfg = build_run_config(NANO + ["--lr", "5e-4", "--no-drop-tokens", "--use-residual", "--seq-len=32"],
                           {"GLOBAL_BATCH_SIZE": "16", "SEQ_LEN": "128", "PRECISION": "bf16",
                            "OUTPUT_BASEPATH": str(clean_env)})
    assert cfg.lr == 5e-4 and cfg.model.drop_tokens is False and cfg.model.use_residual is True
    assert cfg.model.seq_len == 32  # a flag wins over the environment
    assert cfg.global_batch == 16 and cfg.grad_accum == 4 and cfg.precision == "bf16"
    assert cfg.model.ep_size == 2  # min(experts, world)


@pytest.mark.parametrize("flags,message", [
    (["--learning-rate", "1"], "flags: unknown --learning-rate"),
    (["--lr", "fast"], "--lr: got 'fast'; allowed: a number"),
    (["--lr"], "--lr: missing its value"),
    (["lr", "1"], "flags: got 'lr'"),
    (["--drop-tokens", "maybe"], "--drop-tokens: got 'maybe'; allowed: true | false"),
])
def test_bad_flags(clean_env, flags, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("|", r"\|")):
        build_run_config(NANO + flags, {"OUTPUT_BASEPATH": str(clean_env)})


def test_token_based_iterations_and_accumulation(clean_env):
    cfg = build_run_config("dryrun 8 gpt2bpe 0.35B 64 2 4 1 full z2 500".split(),
                           {"WORLD_SIZE": "4", "RANK": "1", "TRAIN_TOKENS": str(524288 * 1000),
                            "WARMUP_TOKENS": str(524288 * 10 + 1)})
    assert cfg.world_size == 32 and cfg.dp_size == 32 and cfg.model.ep_size == 32
    assert cfg.global_batch == 256 and cfg.grad_accum == 2
    assert cfg.train_iters == 1000 and cfg.warmup_iters == 11


def test_user_model_py_does_not_shadow_the_package(tmp_path):
    """A user's own model.py beside where they launch must not replace our `model` package."""
    (tmp_path / "model.py").write_text("raise ImportError('the user model.py was imported')\n")
    env = {**os.environ, "OUTPUT_BASEPATH": str(tmp_path / "out"), "PRECISION": "fp32"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(["bash", str(SCRIPT), *NANO], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "launcher", *NANO], capture_output=True, text=True,
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _tiny_dataset(prefix: Path) -> None:
    from launcher.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(str(prefix), vocab_size=300) as writer:
        writer.add_document([1, 2, 3, 299])


@pytest.mark.parametrize("case,message", [
    ("missing_data", "error: indexed dataset {tmp}/nowhere: {tmp}/nowhere.idx not found"),
    ("missing_tokenizer", "error: tokenizer not found: {tmp}/tokenizer"),
    ("missing_load", "error: LOAD: got '{tmp}/old-run'; allowed: a run folder"),
    ("split_without_train", "error: --split: got '0,100,0'; allowed: a positive share for training"),
    ("run_name_escapes", "error: --run-name: got '../../etc'; allowed: letters, digits"),
    ("beta", "error: --adam-beta1: got 2.0; allowed: 0 <= beta < 1"),
    ("weight_decay", "error: --weight-decay: got -1.0; allowed: a number >= 0"),
    ("vocab", "error: --vocab-size: got 5; allowed: at least 257"),
])
def test_bad_inputs_are_refused_before_anything_starts(clean_env, capsys, monkeypatch, tmp_path, case, message):
    """Files a run reads are checked by the launcher, not discovered missing inside the training processes."""
    args, data = list(NANO), tmp_path / "corpus"
    if case == "missing_data":
        monkeypatch.setenv("DATA_PATH", str(tmp_path / "nowhere"))
    elif case == "missing_tokenizer":
        _tiny_dataset(data)
        monkeypatch.setenv("DATA_PATH", str(data))
    elif case == "missing_load":
        monkeypatch.setenv("LOAD", str(tmp_path / "old-run"))
    else:
        args += {"split_without_train": ["--split", "0,100,0"], "run_name_escapes": ["--run-name", "../../etc"],
                 "beta": ["--adam-beta1", "2"], "weight_decay": ["--weight-decay", "-1"],
                 "vocab": ["--vocab-size", "5"]}[case]
    args[0] = "run"  # even `run` stops here: nothing is built, written or launched
    code, out, err = dryrun(args, capsys)
    assert code == 2 and out == ""
    assert err.startswith(message.format(tmp=tmp_path)), err
    assert err.count("\n") == 1
    assert not clean_env.exists()


def test_moe_trains_with_a_lower_lr_than_its_dense_base(clean_env):
    dense = build_run_config("dryrun 1 gpt2bpe 1.3B none 0 1 1 sel none 100".split(), {})
    moe = build_run_config("dryrun 1 gpt2bpe 1.3B 128 0 1 1 sel none 100".split(), {})
    assert (dense.lr, dense.min_lr) == (2e-4, 2e-5)
    assert (moe.lr, moe.min_lr) == (1.2e-4, 1.0e-6)  # DeepSpeed-MoE's 1.3B+MoE-128 settings
    other = build_run_config("dryrun 1 gpt2bpe 6.7B 64 0 1 1 sel none 100".split(), {})
    assert other.lr < 1.2e-4 and other.min_lr < other.lr
