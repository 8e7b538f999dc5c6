"""Checkpoints in DeepSpeed's layout, with what is needed to resume exactly and to use them alone.

    <run dir>/checkpoints/
        latest                      the tag of the newest COMPLETE checkpoint (replaced atomically)
        best                        fine-tuning: the tag of the checkpoint with the lowest validation loss
        iter_0000020/               DeepSpeed: mp_rank_00_model_states.pt (dense weights), one file per expert
                                    (layer_<L>_expert_<global id>_mp_rank_00_model_states.pt), optimizer shards
            trainer_state.json      iteration, tokens seen, the layout that wrote it (processes, EP, ZeRO,
                                    precision) and every file with its size; written last by rank 0
            rng_rank_00000.json     each rank's RNG states (routing samples tokens: RTS, jitter)
            run_config.json         the RunConfig, model_config.json the GPTMoEConfig
            tokenizer/              the run's tokenizer

DeepSpeed writes `latest` on rank 0 before the other ranks have finished writing; here DeepSpeed's pointer is
off, every rank passes a barrier after its files are on disk, and only then does rank 0 move `latest`. A
crash during a save leaves `latest` on the previous checkpoint.

Nothing is unpickled with code: our own files are JSON; DeepSpeed's `.pt` files are read through
`model.checkpoint.safe_load` (weights_only, DeepSpeed's few plain-data types allowed), both by the engine
(its checkpoint engine's `load` is replaced) and by `load_for_inference`. Before loading, `verify_checkpoint`
checks what the engine will read: every file present at the size it was written, each pickle free of
anything but data, the model of the same shape, the layout one the engine can load.

A checkpoint of another layout (processes, EP size, ZeRO stage) loads its weights through DeepSpeed (module
only) and its optimizer state through launcher.training.reshard.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from launcher.errors import UsageError
from launcher.files import write_json_atomic, write_text_atomic
from launcher.training.distributed import barrier, broadcast_from_main

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from launcher.training.distributed import Placement
    from model.config import GPTMoEConfig

LATEST = "latest"
BEST = "best"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
RUN_CONFIG = "run_config.json"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def find_checkpoint(path: str | Path) -> tuple[Path, str] | None:
    """(checkpoints folder, tag) for `path`: a checkpoints folder (its `latest`), a run folder (its
    checkpoints/latest), one tag folder, or a pointer file (`checkpoints/latest`, `checkpoints/best`).
    None when there is nothing complete to load."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path.parent, path.name
    pointers = [path] if path.name in (LATEST, BEST) and path.is_file() else \
        [path / LATEST, path / "checkpoints" / LATEST]
    for pointer in pointers:
        if pointer.is_file():
            tag = read_pointer(pointer)
            if tag and (pointer.parent / tag / TRAINER_STATE).is_file():
                return pointer.parent, tag
    return None


def read_pointer(pointer: Path) -> str | None:
    """The tag a `latest` or `best` file names, or None (unreadable, or not a tag name)."""
    try:
        tag = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if tag and "/" not in tag else None


def missing_load(source: str | Path) -> str:
    """The error for a LOAD with nothing complete to load."""
    return (f"LOAD: got {str(source)!r}; allowed: a run folder, a checkpoints folder with a '{LATEST}' file, or a "
            f"tag folder with {TRAINER_STATE} (a complete checkpoint)")


def check_compatible(cfg: RunConfig, state: dict, where: Path) -> None:
    """Data order and the schedule are functions of the iteration and the batch shape: refuse a shape change."""
    for key, mine in (("global_batch", cfg.global_batch), ("seq_len", cfg.model.seq_len)):
        if key in state and state[key] != mine:
            raise UsageError(f"resume from {where}: the checkpoint was trained with {key}={state[key]}, this "
                             f"run has {mine}; exact resumption needs the same value")
    digest = cfg.finetune.data_digest if cfg.finetune else None
    if digest and state.get("data_digest") not in (None, digest):
        raise UsageError(f"resume from {where}: it was fine-tuned on other data (TRAIN_DATASET_PATH's contents, "
                         "--pack, SEQ_LEN or the .jsonl keys differ); exact resumption needs the same data")


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """How the processes that wrote (or will read) a checkpoint split the model and the optimizer."""

    world_size: int
    ep_size: int
    zero_stage: int
    precision: str
    sp_size: int = 1

    @classmethod
    def of_run(cls, cfg: RunConfig) -> "Layout":
        return cls(world_size=cfg.world_size, ep_size=cfg.model.ep_size, zero_stage=cfg.zero_stage,
                   precision=cfg.precision, sp_size=cfg.sp_size)

    @classmethod
    def of_checkpoint(cls, tag_dir: Path, state: dict) -> "Layout":
        """From trainer_state.json; for checkpoints written before it recorded the layout, from the
        run_config.json beside it."""
        if isinstance(state.get("layout"), dict):
            try:
                return cls(**state["layout"])
            except TypeError:
                raise UsageError(f"{tag_dir / TRAINER_STATE}: 'layout' is not one this toolkit wrote") from None
        run = read_json(tag_dir / RUN_CONFIG)
        try:
            ep_size = run["model"]["ep_size"] if "model" in run else run["ep_size"]  # flat: an older run_config
            return cls(world_size=int(state.get("world_size") or run["num_nodes"] * run["gpus_per_node"]),
                       ep_size=int(ep_size), zero_stage=int(run["zero_stage"]),
                       precision=str(run["precision"]), sp_size=int(run.get("sp_size", 1)))
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{tag_dir / RUN_CONFIG}: lacks the processes, EP size, ZeRO stage or precision "
                             "the checkpoint was written with") from None

    def describe(self) -> str:
        sp = f", SP {self.sp_size}" if self.sp_size > 1 else ""
        processes = f"{self.world_size} process{'es' if self.world_size != 1 else ''}"
        return f"{processes}, EP {self.ep_size}{sp}, ZeRO {self.zero_stage}, {self.precision}"


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint, or UsageError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: missing from the checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a JSON object")
    return data


def read_trainer_state(tag_dir: Path) -> dict:
    state = read_json(tag_dir / TRAINER_STATE)
    if not isinstance(state.get("iteration"), int) or state["iteration"] < 0:
        raise UsageError(f"{tag_dir / TRAINER_STATE}: no iteration count (a non-negative integer)")
    return state


def read_model_config(tag_dir: Path):
    """The checkpoint's GPTMoEConfig, or UsageError naming model_config.json and what is wrong with it."""
    from model.config import GPTMoEConfig

    data = read_json(tag_dir / MODEL_CONFIG)
    try:
        return GPTMoEConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{tag_dir / MODEL_CONFIG}: {str(exc).splitlines()[0]}") from None


# What fixes the shape of the weights and how they are used (the expert bias is a saved buffer); the rest
# (capacity, EP, recompute, dropout, loss coefficients, the bias's rate) may change between runs of one model.
SHAPE_FIELDS = ("padded_vocab_size", "seq_len", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size",
                "moe_layer_indices", "experts_per_moe_layer", "router_type", "experts_per_token", "use_residual",
                "tie_embeddings", "expert_bias", "expert_mlp_bias")


def _shape(mcfg: GPTMoEConfig) -> dict:
    out = {}
    for name in SHAPE_FIELDS:
        value = getattr(mcfg, name)
        out[name] = value() if callable(value) else value
    return out


def shape_differences(checkpoint_mcfg: GPTMoEConfig, run_mcfg: GPTMoEConfig) -> list[str]:
    """'field: checkpoint value vs run value' for every shape field that differs."""
    a, b = _shape(checkpoint_mcfg), _shape(run_mcfg)
    return [f"{name} {a[name]} (checkpoint) vs {b[name]} (this run)" for name in SHAPE_FIELDS if a[name] != b[name]]


def check_same_model(tag_dir: Path, run_mcfg: GPTMoEConfig) -> None:
    diffs = shape_differences(read_model_config(tag_dir), run_mcfg)
    if diffs:
        raise UsageError(f"checkpoint {tag_dir}: its model differs from this run's: {'; '.join(diffs)}; resume "
                         "with the MODEL_SIZE, MOE, RT and model flags of the run that wrote it")


def check_layout(tag_dir: Path, saved: Layout, now: Layout) -> None:
    """Another layout loads through launcher.training.reshard, within what it supports."""
    from launcher.training.reshard import reshard_refusal

    refusal = reshard_refusal(saved, now)
    if refusal:
        raise UsageError(f"checkpoint {tag_dir}: written by {saved.describe()}; this run has {now.describe()}: "
                         f"{refusal}")


# ---------------------------------------------------------------------------------------------- files
def _listing(tag_dir: Path) -> dict[str, int | None]:
    """Every file under the tag folder -> its size in bytes for tensor files (None for the small text files a
    user may edit), trainer_state.json aside."""
    return {str(p.relative_to(tag_dir)): p.stat().st_size if p.suffix == ".pt" else None
            for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != TRAINER_STATE}


def _sizes_seen_by_all_ranks(tag_dir: Path) -> dict[str, int]:
    """Collective: each tensor file's size, the largest any rank sees. On a network filesystem a file another
    node wrote can look older (or be missing) for a while to the others; its writer sees it whole."""
    import torch.distributed as dist

    mine = {name: size for name, size in _listing(tag_dir).items() if size is not None}
    views = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        views = [None] * dist.get_world_size()
        dist.all_gather_object(views, mine)
    sizes: dict[str, int] = {}
    for view in views:
        for name, size in view.items():
            sizes[name] = max(size, sizes.get(name, 0))
    return sizes


def expected_files(tag_dir: Path, state: dict, layout: Layout, mcfg: GPTMoEConfig) -> dict[str, int | None]:
    """The files the checkpoint must hold -> their size (None: unknown). Written into trainer_state.json since
    it records them; for older checkpoints, predicted from DeepSpeed's naming for the layout."""
    from model.checkpoint import MODEL_STATES

    if isinstance(state.get("files"), dict):
        return dict(state["files"])
    names = [MODEL_STATES, MODEL_CONFIG, RUN_CONFIG] + [p.name for p in sorted(tag_dir.glob("rng_rank_*"))]
    for layer, experts in enumerate(mcfg.experts_per_moe_layer()):
        names += [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for e in range(experts)]
    if layout.zero_stage > 0:
        prefix = "bf16_" if layout.precision == "bf16" else ""
        names += [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(layout.world_size)]
    elif mcfg.is_moe:
        names += [f"expp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(layout.ep_size)]
    return {name: None for name in names}


def rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank_{rank:05d}.json"


def _legacy_rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank_{rank:05d}.pt"


def check_files(tag_dir: Path, files: dict[str, int | None]) -> None:
    """Every file present, at the size it was written; every .pt file's pickle holds data only (it is scanned,
    not run: see model.checkpoint.check_checkpoint_file)."""
    from model.checkpoint import CheckpointError, check_checkpoint_file

    for name, size in sorted(files.items()):
        path = tag_dir / name
        if not path.is_file():
            raise UsageError(f"checkpoint {tag_dir}: {name} is missing; the checkpoint is incomplete")
        if size is not None and path.stat().st_size != size:
            raise UsageError(f"checkpoint {tag_dir}: {name} has {path.stat().st_size} bytes, {size} were written "
                             "(truncated or replaced)")
        if name.endswith(".pt"):
            try:
                check_checkpoint_file(path, _numpy_types() if name.startswith("rng_rank_") else None)
            except CheckpointError as exc:
                raise UsageError(str(exc)) from None
        elif name.startswith("rng_rank_"):
            _check_rng_states(read_json(path), path)


def verify_checkpoint(cfg: RunConfig, folder: Path, tag: str, run_mcfg: GPTMoEConfig | None = None) -> dict:
    """Everything resuming from folder/tag needs, checked without loading a tensor: returns the trainer state.
    A finished run (iteration >= the run's) is only checked for its state: nothing more is read."""
    tag_dir = folder / tag
    state = read_trainer_state(tag_dir)
    check_compatible(cfg, state, tag_dir)
    if state["iteration"] >= cfg.train_iters:
        return state
    mcfg = read_model_config(tag_dir)
    if run_mcfg is not None:
        check_same_model(tag_dir, run_mcfg)
    check_layout(tag_dir, Layout.of_checkpoint(tag_dir, state), Layout.of_run(cfg))
    check_files(tag_dir, expected_files(tag_dir, state, Layout.of_checkpoint(tag_dir, state), mcfg))
    return state


# ---------------------------------------------------------------------------------------------- RNG
def _numpy_types() -> tuple:
    """What a numpy array pickles as (older checkpoints kept numpy's RNG state that way)."""
    from numpy import dtype, ndarray

    reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct  # numpy 2 / 1
    return (reconstruct, ndarray, dtype, type(np.dtype(np.uint32)))


def _rng_states() -> dict:
    """This process's RNG states as JSON data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": [version, list(internal), gauss],
              "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
              "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state().tolist()
    return states


def _check_rng_states(states, path: Path) -> None:
    python, numpy = states.get("python"), states.get("numpy")
    if not (isinstance(python, (list, tuple)) and len(python) == 3 and isinstance(numpy, (list, tuple))
            and len(numpy) == 5 and "torch" in states):
        raise UsageError(f"{path}: not RNG states this toolkit wrote (Python's, numpy's and torch's generators)")


def _set_rng_states(states: dict) -> None:
    """From `_rng_states()` (JSON) or the torch.save'd dict older checkpoints hold."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.as_tensor(states["torch"], dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.as_tensor(states["cuda"], dtype=torch.uint8))


def read_rng_states(tag_dir: Path, rank: int) -> dict | None:
    from model.checkpoint import CheckpointError, safe_load

    path = rng_file(tag_dir, rank)
    if path.is_file():
        return read_json(path)
    legacy = _legacy_rng_file(tag_dir, rank)
    if legacy.is_file():
        try:
            return safe_load(legacy, allowed=_numpy_types())
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None
    return None


# ---------------------------------------------------------------------------------------------- engine
class SafeLoading:
    """DeepSpeed's checkpoint engine with `load` going through `safe_load`; saving and the rest unchanged.
    DeepSpeed's own `load` is `torch.load(weights_only=False)`: it would run a planted pickle."""

    def __init__(self, inner):
        self.inner = inner

    def load(self, path, map_location=None):
        from model.checkpoint import CheckpointError, safe_load

        try:
            return safe_load(path, map_location=map_location)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None

    def __getattr__(self, name):
        return getattr(self.inner, name)


def load_safely(engine) -> None:
    """Make every checkpoint file `engine` reads go through `safe_load`."""
    current = getattr(engine, "checkpoint_engine", None)
    if current is not None and not isinstance(current, SafeLoading):
        engine.checkpoint_engine = SafeLoading(current)


class Checkpointer:
    def __init__(self, cfg: RunConfig, mcfg: GPTMoEConfig, placement: Placement, engine, tokenizer_dir: str):
        self.cfg = cfg
        self.mcfg = mcfg
        self.placement = placement
        self.engine = engine
        load_safely(engine)
        self.tokenizer_dir = Path(tokenizer_dir)
        self.folder = cfg.run_dir / "checkpoints"
        self.last_saved: int | None = None

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, tokens: int, state: dict | None = None) -> Path | None:
        """Collective. Returns the tag folder, or None when this iteration is on disk already. `state`: more
        fields for trainer_state.json (fine-tuning: the validation loss)."""
        if self.last_saved == iteration:
            return None
        tag = tag_for(iteration)
        tag_dir = self.folder / tag
        self.engine.save_checkpoint(str(self.folder), tag=tag, client_state={"iteration": iteration},
                                    save_latest=False)
        write_text_atomic(json.dumps(_rng_states()), rng_file(tag_dir, self.placement.rank))
        barrier()  # every rank's files are written
        sizes = _sizes_seen_by_all_ranks(tag_dir)
        if self.placement.is_main:
            self.cfg.save(tag_dir / RUN_CONFIG)
            write_json_atomic(self.mcfg.to_dict(), tag_dir / MODEL_CONFIG)
            if self.tokenizer_dir.is_dir():
                shutil.copytree(self.tokenizer_dir, tag_dir / "tokenizer", dirs_exist_ok=True)
            write_json_atomic({"iteration": iteration, "tokens": tokens, "train_iters": self.cfg.train_iters,
                               "world_size": self.cfg.world_size, "global_batch": self.cfg.global_batch,
                               "seq_len": self.cfg.model.seq_len, "layout": asdict(Layout.of_run(self.cfg)),
                               "files": {**_listing(tag_dir), **sizes}, **(state or {})}, tag_dir / TRAINER_STATE)
            write_text_atomic(tag + "\n", self.folder / LATEST)
        barrier()  # nobody moves on (or exits) before `latest` names a complete checkpoint
        self.last_saved = iteration
        return tag_dir

    def keep_last_and_best(self, tag_dir: Path, valid_loss: float | None) -> Path | None:
        """Rank 0, after `save`: point `best` at tag_dir if its validation loss is the lowest so far, then delete
        every checkpoint but the latest and the best. Returns the best tag folder."""
        best = self.folder / BEST
        best_tag = read_pointer(best) if best.is_file() else None
        best_loss = None
        if best_tag and (self.folder / best_tag / TRAINER_STATE).is_file():
            best_loss = read_json(self.folder / best_tag / TRAINER_STATE).get("valid_loss")
        if valid_loss is not None and (best_loss is None or valid_loss < best_loss):
            write_text_atomic(tag_dir.name + "\n", best)
            best_tag = tag_dir.name
        keep = {read_pointer(self.folder / LATEST), best_tag}
        for old in self.folder.glob("iter_*"):
            if old.is_dir() and old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
        return self.folder / best_tag if best_tag else None

    # ------------------------------------------------------------------ load
    def _source(self):
        """Rank 0's answer, on every rank: ((folder, tag) or None, trainer state, error message)."""
        source = self.cfg.load
        found = find_checkpoint(source or self.folder)
        if source and found is None:
            return None, None, missing_load(source)
        if found is None:
            return None, None, None
        try:
            return found, verify_checkpoint(self.cfg, *found, run_mcfg=self.mcfg), None
        except UsageError as exc:
            return found, None, str(exc)

    def resume(self) -> int:
        """Load LOAD, else this run folder's newest checkpoint; returns the iteration to continue from
        (0 for a fresh run). Collective."""
        # Rank 0 decides which checkpoint and checks it: ranks reading `latest` on their own could pick different
        # ones (node-local disks, a stale network-filesystem cache), and a file refused on one rank only would
        # leave the others waiting in the load's collectives.
        found, state, error = broadcast_from_main(self._source() if self.placement.is_main else None)
        if error:
            raise UsageError(error)
        if found is None:
            return 0
        folder, tag = found
        tag_dir = folder / tag
        _agree(None if (tag_dir / TRAINER_STATE).is_file() else
               f"checkpoint {tag_dir}: rank {self.placement.rank} cannot see it; checkpoints must be on storage "
               "every node shares")
        iteration = int(state["iteration"])
        self.last_saved = iteration if folder.resolve() == self.folder.resolve() else None
        if iteration >= self.cfg.train_iters:
            return iteration  # finished: nothing to load
        try:
            self._load(folder, tag, iteration)
            error = None
        except UsageError as exc:  # e.g. a file replaced after rank 0 checked it
            error = str(exc)
        _agree(error)
        return iteration

    def _load(self, folder: Path, tag: str, iteration: int) -> None:
        tag_dir = folder / tag
        saved = Layout.of_checkpoint(tag_dir, read_trainer_state(tag_dir))
        same = saved == Layout.of_run(self.cfg)
        path, client = self.engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=same,
                                                   load_module_only=not same, load_lr_scheduler_states=False)
        if path is None:
            raise UsageError(f"checkpoint {tag_dir}: DeepSpeed found nothing to load in it")
        if not same:  # the weights are in (every expert by its global id); the optimizer state is re-partitioned
            from launcher.training.reshard import SavedOptimizerState, install

            install(self.engine, SavedOptimizerState(tag_dir, saved, self.engine.module))
            for key in ("global_steps", "global_samples", "skipped_steps"):
                if key in client:
                    setattr(self.engine, key, client[key])
            if self.placement.is_main:
                print(f"resharded checkpoint {tag_dir}: written by {saved.describe()}, loaded into "
                      f"{Layout.of_run(self.cfg).describe()}", flush=True)
        rng = read_rng_states(tag_dir, self.placement.rank) if same else None
        if rng is not None:
            path = rng_file(tag_dir, self.placement.rank)
            _check_rng_states(rng, path)
            try:
                _set_rng_states(rng)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise UsageError(f"{path}: not RNG states this toolkit wrote ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        else:  # RNG streams cannot continue; make the new ones at least reproducible
            seed = self.cfg.seed + 1000 * iteration + self.placement.rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)


def _agree(error: str | None) -> None:
    """Collective: raise the first rank's error on every rank (so none waits for one that has given up)."""
    import torch.distributed as dist

    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise UsageError(first)


def check_model_files(tag_dir: Path):
    """The GPTMoEConfig of checkpoint tag_dir, once the files holding its weights (written at any EP size) are
    checked: present, at the size written, data only. What loading the weights alone reads."""
    mcfg = read_model_config(tag_dir)
    state = read_trainer_state(tag_dir)
    files = {name: size for name, size in expected_files(tag_dir, state, Layout(1, 1, 0, "fp32"), mcfg).items()
             if "_model_states.pt" in name or name == MODEL_CONFIG}
    check_files(tag_dir, files)
    return mcfg


def load_model_weights(model, tag_dir: Path) -> None:
    """The weights of checkpoint tag_dir, and nothing else of it, into `model`: the experts `model` holds,
    whatever expert-parallel size wrote them; a position table longer than the model's is cut to its seq_len.
    Every file through `safe_load`. UsageError (one line naming the file) when it does not fit."""
    from model.checkpoint import CheckpointError, _first_mismatch, read_deepspeed_checkpoint

    try:
        state = read_deepspeed_checkpoint(model, tag_dir.parent, tag_dir.name)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    positions = model.config.seq_len
    if "wpe.weight" in state and state["wpe.weight"].shape[0] > positions:
        state["wpe.weight"] = state["wpe.weight"][:positions]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"checkpoint {tag_dir}: does not fit the model: {_first_mismatch(str(exc))}") from None


def load_for_inference(path: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer, tag folder) from a run folder, a checkpoints folder or a tag folder,
    in one process: no torch.distributed, every expert local, fp32. Raises UsageError (one line naming the file)
    for a missing, incomplete, unreadable, unsafe or mismatched checkpoint."""
    from launcher.data.tokenizer import load_tokenizer
    from model.gpt import GPTMoE

    found = find_checkpoint(path)
    if found is None:
        raise UsageError(f"{path}: no complete checkpoint (a run folder, a checkpoints folder with a "
                         f"'{LATEST}' file, or a tag folder with {TRAINER_STATE})")
    tag_dir = found[0] / found[1]
    saved = check_model_files(tag_dir)
    mcfg = type(saved).from_dict({**saved.to_dict(), "ep_size": 1, "recompute": "none"})
    model = GPTMoE(mcfg, ep_rank=0)
    load_model_weights(model, tag_dir)  # every expert's file, whatever EP wrote them
    model = model.float().to(device).eval()
    try:
        tokenizer = load_tokenizer(tag_dir / "tokenizer")
    except (OSError, ValueError) as exc:
        raise UsageError(f"{tag_dir / 'tokenizer'}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None
    return model, tokenizer, tag_dir


def write_inference_checkpoint(model, tokenizer, run_dir: str | Path, iteration: int = 0) -> Path:
    """A model in memory (EP=1) as `run_dir/checkpoints/iter_NNNNNNN/` in the layout a training run writes:
    dense weights in mp_rank_00_model_states.pt, one file per expert with global numbering (as DeepSpeed
    writes at any expert-parallel size), the model config, the tokenizer and trainer_state.json; `latest`
    moves last. Everything that loads checkpoints (generate, serve, evaluate) reads it. Returns run_dir."""
    from model.checkpoint import MODEL_STATES
    from model.moe.experts import split_stacked

    folder = Path(run_dir) / "checkpoints"
    tag = tag_for(iteration)
    tag_dir = folder / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    dense = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    prefixes = [k[:-len("fc1_weight")] for k in dense if k.endswith("deepspeed_moe.experts.fc1_weight")]
    for layer, prefix in enumerate(prefixes):  # module order: DeepSpeed's MoE layer numbering
        stacked = {name: dense.pop(prefix + name) for name in ("fc1_weight", "fc2_weight")}
        experts = stacked["fc1_weight"].shape[0]
        per_expert = split_stacked(stacked)  # deepspeed_experts.<e>.fc1.weight ...
        for e in range(experts):
            torch.save({prefix + k: v for k, v in per_expert.items() if k.split(".")[1] == str(e)},
                       tag_dir / f"layer_{layer}_expert_{e}_{MODEL_STATES}")
    torch.save({"module": dense}, tag_dir / MODEL_STATES)
    write_json_atomic(model.config.to_dict(), tag_dir / MODEL_CONFIG)
    tokenizer.save(tag_dir / "tokenizer")
    write_json_atomic({"iteration": iteration}, tag_dir / TRAINER_STATE)
    write_text_atomic(tag + "\n", folder / LATEST)
    return Path(run_dir)
