"""`python -m launcher MODE GPUS_PER_NODE ... SAVE_INTERVAL [--flags]`: validate, write configs, launch.

The positional bash scripts under examples/megatron/ hand everything here.
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
from launcher.config import RunConfig
from launcher.cluster import format_command, launch_command, run_torchrun
from launcher.ds_config import build_ds_config, check_ds_config
from launcher.dryrun import summary
from launcher.errors import UsageError
from launcher.files import write_json_atomic, write_text_atomic
from launcher.preflight import check_inputs
from model.config import GPTMoEConfig


def prepare_data(cfg: RunConfig) -> None:
    """With no DATA_PATH, tokenize the embedded corpus (the Python standard library) once, before any rank starts."""
    if cfg.data_path or cfg.finetune:
        return
    from launcher.data.stdlib_corpus import build_stdlib_corpus

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
    cheapest first; the corpus is built (run mode) only once all else is known good.
    `build(argv, env) -> (RunConfig, origins)`: the line's parser (pretraining's, or launcher.finetune_cli's)."""
    cfg, origins = build(argv, env)
    ds = build_ds_config(cfg)
    check_ds_config(ds)
    check_inputs(cfg)
    if cfg.mode == "run":
        prepare_data(cfg)
    return cfg, cfg.model_config(tokenizer_vocab_size(cfg)), ds, origins


def main(argv: list[str] | None = None, build=build_pretrain_config, usage: str = USAGE,
         module: str = "launcher.pretrain") -> int:
    """`build`, `usage`: the line's parser and help; `module`: the entry point every process runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage)
        return 0 if argv else 2
    try:
        cfg, mcfg, ds, origins = resolve(argv, os.environ, build)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_config_path = cfg.run_dir / "run_config.json"
    ds_path = cfg.run_dir / "ds_config.json"
    command, env = launch_command(cfg, ["--run-config", str(run_config_path)], module)
    # Everything is validated above: only now is anything written.
    cfg.save(run_config_path)
    write_text_atomic(cfg.to_yaml(given=origins), cfg.run_dir / "run_config.yaml")
    write_json_atomic(ds, ds_path)
    print(summary(cfg, mcfg, str(ds_path), format_command(command, env), origins), flush=True)
    if cfg.mode == "dryrun":
        return 0
    env = {**os.environ, **env}
    if "torch.distributed.run" in command:
        return run_torchrun(command, env)
    os.execvpe(command[0], command, env)  # one process (or the deepspeed launcher): signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
