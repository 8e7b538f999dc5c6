"""The fine-tuning script's line -> one RunConfig with its FinetuneConfig, resolved against the pretrained
checkpoint and the data.

    [MODE] TASK_NAME TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH MODEL_SIZE MOE RT BATCH_SIZE
    EPOCH SP AC ZERO SEQ_LEN [--flag value ...]

The model is the checkpoint's: MODEL_SIZE (with any shape flags), MOE and RT must describe it, or one line says
which differs; SEQ_LEN may be shorter than its position table. The tokenizer is the one saved in the
checkpoint. TRAIN is tokenized here, so that the training length (EPOCH epochs of it) becomes the run's
iterations before anything is written: warm-up `--warmup-fraction` of them (0.01), then cosine decay; a
validation, a checkpoint and a few samples after each epoch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from launcher.cli import _experts, _int, _router, _zero_stage, resolve_settings
from launcher.config import MODES, RunConfig
from launcher.errors import UsageError
from launcher.finetune_config import DERIVED_UNLESS_GIVEN
from launcher.presets import PRESETS
from model.config import SIZES, RouterKind

POSITIONAL = {"TASK_NAME": "task_name", "TRAIN_DATASET_PATH": "train_path", "VALID_DATASET_PATH": "valid_path",
              "PRETRAIN_CHECKPOINT_PATH": "pretrained", "MODEL_SIZE": "model_size", "MOE": "num_experts",
              "RT": "router_type", "BATCH_SIZE": "micro_batch", "EPOCH": "epochs", "SP": "sp_size",
              "AC": "recompute", "ZERO": "zero_stage", "SEQ_LEN": "seq_len"}
PARSERS = {"TASK_NAME": str, "TRAIN_DATASET_PATH": str, "VALID_DATASET_PATH": str, "PRETRAIN_CHECKPOINT_PATH": str,
           "MODEL_SIZE": str, "MOE": _experts, "RT": _router, "BATCH_SIZE": _int, "EPOCH": _int, "SP": _int,
           "AC": str, "ZERO": _zero_stage, "SEQ_LEN": _int}
# Pretraining's length and data variables: fine-tuning's come from EPOCH and the positional paths.
IGNORED_ENVIRONMENT = ("TRAIN_TOKENS", "WARMUP_TOKENS", "DATA_PATH", "SEQ_LEN")
# Fine-tuning's default learning rate: this fraction of the size's pretraining rate, decaying to a tenth of it.
LR_FRACTION = 0.1

USAGE = """\
usage: run_finetune_text_generation_gpt.sh [MODE] TASK_NAME TRAIN_DATASET_PATH VALID_DATASET_PATH \
PRETRAIN_CHECKPOINT_PATH MODEL_SIZE MOE RT BATCH_SIZE EPOCH SP AC ZERO SEQ_LEN [--flag value ...]

  MODE                      optional: run (the default) | dryrun (resolve, print, write the configs, start nothing)
  TASK_NAME                 names the run folder: OUTPUT_BASEPATH/<TASK_NAME>-finetune-<settings>
  TRAIN_DATASET_PATH        prompt<TAB>target .tsv, or .jsonl with prompt/target fields (--prompt-key, --target-key)
  VALID_DATASET_PATH        the same format: validation loss and perplexity after each epoch, samples
  PRETRAIN_CHECKPOINT_PATH  run folder, checkpoints folder or tag folder, any expert-parallel size
  MODEL_SIZE MOE RT         the checkpoint's model (checked against it): size, none | experts, 0 | 1 | 2
  BATCH_SIZE                micro batch per process, >= 1
  EPOCH                     passes over TRAIN, >= 1
  SP                        sequence-parallel degree (DeepSpeed-Ulysses), 1 = off
  AC                        activation recomputation: none | sel | full
  ZERO                      none | z1 | z2 (also 0 | 1 | 2; do = z1)
  SEQ_LEN                   tokens per sequence, at most the checkpoint's

environment: GPUS_PER_NODE (processes per node; default: the GPUs here, else 1), WORLD_SIZE (nodes) RANK
             MASTER_ADDR MASTER_PORT, OUTPUT_BASEPATH GLOBAL_BATCH_SIZE (default: micro batch x data-parallel
             size) EP_SIZE PRECISION LOAD OFFLOAD
flags:       --lr (default a tenth of the size's pretraining rate) --min-lr --pack --warmup-fraction 0.01
             --samples 4 --sample-tokens 64 --prompt-key --target-key, and any run or model setting of
             pretraining (--seed, --weight-decay, --dropout, --eval-iters, --run-name, ...)
example:     bash examples/megatron/run_finetune_text_generation_gpt.sh poetry data/poetry_train.tsv \
data/poetry_dev.tsv runs/pretrain 0.125B 8 0 4 3 1 sel z1 512"""


def default_processes_per_node() -> int:
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def read_pretrained(path: str):
    """(tag folder, its GPTMoEConfig, its tokenizer kind) of PRETRAIN_CHECKPOINT_PATH, its weight files
    checked (present, whole, data only); one-line UsageError otherwise."""
    from launcher.training.checkpoint import RUN_CONFIG, check_model_files, find_checkpoint, read_json

    found = find_checkpoint(path)
    if found is None:
        raise UsageError(f"PRETRAIN_CHECKPOINT_PATH: got {path!r}; allowed: a run folder, a checkpoints folder "
                         "with a 'latest' file, or a tag folder with trainer_state.json (a complete checkpoint)")
    tag_dir = found[0] / found[1]
    mcfg = check_model_files(tag_dir)
    kind = read_json(tag_dir / RUN_CONFIG).get("tokenizer")
    if not (tag_dir / "tokenizer").is_dir() or not isinstance(kind, str):
        raise UsageError(f"PRETRAIN_CHECKPOINT_PATH: {tag_dir} holds no tokenizer (tokenizer/ and run_config.json's "
                         "'tokenizer'); allowed: a checkpoint this toolkit wrote")
    return tag_dir, mcfg, kind


def _shape(layers: int, hidden: int, heads: int) -> str:
    return f"{layers} layers, hidden {hidden}, {heads} heads"


def check_against_checkpoint(settings: dict, ckpt, tag_dir: Path) -> None:
    """MODEL_SIZE (with shape flags), MOE, RT and SEQ_LEN as given, against the checkpoint's model config."""
    size = settings["model_size"]
    if size not in SIZES:
        raise UsageError(f"MODEL_SIZE: got {size!r}; allowed: {' | '.join(SIZES)}")
    layers, hidden, heads = SIZES[size]
    given = (settings.get("num_layers", layers), settings.get("hidden_size", hidden), settings.get("num_heads", heads))
    have = (ckpt.num_layers, ckpt.hidden_size, ckpt.num_heads)
    if given != have:
        names = [name for name, shape in SIZES.items() if shape == have]
        described = f"{names[0]} ({_shape(*have)})" if names else _shape(*have)
        flags = "" if given == SIZES[size] else " with its shape flags"
        raise UsageError(f"MODEL_SIZE: got {size}{flags} ({_shape(*given)}); the checkpoint {tag_dir} is {described}")
    experts = settings["num_experts"]
    if experts != ckpt.num_experts:
        had = "dense (MOE none)" if not ckpt.is_moe else f"MOE {ckpt.num_experts}"
        raise UsageError(f"MOE: got {experts or 'none'}; the checkpoint {tag_dir} is {had}")
    if ckpt.is_moe and settings["router_type"] != ckpt.router_type:
        digit = {RouterKind.TOP1: 0, RouterKind.EXPERT_CHOICE: 1, RouterKind.TOP2: 2}
        raise UsageError(f"RT: got {digit[settings['router_type']]} ({settings['router_type'].label}); the checkpoint "
                         f"{tag_dir} routes with {digit[ckpt.router_type]} ({ckpt.router_type.label})")
    if settings["seq_len"] > ckpt.seq_len:
        raise UsageError(f"SEQ_LEN: got {settings['seq_len']}; allowed: at most the checkpoint's {ckpt.seq_len} "
                         "positions")


def build_finetune_config(argv: Sequence[str], env: Mapping[str, str]) -> tuple[RunConfig, dict[str, str]]:
    """(RunConfig, where each setting given came from): everything checked, nothing written: the line, the
    checkpoint, the data."""
    from launcher.data.tokenizer import load_tokenizer
    from launcher.training.checkpoint import shape_differences
    from launcher.training.sft_data import data_digest, iters_per_epoch, load_examples, valid_steps

    mode = "run"
    if argv and argv[0] in MODES:
        mode, argv = argv[0], argv[1:]
    settings, origins = resolve_settings(argv, {k: v for k, v in env.items() if k not in IGNORED_ENVIRONMENT},
                                         POSITIONAL, PARSERS, USAGE)
    if env.get("GPUS_PER_NODE", "").strip() and origins.get("gpus_per_node") != "line":
        settings["gpus_per_node"] = _int("GPUS_PER_NODE", env["GPUS_PER_NODE"].strip())
        origins["gpus_per_node"] = "environment"
    settings.setdefault("gpus_per_node", default_processes_per_node())
    settings["mode"] = mode

    tag_dir, ckpt, kind = read_pretrained(settings["pretrained"])
    check_against_checkpoint(settings, ckpt, tag_dir)
    # The checkpoint's model; what this run sets (SEQ_LEN, AC, EP, model flags) on top.
    model = {k: v for k, v in ckpt.to_dict().items() if k not in ("ep_size", "recompute")}
    settings = {**model, "tokenizer": kind, "tokenizer_path": str(tag_dir / "tokenizer"), "lr_decay": "cosine",
                **settings, "pretrained": str(tag_dir)}
    if "lr" not in settings:
        lr = PRESETS[settings["model_size"]].lrs(moe=ckpt.is_moe)[0] * LR_FRACTION
        settings["lr"] = lr
        settings.setdefault("min_lr", lr * LR_FRACTION)
    world = settings["num_nodes"] * settings["gpus_per_node"]
    if "global_batch" not in settings and world % settings["sp_size"] == 0:
        settings["global_batch"] = settings["micro_batch"] * world // settings["sp_size"]
    # One iteration for now: the length comes from the data, read once everything else is known good.
    settings.update(train_tokens=settings.get("global_batch", 1) * settings["seq_len"], warmup_tokens=0)
    cfg = RunConfig.from_settings(settings)
    diffs = shape_differences(ckpt, dataclasses.replace(cfg.model, seq_len=ckpt.seq_len))
    if diffs:
        raise UsageError(f"the checkpoint {tag_dir} has another model: {'; '.join(diffs)}; give the model flags it "
                         "was trained with")

    train, valid = load_examples(cfg, load_tokenizer(cfg.resolved_tokenizer_path, kind=cfg.tokenizer))
    train_iters = iters_per_epoch(len(train), cfg.global_batch) * cfg.finetune.epochs
    per_epoch = train_iters // cfg.finetune.epochs
    derived = dict(train_tokens=train_iters * cfg.tokens_per_iter,
                   warmup_tokens=cfg.finetune.warmup_iters(train_iters) * cfg.tokens_per_iter)
    per_epoch_defaults = dict(eval_interval=per_epoch, save_interval=per_epoch,
                              eval_iters=valid_steps(len(valid), cfg.micro_batch, cfg.dp_size))
    derived.update({k: per_epoch_defaults[k] for k in DERIVED_UNLESS_GIVEN if k not in origins})
    finetune = dataclasses.replace(cfg.finetune, data_digest=data_digest(cfg))
    return dataclasses.replace(cfg, **derived, finetune=finetune), origins

