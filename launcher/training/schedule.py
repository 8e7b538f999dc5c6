"""Learning rate as a pure function of the iteration: linear warm-up, then decay to the minimum.

Token based, as the launch contract says: the warm-up lasts WARMUP_TOKENS and the decay reaches the minimum
after TRAIN_TOKENS; with a fixed global batch both are whole iterations (`RunConfig.warmup_iters`,
`train_iters`). Being a pure function of the iteration, the schedule needs no state in a checkpoint and a
resumed run continues it exactly, whatever steps a loss scaler skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.config import RunConfig


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    min_lr: float
    warmup_iters: int
    train_iters: int
    decay: str = "linear"  # linear | cosine | constant

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> "LRSchedule":
        return cls(lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters, train_iters=cfg.train_iters,
                   decay=cfg.lr_decay)

    def __call__(self, iteration: int) -> float:
        """lr for the optimizer step that ends 0-based `iteration` (the first step sees lr / warmup_iters)."""
        if iteration < self.warmup_iters:
            return self.lr * (iteration + 1) / self.warmup_iters
        if self.decay == "constant":
            return self.lr
        span = self.train_iters - self.warmup_iters
        progress = min(1.0, (iteration - self.warmup_iters) / span) if span > 0 else 1.0
        if self.decay == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - progress
        return self.min_lr + (self.lr - self.min_lr) * factor
