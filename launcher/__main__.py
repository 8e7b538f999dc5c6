"""`python -m launcher MODE GPUS_PER_NODE ... SAVE_INTERVAL [--flags]`: validate, write configs, launch.

The positional bash scripts under examples/megatron/ hand everything here. Order: everything is checked
(settings, the files read, the outputs, the machine) before anything is written; then the run folder is
locked, the embedded corpus built if needed, the nodes rendezvous, the configs are written and the job starts.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def _name_the_cpu_accelerator() -> None:
    """DeepSpeed (imported with the model) warns when it has to guess the accelerator: on a machine without
    CUDA, name it before that import."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


_name_the_cpu_accelerator()

from launcher.cli import USAGE, resolve_settings
from launcher.cluster import format_command, launch_command, rendezvous
from launcher.config import RunConfig
from launcher.ds_config import build_ds_config, check_ds_config
from launcher.dryrun import embedded_corpus_note, summary
from launcher.errors import UsageError
from launcher.files import write_json_atomic, write_text_atomic
from launcher.job import LEADER_ENV, RunLock, Supervisor, remove_stale_build_locks
from launcher.preflight import check_before_writing, check_inputs
from launcher.training.signals import StartupStopped, StopRequest, blocked, unblock
from model.config import GPTMoEConfig


def prepare_data(cfg: RunConfig) -> None:
    """With no DATA_PATH, tokenize the embedded corpus (the Python standard library) once, before any rank starts."""
    if cfg.data_path or cfg.finetune:
        return
    from launcher.data.stdlib_corpus import build_stdlib_corpus

    if not (cfg.default_data_dir / "corpus.json").is_file():  # first use: say what the wait is for
        print(f"data: {embedded_corpus_note(cfg)}", flush=True)
    # Serialised by the builder itself: a second launcher on this machine waits, then reuses the corpus.
    build_stdlib_corpus(cfg.default_data_dir.parent, tokenizer_kind=cfg.tokenizer, vocab_size=cfg.model.vocab_size)


def tokenizer_vocab_size(cfg: RunConfig) -> int | None:
    """The vocabulary of the run's tokenizer when it exists already; else None (the configured size is used)."""
    path = Path(cfg.resolved_tokenizer_path)
    if not path.exists():
        return None
    from launcher.data.tokenizer import load_tokenizer

    return load_tokenizer(str(path), kind=cfg.tokenizer).vocab_size


def build_pretrain_config(argv: list[str], env) -> tuple[RunConfig, dict[str, str]]:
    """The pretraining script's line -> (RunConfig, where each setting given came from)."""
    settings, origins = resolve_settings(argv, env)
    return RunConfig.from_settings(settings), origins


def resolve(argv: list[str], env, build=build_pretrain_config) -> tuple[RunConfig, GPTMoEConfig, dict, dict[str, str]]:
    """(run config, model config, DeepSpeed config, where each given setting came from): everything validated,
    cheapest first; nothing written.
    `build(argv, env) -> (RunConfig, origins)`: the line's parser (pretraining's, or launcher.finetune_cli's)."""
    cfg, origins = build(argv, env)
    RunLock(cfg).check_free()  # first: a live job's folder is not ours to read as a resume, nor to rewrite
    ds = build_ds_config(cfg)
    check_ds_config(ds)
    check_inputs(cfg)
    mcfg = cfg.model_config(tokenizer_vocab_size(cfg))
    check_before_writing(cfg, mcfg)
    return cfg, mcfg, ds, origins


def start(argv: list[str], build=build_pretrain_config, module: str = "launcher.pretrain") -> tuple | None:
    """Check, lock, build, write: returns (cfg, launch argv, launch env), or None for dryrun."""
    cfg, mcfg, ds, origins = resolve(argv, os.environ, build)
    lock = RunLock(cfg) if cfg.mode == "run" else None
    try:
        if lock:
            lock.acquire()
            if cfg.num_nodes > 1 and not cfg.hostfile:  # a missing node is found before any corpus is built
                rendezvous(cfg, cfg.rendezvous_timeout)
            prepare_data(cfg)
            mcfg = cfg.model_config(tokenizer_vocab_size(cfg))
        run_config_path = cfg.run_dir / "run_config.json"
        ds_path = cfg.run_dir / "ds_config.json"
        command, env = launch_command(cfg, ["--run-config", str(run_config_path)], module)
        cfg.save(run_config_path)
        write_text_atomic(cfg.to_yaml(given=origins), cfg.run_dir / "run_config.yaml")
        write_json_atomic(ds, ds_path)
        if lock:
            lock.keep()
    except BaseException:
        if lock:
            lock.release()
        raise
    print(summary(cfg, mcfg, str(ds_path), format_command(command, env), origins), flush=True)
    return (cfg, command, env) if cfg.mode == "run" else None


def main(argv: list[str] | None = None, build=build_pretrain_config, usage: str = USAGE,
         module: str = "launcher.pretrain") -> int:
    """`build`, `usage`: the line's parser and help; `module`: the entry point every process runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage)
        return 0 if argv else 2
    try:
        # Ctrl-C or SIGTERM before the job starts: one line, nothing left half done.
        with StopRequest(startup=True):
            started = start(argv, build, module)
            blocked()  # from here the job's own handlers take the stop signals (see Supervisor, pretrain)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StartupStopped as exc:
        print(f"{exc}: stopped before the job started; nothing was launched", file=sys.stderr)
        return 128 + exc.signum
    if started is None:
        unblock()
        return 0
    cfg, command, env = started
    for lock in remove_stale_build_locks():  # else the job would wait on it forever, silently
        print(f"removed a build lock left by a killed job: {lock}", flush=True)
    env = {**os.environ, **env, LEADER_ENV: str(os.getpid())}
    if "launcher.job" in command:
        return Supervisor(command, env).run()
    if cfg.hostfile:  # the deepspeed launcher: its own handlers stop its processes
        unblock()
    # One process (or the deepspeed launcher): it takes this pid, the run folder's lock and the blocked signals.
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    sys.exit(main())
