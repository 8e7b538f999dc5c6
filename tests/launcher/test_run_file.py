"""Run files: `--config run.yaml` sets any setting by its flag name, the line and the environment win, dryrun
says where each value came from, and the run_config.yaml it writes repeats the run."""
import json

import pytest
import yaml

from launcher.__main__ import main
from launcher.errors import UsageError
from launcher.cli import build_run_config

NANO = "dryrun 2 gpt2bpe nano 8 0 2 1 none none 100".split()


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "SEQ_LEN", "DATA_PATH", "TRAIN_TOKENS",
                "WARMUP_TOKENS", "GLOBAL_BATCH_SIZE", "EP_SIZE", "PRECISION", "LOAD", "OFFLOAD", "SLURM_NNODES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OUTPUT_BASEPATH", str(tmp_path / "out"))
    return tmp_path / "out"


def _file(tmp_path, text: str, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_run_file_sets_run_and_model_settings_by_flag_name(out_dir, tmp_path):
    path = _file(tmp_path, "lr: 3.0e-4\nhidden-size: 128\nnum_attention_heads: 8\nrouter-type: top2\n"
                           "num-experts: 4\nuse-rts: false\nsplit: 90,5,5\n")
    cfg = build_run_config([*NANO, "--config", path], {})
    assert cfg.lr == 3e-4 and cfg.split == "90,5,5"
    m = cfg.model
    assert (m.hidden_size, m.num_heads, m.use_rts) == (128, 8, False)
    assert (m.num_experts, m.router_type.value) == (8, "top1")  # MOE and RT on the line win over the file
    # positional arguments left off the line come from the file
    more = _file(tmp_path, "micro-batch: 2\nsp-size: 1\nrecompute: sel\nzero-stage: z1\nsave-interval: 50\n",
                 "more.yaml")
    with open(more, "a") as f:
        f.write(open(path).read())
    cfg = build_run_config(["dryrun", "2", "gpt2bpe", "nano", "--config", more], {})
    assert (cfg.model.num_experts, cfg.model.router_type.value, cfg.micro_batch, cfg.zero_stage) == (4, "top2", 2, 1)
    assert (cfg.model.recompute, cfg.save_interval) == ("sel", 50)


def test_line_and_environment_win_and_dryrun_says_where_values_came_from(out_dir, tmp_path, capsys,
                                                                           monkeypatch):
    path = _file(tmp_path, "lr: 3.0e-4\nseq-len: 32\nnum-layers: 4\ndropout: 0.1\n")
    monkeypatch.setenv("SEQ_LEN", "16")
    assert main([*NANO, "--config", path, "--dropout", "0.2"]) == 0
    out = capsys.readouterr().out
    [written] = out_dir.rglob("run_config.json")
    cfg = json.loads(written.read_text())
    assert cfg["lr"] == 3e-4 and cfg["model"]["num_layers"] == 4  # from the file
    assert cfg["model"]["seq_len"] == 16 and cfg["model"]["dropout"] == 0.2  # environment, line
    assert ("settings     from the line: MODE GPUS_PER_NODE TOKENIZER MODEL_SIZE MOE RT BATCH_SIZE SP AC ZERO "
            "SAVE_INTERVAL --dropout") in out
    assert "from the environment: SEQ_LEN OUTPUT_BASEPATH" in out
    assert f"from {path}: lr num-layers\n" in out
    assert "the rest: defaults, and the nano size preset" in out


def test_dryrun_writes_a_run_file_that_repeats_the_run(out_dir, tmp_path, capsys, monkeypatch):
    """dryrun -> run_config.yaml -> `dryrun --config` alone: the same resolved run, field for field."""
    monkeypatch.setenv("SEQ_LEN", "32")
    assert main([*NANO, "--hidden-size", "128", "--router-jitter", "0.01", "--lr", "5e-4", "--num-experts", "2,4",
                 "--num-layers", "4", "--use-residual"]) == 0
    [first] = out_dir.rglob("run_config.json")
    run_file = first.with_name("run_config.yaml")
    data = yaml.safe_load(run_file.read_text())
    assert data["hidden-size"] == 128 and data["num-attention-heads"] == 4 and data["num-experts"] == [2, 4]
    assert data["router-type"] == "top1" and data["recompute"] == "none" and data["zero-stage"] == 0
    assert "mode" not in data and "master-port" not in data and "run-name" not in data and "device" not in data
    original = json.loads(first.read_text())
    capsys.readouterr()

    monkeypatch.delenv("SEQ_LEN")
    repeat_out = tmp_path / "repeat"
    monkeypatch.setenv("OUTPUT_BASEPATH", str(repeat_out))
    assert main(["dryrun", "--config", str(run_file)]) == 0
    [second] = repeat_out.rglob("run_config.json")
    repeated = json.loads(second.read_text())
    assert {**repeated, "output_basepath": None} == {**original, "output_basepath": None}
    assert second.parent.name == first.parent.name


@pytest.mark.parametrize("text,message", [
    ("learning-rate: 1\n", "run.yaml: unknown setting 'learning-rate'; allowed: "),
    ("mode: run\n", "run.yaml: unknown setting 'mode'"),
    ("lr: fast\n", "run.yaml: lr: got 'fast'; allowed: a number"),
    ("use-rts: 3\n", "run.yaml: use-rts: got '3'; allowed: true | false"),
    ("num-experts: [2, x]\n", "run.yaml: num-experts: got [2, 'x']; allowed: an expert count or a list of counts"),
    ("hidden-size: {a: 1}\n", "run.yaml: hidden-size: got {'a': 1}; allowed: a single value"),
    ("- lr\n", "run.yaml: got a list; allowed: a mapping of settings by flag name"),
    ("lr: [1\n", "run.yaml: not valid YAML at line 2"),
    ("hidden-size: 90\n", "--num-attention-heads: got 4; allowed: a divisor of --hidden-size=90"),
])
def test_bad_run_files_are_one_line_and_exit_2(out_dir, tmp_path, capsys, text, message):
    path = _file(tmp_path, text)
    assert main([*NANO, "--config", path]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err.replace(str(tmp_path) + "/", ""), err
    assert not out_dir.exists()


def test_missing_file_and_missing_positional(out_dir, tmp_path):
    with pytest.raises(UsageError, match="--config: got 'nowhere.yaml'; allowed: a YAML file"):
        build_run_config([*NANO, "--config", "nowhere.yaml"], {})
    path = _file(tmp_path, "gpus-per-node: 2\ntokenizer: gpt2bpe\nmodel-size: nano\nnum-experts: 8\n")
    with pytest.raises(UsageError, match="RT: missing; give it on the line \\(positional argument 6\\) or in the "
                                         "--config file as router-type"):
        build_run_config(["dryrun", "--config", path], {})
    with pytest.raises(UsageError, match="expected 11 positional arguments, got 5"):
        build_run_config(NANO[:5], {})
