"""Positional arguments + `--flags` + a run file + environment -> one RunConfig.

Every setting, run or model, has a flag: its name with dashes (`--lr`, `--router-jitter`), or for a model
setting Megatron-LM's name where it has one (`--num-attention-heads`; see `launcher.config.MODEL_FLAG_NAMES`).
`--config FILE` reads settings from a YAML file by the same names (`hidden-size: 1024`); positional arguments
it gives may then be left off the line, from the right.
Precedence, lowest first: size-table defaults, the run file, environment, positional arguments and flags on
the line. `resolve_settings` also says where each setting came from, for dryrun to show.
"""
from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

from launcher.cluster import discover_cluster
from launcher.config import (ENVIRONMENT, MODEL_FLAG_NAMES, POSITIONAL, RUN_FIELDS, SETTING_ALIASES, ZERO_ALIASES,
                             RunConfig, flag_name)
from launcher.errors import UsageError
from launcher.finetune_config import FINETUNE_FIELDS, FINETUNE_RESOLVED, FinetuneConfig
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
run file:    --config run.yaml: settings by flag name (lr: 3.0e-4); the line and the environment win over it.
             dryrun writes RUN_DIR/run_config.yaml; `run --config RUN_DIR/run_config.yaml` repeats that run
example:     bash examples/megatron/dlc_run_pretrain_megatron_gpt.sh run 1 jiebabpe 0.125B 8 0 1 1 sel none 10000"""

# Settings only a positional argument (or the launcher) sets.
_NOT_FLAGS = {"mode", *FINETUNE_RESOLVED}


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
    """`none` (dense), a count, or one count per MoE layer (`4,8`; 0 makes that layer dense)."""
    if text.lower() == "none":
        return 0
    if "," in text:
        return [_int(name, part.strip(), minimum=0) for part in text.split(",")]
    return _int(name, text)


def _router(name: str, text: str) -> RouterKind:
    try:
        return RouterKind.from_rt(text)  # the one place the RT digit is read
    except ConfigError as exc:
        raise UsageError(f"{name}: got {text!r}; allowed: {exc.allowed}") from None


_POSITIONAL_PARSERS = {"MODE": str, "GPUS_PER_NODE": _int, "TOKENIZER": str, "MODEL_SIZE": str, "MOE": _experts,
                       "RT": _router, "BATCH_SIZE": _int, "SP": _int, "AC": str, "ZERO": _zero_stage,
                       "SAVE_INTERVAL": _int}


def parse_positional(args: Sequence[str], positional: Mapping[str, str] = POSITIONAL,
                     parsers: Mapping = _POSITIONAL_PARSERS) -> dict:
    """The positional arguments given (all 11, or the first few when a run file gives the rest) -> settings.
    Choices are checked by RunConfig and GPTMoEConfig. `positional` (name -> setting) and `parsers` (name ->
    parse(name, text), or str): another script's arguments (launcher.finetune_cli)."""
    out = {}
    for (name, setting), text in zip(positional.items(), args):
        parse = parsers[name]
        out[setting] = text if parse is str else parse(name, text)
    return out


def _plain(t):
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:  # `int | None` -> int
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _setting_types() -> dict[str, object]:
    """Every setting's type, run, model and fine-tuning fields alike."""
    hints = {**typing.get_type_hints(RunConfig), **typing.get_type_hints(GPTMoEConfig),
             **typing.get_type_hints(FinetuneConfig)}
    return {name: _plain(hints[name]) for name in (*RUN_FIELDS, *MODEL_FIELDS, *FINETUNE_FIELDS)}


SETTING_TYPES = _setting_types()
# flag spelling (underscores) -> setting
FLAGS = {**{MODEL_FLAG_NAMES.get(s, s): s for s in SETTING_TYPES if s not in _NOT_FLAGS}, **SETTING_ALIASES}


def convert(setting: str, name: str, value):
    """A setting's value from its text (line, environment) or from a YAML value; `name` is how errors call it."""
    if not isinstance(value, str):
        return _from_yaml(setting, name, value)
    text = value
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


def _from_yaml(setting: str, name: str, value):
    """A value YAML has typed already: check it has the setting's type (ranges are RunConfig's business)."""
    typ = SETTING_TYPES[setting]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if setting == "num_experts" and (is_int or (isinstance(value, list) and value
                                                and all(isinstance(v, int) and not isinstance(v, bool)
                                                        for v in value))):
        return value
    if setting == "zero_stage" and is_int:
        return _zero_stage(name, str(value))
    if typ is bool and isinstance(value, bool):
        return value
    if typ is int and is_int:
        return value
    if typ is float and (is_int or isinstance(value, float)):
        return float(value)
    if typ is str and (is_int or isinstance(value, float)):
        return str(value)  # `model-size: 13B` is a string, `split: 98` a number
    if isinstance(value, (bool, int, float)):
        return convert(setting, name, str(value).lower() if isinstance(value, bool) else str(value))
    kind = {"num_experts": "an expert count or a list of counts", "zero_stage": "0 | 1 | 2"}.get(setting)
    raise UsageError(f"{name}: got {value!r}; allowed: {kind or 'a single value'}")


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


def read_run_file(path: str) -> dict:
    """`--config FILE`: a YAML mapping of settings by flag name (`hidden-size: 1024`, `num_layers: 8`)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config: got {path!r}; allowed: a YAML file of settings by flag name (lr: 3.0e-4)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: got a {type(data).__name__}; allowed: a mapping of settings by flag name "
                         "(lr: 3.0e-4)")
    out = {}
    for key, value in data.items():
        setting = FLAGS.get(str(key).replace("-", "_"))
        if setting is None:
            settable = sorted(flag_name(s)[2:] for s in SETTING_TYPES if s not in _NOT_FLAGS)
            raise UsageError(f"{path}: unknown setting {key!r}; allowed: {', '.join(settable)}")
        if value is not None:  # `key:` with no value: the default
            out[setting] = convert(setting, f"{path}: {key}", value)
    return out


def _split_line(argv: Sequence[str], count: int) -> tuple[list[str], list[str], str | None]:
    """(up to `count` positional arguments, flags, --config FILE) of a launch line."""
    n = 0
    while n < min(len(argv), count) and not argv[n].startswith("--"):
        n += 1
    flags, run_file, i = [], None, n
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name == "--config":
            if not eq:
                if i + 1 == len(argv):
                    raise UsageError("--config: missing its value (a YAML file of settings)")
                i, value = i + 1, argv[i + 1]
            run_file = value
        else:
            flags.append(argv[i])
        i += 1
    return list(argv[:n]), flags, run_file


def resolve_settings(argv: Sequence[str], env: Mapping[str, str], positional: Mapping[str, str] = POSITIONAL,
                     parsers: Mapping = _POSITIONAL_PARSERS, usage: str = USAGE) -> tuple[dict, dict[str, str]]:
    """(settings, origin of each setting given) from a launch line and the environment. Origins: "line",
    "environment", or the run file's path. `positional`, `parsers`, `usage`: the script's (default: pretraining's,
    see parse_positional)."""
    given, flag_args, run_file = _split_line(argv, len(positional))
    if len(given) < len(positional) and run_file is None:
        raise UsageError(f"expected {len(positional)} positional arguments, got {len(given)}\n"
                         f"{usage.splitlines()[0]}  (--help: every value)")
    layers = [(run_file, read_run_file(run_file) if run_file else {}), ("environment", parse_env(env)),
              ("line", parse_positional(given, positional, parsers)), ("line", parse_flags(flag_args))]
    settings: dict = {}
    origins: dict[str, str] = {}
    for origin, values in layers:
        settings.update(values)
        origins.update(dict.fromkeys(values, origin))
    for name, setting in positional.items():
        if setting not in settings:
            raise UsageError(f"{name}: missing; give it on the line (positional argument "
                             f"{list(positional).index(name) + 1}) or in the --config file as {flag_name(setting)[2:]}")
    # The cluster is discovered on each node, below everything else given.
    settings = {**discover_cluster(env, hostfile=settings.get("hostfile")), **settings}
    return settings, origins


def build_run_config(argv: Sequence[str], env: Mapping[str, str]) -> RunConfig:
    """argv: the positional arguments then flags, as given to the launch script."""
    return RunConfig.from_settings(resolve_settings(argv, env)[0])
