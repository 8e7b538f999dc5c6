"""Checks made by the launcher before anything is written or started.

A missing dataset, an unwritable output folder, a busy port or a model that cannot fit, found only inside
the training processes, would cost a cluster allocation (or a trained tokenizer) and, behind torchrun, a page
of tracebacks instead of one line. Each check raises UsageError with one line: what is wrong, what is allowed.
"""
from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import UsageError

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from model.config import GPTMoEConfig

SAMPLE_DOCUMENTS = 256  # documents read to find the largest token id of a big dataset
SAMPLE_TOKENS_PER_DOCUMENT = 16_384
FULL_SCAN_TOKENS = 1 << 22  # smaller datasets are read whole


def check_inputs(cfg: RunConfig) -> None:
    """Raise UsageError naming the first bad input: split, data, tokenizer, data ids vs vocab, LOAD, --upcycle-from."""
    from launcher.data.gpt_dataset import parse_blend, parse_split
    from launcher.training.checkpoint import find_checkpoint

    if parse_split(cfg.split)[0] <= 0:
        raise UsageError(f"--split: got {cfg.split!r}; allowed: a positive share for training, e.g. 98,2,0")
    if cfg.data_path:  # unset: the embedded corpus, built by the launcher before training starts
        from launcher.data.indexed import IndexedDataset
        from launcher.data.tokenizer import load_tokenizer

        datasets = [IndexedDataset(prefix) for _, prefix in parse_blend(cfg.data_path)]  # present, whole
        tokenizer = load_tokenizer(cfg.resolved_tokenizer_path, kind=cfg.tokenizer)
        for ds in datasets:
            check_ids_in_vocab(ds, tokenizer.vocab_size, cfg.resolved_tokenizer_path)
    check_resumable(cfg)
    if cfg.upcycle_from and find_checkpoint(cfg.run_dir / "checkpoints") is None:  # else the run resumes
        from launcher.training.upcycle import upcycle_source

        upcycle_source(cfg, _run_model_config(cfg))


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
    from launcher.data.tokenizer import load_tokenizer

    if not Path(cfg.resolved_tokenizer_path).exists():
        return None
    try:
        return cfg.model_config(load_tokenizer(cfg.resolved_tokenizer_path, kind=cfg.tokenizer).vocab_size)
    except ValueError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None


# ---------------------------------------------------------------------------- data
def sampled_max_token_id(ds) -> int:
    """The largest id in an IndexedDataset: exact for small ones, else over the first 16K tokens of 256
    documents spread evenly (the first and last included). Data made with another tokenizer uses its high ids
    everywhere, so a sample finds them without reading gigabytes."""
    if ds.num_tokens <= FULL_SCAN_TOKENS:
        return ds.max_token_id()
    n = len(ds)
    docs = sorted({round(i * (n - 1) / (SAMPLE_DOCUMENTS - 1)) for i in range(SAMPLE_DOCUMENTS)}) if n > 1 else [0]
    high = -1
    for doc in docs:
        ids = ds.get(doc, 0, SAMPLE_TOKENS_PER_DOCUMENT)
        if ids.size:
            high = max(high, int(ids.max()))
    return high


def check_ids_in_vocab(ds, vocab_size: int, tokenizer_path: str) -> None:
    import numpy as np

    if np.iinfo(ds.dtype).max < vocab_size and np.iinfo(ds.dtype).min >= 0:
        return  # the storage type cannot hold a larger id
    high = sampled_max_token_id(ds)
    if high >= vocab_size:
        raise UsageError(
            f"DATA_PATH: {ds.prefix}.bin holds token id {high}, beyond the vocabulary of the tokenizer "
            f"{tokenizer_path} ({vocab_size} ids); allowed: data tokenized with this tokenizer (python -m "
            f"launcher.preprocess --tokenizer {tokenizer_path} ...), or --tokenizer-path the one it was made with")


# ---------------------------------------------------------------------------- outputs
def check_writable(path, what: str, given=None) -> None:
    """UsageError unless `path` is, or can be created as, a folder this process can write in. Leaves nothing
    behind (a probe file is created and removed in the deepest folder that exists). `given`: what the user
    typed, where `path` is derived from it (a prefix's folder)."""
    path = Path(path)
    shown = str(given if given is not None else path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{what}: got {shown!r}, but {probe} is a file; allowed: a folder (or a path where "
                         "one can be created)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UsageError(f"{what}: got {shown!r}, but {probe} cannot be written ({exc.strerror}); allowed: a "
                         "folder this user can write in") from None


def check_outputs(cfg: RunConfig) -> None:
    check_writable(cfg.run_dir, "OUTPUT_BASEPATH")
    if not cfg.data_path and not cfg.finetune:
        check_writable(cfg.default_data_dir, "OUTPUT_BASEPATH")  # the embedded corpus is built there


# ---------------------------------------------------------------------------- the machine (run mode)
def check_device(cfg: RunConfig) -> None:
    """The device and precision asked for exist here. (dryrun plans for any device.)"""
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device: got 'cuda', but no CUDA device is usable here (torch.cuda.is_available() "
                             "is False); allowed: cpu on this machine, or MODE=dryrun to plan a GPU job from it")
        count = torch.cuda.device_count()
        if cfg.gpus_per_node > count:
            raise UsageError(f"GPUS_PER_NODE: got {cfg.gpus_per_node}; allowed: at most {count}, the CUDA devices "
                             "this node has")
        if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise UsageError(f"PRECISION: got 'bf16', but {torch.cuda.get_device_name(0)} has no bf16; allowed: "
                             "fp16 | fp32")
    elif cfg.precision == "fp16":
        raise UsageError("PRECISION: got 'fp16' on CPU; allowed on CPU: fp32 | bf16 (DeepSpeed trains fp16 on GPUs "
                         "only; MODE=dryrun --device cuda plans a GPU job)")


def _is_this_machine(addr: str) -> bool:
    try:
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as sock:
            sock.bind((addr, 0))  # only an address of this machine can be bound
        return True
    except OSError:
        return False


def check_port(cfg: RunConfig) -> None:
    """Node 0 serves the rendezvous on MASTER_PORT: it must be free there (when that is here)."""
    if cfg.node_rank != 0 or not _is_this_machine(cfg.master_addr):
        return
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store binds it
            sock.bind((host, cfg.master_port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                from launcher.cluster import free_port

                raise UsageError(f"MASTER_PORT: got {cfg.master_port}, but it is in use on this machine (another "
                                 f"job?); allowed: a free port, e.g. MASTER_PORT={free_port()}") from None
        finally:
            sock.close()


def check_memory(cfg: RunConfig, mcfg: GPTMoEConfig) -> None:
    from launcher.memory import GIB, estimate_memory

    mem = estimate_memory(cfg, mcfg)
    if mem.fits or cfg.ignore_memory_check:
        return
    raise UsageError(
        f"memory: this run needs about {mem.total / GIB:.1f} GiB per process and {mem.device_name} offers "
        f"{mem.device_total / GIB:.1f} GiB (MODE=dryrun shows the parts); allowed: a smaller model or BATCH_SIZE, "
        "ZeRO z1/z2, recompute sel/full, more processes, OFFLOAD=cpu, or --ignore-memory-check to launch anyway")


def check_before_writing(cfg: RunConfig, mcfg: GPTMoEConfig) -> None:
    """Everything about the outputs and the machine, in the order a user would fix them."""
    check_outputs(cfg)
    if cfg.mode == "run":
        check_device(cfg)
        check_memory(cfg, mcfg)
        check_port(cfg)
