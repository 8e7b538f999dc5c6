"""Running a trained checkpoint in this one process: device, threads, loading with one-line errors, and the
check that MODEL_SIZE / MOE (/ RT) given on a command line describe the checkpoint's model."""
from __future__ import annotations

import os
from pathlib import Path

from launcher.errors import UsageError


def resolve_device(text: str):
    """torch.device for `--device`: cpu, cuda or cuda:N where torch sees such a device."""
    import torch

    allowed = "cpu | cuda | cuda:N"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: got {text!r}; allowed: {allowed}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: got {text!r}; allowed: {allowed}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device: got {text!r}, but torch sees no CUDA device here "
                             f"(torch {torch.__version__}); allowed: cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device: got {text!r}; allowed: cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name: str, device):
    """torch dtype for `--dtype` (auto | fp32 | bf16 | fp16): auto is bf16 on a GPU that supports it, else fp32."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return dtype


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads() -> tuple[int, str]:
    """(threads, why) for CPU inference: OMP_NUM_THREADS when set, else the cores this process may use less
    the load other processes put on them (1-minute load average), at least 1. Decoding is a chain of small
    matrix products: a thread that waits for a busy core stalls every step (2 threads on a busy 2-core
    machine ran 7-25x slower than 1)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = available_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - load))), f"{cores} cores, load {load:.1f}"


def set_threads(requested: int | None) -> str:
    """Set torch's intra-op threads; returns the one line that says how many and why."""
    import torch

    if requested is None:
        threads, why = default_threads()
    else:
        threads, why = requested, "--threads"
    torch.set_num_threads(threads)
    return f"# threads: {threads} ({why})"


def _shape(num_layers: int, hidden: int, heads: int) -> str:
    return f"{num_layers} layers, hidden {hidden}, {heads} heads"


def describe_size(num_layers: int, hidden: int, heads: int) -> str:
    """'nano (2 layers, hidden 64, 4 heads)': the size table's name where one fits."""
    from model.config import SIZES

    names = [name for name, shape in SIZES.items() if shape == (num_layers, hidden, heads)]
    return f"{names[0]} ({_shape(num_layers, hidden, heads)})" if names else _shape(num_layers, hidden, heads)


def check_model_matches(mcfg, model_size: str | None = None, moe: str | None = None,
                        router_type: str | None = None, where: str = "the checkpoint") -> None:
    """UsageError naming the first of MODEL_SIZE / MOE / RT (as typed on a command line) that disagrees with
    the model config `mcfg`; None skips a check."""
    from model.config import RT_ALLOWED, SIZES

    have = (mcfg.num_layers, mcfg.hidden_size, mcfg.num_heads)
    if model_size is not None:
        if model_size not in SIZES:
            raise UsageError(f"MODEL_SIZE: got {model_size!r}; allowed: {' | '.join(SIZES)}")
        if SIZES[model_size] != have:
            raise UsageError(f"MODEL_SIZE: got {model_size} ({_shape(*SIZES[model_size])}); "
                             f"{where} is {describe_size(*have)}")
    if moe is not None:
        experts = mcfg.num_experts
        had = "dense (MOE none)" if not experts else f"MOE {experts}"
        if moe.lower() == "none":
            ok = not experts
        elif moe.isdigit() and int(moe) > 0:
            ok = experts == int(moe)
        else:
            raise UsageError(f"MOE: got {moe!r}; allowed: none | an expert count >= 1")
        if not ok:
            raise UsageError(f"MOE: got {moe}; {where} is {had}")
    if router_type is not None and mcfg.num_experts:
        from model.config import ConfigError, RouterKind

        try:
            kind = RouterKind.from_rt(router_type)
        except ConfigError:
            raise UsageError(f"RT: got {router_type!r}; allowed: {RT_ALLOWED}") from None
        if kind is not mcfg.router_type:
            raise UsageError(f"RT: got {router_type} ({kind.label}); {where} routes with "
                             f"{mcfg.router_type.label}")


def load_checkpoint(path, device="cpu", dtype=None, expect=None):
    """(model in eval mode, tokenizer, tag folder) of a run folder, checkpoints folder or tag folder, with
    every expert in this process whatever the expert-parallel size it was written with. `expect(config)`
    sees the checkpoint's GPTMoEConfig before any weight is read (check_model_matches). Anything wrong with
    the checkpoint is a UsageError of one line."""
    import pickle

    from launcher.training.checkpoint import find_checkpoint, load_for_inference, read_model_config

    found = find_checkpoint(path)
    if found is None:
        where = Path(path)
        raise UsageError(f"{where}: no complete checkpoint (a run folder, a checkpoints folder with a 'latest' "
                         "file, or a tag folder with trainer_state.json)" if where.exists() else f"{where}: not found")
    tag_dir = found[0] / found[1]
    if expect is not None:
        expect(read_model_config(tag_dir))
    try:
        model, tokenizer, tag_dir = load_for_inference(tag_dir, "cpu")
    except (OSError, EOFError, KeyError, RuntimeError, pickle.UnpicklingError) as err:
        # load_for_inference names what it checks; a file that passes its checks and still fails lands here
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        detail = "; ".join(lines[:2]) or type(err).__name__
        raise UsageError(f"checkpoint {tag_dir}: cannot be loaded ({type(err).__name__}: {detail[:300]})") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"checkpoint {tag_dir}: its tokenizer has {tokenizer.vocab_size} ids, the model "
                         f"{model.config.vocab_size}")
    return model.to(device=device, dtype=dtype), tokenizer, tag_dir
