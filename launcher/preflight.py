"""Checks of the files a run reads, made by the launcher before anything is written or started.

A missing dataset, tokenizer or checkpoint found only inside the training processes would cost a cluster
allocation and, behind torchrun, a page of tracebacks instead of one line.
"""
from __future__ import annotations

from launcher.errors import UsageError


def check_inputs(cfg) -> None:
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
    if cfg.load:
        check_resumable(cfg, cfg.load)


def check_resumable(cfg, source: str) -> None:
    import json

    from launcher.training.checkpoint import LATEST, TRAINER_STATE, check_compatible, find_checkpoint

    found = find_checkpoint(source)
    if found is None:
        raise UsageError(f"LOAD: got {source!r}; allowed: a run folder, a checkpoints folder with a "
                         f"'{LATEST}' file, or a tag folder with {TRAINER_STATE} (a complete checkpoint)")
    folder, tag = found
    check_compatible(cfg, json.loads((folder / tag / TRAINER_STATE).read_text()), folder / tag)
