"""Positional arguments + `--flags` + environment -> one RunConfig.

Precedence, lowest first: size-table defaults, positional arguments, environment, flags.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence

from launcher.cluster import discover_cluster
from launcher.config import ZERO_ALIASES, RunConfig
from launcher.errors import UsageError

POSITIONAL = ("MODE", "GPUS_PER_NODE", "TOKENIZER", "MODEL_SIZE", "MOE", "RT", "BATCH_SIZE", "SP", "AC", "ZERO",
              "SAVE_INTERVAL")

USAGE = """\
usage: dlc_run_pretrain_megatron_gpt.sh MODE GPUS_PER_NODE TOKENIZER MODEL_SIZE MOE RT BATCH_SIZE SP AC ZERO SAVE_INTERVAL [--flag value ...]

  MODE           run | dryrun
  GPUS_PER_NODE  processes per node (CPU processes where there is no GPU), >= 1
  TOKENIZER      jiebabpe | gpt2bpe
  MODEL_SIZE     0.125B 0.35B 0.76B 1.3B 2.7B 3.6B 6.7B 13B, or nano | tiny (CPU sizes)
  MOE            none | expert count (MoE layer on every other layer)
  RT             0 top-1 (Switch) | 1 expert choice | 2 top-2 (GShard)
  BATCH_SIZE     micro batch per process, >= 1
  SP             sequence-parallel degree (DeepSpeed-Ulysses), 1 = off
  AC             activation recomputation: none | sel | full
  ZERO           none | z1 | z2 (also 0 | 1 | 2; do = z1)
  SAVE_INTERVAL  iterations between checkpoints, >= 1

environment: WORLD_SIZE (nodes) RANK (node rank) MASTER_ADDR MASTER_PORT SEQ_LEN DATA_PATH OUTPUT_BASEPATH
             TRAIN_TOKENS WARMUP_TOKENS GLOBAL_BATCH_SIZE EP_SIZE PRECISION LOAD OFFLOAD
flags:       any run setting as --name value, e.g. --lr 3e-4 --seq-len 1024 --eval-interval 50 --no-drop-tokens
example:     bash examples/megatron/dlc_run_pretrain_megatron_gpt.sh run 1 jiebabpe 0.125B 8 0 1 1 sel none 10000"""

ENV_FIELDS = {"SEQ_LEN": "seq_len", "DATA_PATH": "data_path", "OUTPUT_BASEPATH": "output_basepath",
              "TRAIN_TOKENS": "train_tokens", "WARMUP_TOKENS": "warmup_tokens", "GLOBAL_BATCH_SIZE": "global_batch",
              "EP_SIZE": "ep_size", "PRECISION": "precision", "LOAD": "load", "OFFLOAD": "offload"}
# Fields set only through positional arguments or cluster discovery.
_NOT_FLAGS = {"mode"}


def _int(name: str, text: str, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name}: got {text!r}; allowed: an integer >= {minimum}") from None
    if value < minimum:
        raise UsageError(f"{name}: got {text!r}; allowed: an integer >= {minimum}")
    return value


def parse_positional(args: Sequence[str]) -> dict:
    """The 11 positional arguments -> RunConfig fields (choices are checked by RunConfig)."""
    a = dict(zip(POSITIONAL, args))
    if a["MOE"].lower() == "none":
        num_experts = 0
    else:
        num_experts = _int("MOE", a["MOE"])
    if a["RT"] not in ("0", "1", "2"):
        raise UsageError(f"RT: got {a['RT']!r}; allowed: 0 (top-1) | 1 (expert choice) | 2 (top-2)")
    zero = a["ZERO"].lower()
    if zero in ("3", "z3"):
        zero_stage = 3  # RunConfig explains why it is refused
    elif zero in ZERO_ALIASES:
        zero_stage = ZERO_ALIASES[zero]
    else:
        raise UsageError(f"ZERO: got {a['ZERO']!r}; allowed: none | z1 | z2 | do | 0 | 1 | 2")
    return dict(mode=a["MODE"], gpus_per_node=_int("GPUS_PER_NODE", a["GPUS_PER_NODE"]), tokenizer=a["TOKENIZER"],
                model_size=a["MODEL_SIZE"], num_experts=num_experts, router_type=int(a["RT"]),
                micro_batch=_int("BATCH_SIZE", a["BATCH_SIZE"]), sp_size=_int("SP", a["SP"]), recompute=a["AC"],
                zero_stage=zero_stage, save_interval=_int("SAVE_INTERVAL", a["SAVE_INTERVAL"]))


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    out = {}
    for f in dataclasses.fields(RunConfig):
        t = hints[f.name]
        if isinstance(t, types.UnionType):  # `int | None` -> int
            t = next(a for a in typing.get_args(t) if a is not type(None))
        out[f.name] = t
    return out


def _convert(name: str, text: str, typ: type):
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{name}: got {text!r}; allowed: true | false")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"{name}: got {text!r}; allowed: an integer") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"{name}: got {text!r}; allowed: a number") from None
    return text


def parse_flags(args: Sequence[str]) -> dict:
    """`--name value`, `--name=value`, bare `--name` (true) and `--no-name` (false) -> RunConfig fields."""
    types_ = _field_types()
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise UsageError(f"flags: got {arg!r}; allowed: --name value after the 11 positional arguments")
        name, eq, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        negated = key.startswith("no_") and key[3:] in types_ and types_[key[3:]] is bool
        if negated:
            key = key[3:]
        if key not in types_ or key in _NOT_FLAGS:
            settable = sorted(k.replace("_", "-") for k in types_ if k not in _NOT_FLAGS)
            raise UsageError(f"flags: unknown --{name}; allowed: {', '.join('--' + s for s in settable)}")
        typ = types_[key]
        if negated:
            out[key] = False
        elif eq:
            out[key] = _convert(f"--{name}", value, typ)
        elif typ is bool and (i + 1 == len(args) or args[i + 1].startswith("--")):
            out[key] = True
        else:
            if i + 1 == len(args):
                raise UsageError(f"--{name}: missing its value")
            i += 1
            out[key] = _convert(f"--{name}", args[i], typ)
        i += 1
    return out


def parse_env(env: Mapping[str, str]) -> dict:
    types_ = _field_types()
    out = {}
    for var, key in ENV_FIELDS.items():
        text = env.get(var, "").strip()
        if text:
            out[key] = _convert(var, text, types_[key])
    return out


def build_run_config(argv: Sequence[str], env: Mapping[str, str]) -> RunConfig:
    """argv: the positional arguments then flags, as given to the launch script."""
    if len(argv) < len(POSITIONAL):
        raise UsageError(f"expected {len(POSITIONAL)} positional arguments, got {len(argv)}\n{USAGE}")
    settings = parse_positional(argv[:len(POSITIONAL)])
    flags = parse_flags(argv[len(POSITIONAL):])
    settings.update(discover_cluster(env, hostfile=flags.get("hostfile")))
    settings.update(parse_env(env))
    settings.update(flags)
    return RunConfig(**settings)
