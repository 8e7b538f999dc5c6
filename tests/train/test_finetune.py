"""Fine-tuning through run_finetune_text_generation_gpt.sh, from the session's reference run (nano, MoE-8 top-1,
written by 2 processes with EP=2).

Four launches of 2 processes: A fine-tunes the EP=2 checkpoint into an EP=1 run; B fine-tunes A's EP=1
checkpoint with EP=2; B is also run interrupted (--exit-interval) and resumed, which must give B's losses
exactly. The rest (dryrun, bad input, the data order) runs in this process.
"""
from __future__ import annotations

import json
import os
import math
import random

import pytest
import torch
from train_helpers import FINETUNE_SCRIPT, launch, metrics, run_dir, train_env

from launcher.finetune import main as finetune_main

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]

WORDS = ("name value result items count index path data text line token model state config layer size order "
         "queue stack cache table entry field record parent child node graph edge weight total score label color "
         "shape width height depth start stop step limit offset prefix suffix key default").split()
LR, MIN_LR = 1e-3, 1e-4


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A small prompt<TAB>target task on the corpus's own vocabulary (Python code): (train.tsv, valid.tsv)."""
    rows = [(f"def {verb}_{word}(self):", f" return self._{word}") for verb in ("get", "load") for word in WORDS]
    random.Random(0).shuffle(rows)
    folder = tmp_path_factory.mktemp("sft")
    train, valid = folder / "train.tsv", folder / "valid.tsv"
    train.write_text("".join(f"{p}\t{t}\n" for p, t in rows[:64]))
    valid.write_text("".join(f"{p}\t{t}\n" for p, t in rows[64:76]))
    return train, valid


def ft_env(out, **extra) -> dict:
    env = train_env(("unused", "unused"), out, iters=1, GPUS_PER_NODE=2, **extra)
    for name in ("GLOBAL_BATCH_SIZE", "DATA_PATH"):  # the global batch: micro batch x data-parallel size
        env.pop(name)
    return env


def positional(pairs, checkpoint, epochs=2, zero="none", ac="none", mode="") -> str:
    train, valid = pairs
    return f"{mode} task {train} {valid} {checkpoint} nano 8 0 2 {epochs} 1 {ac} {zero} 32".strip()


def flags(*more) -> list[str]:
    return ["--lr", str(LR), "--min-lr", str(MIN_LR), "--log-interval", "1", "--samples", "2", *more]


def target_loss(model, tokenizer, path) -> float:
    """Mean loss per target token of `model` on a tsv, one example at a time, computed here from the logits."""
    total, count = 0.0, 0
    for line in path.read_text().splitlines():
        prompt, target = line.split("\t")
        p, t = tokenizer.encode(prompt), tokenizer.encode(target) + [tokenizer.eod_id]
        ids = torch.tensor([p + t])
        with torch.no_grad():
            logits = model(ids[:, :-1]).logits[0, len(p) - 1:]  # the positions that predict the target
        total += float(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(t), reduction="sum"))
        count += len(t)
    return total / count


@pytest.fixture(scope="module")
def run_a(reference_run, pairs, tmp_path_factory):
    """The EP=2 reference checkpoint fine-tuned by 2 processes holding every expert each (EP_SIZE=1)."""
    out = tmp_path_factory.mktemp("ft_a")
    proc = launch(positional(pairs, reference_run[0]), ft_env(out, EP_SIZE=1), *flags(), script=FINETUNE_SCRIPT)
    return run_dir(out), proc.stdout


@pytest.fixture(scope="module")
def run_b(run_a, pairs, tmp_path_factory):
    """A's EP=1 checkpoint (its run folder) fine-tuned with EP=2, packed, ZeRO 1, selective recompute."""
    out = tmp_path_factory.mktemp("ft_b")
    proc = launch(positional(pairs, run_a[0], epochs=1, zero="z1", ac="sel"), ft_env(out), *flags("--pack"),
                  script=FINETUNE_SCRIPT)
    return run_dir(out), proc.stdout


def test_finetuning_lowers_the_validation_loss_and_keeps_the_last_and_best(run_a, reference_run, pairs):
    from launcher.training.checkpoint import load_for_inference

    run, stdout = run_a
    valid, train = metrics(run, "valid"), metrics(run, "train")
    iters = 32  # 64 examples / (2 processes x micro batch 2) = 16 iterations an epoch, 2 epochs
    assert sorted(valid) == [0, 16, 32] and sorted(train) == list(range(1, iters + 1))
    # Iteration 0 is the pretrained model (EP=2, loaded into EP=1 ranks), scored on target tokens only.
    model, tokenizer, _ = load_for_inference(reference_run[0])
    assert valid[0]["loss"] == pytest.approx(target_loss(model, tokenizer, pairs[1]), rel=1e-5)
    assert valid[32]["loss"] < valid[16]["loss"] < valid[0]["loss"]
    assert [valid[i]["epoch"] for i in (0, 16, 32)] == [0, 1, 2]
    assert all(r["aux_loss"] > 0 and math.isfinite(r["lm_loss"]) for r in train.values())  # logged apart
    # Warm-up 1 iteration (ceil(0.01 x 32)) to --lr, then cosine decay towards --min-lr over the other 31.
    cosine = [LR] + [MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * step / (iters - 1)))
                     for step in range(iters - 1)]
    assert [train[i]["lr"] for i in range(1, iters + 1)] == pytest.approx(cosine, rel=1e-9)

    ckpt = run / "checkpoints"
    best = min((16, 32), key=lambda i: valid[i]["loss"])
    assert (ckpt / "latest").read_text().strip() == "iter_0000032"
    assert (ckpt / "best").read_text().strip() == f"iter_{best:07d}"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == sorted({"iter_0000032", f"iter_{best:07d}"})
    state = json.loads((ckpt / "iter_0000032" / "trainer_state.json").read_text())
    assert state["valid_loss"] == valid[32]["loss"] and state["epoch"] == 2
    assert json.loads((ckpt / "iter_0000032" / "model_config.json").read_text())["ep_size"] == 1
    prompts = [line.split("\t")[0] for line in pairs[1].read_text().splitlines()[:2]]
    for epoch in (1, 2):
        samples = [json.loads(line) for line in (run / "samples" / f"epoch_{epoch:03d}.jsonl").read_text().splitlines()]
        assert [s["prompt"] for s in samples] == prompts and all(isinstance(s["generation"], str) for s in samples)
    assert "validation (pretrained model, iteration 0)" in stdout and f"best: {ckpt / f'iter_{best:07d}'}" in stdout
    # `checkpoints/best` names a checkpoint for the tools that load one.
    assert load_for_inference(ckpt / "best")[2].name == f"iter_{best:07d}"


def test_an_ep1_checkpoint_fine_tunes_with_ep2(run_a, run_b):
    run, stdout = run_b
    valid = metrics(run, "valid")
    # B starts from A's last checkpoint: same weights, same validation examples, so the same loss.
    assert valid[0]["loss"] == pytest.approx(metrics(run_a[0], "valid")[32]["loss"], rel=1e-5)
    last = max(valid)
    assert valid[last]["loss"] < valid[0]["loss"]
    assert json.loads((run / "run_config.json").read_text())["model"]["ep_size"] == 2
    assert "one example per sequence" not in stdout and "packed" in stdout


def test_the_fine_tuned_ep2_checkpoint_exports_for_plain_transformers(run_b, pairs, tmp_path):
    """B's best checkpoint (fine-tuned with EP=2) through `launcher.export`, loaded where neither the toolkit nor
    DeepSpeed is installed: its greedy continuations of validation prompts are launcher.generate's."""
    from hf_user import run_as_hf_user

    from launcher.export import main as export_main
    from launcher.generate import main as generate_main

    best, out = run_b[0] / "checkpoints" / "best", tmp_path / "hf"
    assert export_main([str(best), str(out)]) == 0
    prompts = [line.split("\t")[0] for line in pairs[1].read_text().splitlines()[:3]]
    source, target = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert generate_main([str(best), "--input", str(source), "--output", str(target), "--temperature", "0",
                          "--max-new-tokens", "8"]) == 0
    expected = [json.loads(line)["prompt"] + json.loads(line)["generation"]
                for line in target.read_text().splitlines()]
    user = run_as_hf_user(out, prompts, 8, tmp_path / "user")
    assert user["import model"] == user["import deepspeed"] == "ModuleNotFoundError"
    assert user["pipeline"] == expected and user["generate"] == expected


def test_finetuning_with_zero_2_bf16_and_full_recompute(reference_run, pairs, tmp_path):
    """The settings pretraining offers, in fine-tuning: ZeRO 2, bf16 and full recompute, EP=2 from the EP=2
    checkpoint. The pretrained weights arrive (the first validation is the fp32 model's, to bf16 precision),
    training lowers the validation loss, and the best checkpoint loads for inference."""
    from launcher.training.checkpoint import load_for_inference

    proc = launch(positional(pairs, reference_run[0], epochs=1, zero="z2", ac="full"), ft_env(tmp_path, PRECISION="bf16"),
                  *flags(), script=FINETUNE_SCRIPT)
    run = run_dir(tmp_path)
    cfg = json.loads((run / "run_config.json").read_text())
    ds = json.loads((run / "ds_config.json").read_text())
    assert cfg["zero_stage"] == 2 and ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    assert cfg["model"]["recompute"] == "full" and cfg["model"]["ep_size"] == 2
    valid, train = metrics(run, "valid"), metrics(run, "train")
    model, tokenizer, _ = load_for_inference(reference_run[0])
    assert valid[0]["loss"] == pytest.approx(target_loss(model, tokenizer, pairs[1]), rel=2e-2)
    assert valid[max(valid)]["loss"] < valid[0]["loss"] - 0.1
    assert all(math.isfinite(r["lm_loss"]) and r["skipped_steps"] == 0 for r in train.values())
    model, _, tag = load_for_inference(run / "checkpoints" / "best")
    assert target_loss(model.float(), tokenizer, pairs[1]) == pytest.approx(min(r["loss"] for r in valid.values()),
                                                                           rel=2e-2)
    assert "bf16" in proc.stdout


def test_an_interrupted_run_resumes_exactly(run_a, run_b, pairs, tmp_path):
    """--exit-interval 3 saves and stops after iteration 3; the same command again resumes there (the
    fine-tuned weights, not the pretrained ones) and trains to the losses of the uninterrupted run B."""
    line = positional(pairs, run_a[0], epochs=1, zero="z1", ac="sel")
    first = launch(line, ft_env(tmp_path), *flags("--pack", "--exit-interval", "3"), script=FINETUNE_SCRIPT)
    assert "--exit-interval 3: checkpoint saved at iteration 3" in first.stdout
    run = run_dir(tmp_path)
    assert sorted(metrics(run)) == [1, 2, 3] and not (run / "samples").exists()
    second = launch(line, ft_env(tmp_path), *flags("--pack"), script=FINETUNE_SCRIPT)
    assert "resumed from iteration 3" in second.stdout and "weights:" not in second.stdout
    resumed, reference = metrics(run), metrics(run_b[0])
    assert sorted(resumed) == sorted(reference)
    for i in sorted(reference):
        for key in ("lm_loss", "aux_loss", "lr", "grad_norm"):
            assert resumed[i][key] == reference[i][key], (i, key)
    assert {i: r["loss"] for i, r in metrics(run, "valid").items()} == \
        {i: r["loss"] for i, r in metrics(run_b[0], "valid").items()}


def test_dryrun_of_the_script(reference_run, pairs, tmp_path):
    proc = launch(positional(pairs, reference_run[0], mode="dryrun"), ft_env(tmp_path), *flags(),
                  script=FINETUNE_SCRIPT)
    out = proc.stdout
    assert "finetune     task task: 2 epoch(s) x 16 iterations" in out and "cosine" in out
    assert f"weights from {reference_run[0] / 'checkpoints' / 'iter_0000006'}" in out
    assert "world 2 = 1 node(s) x 2 process(es)" in out and "expert-parallel 2" in out
    assert "-m launcher.finetune --run-config" in out
    run = run_dir(tmp_path)
    assert not (run / "checkpoints").exists()
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["finetune"]["epochs"] == 2 and cfg["eval_interval"] == cfg["save_interval"] == 16
    assert cfg["eval_iters"] == 3 and cfg["lr_decay"] == "cosine"  # 12 validation examples / (2 x 2) a step


@pytest.mark.parametrize("change,message", [
    ({"size": "tiny"}, "MODEL_SIZE: got tiny (4 layers, hidden 128, 4 heads); the checkpoint"),
    ({"moe": "4"}, "MOE: got 4; the checkpoint"),
    ({"moe": "none"}, "MOE: got none; the checkpoint"),
    ({"rt": "2"}, "RT: got 2 (top-2 (GShard)); the checkpoint"),
    ({"seq": "64"}, "SEQ_LEN: got 64; allowed: at most the checkpoint's 32 positions"),
    ({"ckpt": "nowhere"}, "PRETRAIN_CHECKPOINT_PATH: got"),
    ({"train": "missing.tsv"}, "fine-tuning data not found"),
    ({"epochs": "0"}, "EPOCH: got '0'"),
], ids=["size", "experts", "dense", "router", "seq-len", "checkpoint", "data", "epochs"])
def test_bad_input_is_one_line_and_nothing_is_written(reference_run, pairs, tmp_path, monkeypatch, capsys, change,
                                                       message):
    a = {"train": str(pairs[0]), "ckpt": str(reference_run[0]), "size": "nano", "moe": "8", "rt": "0", "epochs": "2",
         "seq": "32", **change}
    if a["train"] == "missing.tsv":
        a["train"] = str(tmp_path / "missing.tsv")
    for name, value in ft_env(tmp_path / "out").items():
        monkeypatch.setenv(name, value)
    argv = ["task", a["train"], str(pairs[1]), a["ckpt"], a["size"], a["moe"], a["rt"], "2",
            a["epochs"], "1", "none", "none", a["seq"]]
    assert finetune_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_each_epoch_visits_every_example_once_in_its_own_order(reference_run, pairs, tmp_path, monkeypatch):
    """Iteration i's batch is a function of i alone (what exact resumption needs); an epoch covers the examples,
    the last batch completed from the same epoch's order."""
    from launcher.data.tokenizer import load_tokenizer
    from launcher.finetune_cli import build_finetune_config
    from launcher.training.distributed import Placement
    from launcher.training.sft_data import FinetuneData

    train = tmp_path / "train.tsv"
    train.write_text("".join(f"{i}:\t{i}\n" for i in range(10)))  # 10 examples: 3 iterations of 4
    env = ft_env(tmp_path / "out")
    cfg, _ = build_finetune_config(positional((train, pairs[1]), reference_run[0]).split() + ["--samples", "0"], env)
    tokenizer = load_tokenizer(cfg.resolved_tokenizer_path)
    prompt_of = {tuple(tokenizer.encode(f"{i}:")): i for i in range(10)}

    def batch_examples(iteration, rank):
        data = FinetuneData(cfg, Placement(rank, rank, 1, torch.device("cpu")), tokenizer)
        rows = data.train_batch(iteration, 0).input_ids.tolist()
        return [next(v for k, v in prompt_of.items() if row[:len(k)] == list(k)) for row in rows]

    epochs = [[e for i in range(3 * epoch, 3 * epoch + 3) for r in (0, 1) for e in batch_examples(i, r)]
              for epoch in (0, 1)]
    for seen in epochs:
        assert len(seen) == 12 and sorted(set(seen)) == list(range(10)) and seen[10:] == seen[:2]
    assert epochs[0] != epochs[1]
    assert batch_examples(4, 1) == batch_examples(4, 1)


@pytest.mark.parametrize("missing", [None, "poetry_dev.tsv"])
def test_poetry_example_refuses_a_data_dir_without_its_files_in_one_line(tmp_path, missing):
    import subprocess

    from train_helpers import ROOT

    data = tmp_path / "data"
    data.mkdir()
    for name in {"songci.jsonl", "yuanqu.jsonl", "poetry_train.tsv", "poetry_dev.tsv"} - {missing}:
        (data / name).write_text("")
    argv = [str(data)] if missing else []
    proc = subprocess.run(["bash", str(ROOT / "examples" / "megatron" / "poetry.sh"), *argv], cwd=tmp_path,
                          env={**os.environ, "OUTPUT_BASEPATH": str(tmp_path / "out")}, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and (missing or "usage") in err[0], err
    assert not (tmp_path / "out").exists()
