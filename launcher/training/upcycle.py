"""`--upcycle-from CHECKPOINT`: start an MoE run from a dense checkpoint (Komatsuzaki et al. 2022).

Every process builds its model as usual, then, for a fresh run, takes the dense checkpoint's weights: each of
its experts (whatever the expert-parallel rank) a copy of the layer's dense feed-forward weights, routers
fresh and the router weight folded into the experts (model/surgery.py), so the first forward equals the
dense model's. DeepSpeed's engine is built on these weights afterwards, so any EP size and ZeRO 0/1/2 take
them; Adam and the learning-rate schedule start from iteration 0. A run that has a checkpoint of its own
resumes from it instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import UsageError

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from model.config import GPTMoEConfig


def _field_label(name: str) -> str:
    from launcher.config import label

    return {"padded_vocab_size": "the vocabulary (padded)", "num_experts": "MOE"}.get(name) or label(name)


def upcycle_source(cfg: RunConfig, run_mcfg: GPTMoEConfig | None) -> Path:
    """The tag folder of `cfg.upcycle_from`, checked without loading a tensor: complete, data only, dense, and
    of this run's sizes. `run_mcfg`: the run's model with its tokenizer's vocabulary; None while the tokenizer
    is still to be trained (the vocabulary is then not compared)."""
    from launcher.training.checkpoint import (LATEST, MODEL_CONFIG, TRAINER_STATE, Layout, check_files,
                                              expected_files, find_checkpoint, read_model_config,
                                              read_trainer_state)
    from model.surgery import upcycle_mismatches

    found = find_checkpoint(cfg.upcycle_from)
    if found is None:
        raise UsageError(f"--upcycle-from: got {cfg.upcycle_from!r}; allowed: a dense run folder, a checkpoints folder "
                         f"with a '{LATEST}' file, or a tag folder with {TRAINER_STATE} (a complete checkpoint)")
    tag_dir = found[0] / found[1]
    dense = read_model_config(tag_dir)
    mismatches = [m for m in upcycle_mismatches(dense, run_mcfg or cfg.model)
                  if run_mcfg is not None or m[0] != "padded_vocab_size"]
    if mismatches:
        raise UsageError(f"--upcycle-from: {tag_dir} does not fit this run: " + "; ".join(
            f"{_field_label(name)} {d} (dense checkpoint) vs {m} (this run)" for name, d, m in mismatches))
    if run_mcfg is not None:
        _check_tokenizer(tag_dir / "tokenizer", Path(cfg.resolved_tokenizer_path))
    files = expected_files(tag_dir, read_trainer_state(tag_dir), Layout(1, 1, 0, "fp32"), dense)
    check_files(tag_dir, {n: s for n, s in files.items() if "_model_states.pt" in n or n == MODEL_CONFIG})
    return tag_dir


def _check_tokenizer(saved: Path, run: Path) -> None:
    """The dense model's embeddings mean something only with its own tokenizer: the files both folders hold
    must be the same."""
    if not saved.is_dir() or not run.is_dir():
        return
    import json

    def content(path: Path):
        text = path.read_bytes()
        return json.loads(text) if path.suffix == ".json" else text

    for file in sorted(p for p in saved.iterdir() if p.is_file()):
        other = run / file.name
        if other.is_file() and content(other) != content(file):
            raise UsageError(f"--upcycle-from: the dense checkpoint's tokenizer ({file}) differs from this run's "
                             f"({other}); allowed: the dense run's tokenizer (--tokenizer-path {saved})")


def upcycle_model(model, tag_dir: Path) -> None:
    """Load the dense weights of `tag_dir` into `model` (this rank's experts), as model/surgery.py lays out."""
    import torch

    from model.checkpoint import CheckpointError, read_module_states
    from model.surgery import upcycle_state_dict

    try:
        dense = read_module_states(tag_dir)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    try:
        state = upcycle_state_dict({k: v.float() for k, v in dense.items() if isinstance(v, torch.Tensor)}, model)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"--upcycle-from {tag_dir}: {str(exc).strip(chr(39))}") from None
    model.load_state_dict(state)
