"""Checkpoints in DeepSpeed's layout, with what is needed to resume exactly and to use them alone.

    <run dir>/checkpoints/
        latest                      the tag of the newest COMPLETE checkpoint (replaced atomically)
        iter_0000020/               DeepSpeed: mp_rank_00_model_states.pt (dense weights), one file per expert
                                    (layer_<L>_expert_<global id>_mp_rank_00_model_states.pt), optimizer shards
            trainer_state.json      iteration, tokens seen; written last by rank 0
            rng_rank_00000.pt       each rank's RNG states (routing samples tokens: RTS, jitter)
            run_config.json         the RunConfig, model_config.json the GPTMoEConfig
            tokenizer/              the run's tokenizer

DeepSpeed writes `latest` on rank 0 before the other ranks have finished writing; here DeepSpeed's pointer is
off, every rank passes a barrier after its files are on disk, and only then does rank 0 move `latest`. A
crash during a save leaves `latest` on the previous checkpoint.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from launcher.errors import UsageError
from launcher.files import write_json_atomic, write_text_atomic
from launcher.training.distributed import all_reduce_sum, barrier, broadcast_from_main

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def find_checkpoint(path: str | Path) -> tuple[Path, str] | None:
    """(checkpoints folder, tag) for `path`: a checkpoints folder (its `latest`), a run folder (its
    checkpoints/latest) or one tag folder. None when there is nothing complete to load."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path.parent, path.name
    for folder in (path, path / "checkpoints"):
        latest = folder / LATEST
        if latest.is_file():
            tag = latest.read_text().strip()
            if (folder / tag / TRAINER_STATE).is_file():
                return folder, tag
    return None


def check_compatible(cfg, state: dict, where: Path) -> None:
    """Data order and the schedule are functions of the iteration and the batch shape: refuse a shape change."""
    for key, mine in (("global_batch", cfg.global_batch), ("seq_len", cfg.seq_len)):
        if key in state and state[key] != mine:
            raise UsageError(f"resume from {where}: the checkpoint was trained with {key}={state[key]}, this "
                             f"run has {mine}; exact resumption needs the same value")


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class Checkpointer:
    def __init__(self, cfg, mcfg, placement, engine, tokenizer_dir: str):
        self.cfg = cfg
        self.mcfg = mcfg
        self.placement = placement
        self.engine = engine
        self.tokenizer_dir = Path(tokenizer_dir)
        self.folder = cfg.run_dir / "checkpoints"
        self.last_saved: int | None = None

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, tokens: int) -> Path | None:
        """Collective. Returns the tag folder, or None when this iteration is on disk already."""
        if self.last_saved == iteration:
            return None
        tag = tag_for(iteration)
        tag_dir = self.folder / tag
        self.engine.save_checkpoint(str(self.folder), tag=tag, client_state={"iteration": iteration},
                                    save_latest=False)
        torch.save(_rng_states(), tag_dir / f"rng_rank_{self.placement.rank:05d}.pt")
        barrier()  # every rank's files are written
        if self.placement.is_main:
            self.cfg.save(tag_dir / "run_config.json")
            write_json_atomic(self.mcfg.to_dict(), tag_dir / "model_config.json")
            if self.tokenizer_dir.is_dir():
                shutil.copytree(self.tokenizer_dir, tag_dir / "tokenizer", dirs_exist_ok=True)
            write_json_atomic({"iteration": iteration, "tokens": tokens, "train_iters": self.cfg.train_iters,
                               "world_size": self.placement.world_size, "global_batch": self.cfg.global_batch,
                               "seq_len": self.cfg.seq_len}, tag_dir / TRAINER_STATE)
            write_text_atomic(tag + "\n", self.folder / LATEST)
        barrier()  # nobody moves on (or exits) before `latest` names a complete checkpoint
        self.last_saved = iteration
        return tag_dir

    # ------------------------------------------------------------------ load
    def resume(self) -> int:
        """Load LOAD, else this run folder's newest checkpoint; returns the iteration to continue from
        (0 for a fresh run). Collective."""
        source = self.cfg.load
        # Rank 0 decides which checkpoint: ranks reading `latest` on their own could pick different ones
        # (node-local disks, a stale network-filesystem cache) and then hang in the load's collectives.
        found = broadcast_from_main(find_checkpoint(source or self.folder) if self.placement.is_main else None)
        if source and found is None:
            raise UsageError(f"LOAD: got {source!r}; allowed: a run folder, a checkpoints folder with a "
                             f"'{LATEST}' file, or a tag folder with {TRAINER_STATE} (a complete checkpoint)")
        if found is None:
            return 0
        folder, tag = found
        unseen = all_reduce_sum([0.0 if (folder / tag / TRAINER_STATE).is_file() else 1.0], self.placement.device)
        if unseen[0]:
            raise UsageError(f"checkpoint {folder / tag}: {int(unseen[0])} of {self.placement.world_size} ranks "
                             "cannot see it; checkpoints must be on storage every node shares")
        state = json.loads((folder / tag / TRAINER_STATE).read_text())
        check_compatible(self.cfg, state, folder / tag)
        path, _ = self.engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder / tag}")
        rng = folder / tag / f"rng_rank_{self.placement.rank:05d}.pt"
        if rng.is_file() and state.get("world_size") == self.placement.world_size:
            _set_rng_states(torch.load(rng, weights_only=False))  # our own file; numpy's state is not a tensor
        else:  # another world size: RNG streams cannot continue; make the new ones at least reproducible
            seed = self.cfg.seed + 1000 * state["iteration"] + self.placement.rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        self.last_saved = state["iteration"] if folder.resolve() == self.folder.resolve() else None
        return int(state["iteration"])



def load_for_inference(path: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer, tag folder) from a run folder, a checkpoints folder or a tag folder,
    in one process: no torch.distributed, every expert local, fp32."""
    from launcher.data.tokenizer import load_tokenizer
    from model.checkpoint import load_deepspeed_checkpoint
    from model.config import GPTMoEConfig
    from model.gpt import GPTMoE

    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a run folder, a checkpoints folder with a "
                                f"'{LATEST}' file, or a tag folder with {TRAINER_STATE})")
    tag_dir = found[0] / found[1]
    config = json.loads((tag_dir / "model_config.json").read_text())
    mcfg = GPTMoEConfig.from_dict({**config, "ep_size": 1, "recompute": "none"})
    model = GPTMoE(mcfg, ep_rank=0)
    load_deepspeed_checkpoint(model, found[0], found[1])  # every expert's file, whatever EP wrote them
    model = model.float().to(device).eval()
    tokenizer = load_tokenizer(tag_dir / "tokenizer")
    return model, tokenizer, tag_dir
