"""The pretraining loop of one process: build the engine, resume, train, evaluate, checkpoint, stop.

Each iteration: `grad_accum` micro batches forward and backward, then ONE all-reduce of a short vector
(losses, a non-finite flag, the stop request, grad-norm parts) that every rank needs anyway, and only then
the optimizer step. So a NaN/inf loss is caught before it reaches the weights, and a SIGTERM seen by any
rank stops every rank after the same iteration.

What it trains on is its data source (`build_data`); `launcher.training.finetune.FinetuneTrainer` is this loop
with SFT data, pretrained weights and what fine-tuning does at the end of each epoch.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from launcher.errors import UsageError
from launcher.job import tell_launcher_training_began
from launcher.training.checkpoint import Checkpointer, find_checkpoint
from launcher.training.data import PretrainData
from launcher.training.distributed import Placement, all_reduce_sum, barrier, init_distributed, shutdown_distributed
from launcher.training.metrics import ExpertLoad, MetricsWriter, flops_per_token, format_train_line
from launcher.training.optim import build_optimizer, set_lr
from launcher.training.schedule import LRSchedule
from launcher.training.signals import StopRequest
from model.moe.router import apply_expert_load, pending_expert_load

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from model.config import GPTMoEConfig

# Slots of the per-iteration all-reduce.
LM, AUX, Z, NONFINITE, STOP, DENSE_SQ, EXPERT_SQ = range(7)


class TrainingStopped(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says where and what to try."""


def engine_config(cfg: RunConfig, ds_config_path: Path | None) -> dict:
    """The DeepSpeed JSON the launcher wrote beside the run config (or the same, rebuilt)."""
    if ds_config_path is not None and ds_config_path.is_file():
        ds = json.loads(ds_config_path.read_text())
    else:
        from launcher.ds_config import build_ds_config

        ds = build_ds_config(cfg)
    if cfg.sp_size > 1:
        # DeepSpeed sees the ranks of a sequence-parallel group as data-parallel ranks (it averages gradients
        # over all of them, which is right: each holds the mean loss of its slice of the same samples), so its
        # batch-size check counts micro batches per rank over the whole world.
        ds = dict(ds, train_batch_size=cfg.micro_batch * cfg.grad_accum * cfg.world_size)
    return ds


def build_model(cfg: RunConfig, mcfg: GPTMoEConfig, placement: Placement):
    from model.gpt import GPTMoE
    from model.parallel import expert_parallel_rank

    # The same seed on every rank: the model draws its experts' seed from it and initialises each expert by
    # its global id, so expert-parallel ranks hold different experts of one consistent model.
    torch.manual_seed(cfg.seed)
    model = GPTMoE(mcfg, ep_rank=expert_parallel_rank(placement.rank, mcfg.ep_size))
    if cfg.sp_size > 1:
        from model.parallel import apply_sequence_parallel

        apply_sequence_parallel(model, placement.sp_group)
    # From here each rank draws its own random numbers (random token selection, dropout).
    torch.manual_seed(cfg.seed + 1 + placement.rank)
    return model


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config_path: Path | None = None):
        import deepspeed
        from launcher.data.tokenizer import load_tokenizer

        self.cfg = cfg
        self.placement = p = init_distributed(cfg)
        self.tokenizer = tokenizer = load_tokenizer(cfg.resolved_tokenizer_path, kind=cfg.tokenizer)
        self.mcfg = cfg.model_config(tokenizer.vocab_size)
        model = build_model(cfg, self.mcfg, p)
        self.upcycled_from = None  # the dense checkpoint an upcycled run started from
        self.initial_weights(model)
        # Recompute (sel/full) is the model's own torch.utils.checkpoint; nothing to configure on DeepSpeed's side.
        ds = engine_config(cfg, ds_config_path)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=ds)
        # ZeRO and the mixed-precision optimizers report the grad norm they clipped with; plain fp32 does not.
        self.own_grad_norm = not hasattr(self.engine.optimizer, "_global_grad_norm")
        self.expert_replicas = cfg.world_size // cfg.model.ep_size  # ranks holding each expert (expert-data-parallel)
        self.data = self.build_data()
        self.schedule = LRSchedule.from_run_config(cfg)
        self.checkpointer = Checkpointer(cfg, self.mcfg, p, self.engine, cfg.resolved_tokenizer_path)
        self.flops_per_token = flops_per_token(self.mcfg, cfg.model.seq_len)

    # ------------------------------------------------------------------ what is trained, on what
    def initial_weights(self, model) -> None:
        """Before the engine takes `model`: pretraining starts from the model's own initialisation, or, in a fresh
        run with --upcycle-from, from the dense checkpoint's weights (launcher/training/upcycle.py)."""
        cfg = self.cfg
        if cfg.upcycle_from and find_checkpoint(cfg.run_dir / "checkpoints") is None:  # else the run resumes
            from launcher.training.upcycle import upcycle_model, upcycle_source

            self.upcycled_from = upcycle_source(cfg, self.mcfg)
            upcycle_model(model, self.upcycled_from)

    def build_data(self):
        return PretrainData(self.cfg, self.placement, barrier, self.tokenizer.vocab_size)

    # ------------------------------------------------------------------ one iteration
    def _grad_sq(self) -> torch.Tensor:
        """(dense, this rank's experts) squared grad norms, for the fp32 no-ZeRO case DeepSpeed does not report."""
        from deepspeed.moe.utils import is_moe_param

        sq = torch.zeros(2, dtype=torch.float64, device=self.placement.device)
        for param in self.engine.module.parameters():
            if param.grad is not None:
                sq[int(is_moe_param(param))] += param.grad.detach().double().pow(2).sum()
        return sq

    def train_iteration(self, iteration: int, stop: StopRequest, load: ExpertLoad) -> list[float]:
        """0-based `iteration`; returns the all-reduced vector (see the slots above), summed over ranks."""
        cfg, engine = self.cfg, self.engine
        set_lr(engine.optimizer, self.schedule(iteration))
        sums = torch.zeros(3, dtype=torch.float64, device=self.placement.device)  # lm, aux, z; no host sync
        for micro_step in range(cfg.grad_accum):
            batch = self.data.train_batch(iteration, micro_step)
            out = engine(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids)
            aux = _as_tensor(out.aux_loss, out.loss)
            z = _as_tensor(out.z_loss, out.loss)
            engine.backward(out.loss + aux + z)
            sums += torch.stack([out.loss.detach(), aux.detach(), z.detach()]).double()
            load.add(out.moe_stats)
            if micro_step < cfg.grad_accum - 1:
                engine.step()  # DeepSpeed's convention: a no-op inside the accumulation window
        nonfinite = (~torch.isfinite(sums).all()).double().reshape(1)
        stop_flag = torch.full((1,), float(stop.requested is not None), dtype=torch.float64, device=sums.device)
        grad_sq = self._grad_sq() if self.own_grad_norm else sums.new_zeros(2)
        # Expert-bias routers' load of this step rides along: the bias moves by the load of every rank.
        expert_load = pending_expert_load(engine.module)
        parts = [sums / cfg.grad_accum, nonfinite, stop_flag, grad_sq]
        vector = torch.cat(parts if expert_load is None else [*parts, expert_load.to(sums.device)])
        reduced_t = all_reduce_sum(vector, self.placement.device)
        reduced = reduced_t[:EXPERT_SQ + 1].tolist()  # the one host sync of the iteration
        if reduced[NONFINITE] and cfg.precision != "fp16":
            # fp16 has DeepSpeed's loss scaler, which skips the step and lowers the scale; fp32/bf16 have none.
            world = self.cfg.world_size
            raise TrainingStopped(
                f"iteration {iteration + 1}: the loss is not finite (lm {reduced[LM] / world:.4g}, aux "
                f"{reduced[AUX] / world:.4g}, z {reduced[Z] / world:.4g}) on {int(reduced[NONFINITE])} of {world} "
                f"ranks; the step was not applied. Resume from the last checkpoint with a lower --lr, a longer "
                f"warm-up (WARMUP_TOKENS) or --clip-grad, or check the data")
        engine.step()
        if expert_load is not None:
            apply_expert_load(engine.module, reduced_t[EXPERT_SQ + 1:])
        return reduced

    def grad_norm(self, reduced: list[float]) -> float:
        if self.own_grad_norm:
            world = self.cfg.world_size
            return math.sqrt(reduced[DENSE_SQ] / world + reduced[EXPERT_SQ] / self.expert_replicas)
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """LM loss per predicted token over one validation pass of the data source (every rank's share), and
        perplexity; {} when there is nothing to validate on."""
        self.engine.eval()
        total, tokens = 0.0, 0
        for batch in self.data.valid_batches():
            loss = self.engine(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids).loss
            n = int((batch.labels != -100).sum())
            if n:  # a batch with nothing to predict (padding a rank's share) has a NaN mean
                total += float(loss) * n
                tokens += n
        self.engine.train()
        total, tokens = all_reduce_sum([total, tokens], self.placement.device).tolist()
        if not tokens:
            return {}
        loss = total / tokens
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}

    # ------------------------------------------------------------------ the run
    def run(self, stop: StopRequest) -> int:
        cfg, p = self.cfg, self.placement
        start = self.checkpointer.resume()
        writer = MetricsWriter(cfg, p.is_main, start)
        # The resume's collectives are behind every rank: from here a signal means "save, then stop".
        stop.training_begins()
        tell_launcher_training_began()
        if start >= cfg.train_iters:
            writer.message(f"already trained: {start} of {cfg.train_iters} iterations are in the checkpoint")
        elif start:
            writer.message(f"resumed from iteration {start} ({start * cfg.tokens_per_iter:,} tokens)")
        else:
            self.before_training(writer)
        load = ExpertLoad(self.mcfg.moe_layer_indices())
        interval = {"lm": 0.0, "aux": 0.0, "z": 0.0, "iters": 0, "time": 0.0}
        skipped_before = self.engine.skipped_steps
        last_eval = None
        iteration = start
        try:
            while iteration < cfg.train_iters:
                t0 = time.perf_counter()
                reduced = self.train_iteration(iteration, stop, load)
                elapsed = time.perf_counter() - t0
                iteration += 1
                world = cfg.world_size
                interval["lm"] += reduced[LM] / world
                interval["aux"] += reduced[AUX] / world
                interval["z"] += reduced[Z] / world
                interval["iters"] += 1
                interval["time"] += elapsed
                writer.step(cfg.tokens_per_iter / elapsed, float(reduced[LM]) / world)
                # Every rank sees the same iteration, so an exit interval stops them together, as a signal does.
                leave = bool(reduced[STOP]) or bool(cfg.exit_interval and iteration % cfg.exit_interval == 0
                                                    and iteration < cfg.train_iters)
                if iteration % cfg.log_interval == 0 or iteration == cfg.train_iters or leave:
                    self._log(writer, iteration, interval, reduced, load, skipped_before)
                    skipped_before = self.engine.skipped_steps
                if iteration % cfg.eval_interval == 0 or iteration == cfg.train_iters:
                    last_eval = self._eval(writer, iteration)
                if iteration % cfg.save_interval == 0 or iteration == cfg.train_iters or leave:
                    self._save(writer, iteration)
                if leave:
                    why = ((stop.requested or "stop request from another rank") if reduced[STOP]
                           else f"--exit-interval {cfg.exit_interval}")
                    writer.message(f"{why}: checkpoint saved at iteration {iteration}; run the same command again "
                                   "to resume")
                    return 0
        finally:
            writer.close()
        if last_eval and p.is_main:
            print(f"done: {iteration} iterations, {iteration * cfg.tokens_per_iter:,} tokens; validation loss "
                  f"{last_eval['loss']:.4f}, perplexity {last_eval['ppl']:.2f}", flush=True)
        return 0

    def before_training(self, writer) -> None:
        """A run starting from iteration 0 (not resumed): pretraining only says where an upcycled run started."""
        if self.upcycled_from:
            writer.message(f"upcycled from {self.upcycled_from}: every expert starts as its layer's dense "
                           "feed-forward weights, routers fresh")

    def _log(self, writer, iteration, interval, reduced, load, skipped_before) -> None:
        n = interval["iters"]
        tokens_per_s = n * self.cfg.tokens_per_iter / interval["time"]
        values = {"lm_loss": interval["lm"] / n, "aux_loss": interval["aux"] / n, "z_loss": interval["z"] / n,
                  "lr": self.schedule(iteration - 1), "grad_norm": self.grad_norm(reduced),
                  "tokens_per_s": tokens_per_s,
                  "tflops_per_process": tokens_per_s * self.flops_per_token / self.cfg.world_size / 1e12,
                  "tokens": iteration * self.cfg.tokens_per_iter,
                  "eta_s": (self.cfg.train_iters - iteration) * interval["time"] / n,
                  "skipped_steps": self.engine.skipped_steps - skipped_before,
                  "experts": load.reduce(self.placement.device)}
        writer.message(format_train_line(iteration, self.cfg.train_iters, values))
        writer.record("train", iteration, values)
        interval.update(lm=0.0, aux=0.0, z=0.0, iters=0, time=0.0)

    def _eval(self, writer, iteration) -> dict:
        result = self.evaluate()
        if result:
            writer.message(f"validation at iteration {iteration}: loss {result['loss']:.4f}, "
                           f"perplexity {result['ppl']:.2f}")
            writer.record("valid", iteration, result)
            writer.flush()
        return result

    def _save(self, writer, iteration, state: dict | None = None) -> Path | None:
        """Collective; returns the tag folder written (None: this iteration was saved already)."""
        t0 = time.perf_counter()
        tag_dir = self.checkpointer.save(iteration, iteration * self.cfg.tokens_per_iter, state)
        if tag_dir is not None:
            writer.message(f"checkpoint saved: {tag_dir} ({time.perf_counter() - t0:.1f} s)")
        return tag_dir


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    """The model's aux/z losses may be plain 0 for a dense model."""
    if value is None:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def pretrain(cfg: RunConfig, ds_config_path: Path | None = None, stop: StopRequest | None = None) -> int:
    """Run (or resume) the training `cfg` describes on this process; returns the exit code.

    `stop`: the worker's StopRequest, installed before anything else (launcher.pretrain); kept until the very
    end: a second SIGTERM (a cluster signals every process) must not kill a rank while it saves or leaves the
    process group. Until the first iteration a signal raises StartupStopped, which the caller handles."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury the progress
    if stop is None:
        stop = StopRequest(startup=True).install()
    if cfg.finetune:
        from launcher.training.finetune import FinetuneTrainer as trainer_class
    else:
        trainer_class = Trainer
    try:
        trainer = trainer_class(cfg, ds_config_path)
    except UsageError as exc:  # e.g. data tokenized with another tokenizer: every rank finds it
        _report(exc)
        return 2
    try:
        code = trainer.run(stop)
    except (UsageError, TrainingStopped) as exc:  # a bad LOAD, a non-finite loss
        code = 2 if isinstance(exc, UsageError) else 1
        _report(exc)
    shutdown_distributed()
    return code


def _report(exc: Exception) -> None:
    """One line from rank 0 (every rank hit the same error)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)
