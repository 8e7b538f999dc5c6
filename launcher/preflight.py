"""Checks of the files a run reads, made by the launcher before anything is written or started.

A missing dataset, tokenizer or checkpoint found only inside the training processes would cost a cluster
allocation and, behind torchrun, a page of tracebacks instead of one line.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.errors import UsageError

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from model.config import GPTMoEConfig


def check_inputs(cfg: RunConfig) -> None:
    """Raise UsageError naming the first bad input: split, data, tokenizer, LOAD."""
    from launcher.data.gpt_dataset import parse_blend, parse_split

    if parse_split(cfg.split)[0] <= 0:
        raise UsageError(f"--split: got {cfg.split!r}; allowed: a positive share for training, e.g. 98,2,0")
    if cfg.data_path:  # unset: the embedded corpus, built by the launcher before training starts
        from launcher.data.indexed import IndexedDataset
        from launcher.data.tokenizer import load_tokenizer

        for _, prefix in parse_blend(cfg.data_path):
            IndexedDataset(prefix)  # validates PREFIX.bin/.idx: present, whole, consistent
        load_tokenizer(cfg.resolved_tokenizer_path, kind=cfg.tokenizer)
    check_resumable(cfg)


def check_resumable(cfg: RunConfig, run_mcfg: GPTMoEConfig | None = None) -> None:
    """The checkpoint the run will resume from (LOAD, else the run folder's newest), checked as the workers
    would before loading it: readable, complete, data only, the same model shape and a loadable layout.
    `run_mcfg`: the run's GPTMoEConfig; None = built here from the run's tokenizer, when it exists already."""
    from launcher.training.checkpoint import find_checkpoint, missing_load, verify_checkpoint

    source = cfg.load or cfg.run_dir / "checkpoints"
    found = find_checkpoint(source)
    if found is None:
        if cfg.load:
            raise UsageError(missing_load(cfg.load))
        return
    verify_checkpoint(cfg, *found, run_mcfg=run_mcfg or _run_model_config(cfg))


def _run_model_config(cfg: RunConfig) -> GPTMoEConfig | None:
    """The run's model with its tokenizer's vocabulary; None while the tokenizer is still to be trained."""
    from pathlib import Path

    from launcher.data.tokenizer import load_tokenizer

    if not Path(cfg.resolved_tokenizer_path).exists():
        return None
    try:
        return cfg.model_config(load_tokenizer(cfg.resolved_tokenizer_path, kind=cfg.tokenizer).vocab_size)
    except ValueError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
