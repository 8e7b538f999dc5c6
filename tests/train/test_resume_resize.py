"""Resuming on another number of processes: 2 processes -> 1 -> 2, expert parallelism and ZeRO stage changing
with them, continues an uninterrupted 2-process run within fp32 rounding.

Routing is dropless here: with token dropping, which tokens overflow is drawn per rank (random token
selection), and those draws cannot carry over to another number of ranks."""
from __future__ import annotations

import json

import pytest
from train_helpers import Payload, flags, launch, metrics, run_config, run_dir, train_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]

MODEL = "gpt2bpe nano 8 0 2 1 none"  # top-1 MoE-8, micro batch 2, no SP, no recompute
SAVE_EVERY = "2"


def _launch(tiny_corpus, out, processes: int, zero: str, load=None):
    env = train_env(tiny_corpus, out, iters=6, **({"LOAD": load} if load else {}))
    return launch(f"run {processes} {MODEL} {zero} {SAVE_EVERY}", env,
                  *flags(tiny_corpus, "--no-drop-tokens", "--eval-interval", "6"))


@pytest.fixture(scope="module")
def zero2_run(tiny_corpus, tmp_path_factory):
    """The uninterrupted run: 2 processes, EP 2, ZeRO 2, 6 iterations, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("zero2")
    _launch(tiny_corpus, out, 2, "z2")
    return run_dir(out)


def test_two_processes_to_one_to_two(tiny_corpus, tmp_path, zero2_run):
    reference = zero2_run
    one = _launch(tiny_corpus, tmp_path / "b", 1, "none", load=reference / "checkpoints" / "iter_0000002")
    assert "loaded into 1 process, EP 1, ZeRO 0, fp32" in one.stdout and "resumed from iteration 2" in one.stdout
    single = run_dir(tmp_path / "b")
    two = _launch(tiny_corpus, tmp_path / "c", 2, "z1", load=single / "checkpoints" / "iter_0000004")
    assert "written by 1 process, EP 1, ZeRO 0, fp32, loaded into 2 processes, EP 2, ZeRO 1" in two.stdout
    again = run_dir(tmp_path / "c")

    expected, on_one, on_two = metrics(reference), metrics(single), metrics(again)
    assert sorted(on_one) == [3, 4, 5, 6] and sorted(on_two) == [5, 6]
    for i, record in [*((i, on_one[i]) for i in (3, 4)), *((i, on_two[i]) for i in (5, 6))]:
        # the optimizer state carried over: a lost moment or step count would show in the loss of the next step
        assert record["lm_loss"] == pytest.approx(expected[i]["lm_loss"], rel=2e-6, abs=0), i
        assert record["aux_loss"] == pytest.approx(expected[i]["aux_loss"], rel=1e-5), i
        assert record["grad_norm"] == pytest.approx(expected[i]["grad_norm"], rel=1e-4), i
    assert metrics(again, "valid")[6]["loss"] == pytest.approx(metrics(reference, "valid")[6]["loss"], rel=2e-6)


def test_a_planted_pickle_in_a_zero_shard_is_refused(tiny_corpus, tmp_path, zero2_run):
    """The ZeRO optimizer shard, as the same-layout load (DeepSpeed's engine) and the resharding reader see it."""
    import shutil

    import torch

    from launcher.errors import UsageError
    from launcher.preflight import check_resumable
    from launcher.training.checkpoint import TRAINER_STATE, Layout, SafeLoading
    from launcher.training.reshard import SavedOptimizerState
    from model.gpt import GPTMoE

    tag = tmp_path / "ckpt" / "iter_0000002"
    shutil.copytree(zero2_run / "checkpoints" / tag.name, tag)
    shard = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    proof = tmp_path / "proof"
    torch.save({**torch.load(shard, weights_only=False), "planted": Payload(proof)}, shard)
    state = json.loads((tag / TRAINER_STATE).read_text())
    state["files"][shard.name] = shard.stat().st_size
    (tag / TRAINER_STATE).write_text(json.dumps(state))

    refused = f"{shard.name}: refused: its pickle names builtins.exec"
    with pytest.raises(UsageError, match=refused):  # same layout: DeepSpeed loads it
        check_resumable(run_config(tiny_corpus, tmp_path / "out", tag, positional=f"run 2 {MODEL} z2 2", iters=6))
    with pytest.raises(UsageError, match=refused):  # another layout: resharded
        check_resumable(run_config(tiny_corpus, tmp_path / "out", tag, positional=f"run 1 {MODEL} none 2", iters=6))
    with pytest.raises(UsageError, match=refused):
        SafeLoading(None).load(str(shard), map_location="cpu")
    from model.config import GPTMoEConfig

    model = GPTMoE(GPTMoEConfig.from_dict({**json.loads((tag / "model_config.json").read_text()), "ep_size": 1}))
    with pytest.raises(UsageError, match=refused):
        SavedOptimizerState(tag, Layout.of_checkpoint(tag, state), model)
    assert not proof.exists()
