"""The optimizer a run hands to `deepspeed.initialize`, with MoE-aware parameter groups.

Which Adam:
  - OFFLOAD=cpu: DeepSpeed's CPU Adam (a compiled op, cached in TORCH_EXTENSIONS_DIR; ~35 s to build once
    on a 2-core machine), which ZeRO-Offload expects for the optimizer states it keeps in host memory;
  - GPUs: DeepSpeed's FusedAdam;
  - CPU otherwise: torch's AdamW (DeepSpeed's own optimizers compile for a minute on CPU and are no faster).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from launcher.config import RunConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices only (biases and norm scales keep theirs, as Megatron does); expert parameters split
    into their own groups, which ZeRO needs to reduce them over the expert-data-parallel ranks only."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """cfg: RunConfig. The lr set here is replaced every step by the schedule."""
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.offload == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, adamw_mode=True)
    if cfg.device == "cuda":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)


def set_lr(optimizer, lr: float) -> None:
    """Every group, expert groups included, follows the one schedule."""
    for group in optimizer.param_groups:
        group["lr"] = lr
