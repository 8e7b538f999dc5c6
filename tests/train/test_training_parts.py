"""The training loop's parts, in process: schedule, data order, checkpoint pointer, metrics, signals."""
from __future__ import annotations

import json
import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from launcher.cli import build_run_config
from launcher.errors import UsageError
from launcher.training.checkpoint import Checkpointer, find_checkpoint, tag_for
from launcher.training.data import Batches
from launcher.training.distributed import Placement
from launcher.training.metrics import ExpertLoad, MetricsWriter, flops_per_token, format_train_line
from launcher.training.optim import param_groups
from launcher.training.schedule import LRSchedule
from launcher.training.signals import StopRequest


# ---------------------------------------------------------------- schedule
def test_schedule_warms_up_then_decays_to_min_lr():
    s = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=4, train_iters=14, decay="linear")
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0 and s(9) == pytest.approx(0.55) and s(14) == pytest.approx(0.1) and s(100) == 0.1
    c = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=4, train_iters=14, decay="cosine")
    assert c(4) == 1.0 and c(9) == pytest.approx(0.55) and c(14) == pytest.approx(0.1)
    assert c(6) > s(6) and c(12) < s(12)  # cosine stays high longer, then falls faster
    assert LRSchedule(1.0, 0.1, 0, 10, "constant")(7) == 1.0
    assert LRSchedule(1.0, 0.1, 0, 10)(0) == 1.0  # no warm-up


def test_schedule_is_token_based():
    cfg = build_run_config("run 2 gpt2bpe nano 8 0 2 1 none none 10".split(),
                           {"TRAIN_TOKENS": str(100 * 512), "WARMUP_TOKENS": str(10 * 512), "SEQ_LEN": "64",
                            "GLOBAL_BATCH_SIZE": "8"})
    s = LRSchedule.from_run_config(cfg)
    assert (s.warmup_iters, s.train_iters) == (10, 100)


# ---------------------------------------------------------------- data order
def _placement(rank, sp=1):
    return Placement(rank=rank, local_rank=rank, sp_size=sp, device=torch.device("cpu"))


def _batch_cfg(micro_batch, global_batch, seq_len, dp_size):
    return SimpleNamespace(micro_batch=micro_batch, global_batch=global_batch, dp_size=dp_size,
                           model=SimpleNamespace(seq_len=seq_len))


class _Samples:
    """Sample i = [i*100, i*100 + 1, ...]: the ids say which sample and which position a token came from."""

    def __init__(self, seq_len):
        self.seq_len = seq_len

    def __getitem__(self, i):
        return torch.arange(i * 100, i * 100 + self.seq_len + 1).numpy()


def test_each_iteration_takes_its_global_batch_once():
    cfg = _batch_cfg(micro_batch=2, global_batch=16, seq_len=8, dp_size=2)  # 2 ranks x 2 micro x 4 accumulation
    data = _Samples(8)
    for iteration in (0, 5):
        seen = []
        for rank in (0, 1):
            batches = Batches(cfg, _placement(rank))
            for micro_step in range(4):
                b = batches.train(data, iteration, micro_step)
                assert b.input_ids.shape == (2, 8) and torch.equal(b.labels[:, :-1], b.input_ids[:, 1:])
                seen += (b.input_ids[:, 0] // 100).tolist()
        assert sorted(seen) == list(range(iteration * 16, iteration * 16 + 16))


def test_sequence_parallel_ranks_share_a_sample_and_split_it():
    cfg = _batch_cfg(micro_batch=1, global_batch=2, seq_len=8, dp_size=2)  # 4 ranks, SP 2 -> 2 data-parallel ranks
    data = _Samples(8)
    parts = [Batches(cfg, _placement(r, sp=2)).train(data, 0, 0) for r in range(4)]
    assert torch.equal(torch.cat([parts[0].input_ids, parts[1].input_ids], 1), torch.arange(8)[None])
    assert torch.equal(torch.cat([parts[2].labels, parts[3].labels], 1), torch.arange(101, 109)[None])
    assert parts[1].position_ids.tolist() == [[4, 5, 6, 7]] and parts[0].position_ids.tolist() == [[0, 1, 2, 3]]


# ---------------------------------------------------------------- optimizer groups
def test_expert_params_get_their_own_groups_and_no_decay_on_vectors():
    from model.config import GPTMoEConfig
    from model.gpt import GPTMoE

    model = GPTMoE(GPTMoEConfig.from_size("nano", vocab_size=300, seq_len=16, num_experts=4))
    groups = param_groups(model, 0.1)
    moe = [g for g in groups if g.get("moe")]
    assert moe and all(p.allreduce is False for g in moe for p in g["params"])
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim < 2 for p in g["params"]))
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- checkpoints
class _FailingEngine:
    """Writes a partial tag folder, then dies as a crash during a save would."""

    def save_checkpoint(self, folder, tag, client_state, save_latest):
        assert save_latest is False  # DeepSpeed's own pointer would move before the other ranks finish
        os.makedirs(os.path.join(folder, tag))
        open(os.path.join(folder, tag, "mp_rank_00_model_states.pt"), "wb").close()
        raise OSError("disk full")


def _complete_checkpoint(folder, iteration):
    tag = folder / tag_for(iteration)
    tag.mkdir(parents=True)
    (tag / "trainer_state.json").write_text(json.dumps({"iteration": iteration}))
    (folder / "latest").write_text(tag.name)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_current(tmp_path):
    cfg = build_run_config("run 1 gpt2bpe nano 8 0 2 1 none none 10".split(), {"OUTPUT_BASEPATH": str(tmp_path)})
    folder = cfg.run_dir / "checkpoints"
    _complete_checkpoint(folder, 10)
    checkpointer = Checkpointer(cfg, None, _placement(0), _FailingEngine(), str(tmp_path / "no-tokenizer"))
    with pytest.raises(OSError):
        checkpointer.save(20, 20 * 512)
    assert (folder / "latest").read_text().strip() == "iter_0000010"
    assert find_checkpoint(cfg.run_dir) == (folder, "iter_0000010")


def test_a_bad_load_names_the_setting(tmp_path):
    cfg = build_run_config("run 1 gpt2bpe nano 8 0 2 1 none none 10".split(),
                           {"OUTPUT_BASEPATH": str(tmp_path), "LOAD": str(tmp_path / "no-such-run")})
    with pytest.raises(UsageError, match=r"^LOAD: got '.*no-such-run'; allowed: a run folder"):
        Checkpointer(cfg, None, _placement(0), None, str(tmp_path)).resume()


def test_find_checkpoint_accepts_run_checkpoints_and_tag_folders(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    assert find_checkpoint(tmp_path / "run") is None
    _complete_checkpoint(folder, 7)
    for path in (tmp_path / "run", folder, folder / "iter_0000007"):
        assert find_checkpoint(path) == (folder, "iter_0000007")
    (folder / "latest").write_text("iter_0000099")  # names a tag that never completed
    assert find_checkpoint(folder) is None


# ---------------------------------------------------------------- metrics
def test_expert_load_imbalance_and_dropped_fraction():
    load = ExpertLoad([1, 3])
    for counts in ([6, 2, 0, 0], [0, 0, 2, 6]):
        load.add([{"layer": 1, "expert_counts": torch.tensor(counts), "dropped_fraction": torch.tensor(0.25),
                   "entropy": torch.tensor(0.5 if counts[0] else 1.0)},
                  {"layer": 3, "expert_counts": torch.tensor([4, 4, 4, 4]), "dropped_fraction": torch.tensor(0.0)}])
    out = load.reduce(torch.device("cpu"))  # no process group: this rank's sums
    # per micro batch 6/2 = 3 both times; the interval's summed counts [6, 2, 2, 6] would say 1.5
    assert out[1]["imbalance"] == pytest.approx(3.0) and out[1]["dropped"] == pytest.approx(0.25)
    assert out[1]["load"] == [0.375, 0.125, 0.125, 0.375]
    assert out[1]["entropy"] == pytest.approx(0.75)  # the mean over micro batches
    assert out[3]["imbalance"] == 1.0 and out[3]["dropped"] == 0.0
    assert math.isnan(out[3]["entropy"])  # a layer whose router reported none
    assert load.reduce(torch.device("cpu")) == {}  # reset for the next interval
    line = format_train_line(10, 100, {"lm_loss": 3.0, "aux_loss": 0.01, "z_loss": 0.0, "lr": 1e-3, "grad_norm": 0.5,
                                       "tokens_per_s": 1234.0, "tflops_per_process": 0.01, "eta_s": 3725,
                                       "skipped_steps": 0, "experts": out})
    assert line.startswith("iter  10/100 | lm loss 3.0000 | aux 0.0100 | lr 1.000e-03 | grad norm 0.500")
    assert "1,234 tok/s" in line and "eta 1:02:05" in line and "dropped 12.5%" in line
    assert "load max/mean L1:3.00 L3:1.00" in line
    assert line.endswith("router entropy 0.750")  # layers without an entropy are left out of the mean


def test_model_flops_count_active_parameters():
    from model.config import GPTMoEConfig

    dense = GPTMoEConfig.from_size("tiny", vocab_size=4096, seq_len=128)
    moe = GPTMoEConfig.from_size("tiny", vocab_size=4096, seq_len=128, num_experts=8)
    assert flops_per_token(moe, 128) == pytest.approx(flops_per_token(dense, 128), rel=0.01)  # top-1: +gate only
    assert flops_per_token(dense, 128) == 6 * dense.param_counts()["active"] + 12 * 4 * 128 * 128


def test_metrics_file_is_rewritten_from_the_resumed_iteration(tmp_path):
    cfg = build_run_config("run 1 gpt2bpe nano 8 0 2 1 none none 10".split(), {"OUTPUT_BASEPATH": str(tmp_path)})
    writer = MetricsWriter(cfg, enabled=True, start_iteration=0)
    for i in (1, 2, 3):
        writer.record("train", i, {"lm_loss": float(i), "experts": {1: {"imbalance": 1.5, "load": [0.5, 0.5]}}})
    writer.close()
    writer = MetricsWriter(cfg, enabled=True, start_iteration=2)  # resumed from iteration 2's checkpoint
    writer.record("train", 3, {"lm_loss": 30.0})
    writer.close()
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["lm_loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert math.isclose(records[0]["experts"]["1"]["imbalance"], 1.5)


# ---------------------------------------------------------------- signals
def test_sigterm_is_recorded_not_fatal():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == previous
