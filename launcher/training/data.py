"""Which tokens each process sees, as a pure function of (iteration, micro step, rank).

The GPT datasets are shuffled once, deterministically by seed, when they are built; iteration i then takes
samples [i x global batch, (i+1) x global batch) of the train split, so a resumed run needs nothing but the
iteration to continue the exact data order. Within an iteration, micro step m and data-parallel rank d take
`micro_batch` consecutive samples; the ranks of one sequence-parallel group take the same sample and each
its slice of the sequence.

A data source (`PretrainData` here, `launcher.training.sft_data.FinetuneData` for fine-tuning) gives the
trainer `train_batch(iteration, micro_step)` and `valid_batches()`: one validation pass of this rank, the
same number of batches on every rank (the expert-parallel all-to-all is collective).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from launcher.training.distributed import Placement


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T_local)
    labels: torch.Tensor  # (B, T_local), already shifted: labels[:, t] is the token after input_ids[:, t]
    position_ids: torch.Tensor | None  # (1, T_local), only under sequence parallelism

    @property
    def num_tokens(self) -> int:
        return self.labels.numel()


def eval_samples(cfg: RunConfig) -> int:
    """One validation pass: the same `eval_iters` global micro batches each time, so evaluations compare."""
    return cfg.eval_iters * cfg.micro_batch * cfg.dp_size


def build_datasets(cfg: RunConfig, placement: Placement, barrier, vocab_size: int):
    """(train, valid) for this run. Rank 0 builds the shuffle indices first, the others then read them.
    `vocab_size`: the tokenizer's, so data tokenized with another tokenizer is refused."""
    from launcher.data.gpt_dataset import build_gpt_datasets

    num_samples = (cfg.train_iters * cfg.global_batch, max(1, eval_samples(cfg)), 0)

    def build():
        # the index is cached beside the data
        train, valid, _ = build_gpt_datasets(cfg.resolved_data_path, cfg.split, cfg.model.seq_len, cfg.seed,
                                             num_samples, vocab_size=vocab_size)
        return train, valid

    if placement.is_main:
        datasets = build()
    barrier()
    if not placement.is_main:
        datasets = build()
    return datasets


class Batches:
    """Micro batches for one process."""

    def __init__(self, cfg: RunConfig, placement: Placement):
        self.micro = cfg.micro_batch
        self.global_batch = cfg.global_batch
        self.dp_size = cfg.dp_size
        self.seq_len = cfg.model.seq_len
        self.placement = placement

    def _indices(self, base: int, micro_step: int) -> range:
        start = base + (micro_step * self.dp_size + self.placement.dp_rank) * self.micro
        return range(start, start + self.micro)

    def _collate(self, dataset, indices: range) -> Batch:
        samples = np.stack([np.asarray(dataset[i], dtype=np.int64) for i in indices])  # (B, T + 1)
        tokens = torch.from_numpy(samples)
        return self.place(tokens[:, :-1], tokens[:, 1:])

    def place(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Batch:
        """Whole sequences (B, T) -> this rank's Batch: its slice of them under sequence parallelism, on its
        device. `labels` already shifted (labels[:, t] is the token after input_ids[:, t], or -100)."""
        position_ids = None
        p = self.placement
        if p.sp_size > 1:
            chunk = self.seq_len // p.sp_size
            lo, hi = p.sp_rank * chunk, (p.sp_rank + 1) * chunk
            input_ids, labels = input_ids[:, lo:hi], labels[:, lo:hi]
            position_ids = torch.arange(lo, hi)[None]
        move = lambda t: None if t is None else t.contiguous().to(p.device, non_blocking=True)  # noqa: E731
        return Batch(move(input_ids), move(labels), move(position_ids))

    def train(self, dataset, iteration: int, micro_step: int) -> Batch:
        return self._collate(dataset, self._indices(iteration * self.global_batch, micro_step))

    def valid(self, dataset, eval_step: int) -> Batch:
        return self._collate(dataset, self._indices(0, eval_step))


class PretrainData:
    """Pretraining's data source: packed samples of the indexed dataset (DATA_PATH), split train/valid."""

    def __init__(self, cfg: RunConfig, placement: Placement, barrier, vocab_size: int):
        self.train, self.valid = build_datasets(cfg, placement, barrier, vocab_size)
        self.batches = Batches(cfg, placement)
        self.eval_iters = cfg.eval_iters

    def train_batch(self, iteration: int, micro_step: int) -> Batch:
        return self.batches.train(self.train, iteration, micro_step)

    def valid_batches(self):
        if self.valid is None or len(self.valid) == 0:
            return
        for step in range(self.eval_iters):
            yield self.batches.valid(self.valid, step)
