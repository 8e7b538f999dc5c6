"""Checkpoints are data: a planted pickle in any file kind is refused before it can run, and a LOAD that is
garbage, truncated, incomplete or of another model is one line from the launcher, before anything is written.

Most cases are checked in process on copies of the session's reference run (2 processes, MoE-8 over EP=2,
ZeRO 0); one launch and one generate go through the command lines. The ZeRO optimizer shard is planted in
test_resume_resize.py, beside a ZeRO-2 run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from train_helpers import ROOT, SCRIPT, Payload, flags, run_config, train_env

from launcher.errors import UsageError
from launcher.preflight import check_resumable
from launcher.training.checkpoint import (TRAINER_STATE, SafeLoading, load_for_inference, read_rng_states,
                                          verify_checkpoint)
from model.checkpoint import CheckpointError, safe_load

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]

POSITIONAL = "run 2 gpt2bpe nano 8 0 2 1 none none 3"


def _copy_checkpoint(reference_run, tmp_path, iteration: int = 3) -> Path:
    """A copy of the reference run's tag folder (its run's other checkpoints left out)."""
    src = reference_run[0] / "checkpoints" / f"iter_{iteration:07d}"
    dst = tmp_path / "ckpt" / src.name
    shutil.copytree(src, dst)
    (dst.parent / "latest").write_text(src.name)
    return dst


def _plant(path: Path, marker: Path, *, keep_manifest: bool = True) -> None:
    """Rewrite `path` as a real-looking checkpoint file (its own content) with the payload inside; with
    `keep_manifest`, trainer_state.json is updated to the new size, as an attacker would."""
    content = torch.load(path, weights_only=False) if path.exists() else _legacy_rng_states()
    torch.save({"content": content, "planted": Payload(marker)}, path)
    state_file = path.parent / TRAINER_STATE
    state = json.loads(state_file.read_text())
    if keep_manifest:
        state["files"].pop(path.with_suffix(".json").name, None)
        state["files"][path.name] = path.stat().st_size
    else:
        state.pop("files")
    state_file.write_text(json.dumps(state))


def _legacy_rng_states() -> dict:
    """RNG states as the toolkit saved them before they were JSON: numpy's as an ndarray, in a torch.save."""
    import random

    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


# (file in the tag folder, what it is)
FILE_KINDS = [
    ("mp_rank_00_model_states.pt", "model states"),
    ("layer_0_expert_5_mp_rank_00_model_states.pt", "expert file"),
    ("expp_rank_1_mp_rank_00_optim_states.pt", "optimizer file"),
    ("rng_rank_00001.pt", "RNG states, as older checkpoints kept them"),
]


@pytest.mark.parametrize("name,kind", FILE_KINDS, ids=[k for _, k in FILE_KINDS])
@pytest.mark.parametrize("keep_manifest", [True, False], ids=["manifest", "older-checkpoint"])
def test_a_planted_pickle_is_refused_and_runs_nothing(reference_run, tiny_corpus, tmp_path, name, kind,
                                                      keep_manifest):
    tag = _copy_checkpoint(reference_run, tmp_path)
    if name.startswith("rng_rank_"):
        (tag / name.replace(".pt", ".json")).unlink()  # an older checkpoint: its RNG states in a .pt file
    planted = tag / name
    proof = tmp_path / "proof"
    _plant(planted, proof, keep_manifest=keep_manifest)
    torch.load(planted, weights_only=False)  # the file is live: unrestricted unpickling runs the payload
    assert proof.exists()
    proof.unlink()

    cfg = run_config(tiny_corpus, tmp_path / "out", tag, POSITIONAL)
    with pytest.raises(UsageError, match=rf"{name}: refused: its pickle names builtins.exec") as refused:
        check_resumable(cfg)  # the launcher's preflight and the workers' check before loading
    assert "\n" not in str(refused.value)
    with pytest.raises(UsageError, match="refused"):
        verify_checkpoint(cfg, tag.parent, tag.name)
    with pytest.raises(UsageError, match="refused"):  # what DeepSpeed's engine reads through
        SafeLoading(None).load(str(planted), map_location="cpu")
    if "model_states" in name:
        with pytest.raises(UsageError, match="refused"):
            load_for_inference(tag)
    if name.startswith("rng_rank_"):
        with pytest.raises(UsageError, match="refused"):
            read_rng_states(tag, 1)
    assert not proof.exists()


def test_the_refusal_holds_when_the_scan_is_fooled(tmp_path):
    """safe_load's second line: weights_only loading refuses what a scan could miss."""
    proof = tmp_path / "proof"
    path = tmp_path / "x.pt"
    torch.save({"planted": Payload(proof)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        safe_load(path)
    import model.checkpoint as mc

    scan = mc.check_checkpoint_file
    mc.check_checkpoint_file = lambda *a, **k: None
    try:
        with pytest.raises(CheckpointError, match="cannot be loaded as a checkpoint"):
            safe_load(path)
    finally:
        mc.check_checkpoint_file = scan
    assert not proof.exists()


def test_older_checkpoints_still_load(reference_run, tiny_corpus, tmp_path):
    """Written before the RNG states were JSON and trainer_state.json listed the files: still loadable, and
    their numpy RNG state restores exactly."""
    import numpy as np

    tag = _copy_checkpoint(reference_run, tmp_path)
    legacy = _legacy_rng_states()
    for rank in (0, 1):
        torch.save(legacy, tag / f"rng_rank_{rank:05d}.pt")  # as the toolkit wrote them before
        (tag / f"rng_rank_{rank:05d}.json").unlink()
    state = json.loads((tag / TRAINER_STATE).read_text())
    for key in ("files", "layout"):
        state.pop(key)
    (tag / TRAINER_STATE).write_text(json.dumps(state))
    check_resumable(run_config(tiny_corpus, tmp_path / "out", tag, POSITIONAL))
    restored = read_rng_states(tag, 0)
    assert np.array_equal(restored["numpy"][1], legacy["numpy"][1])
    model, _, _ = load_for_inference(tag)
    assert model.config.num_experts == 8


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _drop_manifest(tag: Path) -> None:
    state = json.loads((tag / TRAINER_STATE).read_text())
    state.pop("files")
    (tag / TRAINER_STATE).write_text(json.dumps(state))


BAD_LOADS = {
    "garbage-folder": (lambda tag: None, "LOAD: got '.*garbage'; allowed: a run folder"),
    "truncated-expert-file": (lambda tag: _truncate(tag / "layer_0_expert_3_mp_rank_00_model_states.pt"),
                              "layer_0_expert_3_mp_rank_00_model_states.pt has \\d+ bytes, \\d+ were written"),
    "truncated-older-checkpoint": (
        lambda tag: (_drop_manifest(tag), _truncate(tag / "mp_rank_00_model_states.pt")),
        "mp_rank_00_model_states.pt: not a whole checkpoint file"),
    "random-bytes-optimizer": (
        lambda tag: (_drop_manifest(tag), _random_bytes(tag / "expp_rank_0_mp_rank_00_optim_states.pt")),
        "expp_rank_0_mp_rank_00_optim_states.pt: not a whole checkpoint file"),
    "missing-expert-file": (lambda tag: (tag / "layer_0_expert_7_mp_rank_00_model_states.pt").unlink(),
                            "layer_0_expert_7_mp_rank_00_model_states.pt is missing; the checkpoint is incomplete"),
    "missing-older-optimizer-file": (
        lambda tag: (_drop_manifest(tag), (tag / "expp_rank_1_mp_rank_00_optim_states.pt").unlink()),
        "expp_rank_1_mp_rank_00_optim_states.pt is missing"),
    "bad-trainer-state": (lambda tag: (tag / TRAINER_STATE).write_text("{not json"),
                          "trainer_state.json: not readable JSON"),
    "bad-rng-states": (lambda tag: (tag / "rng_rank_00001.json").write_text('{"python": 5}'),
                       "rng_rank_00001.json: not RNG states this toolkit wrote"),
    "bad-model-config": (lambda tag: (tag / "model_config.json").write_text('{"hidden_size": -3}'),
                         "model_config.json: GPTMoEConfig.hidden_size: got -3"),
}


@pytest.mark.parametrize("case", sorted(BAD_LOADS))
def test_a_bad_load_is_one_line(reference_run, tiny_corpus, tmp_path, case):
    damage, message = BAD_LOADS[case]
    if case == "garbage-folder":
        target = tmp_path / "garbage"
        target.mkdir()
        (target / "latest").write_bytes(os.urandom(64))
        (target / "mp_rank_00_model_states.pt").write_bytes(os.urandom(256))
    else:
        target = _copy_checkpoint(reference_run, tmp_path)
        damage(target)
    with pytest.raises(UsageError, match=message) as error:
        check_resumable(run_config(tiny_corpus, tmp_path / "out", target, POSITIONAL))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("positional,env,differs", [
    ("run 2 gpt2bpe nano 16 0 2 1 none none 3", {}, r"experts_per_moe_layer \[8\] \(checkpoint\) vs \[16\]"),
    ("run 2 gpt2bpe nano 8 2 2 1 none none 3", {}, r"router_type top1 \(checkpoint\) vs top2"),
    ("run 2 gpt2bpe tiny 8 0 2 1 none none 3", {}, r"num_layers 2 \(checkpoint\) vs 4.*hidden_size 64"),
    ("run 2 gpt2bpe nano none 0 2 1 none none 3", {}, r"experts_per_moe_layer \[8\] \(checkpoint\) vs \[\]"),
    ("run 2 gpt2bpe nano 8 0 2 1 none z1 3", {"PRECISION": "bf16"},
     r"ZeRO 0, fp32; this run has 2 processes, EP 2, ZeRO 1, bf16: written in fp32, this run is bf16; resume "
     r"with PRECISION=fp32 \(processes, EP_SIZE and ZERO may change\)"),
    ("run 2 gpt2bpe nano 8 0 2 2 none none 3", {}, r"with sequence parallelism \(SP > 1\) a run resumes only"),
])
def test_a_load_of_another_model_or_layout_names_what_differs(reference_run, tiny_corpus, tmp_path, positional,
                                                              env, differs):
    tag = reference_run[0] / "checkpoints" / "iter_0000003"
    with pytest.raises(UsageError, match=differs) as error:
        check_resumable(run_config(tiny_corpus, tmp_path, tag, positional=positional, **env))
    assert "\n" not in str(error.value)


def test_the_launcher_refuses_before_writing_anything(reference_run, tiny_corpus, tmp_path):
    tag = _copy_checkpoint(reference_run, tmp_path)
    proof = tmp_path / "proof"
    _plant(tag / "layer_0_expert_2_mp_rank_00_model_states.pt", proof)
    out = tmp_path / "out"
    env = train_env(tiny_corpus, out, iters=12, LOAD=str(tag))
    proc = subprocess.run(["bash", str(SCRIPT), *POSITIONAL.split(), *flags(tiny_corpus)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "layer_0_expert_2_mp_rank_00_model_states.pt: refused" in lines[0], proc.stderr
    assert not out.exists() and not proof.exists()


def test_a_finished_run_says_so_without_loading(reference_run, tiny_corpus, tmp_path):
    """The checkpoint of the last iteration is only read for its state: its weights could be anything."""
    tag = _copy_checkpoint(reference_run, tmp_path, iteration=6)
    for path in tag.glob("*.pt"):
        path.write_bytes(b"not loaded")
    cfg = run_config(tiny_corpus, tmp_path / "out", tag, POSITIONAL, iters=6)
    assert verify_checkpoint(cfg, tag.parent, tag.name)["iteration"] == 6
    check_resumable(cfg)


@pytest.mark.parametrize("damage,message", [
    (lambda tag: _truncate(tag / "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt has \\d+ bytes"),
    (lambda tag: (_drop_manifest(tag), _random_bytes(tag / "mp_rank_00_model_states.pt")),
     "mp_rank_00_model_states.pt: not a whole checkpoint file"),
    (lambda tag: (tag / "model_config.json").write_text("[1, 2"), "model_config.json: not readable JSON"),
    (lambda tag: (tag / "model_config.json").write_text(json.dumps(
        {**json.loads((tag / "model_config.json").read_text()), "hidden_size": 128, "num_heads": 4})),
     "does not fit the model: size mismatch for wte.weight"),
], ids=["truncated", "random-bytes", "bad-config", "config-of-another-size"])
def test_generate_gives_one_line_for_a_bad_checkpoint(reference_run, tmp_path, capsys, damage, message):
    from launcher.generate import main

    tag = _copy_checkpoint(reference_run, tmp_path)
    damage(tag)
    assert main([str(tag), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and __import__("re").search(message, err[0]), err
