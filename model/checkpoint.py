"""Reading checkpoints without running code from them, and loading DeepSpeed checkpoints at any EP size.

Safety. `torch.load` with `weights_only=False` unpickles whatever a file names: a planted pickle runs code
on the machine that loads it. Every `.pt` file read here goes through `safe_load`: its pickle is scanned
first (no code runs, no tensor bytes are read), then loaded with `weights_only=True`, which rebuilds
tensors, containers and numbers only, plus the few classes `DEEPSPEED_TYPES` lists (the ones DeepSpeed's
engine pickles beside its tensors: its ZeRO optimizer's loss scaler, stage enum and parameter slice
addresses, all plain data). Anything else is refused with `CheckpointError`, one line naming the file.

Layout. DeepSpeed writes a checkpoint `<dir>/<tag>/` as
    mp_rank_00_model_states.pt                    every non-expert weight (under "module")
    layer_<L>_expert_<e>_mp_rank_00_model_states.pt  one file per expert, L = MoE layer in module order,
                                                  e = global expert id, keys `...deepspeed_experts.<e>.*`
so experts are numbered globally whatever EP size wrote them. `load_deepspeed_checkpoint` reads the
files of the experts `model` holds (all of them at EP=1) and loads them: train at EP=8, generate at EP=1.

Plain `model.state_dict()` files hold stacked local experts; `merge_expert_parallel_state_dicts` joins
the shards of all EP ranks into one full (EP=1) state dict.
"""
from __future__ import annotations

import _compat_pickle
import os
import pickletools
import zipfile
from pathlib import Path

import torch
from torch import nn

from .moe.experts import DS_EXPERTS, PER_EXPERT_NAMES
from .parallel import moe_layers

MODEL_STATES = "mp_rank_00_model_states.pt"


class CheckpointError(ValueError):
    """A checkpoint file that is unreadable, incomplete, holds something other than data, or does not fit the
    model. The message is one line and names the file."""


def _deepspeed_types() -> tuple[type, ...]:
    """What DeepSpeed's engine pickles besides tensors, containers and numbers (read from its save code,
    engine.py and zero/stage_1_and_2.py, and from the pickles of real checkpoints): the ZeRO and bf16
    optimizers' `loss_scaler` (LossScaler, or DynamicLossScaler under fp16), `zero_stage` (ZeroStageEnum)
    and `param_slice_mappings` (fragment_address). Each rebuilds as plain attributes: no code of the file's."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def _qualified(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def pickle_globals(path: str | os.PathLike) -> set[str]:
    """The classes and functions the pickle of a torch zip checkpoint names (`module.name`), read without
    unpickling (no code runs, tensor bytes are not read). Raises CheckpointError for a file that is not a
    whole torch zip archive: truncated, random bytes, or another format."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(names) != 1:
                raise CheckpointError(f"{path}: not a checkpoint file: a zip archive without torch.save's data.pkl")
            data = archive.read(names[0])
    except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as exc:
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise CheckpointError(f"{path}: cannot read it ({type(exc).__name__})") from None
        raise CheckpointError(f"{path}: not a whole checkpoint file (truncated, or not written by torch.save): "
                              f"{exc}") from None
    found = set()
    strings: list[str] = []  # STACK_GLOBAL takes module and name from the two strings pushed before it
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                module, name = arg.split(" ", 1)
                # protocol 2 spells Python 3 modules the Python 2 way (__builtin__); unpickling maps them back
                found.add(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
            elif opcode.name == "STACK_GLOBAL":
                found.add(".".join(strings[-2:]) if len(strings) >= 2 else "<computed name>")
            elif opcode.name in ("INST", "OBJ"):
                found.add(f"<{opcode.name} opcode>")
            if isinstance(arg, str):
                strings.append(arg)
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is one answer: not a checkpoint
        raise CheckpointError(f"{path}: not a whole checkpoint file (its pickle is malformed: {exc})") from None
    return found


def _torch_globals() -> set[str]:
    from torch import _weights_only_unpickler

    return set(_weights_only_unpickler._get_allowed_globals())


def check_checkpoint_file(path: str | os.PathLike, allowed: tuple[type, ...] | None = None) -> None:
    """Refuse (CheckpointError) a file that is not a whole torch zip checkpoint, or whose pickle names anything
    beyond torch's tensor types and `allowed` (default: DeepSpeed's, see `_deepspeed_types`). Runs nothing."""
    allowed = _deepspeed_types() if allowed is None else allowed
    extra = pickle_globals(path) - _torch_globals() - {_qualified(t) for t in allowed}
    if extra:
        raise CheckpointError(
            f"{path}: refused: its pickle names {', '.join(sorted(extra))}, which a checkpoint never holds "
            f"(allowed: tensors, containers, numbers, {', '.join(t.__name__ for t in allowed) or 'nothing else'}); "
            "loading it could run code. Use checkpoints you or your team wrote")


def safe_load(path: str | os.PathLike, allowed: tuple[type, ...] | None = None, map_location="cpu",
              mmap: bool = False):
    """`torch.load` that runs no code from the file: the pickle is checked (`check_checkpoint_file`), then
    loaded with weights_only=True and only `allowed` (default: DeepSpeed's types) let through.
    Raises CheckpointError (one line naming the file) for anything it cannot load."""
    allowed = _deepspeed_types() if allowed is None else allowed
    check_checkpoint_file(path, allowed)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - unpickling refusals, corrupt records: one answer, one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be loaded as a checkpoint ({first})") from None


# ---------------------------------------------------------------------------------------------- layout
def latest_tag(load_dir: str | os.PathLike) -> str:
    latest = Path(load_dir) / "latest"
    if not latest.exists():
        raise FileNotFoundError(f"{load_dir}: no 'latest' file; pass the checkpoint tag")
    return latest.read_text().strip()


def expert_file(tag_dir: str | os.PathLike, moe_layer: int, expert: int) -> Path:
    """DeepSpeed's file of one expert (global id) of the `moe_layer`-th MoE layer (0-based, module order)."""
    return Path(tag_dir) / f"layer_{moe_layer}_expert_{expert}_mp_rank_00_model_states.pt"


def read_module_states(tag_dir: str | os.PathLike) -> dict:
    """The non-expert weights of a DeepSpeed checkpoint (its main file's "module"), loaded safely."""
    path = Path(tag_dir) / MODEL_STATES
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a DeepSpeed checkpoint folder holds {MODEL_STATES}")
    state = safe_load(path)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise CheckpointError(f"{path}: not a DeepSpeed model-states file (no 'module' state dict)")
    return dict(state["module"])


def read_deepspeed_checkpoint(model: nn.Module, load_dir: str | os.PathLike, tag: str | None = None) -> dict:
    """The state dict `model` needs, gathered from a DeepSpeed checkpoint written at any EP size."""
    ckpt = Path(load_dir) / (tag or latest_tag(load_dir))
    state = read_module_states(ckpt)
    for layer_id, layer in enumerate(moe_layers(model)):
        first = layer.ep_rank * layer.num_local_experts
        for local in range(layer.num_local_experts):
            path = expert_file(ckpt, layer_id, first + local)
            if not path.exists():
                raise CheckpointError(f"{path}: missing; the checkpoint has fewer experts than the model "
                                      f"({layer.num_experts} in MoE layer {layer_id})")
            experts = safe_load(path)
            if not isinstance(experts, dict):
                raise CheckpointError(f"{path}: not a DeepSpeed expert file (no state dict)")
            for key, value in experts.items():
                # global -> local expert id, which the layer's load hook stacks
                state[key.replace(f".{DS_EXPERTS}.{first + local}.", f".{DS_EXPERTS}.{local}.")] = value
    return state


def load_deepspeed_checkpoint(model: nn.Module, load_dir: str | os.PathLike, tag: str | None = None,
                              strict: bool = True):
    """Load a DeepSpeed checkpoint (any EP size) into `model` (any EP size, typically 1). A checkpoint of
    another shape raises CheckpointError naming the first weight that differs."""
    ckpt = Path(load_dir) / (tag or latest_tag(load_dir))
    state = read_deepspeed_checkpoint(model, load_dir, tag)
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt}: does not fit the model: {_first_mismatch(str(exc))}") from None


def _first_mismatch(message: str) -> str:
    """The first problem of torch's multi-line load_state_dict error, as one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("size mismatch for", "Missing key", "Unexpected key")):
            return line.rstrip(".")[:300]
    return lines[-1][:300] if lines else "a weight differs"


def merge_expert_parallel_state_dicts(shards: list[dict]) -> dict:
    """State dicts of EP ranks 0..P-1 (stacked local experts) -> one state dict with every expert."""
    merged = dict(shards[0])
    for key in merged:
        if key.rsplit(".", 1)[-1] in PER_EXPERT_NAMES:
            merged[key] = torch.cat([shard[key] for shard in shards], dim=0)
    return merged
