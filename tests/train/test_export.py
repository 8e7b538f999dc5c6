"""Export to a Hugging Face folder: plain transformers (no toolkit, no DeepSpeed) loads it and generates what
launcher.generate generates: a jiebabpe expert-choice model trained here, in process, on a little Chinese
poetry (so its continuations depend on the prompt), and the session's EP=2 gpt2bpe reference run."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch
from hf_user import run_as_hf_user
from train_helpers import ROOT

from launcher.data.tokenizer import train_tokenizer
from launcher.export import main as export_main
from launcher.export import write_folder
from launcher.generate import generate_all, parse_args, sampling_params
from launcher.generate import main as generate_main
from model import GPTMoE, GPTMoEConfig

POEMS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
    "红豆生南国，春来发几枝。愿君多采撷，此物最相思。",
    "松下问童子，言师采药去。只在此山中，云深不知处。",
    "明月几时有？把酒问青天。不知天上宫阙，今夕是何年。",
    "大江东去，浪淘尽，千古风流人物。故垒西边，人道是，三国周郎赤壁。",
]
PROMPTS = ["床前", "春眠不觉晓，", "千山鸟飞绝", "Python 很好用"]


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """launcher.generate's greedy continuations of a model in memory (its batched decoding path)."""
    args = parse_args(["-", "--temperature", "0", "--max-new-tokens", str(max_new_tokens)])
    args.params = sampling_params(args)
    completions, _ = generate_all(model, tokenizer, [(tokenizer.encode(p), max_new_tokens) for p in prompts], args)
    return [p + c.text(tokenizer.decode) for p, c in zip(prompts, completions)]


@pytest.fixture(scope="module")
def poetry_model():
    """(model, tokenizer): nano, 4 experts, expert choice (thresholds calibrated in training), jiebabpe."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer("jiebabpe", POEMS * 4, 320)
    stream = torch.tensor([t for p in POEMS for t in tokenizer.encode(p) + [tokenizer.eod_id]])
    cfg = GPTMoEConfig.from_size("nano", vocab_size=tokenizer.vocab_size, seq_len=32, num_experts=4,
                                 router_type="expert_choice", capacity_factor=1.5)
    model = GPTMoE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (8,))
        batch = torch.stack([stream[s:s + cfg.seq_len + 1] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, 1:]).total_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tokenizer


def test_jiebabpe_export_loads_in_plain_transformers_and_generates_the_same(poetry_model, tmp_path):
    model, tokenizer = poetry_model
    folder = tmp_path / "poetry-hf"
    write_folder(model, tokenizer, folder, "float32")
    expected = greedy(model, tokenizer, PROMPTS, 12)
    assert len(set(e[len(p):] for e, p in zip(expected, PROMPTS))) == len(PROMPTS)  # context matters

    user = run_as_hf_user(folder, PROMPTS, 12, tmp_path / "user")
    assert {k: v for k, v in user.items() if k.startswith("import")} == {
        "import model": "ModuleNotFoundError", "import launcher": "ModuleNotFoundError",
        "import deepspeed": "ModuleNotFoundError"}
    assert user["classes"] == ["modeling_gpt_moe.GPTMoEForCausalLM", "GPTMoEJiebaTokenizer"]
    assert user["ids"] == [tokenizer.encode(p) for p in PROMPTS]  # jieba first, as in training
    assert user["pipeline"] == expected
    assert user["generate"] == expected

    # Safetensors, JSON and code only: nothing that unpickles.
    kinds = {p.name: p.suffix for p in folder.iterdir()}
    assert set(kinds.values()) <= {".json", ".safetensors", ".py"}, kinds
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "modeling_gpt_moe.py", "configuration_gpt_moe.py",
            "tokenization_gpt_moe.py"} == set(kinds)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt_moe.GPTMoEForCausalLM"
    assert config["eos_token_id"] == config["pad_token_id"] == tokenizer.eod_id
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == tokenizer.eod_id
    assert "max_length" not in generation  # transformers' default (20 new tokens) and no warning per call


def test_export_of_the_ep2_run_loads_in_plain_transformers(reference_run, tmp_path, capsys):
    """Trained over 2 expert-parallel ranks, exported by the command into one folder with all 8 experts, loaded
    where neither the toolkit nor DeepSpeed is installed: greedy text equals launcher.generate's."""
    from safetensors import safe_open

    run, out = reference_run[0], tmp_path / "hf"
    assert export_main([str(run), str(out)]) == 0
    diff = re.search(r"max \|logit difference\| (\S+)\)", capsys.readouterr().out)
    assert diff and float(diff[1]) < 1e-4
    assert export_main([str(run / "checkpoints"), str(out)]) == 2  # not empty
    assert export_main([str(run / "checkpoints" / "iter_0000006"), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        experts = f.get_tensor("model.blocks.1.mlp.deepspeed_moe.experts.fc1_weight")
        assert experts.shape[0] == 8 and experts.dtype == torch.float32
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.wte.weight").dtype == torch.bfloat16

    prompts = ["def ", "class Point:\n    "]  # through the command, as a user runs it
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert generate_main([str(run), "--input", str(tmp_path / "prompts.jsonl"), "--output",
                          str(tmp_path / "out.jsonl"), "--temperature", "0", "--max-new-tokens", "10"]) == 0
    expected = [json.loads(line)["prompt"] + json.loads(line)["generation"]
                for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    user = run_as_hf_user(out, prompts, 10, tmp_path / "user")
    assert user["import model"] == user["import deepspeed"] == "ModuleNotFoundError"
    assert user["classes"][0] == "modeling_gpt_moe.GPTMoEForCausalLM"  # a plain fast tokenizer for gpt2bpe:
    assert user["classes"][1] in ("PreTrainedTokenizerFast", "TokenizersBackend")  # 5.x's name for it
    assert user["pipeline"] == expected and user["generate"] == expected


@pytest.mark.parametrize("argv, message", [
    (["{ckpt}", "{out}", "--dtype", "int8"], "--dtype: got 'int8'; allowed: float32 | bfloat16 | float16"),
    (["{ckpt}"], "the following arguments are required: out_dir"),
    (["{ckpt}", "{full}"], "is not empty; allowed: a new or empty folder, or --overwrite"),
    (["{ckpt}", "{file}"], "is a file; allowed: a new or empty folder"),
    (["{ckpt}", "{out}"], "no complete checkpoint"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    paths = {"ckpt": tmp_path / "nothing-here", "out": tmp_path / "out", "full": tmp_path / "full",
             "file": tmp_path / "file"}
    assert export_main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_run_export_script_needs_two_arguments():
    proc = subprocess.run(["bash", str(ROOT / "examples" / "megatron" / "run_export.sh"), "only-one"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: usage:") and proc.stderr.count("\n") == 1
