"""Writing a model made in this process (pruned, converted) as a checkpoint our trainer wrote.

The files come from a real DeepSpeed engine and the trainer's own Checkpointer, in one process: DeepSpeed's
layout (one file per expert, the ZeRO-0 optimizer file), run_config.json, model_config.json, the tokenizer,
RNG states and trainer_state.json with its file list. So every command that takes a checkpoint takes it, and
training resumes from it (on any number of processes, EP size and ZeRO stage, through the reshard path).
The optimizer state given (anything `launcher.training.reshard.install` reads: Adam moments, fp32 masters,
the step, by parameter name) is written into the engine's optimizer first; without one, Adam starts fresh.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from model.config import GPTMoEConfig


def _one_rank_group() -> None:
    """A process group of this process alone (gloo, in-memory store), kept for the process: DeepSpeed caches
    the expert groups it builds on it, so a second engine in the same process needs the same group."""
    import torch.distributed as dist

    for name in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(name, "0")  # DeepSpeed's engine reads them
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("writing a checkpoint offline runs in a process of its own, not inside a job")


def write_checkpoint(cfg: RunConfig, mcfg: GPTMoEConfig, model: torch.nn.Module, tokenizer_dir: str | Path,
                     iteration: int, tokens: int, folder: Path, optimizer_state=None) -> Path:
    """Write `model` into `folder` (a run's checkpoints folder) as the trainer's checkpoint at `iteration`.
    `cfg`: the run the checkpoint belongs to (one process, EP 1, ZeRO 0), saved as its run_config.json.
    Returns the tag folder."""
    import logging

    import deepspeed

    from launcher.ds_config import build_ds_config
    from launcher.training.checkpoint import Checkpointer
    from launcher.training.distributed import Placement
    from launcher.training.optim import build_optimizer

    if (cfg.world_size, mcfg.ep_size, cfg.zero_stage) != (1, 1, 0):
        raise ValueError("write_checkpoint: the layout written is one process, EP 1, ZeRO 0")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _one_rank_group()
    cpu = type(cfg).from_settings({**cfg.settings(), "device": "cpu"})  # torch's AdamW, as training on CPU
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cpu), config=build_ds_config(cpu))
    if optimizer_state is not None:
        from launcher.training.reshard import install

        install(engine, optimizer_state)
    placement = Placement(rank=0, local_rank=0, sp_size=1, device=torch.device("cpu"))
    checkpointer = Checkpointer(cfg, mcfg, placement, engine, str(tokenizer_dir))
    checkpointer.folder = Path(folder)
    return checkpointer.save(iteration, tokens)
