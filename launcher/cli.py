"""Positional arguments + `--flags` + environment -> one RunConfig.

Every setting, run or model, has a flag: its name with dashes (`--lr`, `--router-jitter`), or for a model
setting Megatron-LM's name where it has one (`--num-attention-heads`; see `launcher.config.MODEL_FLAG_NAMES`).
Precedence, lowest first: size-table defaults, environment, positional arguments and flags on the line.
"""
from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence

from launcher.cluster import discover_cluster
from launcher.config import (ENVIRONMENT, MODEL_FLAG_NAMES, POSITIONAL, RUN_FIELDS, SETTING_ALIASES, ZERO_ALIASES,
                             RunConfig, flag_name)
from launcher.errors import UsageError
from model.config import FIELDS as MODEL_FIELDS
from model.config import ROUTER_ALLOWED, ConfigError, GPTMoEConfig, RouterKind

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
flags:       any run or model setting as --name value, e.g. --lr 3e-4 --seq-len 1024 --hidden-size 1024
             --num-layers 8 --num-attention-heads 16 --ffn-hidden-size 4096 --router-jitter 0.01 --no-drop-tokens
example:     bash examples/megatron/dlc_run_pretrain_megatron_gpt.sh run 1 jiebabpe 0.125B 8 0 1 1 sel none 10000"""

# Settings only a positional argument sets.
_NOT_FLAGS = {"mode"}


def _int(name: str, text: str, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name}: got {text!r}; allowed: an integer >= {minimum}") from None
    if value < minimum:
        raise UsageError(f"{name}: got {text!r}; allowed: an integer >= {minimum}")
    return value


def _zero_stage(name: str, text: str) -> int:
    zero = str(text).lower()
    if zero in ("3", "z3"):
        return 3  # RunConfig explains why it is refused
    if zero not in ZERO_ALIASES:
        raise UsageError(f"{name}: got {text!r}; allowed: none | z1 | z2 | do | 0 | 1 | 2")
    return ZERO_ALIASES[zero]


def _experts(name: str, text: str) -> int | list[int]:
    """`none` (dense), a count, or one count per MoE layer (`4,8`)."""
    if text.lower() == "none":
        return 0
    if "," in text:
        return [_int(name, part.strip()) for part in text.split(",")]
    return _int(name, text)


def parse_positional(args: Sequence[str]) -> dict:
    """The positional arguments -> settings (choices are checked by RunConfig and GPTMoEConfig)."""
    a = dict(zip(POSITIONAL, args))
    try:
        router = RouterKind.from_rt(a["RT"])  # the one place the RT digit is read
    except ConfigError as exc:
        raise UsageError(f"RT: got {a['RT']!r}; allowed: {exc.allowed}") from None
    return dict(mode=a["MODE"], gpus_per_node=_int("GPUS_PER_NODE", a["GPUS_PER_NODE"]), tokenizer=a["TOKENIZER"],
                model_size=a["MODEL_SIZE"], num_experts=_experts("MOE", a["MOE"]), router_type=router,
                micro_batch=_int("BATCH_SIZE", a["BATCH_SIZE"]), sp_size=_int("SP", a["SP"]), recompute=a["AC"],
                zero_stage=_zero_stage("ZERO", a["ZERO"]), save_interval=_int("SAVE_INTERVAL", a["SAVE_INTERVAL"]))


def _plain(t):
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:  # `int | None` -> int
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _setting_types() -> dict[str, object]:
    """Every setting's type, run and model fields alike."""
    hints = {**typing.get_type_hints(RunConfig), **typing.get_type_hints(GPTMoEConfig)}
    return {name: _plain(hints[name]) for name in (*RUN_FIELDS, *MODEL_FIELDS)}


SETTING_TYPES = _setting_types()
# flag spelling (underscores) -> setting
FLAGS = {**{MODEL_FLAG_NAMES.get(s, s): s for s in SETTING_TYPES if s not in _NOT_FLAGS}, **SETTING_ALIASES}


def convert(setting: str, name: str, text: str):
    """A setting's value from its text; `name` is how errors call it."""
    if setting == "num_experts":
        return _experts(name, text)
    if setting == "zero_stage":
        return _zero_stage(name, text)
    typ = SETTING_TYPES[setting]
    if typ is RouterKind:
        if text not in ROUTER_ALLOWED.split(" | "):
            raise UsageError(f"{name}: got {text!r}; allowed: {ROUTER_ALLOWED}")
        return RouterKind(text)
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


def setting_for_flag(name: str) -> str:
    """`hidden-size` -> hidden_size; an unknown name is a one-line error listing every flag."""
    key = name.replace("-", "_")
    if key not in FLAGS:
        settable = sorted(flag_name(s) for s in SETTING_TYPES if s not in _NOT_FLAGS)
        raise UsageError(f"flags: unknown --{name}; allowed: {', '.join(settable)}")
    return FLAGS[key]


def parse_flags(args: Sequence[str]) -> dict:
    """`--name value`, `--name=value`, bare `--name` (true) and `--no-name` (false) -> settings."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise UsageError(f"flags: got {arg!r}; allowed: --name value after the 11 positional arguments")
        name, eq, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        negated = (key.startswith("no_") and FLAGS.get(key[3:]) is not None
                   and SETTING_TYPES[FLAGS[key[3:]]] is bool)
        setting = setting_for_flag(name[3:] if negated else name)
        typ = SETTING_TYPES[setting]
        if negated:
            out[setting] = False
        elif eq:
            out[setting] = convert(setting, f"--{name}", value)
        elif typ is bool and (i + 1 == len(args) or args[i + 1].startswith("--")):
            out[setting] = True
        else:
            if i + 1 == len(args):
                raise UsageError(f"--{name}: missing its value")
            i += 1
            out[setting] = convert(setting, f"--{name}", args[i])
        i += 1
    return out


def parse_env(env: Mapping[str, str]) -> dict:
    out = {}
    for var, setting in ENVIRONMENT.items():
        text = env.get(var, "").strip()
        if text:
            out[setting] = convert(setting, var, text)
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
    return RunConfig.from_settings(settings)

