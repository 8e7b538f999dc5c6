"""Pretraining end to end through the positional script, 2 CPU processes (gloo) per launch.

Each launch is a few iterations of `nano` on 32-token sequences; the group keeps them on one xdist worker,
so at most 2 training processes run at a time.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading

import pytest
from train_helpers import ROOT, SCRIPT, TOKENS_PER_ITER, flags, launch, load_scaled, metrics, run_dir, train_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]

TRAIN_KEYS = {"lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_process", "experts"}


def test_run_logs_evaluates_and_checkpoints(reference_run):
    run, stdout = reference_run
    train = metrics(run)
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    for record in train.values():
        assert TRAIN_KEYS <= set(record) and math.isfinite(record["lm_loss"]) and record["grad_norm"] > 0
        assert record["tokens_per_s"] > 0 and record["tflops_per_process"] > 0
        layer = record["experts"]["1"]  # nano: layer 1 is the MoE layer
        assert layer["imbalance"] >= 1.0 and 0.0 <= layer["dropped"] <= 1.0 and len(layer["load"]) == 8
        assert 0.009 < record["aux_loss"] < 0.05  # coefficient 0.01 x a balancing loss near 1
    assert train[6]["lm_loss"] < train[1]["lm_loss"]
    # warm-up of 1 iteration to 1e-3, then linear decay towards 1e-4 over the remaining 5
    assert [round(train[i]["lr"], 10) for i in range(1, 7)] == [1e-3, 1e-3, 8.2e-4, 6.4e-4, 4.6e-4, 2.8e-4]
    valid = metrics(run, "valid")
    assert sorted(valid) == [3, 6] and valid[6]["ppl"] == pytest.approx(math.exp(valid[6]["loss"]))
    assert "iter 6/6 | lm loss" in stdout and "validation at iteration 6" in stdout
    assert "load max/mean L1:" in stdout and "dropped" in stdout and "TFLOP/s/proc" in stdout
    assert f"perplexity {valid[6]['ppl']:.2f}" in stdout
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    tag = ckpt / "iter_0000006"
    assert sorted(p.name for p in tag.glob("layer_0_expert_*_mp_rank_00_model_states.pt")) == [
        f"layer_0_expert_{i}_mp_rank_00_model_states.pt" for i in range(8)]
    for name in ("mp_rank_00_model_states.pt", "run_config.json", "model_config.json", "trainer_state.json",
                 "tokenizer/tokenizer.json", "rng_rank_00000.json", "rng_rank_00001.json"):
        assert (tag / name).is_file(), name
    assert json.loads((tag / "trainer_state.json").read_text())["iteration"] == 6
    assert (ckpt / "iter_0000003" / "trainer_state.json").is_file()


def test_resume_from_load_equals_uninterrupted_run(reference_run, tiny_corpus, tmp_path):
    """fp32 on CPU: iterations 4-6 after loading iteration 3's checkpoint are bit-identical (data order,
    schedule, optimizer state and the routers' random token selection all continue)."""
    run, _ = reference_run
    env = train_env(tiny_corpus, tmp_path, iters=6, LOAD=run / "checkpoints" / "iter_0000003")
    proc = launch("run 2 gpt2bpe nano 8 0 2 1 none none 3", env, *flags(tiny_corpus, "--eval-interval", "3"))
    assert "resumed from iteration 3" in proc.stdout
    resumed, reference = metrics(run_dir(tmp_path)), metrics(run)
    assert sorted(resumed) == [4, 5, 6]
    for i in (4, 5, 6):
        for key in ("lm_loss", "aux_loss", "lr", "grad_norm"):
            assert resumed[i][key] == reference[i][key], (i, key)
    assert metrics(run_dir(tmp_path), "valid")[6]["loss"] == metrics(run, "valid")[6]["loss"]


def test_checkpoint_loads_into_one_process_with_every_expert(reference_run, tiny_corpus):
    """Trained with EP=2, loaded with EP=1: the validation loss is the same (routing is dropless in eval)."""
    import numpy as np
    import torch

    from launcher.data.gpt_dataset import build_gpt_datasets
    from launcher.training.checkpoint import load_for_inference
    from model.generation import Decoder, Request, SamplingParams

    run, _ = reference_run
    model, tokenizer, tag = load_for_inference(run)
    assert tag.name == "iter_0000006" and model.config.ep_size == 1
    cfg = json.loads((run / "run_config.json").read_text())
    samples = 2 * cfg["micro_batch"] * 2  # eval_iters x micro batch x data-parallel ranks
    _, valid, _ = build_gpt_datasets(tiny_corpus[0], cfg["split"], cfg["model"]["seq_len"], cfg["seed"],
                                     (48, samples, 0))
    tokens = torch.from_numpy(np.stack([valid[i] for i in range(samples)]))
    with torch.no_grad():
        loss = float(model(tokens[:, :-1], labels=tokens[:, 1:]).loss)
    assert loss == pytest.approx(metrics(run, "valid")[6]["loss"], rel=1e-5)
    prompt = tokenizer.encode("def ")
    decoded = Decoder(model).run([Request(prompt, SamplingParams(max_new_tokens=8, temperature=0,
                                                                  stop_token_ids=(tokenizer.eod_id,)))])[0]
    greedy = list(prompt)
    with torch.no_grad():
        for _ in range(8):  # argmax of a full forward pass over everything so far, until end of document
            next_id = int(model(torch.tensor([greedy])).logits[0, -1].argmax())
            if next_id == tokenizer.eod_id:
                break
            greedy.append(next_id)
    produced = decoded.token_ids[:-1] if decoded.finish_reason == "stop_token" else decoded.token_ids
    assert produced == greedy[len(prompt):]


def test_generate_cli(reference_run, tmp_path, capsys):
    """The EP=2 checkpoint through `python -m launcher.generate`: a prompt file decoded 2 at a time gives each
    prompt the greedy tokens it gets alone in process."""
    from launcher.generate import main
    from launcher.training.checkpoint import load_for_inference
    from model.generation import Decoder, Request, SamplingParams

    run = reference_run[0]
    prompts = ["def ", "import", "class A:", "x = 1"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    assert main([str(run), "--input", str(tmp_path / "p.txt"), "--output", str(out), "--batch-size", "2",
                 "--max-new-tokens", "6", "--temperature", "0", "--threads", "1"]) == 0
    model, tokenizer, _ = load_for_inference(run)
    for prompt, line in zip(prompts, out.read_text().splitlines()):
        alone = Decoder(model).run([Request(tokenizer.encode(prompt), SamplingParams(
            max_new_tokens=6, temperature=0, stop_token_ids=(tokenizer.eod_id,)))])[0]
        assert json.loads(line) == {"prompt": prompt, "generation": alone.text(tokenizer.decode),
                                    "tokens": len(alone.token_ids), "finish_reason": alone.finish_reason}
    assert main([str(run), "--prompt", "def", "--max-new-tokens", "6", "--temperature", "0", "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith("def")
    assert main([str(run / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_evaluate_cli(reference_run, tiny_corpus, tmp_path, capsys):
    """An EP=2 checkpoint evaluated in one process: on the 8 sequences training validates on, the same loss;
    results accumulate in evaluation.json beside the checkpoint; bad input is one line and exit code 2."""
    from launcher.evaluate import main

    run, _ = reference_run
    task = tmp_path / "pick.jsonl"
    task.write_text(json.dumps({"context": "def f(x):\n    return", "choices": [" x", " )"], "label": 0}) + "\n")
    assert main([str(run), "--data", tiny_corpus[0], "--tasks", str(task), "--limit", "8", "--batch-size", "3",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    results = json.loads((run / "checkpoints" / "iter_0000006" / "evaluation.json").read_text())
    valid = results["validation"]["tiny_text_document/valid"]
    assert valid["sequences"] == 8 and valid["loss"] == pytest.approx(metrics(run, "valid")[6]["loss"], rel=1e-5)
    assert results["iteration"] == 6 and results["tasks"]["pick"]["examples"] == 1
    assert "tiny_text_document/valid" in out and "pick" in out and "evaluation.json" in out
    # A second evaluation, through the example script, adds its entries and keeps the others.
    script = ROOT / "examples" / "megatron" / "run_evaluate.sh"
    proc = subprocess.run(["bash", str(script), str(run), "none", str(task), "--limit", "1", "--threads", "1"],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=load_scaled(300))
    assert proc.returncode == 0 and "pick" in proc.stdout, proc.stdout[-3000:]
    merged = json.loads((run / "checkpoints" / "iter_0000006" / "evaluation.json").read_text())
    assert merged["validation"] == results["validation"] and merged["tasks"]["pick"]["settings"]["limit"] == 1
    capsys.readouterr()
    for bad, message in ((["--limit", "0"], "--limit"), (["--tasks", str(tmp_path / "no.jsonl")], "not found"),
                         (["--data", "none", "--tasks", "none"], "nothing to evaluate")):
        assert main([str(run), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("moe,rt,ac,zero,env", [
    ("8", "1", "sel", "z1", {"PRECISION": "bf16"}),
    ("8", "2", "full", "z2", {}),
    ("8", "0", "full", "z2", {"PRECISION": "bf16", "OFFLOAD": "cpu"}),  # ZeRO-Offload: DeepSpeed's CPU Adam
], ids=["expert-choice-z1-bf16-sel", "top2-z2-fp32-full", "top1-z2-bf16-full-offload"])
def test_matrix(tiny_corpus, tmp_path, moe, rt, ac, zero, env):
    launch(f"run 2 gpt2bpe nano {moe} {rt} 2 1 {ac} {zero} 100", train_env(tiny_corpus, tmp_path, iters=3, **env),
           *flags(tiny_corpus, "--eval-interval", "3"))
    run = run_dir(tmp_path)
    train = metrics(run)
    assert sorted(train) == [1, 2, 3] and all(math.isfinite(r["lm_loss"]) for r in train.values())
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in train.values())
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == int(zero[1])
    assert ("offload_optimizer" in ds["zero_optimization"]) == ("OFFLOAD" in env)


def test_expert_bias_moves_by_the_load_of_every_rank_once_per_step(tiny_corpus, tmp_path):
    """--expert-bias over EP=2 with 2 micro batches per step and full recomputation (which replays each
    forward in backward): after every step each expert's bias moves by -rate x sign(its share of the step's
    routes - 1/E), the routes of both ranks' micro batches counted once, then the biases are centred. The
    logged per-iteration load is that share, so the saved bias can be replayed from the metrics."""
    import torch

    from launcher.training.checkpoint import load_for_inference
    from model.moe.router import expert_bias_routers

    rate = 0.01
    launch("run 2 gpt2bpe nano 8 0 2 1 full none 100", train_env(tiny_corpus, tmp_path, iters=4),
           *flags(tiny_corpus, "--eval-interval", "4", "--expert-bias", "--expert-bias-rate", str(rate)))
    run = run_dir(tmp_path)
    train = metrics(run)
    bias = torch.zeros(8, dtype=torch.float64)
    for i in (1, 2, 3, 4):
        share = torch.tensor(train[i]["experts"]["1"]["load"], dtype=torch.float64)
        bias += rate * torch.sign(1 / 8 - share)
        bias -= bias.mean()
    model, _, _ = load_for_inference(run)
    (router,) = expert_bias_routers(model)
    assert bias.abs().max() > 0
    torch.testing.assert_close(router.selection_bias.double(), bias, atol=1e-6, rtol=0)


def test_sequence_parallel_matches_one_process(tiny_corpus, tmp_path):
    """DeepSpeed-Ulysses over 2 ranks (each holds half of every sequence) trains the same model as one
    process holding whole sequences: dense, fp32, same data, so the losses agree to rounding."""
    one, sp = tmp_path / "one", tmp_path / "sp"
    launch("run 1 gpt2bpe nano none 0 2 1 none none 100", train_env(tiny_corpus, one, iters=3),
           *flags(tiny_corpus, "--eval-interval", "3"))
    launch("run 2 gpt2bpe nano none 0 2 2 none none 100", train_env(tiny_corpus, sp, iters=3),
           *flags(tiny_corpus, "--eval-interval", "3"))
    a, b = metrics(run_dir(one)), metrics(run_dir(sp))
    assert b[3]["aux_loss"] == 0.0 and not b[3]["experts"]  # dense: no balancing loss, no expert stats
    for i in (1, 2, 3):
        assert b[i]["lm_loss"] == pytest.approx(a[i]["lm_loss"], rel=1e-5), i
    assert metrics(run_dir(sp), "valid")[3]["loss"] == pytest.approx(metrics(run_dir(one), "valid")[3]["loss"],
                                                                     rel=1e-5)


def test_two_nodes_on_one_machine(reference_run, tiny_corpus, tmp_path):
    """PAI DLC style: the script runs once per node with WORLD_SIZE=2 (nodes) and RANK=0/1, one process each;
    together they are the reference run's 2 ranks, so they train the same model to the same losses."""
    port = train_env(tiny_corpus, tmp_path, iters=6)["MASTER_PORT"]
    procs = []
    for node in (1, 0):  # one output folder: nodes of a cluster share storage
        env = train_env(tiny_corpus, tmp_path, iters=6, WORLD_SIZE=2, RANK=node, MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
        cmd = ["bash", str(SCRIPT), *"run 1 gpt2bpe nano 8 0 2 1 none none 3".split(),
               *flags(tiny_corpus, "--eval-interval", "3")]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=load_scaled(240))[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[1][-4000:] + outputs[0][-4000:]
    assert "world 2 = 2 node(s) x 1 process(es)" in outputs[1]
    run = run_dir(tmp_path)
    two_nodes, reference = metrics(run), metrics(reference_run[0])
    assert [two_nodes[i]["lm_loss"] for i in range(1, 7)] == [reference[i]["lm_loss"] for i in range(1, 7)]
    tag = run / "checkpoints" / "iter_0000006"
    assert (tag / "rng_rank_00000.json").is_file() and (tag / "rng_rank_00001.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000006"


def test_sigterm_saves_and_the_same_command_resumes(tiny_corpus, tmp_path):
    """A preempted job: SIGTERM to the launch (the launcher hands it to the workers) -> every rank finishes the
    iteration, a checkpoint is saved, the workers exit 0. The same command then resumes from the run folder."""
    positional = "run 2 gpt2bpe nano 8 0 2 1 none none 1000"
    env = train_env(tiny_corpus, tmp_path, iters=2000)
    cmd = ["bash", str(SCRIPT), *positional.split(), *flags(tiny_corpus, "--eval-interval", "1000")]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Wait for the run's own report of iteration 3 (rank 0 prints one line per iteration, unbuffered); a run
    # that hangs is killed by the watchdog, which ends the read.
    watchdog = threading.Timer(load_scaled(240), proc.kill)
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.split("/")[0].split() == ["iter", "3"]:  # "iter    3/2000 | ..."
                break
    finally:
        watchdog.cancel()
    assert proc.poll() is None, "".join(seen)[-4000:]
    os.kill(proc.pid, signal.SIGTERM)  # the script execs the launcher, which hands the signal to the workers
    out = "".join(seen) + proc.communicate(timeout=load_scaled(90))[0]
    assert "SIGTERM: checkpoint saved at iteration" in out, out[-4000:]
    assert proc.returncode == 0, out[-4000:]  # the whole job exits cleanly, torchrun included
    assert "exitcode  : " not in out  # torchrun reports no failed worker
    run = run_dir(tmp_path)
    stopped = max(metrics(run))
    assert 3 <= stopped < 2000
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped:07d}"

    env["TRAIN_TOKENS"] = str((stopped + 2) * TOKENS_PER_ITER)  # finish 2 iterations later
    again = launch(positional, env, *flags(tiny_corpus, "--eval-interval", "1000"))
    assert f"resumed from iteration {stopped}" in again.stdout
    assert sorted(metrics(run))[-2:] == [stopped + 1, stopped + 2]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped + 2:07d}"


def test_non_finite_loss_stops_with_the_iteration(tiny_corpus, tmp_path):
    """An absurd learning rate blows the weights up after the first step: fp32 has no loss scaler, so training
    stops at iteration 2 with a message, before the step, and saves nothing."""
    env = train_env(tiny_corpus, tmp_path, iters=5, WARMUP_TOKENS=0)
    proc = launch("run 1 gpt2bpe nano 8 0 2 1 none none 100", env, *flags(tiny_corpus, "--lr", "1e30",
                                                                           "--min-lr", "1e30"), check=False)
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "error: iteration 2: the loss is not finite" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert not (run_dir(tmp_path) / "checkpoints" / "latest").exists()

