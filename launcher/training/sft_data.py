"""Fine-tuning's data source: prompt/target examples (launcher.data.sft.SFTDataset), epoch by epoch.

Epoch e visits TRAIN's items in an order drawn from (seed, e); iteration i is step i mod `iters_per_epoch` of
epoch i // `iters_per_epoch` and takes the next global batch of that order (the last batch of an epoch is
completed from the start of the same order, so every item is seen each epoch). Being a pure function of the
iteration, the order continues exactly on resume. Within an iteration the micro steps and data-parallel ranks
split the global batch as in pretraining (launcher.training.data.Batches).

Validation is one pass over VALID, one example per sequence (no packing, so the figure does not depend on
--pack), loss on target tokens only; a rank whose share runs out pads its last batch with an item that has
nothing to predict, so every rank runs the same number of forward passes.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from launcher.data.sft import IGNORE_INDEX, SFTDataset, read_pairs
from launcher.errors import UsageError
from launcher.training.data import Batch, Batches
from model import shift_labels

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from launcher.data.tokenizer import Tokenizer
    from launcher.training.distributed import Placement


def load_examples(cfg: RunConfig, tokenizer: Tokenizer) -> tuple[SFTDataset, SFTDataset]:
    """(train, valid) datasets of a fine-tuning run, as the launcher and every rank build them."""
    ft, seq_len = cfg.finetune, cfg.model.seq_len
    keys = dict(prompt_key=ft.prompt_key, target_key=ft.target_key)
    return (SFTDataset(ft.train_path, tokenizer, seq_len, pack=ft.pack, **keys),
            SFTDataset(ft.valid_path, tokenizer, seq_len, pack=False, **keys))


def iters_per_epoch(train_items: int, global_batch: int) -> int:
    return math.ceil(train_items / global_batch)


def data_digest(cfg: RunConfig) -> str:
    """What decides the training items: TRAIN's bytes, packing, the sequence length and the .jsonl fields."""
    ft = cfg.finetune
    h = hashlib.sha256(Path(ft.train_path).read_bytes())
    h.update(f"pack={ft.pack} seq_len={cfg.model.seq_len} keys={ft.prompt_key},{ft.target_key}".encode())
    return h.hexdigest()[:16]


class FinetuneData:
    def __init__(self, cfg: RunConfig, placement: Placement, tokenizer: Tokenizer):
        self.cfg = cfg
        self.placement = placement
        self.train, self.valid = load_examples(cfg, tokenizer)
        self.iters_per_epoch = iters_per_epoch(len(self.train), cfg.global_batch)
        if self.iters_per_epoch * cfg.finetune.epochs != cfg.train_iters:
            raise UsageError(f"TRAIN_DATASET_PATH: {cfg.finetune.train_path} now gives {len(self.train)} sequences "
                             f"({self.iters_per_epoch} iterations per epoch); the run was launched for "
                             f"{cfg.train_iters // cfg.finetune.epochs}: launch it again")
        self.batches = Batches(cfg, placement)
        self._order: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch` (0-based)'s permutation of the training items."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.cfg.seed, epoch])
            self._order = (epoch, rng.permutation(len(self.train)))
        return self._order[1]

    def _collate(self, items: list[dict]) -> Batch:
        input_ids = torch.stack([item["input_ids"] for item in items])  # (B, T)
        # SFTDataset's labels are aligned with input_ids; GPTMoE.forward scores position t on the token at t + 1
        labels = shift_labels(torch.stack([item["labels"] for item in items]))  # (B, T)
        return self.batches.place(input_ids, labels)

    def train_batch(self, iteration: int, micro_step: int) -> Batch:
        cfg, p = self.cfg, self.placement
        epoch, step = divmod(iteration, self.iters_per_epoch)
        order = self.epoch_order(epoch)
        start = step * cfg.global_batch + (micro_step * cfg.dp_size + p.dp_rank) * cfg.micro_batch
        return self._collate([self.train[int(order[(start + j) % len(order)])] for j in range(cfg.micro_batch)])

    def valid_batches(self):
        cfg, p = self.cfg, self.placement
        blank = dict(self.valid[0], labels=torch.full((cfg.model.seq_len,), IGNORE_INDEX, dtype=torch.long))
        for step in range(cfg.eval_iters):
            start = (step * cfg.dp_size + p.dp_rank) * cfg.micro_batch
            indices = range(start, start + cfg.micro_batch)
            yield self._collate([self.valid[i] if i < len(self.valid) else blank for i in indices])

    def sample_pairs(self, n: int) -> list[tuple[str, str]]:
        """The first `n` (prompt, target) pairs of VALID, for the samples written after each epoch."""
        ft = self.cfg.finetune
        return read_pairs(ft.valid_path, ft.prompt_key, ft.target_key)[:n]


def valid_steps(valid_items: int, micro_batch: int, dp_size: int) -> int:
    """Validation steps that cover VALID once, every rank taking micro_batch items a step."""
    return math.ceil(valid_items / (micro_batch * dp_size))
