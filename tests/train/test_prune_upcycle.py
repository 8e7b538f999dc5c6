"""Expert pruning and upcycling end to end, on the reference run (nano, top-1 MoE-8 trained over EP=2).

A pruned run folder is taken by generate and the Hugging Face export and resumes training on 2 processes;
pruning to one expert gives a dense checkpoint, from which an MoE run upcycles over EP=2 and starts exactly
where the dense model is (its first training loss is the dense model's loss on the same batch).
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from train_helpers import ROOT, SEQ, TOKENS_PER_ITER, flags, launch, metrics, run_dir, train_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]


def _prune(run, out, *args):
    from launcher.prune import main

    return main([str(run), str(out), *args, "--threads", "1"])


@pytest.fixture(scope="module")
def keep4(reference_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "nano-keep4"
    assert _prune(reference_run[0], out, "--keep", "4") == 0
    return out


@pytest.fixture(scope="module")
def dense(reference_run, tmp_path_factory):
    """Through examples/megatron/run_prune.sh: KEEP 1, BY probability, flags passed on."""
    out = tmp_path_factory.mktemp("pruned") / "nano-dense"
    proc = subprocess.run(["bash", str(ROOT / "examples" / "megatron" / "run_prune.sh"), str(reference_run[0]),
                           str(out), "1", "probability", "--eval-data", "none", "--threads", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "(dense)" in proc.stdout and "parameters  total" in proc.stdout
    return out


def test_pruned_run_folder_and_report(keep4, reference_run, capsys):
    report = json.loads((keep4 / "pruning.json").read_text())
    layer = report["layers"][0]
    assert report["iteration"] == 6 and report["keep"] == [4] and layer["layer"] == 1 and len(layer["kept"]) == 4
    routes = layer["routes"]
    assert sorted(routes[e] for e in layer["kept"]) == sorted(routes)[4:]  # the 4 busiest experts
    assert layer["token_coverage"] == pytest.approx(sum(sorted(routes)[4:]) / sum(routes))
    assert report["calibration"]["data"] == "tiny_text_document/valid" and report["calibration"]["tokens"] > 0
    params = report["parameters"]
    assert params["after"]["total"] == params["before"]["total"] - 4 * 2 * 64 * 256 - 4 * 64
    before, after = report["validation"]["before"], report["validation"]["after"]
    assert before["loss"] == pytest.approx(metrics(reference_run[0], "valid")[6]["loss"], abs=0.5)
    assert after["loss"] != before["loss"] and after["tokens"] == before["tokens"]
    tag = keep4 / "checkpoints" / "iter_0000006"
    assert report["optimizer"] == "Adam state of the kept weights carried over"
    assert (keep4 / "checkpoints" / "latest").read_text().strip() == "iter_0000006"
    assert sorted(p.name for p in tag.glob("layer_0_expert_*")) == [
        f"layer_0_expert_{i}_mp_rank_00_model_states.pt" for i in range(4)]
    state = json.loads((tag / "trainer_state.json").read_text())
    assert state["iteration"] == 6 and state["layout"]["world_size"] == 1 and "tokenizer/tokenizer.json" in state["files"]
    assert json.loads((tag / "model_config.json").read_text())["num_experts"] == 4
    for name in ("run_config.json", "run_config.yaml", "ds_config.json"):
        assert (keep4 / name).is_file()
    assert "(dense)" not in capsys.readouterr().out


def test_keeping_every_expert_keeps_the_model(reference_run, tmp_path):
    """--keep 8 of 8: the written checkpoint computes what the original does (loss before == after, and the
    same logits from the loaded checkpoints)."""
    from launcher.training.checkpoint import load_for_inference

    out = tmp_path / "nano-keep8"
    assert _prune(reference_run[0], out, "--keep", "8", "--eval-limit", "4") == 0
    report = json.loads((out / "pruning.json").read_text())
    assert report["validation"]["after"] == report["validation"]["before"]
    assert report["parameters"]["after"] == report["parameters"]["before"]
    original, _, _ = load_for_inference(reference_run[0])
    pruned, _, _ = load_for_inference(out)
    x = torch.randint(0, 500, (2, SEQ))
    with torch.no_grad():
        assert torch.equal(pruned(x).logits, original(x).logits)


def test_pruning_to_one_expert_gives_a_dense_checkpoint(dense):
    from launcher.training.checkpoint import load_for_inference

    model, _, tag = load_for_inference(dense)
    assert model.config.num_experts == 0 and not list(tag.glob("layer_*_expert_*"))
    report = json.loads((dense / "pruning.json").read_text())
    assert report["layers"][0]["dense"] and report["validation"]["after"] is None
    assert report["parameters"]["after"]["total"] == sum(p.numel() for p in model.parameters())


def test_pruned_checkpoint_generates_and_exports(keep4, tmp_path, capsys):
    from launcher.generate import main
    from launcher.training.checkpoint import load_for_inference
    from transformers import AutoModelForCausalLM

    from model import GPTMoEForCausalLM

    assert main([str(keep4), "--prompt", "def", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def")
    model, _, _ = load_for_inference(keep4)
    GPTMoEForCausalLM.from_gpt_moe(model).save_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_pruned_checkpoint_resumes_training(keep4, tiny_corpus, tmp_path):
    """`run --config OUT_DIR/run_config.yaml` with LOAD and 2 more iterations, on 2 processes over EP=2: the
    resharded checkpoint (with the kept experts' Adam state) trains on."""
    env = train_env(tiny_corpus, tmp_path, iters=8, LOAD=keep4, EP_SIZE=2)
    proc = launch(f"run 2 --config {keep4 / 'run_config.yaml'}", env, *flags(tiny_corpus, "--eval-interval", "8"))
    assert "resumed from iteration 6" in proc.stdout
    assert "written by 1 process, EP 1, ZeRO 0, fp32, loaded into 2 processes, EP 2, ZeRO 0" in proc.stdout
    run = run_dir(tmp_path)
    train = metrics(run)
    assert sorted(train) == [7, 8] and all(len(r["experts"]["1"]["load"]) == 4 for r in train.values())
    report = json.loads((keep4 / "pruning.json").read_text())
    assert train[7]["lm_loss"] < report["validation"]["after"]["loss"] + 1.0  # no restart from scratch
    assert (run / "checkpoints" / "iter_0000008" / "trainer_state.json").is_file()


def test_upcycled_run_starts_as_the_dense_model_and_trains_with_ep2(dense, tiny_corpus, tmp_path):
    """Dropless (so no token is dropped by capacity), the first iteration's loss is the dense checkpoint's loss
    on the same batch; a second iteration trains; a run of other sizes is refused before anything is written."""
    from launcher.config import RunConfig
    from launcher.training.checkpoint import load_for_inference
    from launcher.training.data import Batches, build_datasets
    from launcher.training.distributed import Placement

    env = train_env(tiny_corpus, tmp_path, iters=2)
    proc = launch("run 2 gpt2bpe nano 4 0 2 1 none z2 100", env,
                  *flags(tiny_corpus, "--upcycle-from", str(dense), "--no-drop-tokens", "--eval-interval", "2"))
    assert "upcycled from" in proc.stdout and "expert-parallel 2" in proc.stdout and "zero         stage 2" in proc.stdout
    run = run_dir(tmp_path)
    train = metrics(run)
    cfg = RunConfig.read(run / "run_config.json")
    model, tokenizer, _ = load_for_inference(dense)
    train_data, _ = build_datasets(cfg, Placement(0, 0, 1, torch.device("cpu")), lambda: None, tokenizer.vocab_size)
    losses = []
    for rank in range(2):
        batches = Batches(cfg, Placement(rank, rank, 1, torch.device("cpu")))
        for micro in range(cfg.grad_accum):
            batch = batches.train(train_data, 0, micro)
            with torch.no_grad():
                losses.append(float(model(batch.input_ids, labels=batch.labels).loss))
    assert train[1]["lm_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert train[2]["lm_loss"] < train[1]["lm_loss"] + 0.5 and train[2]["grad_norm"] > 0
    saved = json.loads((run / "checkpoints" / "iter_0000002" / "model_config.json").read_text())
    assert saved["expert_mlp_bias"] and saved["num_experts"] == 4

    bad = launch("dryrun 2 gpt2bpe nano 4 0 2 1 none none 100", train_env(tiny_corpus, tmp_path / "bad", iters=2),
                 *flags(tiny_corpus, "--upcycle-from", str(dense), "--hidden-size", "128"), check=False)
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()
    assert "--hidden-size 64 (dense checkpoint) vs 128 (this run)" in bad.stdout.strip().splitlines()[-1]
    other = tmp_path / "other-tokenizer"  # the same vocabulary size, two tokens' ids swapped
    shutil.copytree(dense / "checkpoints" / "iter_0000006" / "tokenizer", other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    bad = launch("dryrun 2 gpt2bpe nano 4 0 2 1 none none 100", train_env(tiny_corpus, tmp_path / "bad", iters=2),
                 "--tokenizer-path", str(other), "--upcycle-from", str(dense), check=False)
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()
    assert "the dense checkpoint's tokenizer" in bad.stdout.strip().splitlines()[-1]


def test_bad_input_is_one_line_and_writes_nothing(reference_run, keep4, tmp_path, capsys):
    for args, message in ((["--keep", "9"], "allowed: 1..8"), (["--keep", "2,2"], "one per MoE layer"),
                          (["--keep", "x"], "--keep"), (["--keep", "2", "--by", "load"], "--by")):
        assert _prune(reference_run[0], tmp_path / "out", *args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    assert _prune(reference_run[0], keep4, "--keep", "2") == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert SEQ == 32 and TOKENS_PER_ITER == 256  # the helpers' shapes the numbers above assume
