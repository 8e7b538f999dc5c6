"""RunConfig: everything one training run needs, from positional arguments, flags, a run file and environment.

Model settings are not declared here: `RunConfig.model` is the run's GPTMoEConfig, built from the size preset
(MODEL_SIZE) with MOE, RT, AC, SEQ_LEN, EP_SIZE and any model flag (`--hidden-size`, `--router-jitter`, ...)
on top, and validated by GPTMoEConfig itself. The flag of a model setting is its GPTMoEConfig field name,
or Megatron-LM's name for it where there is one (`MODEL_FLAG_NAMES`).

Validated once in `__post_init__`; every error names the setting as the user gives it (positional argument,
environment variable or flag), the value given and what is allowed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from launcher.data.tokenizer import MAX_VOCAB_SIZE, TOKENIZER_TYPES
from launcher.errors import UsageError
from launcher.files import write_json_atomic
from launcher.finetune_config import (DERIVED_ALWAYS, DERIVED_UNLESS_GIVEN, FINETUNE_FIELDS, FINETUNE_RESOLVED,
                                      FinetuneConfig)
from launcher.presets import PRESETS, TRAIN_TOKENS, VOCAB_SIZE, WARMUP_TOKENS
from model.config import FIELDS as MODEL_FIELDS
from model.config import SIZES, ConfigError, GPTMoEConfig, RouterKind, check_known_keys, upgrade_legacy_fields

MODES = ("run", "dryrun")
TOKENIZERS = TOKENIZER_TYPES
ZERO_ALIASES = {"none": 0, "0": 0, "z1": 1, "1": 1, "do": 1, "z2": 2, "2": 2}
PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOADS = ("none", "cpu")
LR_DECAY = ("linear", "cosine", "constant")
MIN_VOCAB = 257  # byte-level BPE: every byte, plus the end-of-document token

# The launch script's positional arguments, in order, and the setting each one sets.
POSITIONAL = {"MODE": "mode", "GPUS_PER_NODE": "gpus_per_node", "TOKENIZER": "tokenizer", "MODEL_SIZE": "model_size",
              "MOE": "num_experts", "RT": "router_type", "BATCH_SIZE": "micro_batch", "SP": "sp_size",
              "AC": "recompute", "ZERO": "zero_stage", "SAVE_INTERVAL": "save_interval"}
# Environment variables the launch contract reads, and the setting each one sets.
ENVIRONMENT = {"SEQ_LEN": "seq_len", "DATA_PATH": "data_path", "OUTPUT_BASEPATH": "output_basepath",
               "TRAIN_TOKENS": "train_tokens", "WARMUP_TOKENS": "warmup_tokens", "GLOBAL_BATCH_SIZE": "global_batch",
               "EP_SIZE": "ep_size", "PRECISION": "precision", "LOAD": "load", "OFFLOAD": "offload"}
# Model settings whose flag is not the GPTMoEConfig field name: Megatron-LM's names.
MODEL_FLAG_NAMES = {"num_heads": "num_attention_heads", "moe_layer_interval": "moe_interval",
                    "init_std": "init_method_std", "layer_norm_eps": "layernorm_epsilon",
                    "vocab_pad_multiple": "make_vocab_size_divisible_by"}
# Other spellings accepted for a setting (Megatron's `--seq-length`).
SETTING_ALIASES = {"seq_length": "seq_len"}


def flag_name(setting: str) -> str:
    """`--hidden-size` for hidden_size, `--num-attention-heads` for num_heads."""
    return "--" + MODEL_FLAG_NAMES.get(setting, setting).replace("_", "-")


_LABELS = {**{v: k for k, v in POSITIONAL.items()}, **{v: k for k, v in ENVIRONMENT.items()}}


def label(setting: str) -> str:
    """How messages name a setting: its positional argument or environment variable, else its flag."""
    return _LABELS.get(setting) or flag_name(setting)


def _fail(name: str, given, allowed: str) -> None:
    raise UsageError(f"{name}: got {given!r}; allowed: {allowed}")


def _routes_by_token_choice(settings: dict) -> bool:
    """Whether model settings (not yet validated) describe an MoE model with a top-1 or top-2 router."""
    experts = settings.get("num_experts", 0)
    if not any(isinstance(n, int) and n > 0 for n in (experts if isinstance(experts, list) else [experts])):
        return False
    try:
        kind = RouterKind(settings.get("router_type", RouterKind.TOP1))
    except ValueError:
        return False  # GPTMoEConfig names the bad value
    return kind.top_k is not None


def _relabel(exc: ConfigError) -> UsageError:
    """A GPTMoEConfig error in the launcher's words: settings named as the user gives them."""
    names = re.compile(r"\b(" + "|".join(sorted(MODEL_FIELDS, key=len, reverse=True)) + r")\b")
    allowed = names.sub(lambda m: label(m[1]), exc.allowed)
    value = exc.value.value if hasattr(exc.value, "value") else exc.value
    return UsageError(f"{label(exc.field)}: got {value!r}; allowed: {allowed}")


@dataclass
class RunConfig:
    # --- the positional arguments (MOE, RT and AC set the model's num_experts, router_type, recompute) ---
    mode: str = "dryrun"
    gpus_per_node: int = 1
    tokenizer: str = "gpt2bpe"
    model_size: str = "nano"
    micro_batch: int = 1
    sp_size: int = 1
    zero_stage: int = 0
    save_interval: int = 1000

    # --- cluster (PAI DLC convention: WORLD_SIZE counts nodes) ---
    num_nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    hostfile: str | None = None

    # --- environment overrides; None = default from the size table ---
    data_path: str | None = None  # None: the embedded stdlib corpus, built on first use
    output_basepath: str = "runs"
    train_tokens: int | None = None
    warmup_tokens: int | None = None
    global_batch: int | None = None  # sequences
    precision: str | None = None
    load: str | None = None
    offload: str = "none"

    # --- flags (anything after the 11th positional argument) ---
    lr: float | None = None
    min_lr: float | None = None
    lr_decay: str = "linear"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    split: str = "98,2,0"
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    exit_interval: int | None = None  # save and stop after an iteration that is a multiple of it (Megatron's flag)
    tokenizer_path: str | None = None
    run_name: str | None = None
    device: str | None = None  # cuda | cpu; None = cuda when available
    device_memory_gib: float | None = None  # for dryrun's fit check; None = read from the device
    ignore_memory_check: bool = False  # run even where the memory estimate says it does not fit
    rendezvous_timeout: float = 600.0  # seconds the nodes of a multi-node run wait for each other
    # A dense checkpoint (run, checkpoints or tag folder) whose weights start this MoE run: each expert a copy of
    # its layer's feed-forward weights, routers fresh, optimizer and schedule from the start (model/surgery.py).
    upcycle_from: str | None = None

    # --- the model: GPTMoEConfig fields set for this run (a dict) over the MODEL_SIZE preset; the resolved
    # GPTMoEConfig after __post_init__. Defaults from the run: seq_len and vocab_size from the size table,
    # ep_size = min(experts, world size) (the largest common divisor). vocab_size is also the size of a
    # tokenizer trained for the run; the model trained gets the tokenizer's actual size (`model_config`).
    model: GPTMoEConfig | dict = field(default_factory=dict)
    # --- fine-tuning (launcher.finetune): its settings, or None for pretraining ---
    finetune: FinetuneConfig | dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig(**self.finetune)
        self._check_choices()
        self.model = self._resolve_model()
        self._fill_defaults()
        self._check_counts()
        self._check_upcycle()
        self._check_parallelism()
        self._check_batch()

    @classmethod
    def from_settings(cls, settings: Mapping) -> RunConfig:
        """Flat settings, run, model and fine-tuning alike (`{"lr": 3e-4, "hidden_size": 1024, ...}`) -> RunConfig."""
        check_known_keys(settings, RUN_FIELDS + MODEL_FIELDS + FINETUNE_FIELDS, "settings", UsageError)
        model = {k: v for k, v in settings.items() if k in MODEL_FIELDS}
        finetune = {k: v for k, v in settings.items() if k in FINETUNE_FIELDS}
        if finetune and "task_name" not in finetune:
            given = ", ".join(flag_name(k) for k in finetune)
            raise UsageError(f"{given}: fine-tuning settings; allowed only with "
                             "examples/megatron/run_finetune_text_generation_gpt.sh (python -m launcher.finetune)")
        run = {k: v for k, v in settings.items() if k in RUN_FIELDS}
        return cls(**run, model=model, finetune=finetune or None)

    # ---------------- validation ----------------
    def _check_choices(self) -> None:
        if self.mode not in MODES:
            _fail("MODE", self.mode, " | ".join(MODES))
        if self.tokenizer not in TOKENIZERS:
            _fail("TOKENIZER", self.tokenizer, " | ".join(TOKENIZERS))
        if self.model_size not in SIZES or self.model_size not in PRESETS:
            _fail("MODEL_SIZE", self.model_size, " | ".join(SIZES))
        if self.zero_stage == 3:
            raise UsageError("ZERO: stage 3 is not supported with MoE (DeepSpeed refuses native MoE under "
                             "ZeRO-3); use z2 (optionally with OFFLOAD=cpu) instead")
        if self.zero_stage not in (0, 1, 2):
            _fail("ZERO", self.zero_stage, "none | z1 | z2 | do | 0 | 1 | 2")
        if self.precision is not None and self.precision not in PRECISIONS:
            _fail("PRECISION", self.precision, " | ".join(PRECISIONS))
        if self.offload not in OFFLOADS:
            _fail("OFFLOAD", self.offload, " | ".join(OFFLOADS))
        if self.offload == "cpu" and self.zero_stage == 0:
            raise UsageError("OFFLOAD: cpu needs ZeRO stage 1 or 2 (ZERO=z1 or z2); got ZERO=none")
        if self.lr_decay not in LR_DECAY:
            _fail("--lr-decay", self.lr_decay, " | ".join(LR_DECAY))
        if self.device is not None and self.device not in ("cuda", "cpu"):
            _fail("--device", self.device, "cuda | cpu")

    def _resolve_model(self) -> GPTMoEConfig:
        """The size preset, the run's defaults, then the model settings given; validated by GPTMoEConfig."""
        if isinstance(self.model, GPTMoEConfig):
            return self.model
        preset = PRESETS[self.model_size]
        settings = {"seq_len": preset.seq_len, "vocab_size": preset.vocab_size or VOCAB_SIZE[self.tokenizer],
                    **preset.model_defaults, **self.model}
        if _routes_by_token_choice(settings):
            settings = {**preset.token_choice_defaults, **settings}
        if self.upcycle_from:
            if settings.get("expert_mlp_bias") is False:
                raise UsageError("--expert-mlp-bias: got False; allowed: true with --upcycle-from (the experts carry the "
                                 "dense layer's biases, so the MoE model starts as the dense one)")
            settings["expert_mlp_bias"] = True
        if "ep_size" not in settings:
            # EP must divide every expert count and the world size; for the usual powers of two this is
            # min(experts, world size), the contract's default.
            counts = settings.get("num_experts", 0)
            counts = counts if isinstance(counts, list) else [counts]
            if all(isinstance(n, int) and n >= 0 for n in counts) and any(counts):
                settings["ep_size"] = math.gcd(self.world_size, *(n for n in counts if n))  # 0: a dense slot
        try:
            return GPTMoEConfig.from_size(self.model_size, **settings)
        except ConfigError as exc:
            raise _relabel(exc) from None

    def _fill_defaults(self) -> None:
        preset = PRESETS[self.model_size]
        seq_len = self.model.seq_len
        lr, min_lr = preset.lrs(moe=self.model.is_moe)
        if self.lr is None:
            self.lr = lr
        if self.min_lr is None:
            self.min_lr = min(min_lr, self.lr)
        if self.global_batch is None:
            self.global_batch = max(1, preset.global_batch_tokens // seq_len)
        if self.train_tokens is None:
            self.train_tokens = preset.train_tokens or TRAIN_TOKENS[self.tokenizer]
        if self.warmup_tokens is None:
            self.warmup_tokens = preset.warmup_tokens or WARMUP_TOKENS[self.tokenizer]
        if self.device is None:
            self.device = "cuda" if _cuda_available() else "cpu"
        if self.precision is None:
            self.precision = "bf16" if self.device == "cuda" and _cuda_bf16() else "fp32"
        if self.run_name is None:
            self.run_name = self.default_run_name()

    def shape_changes(self) -> dict[str, int]:
        """The shape settings in which the model differs from its MODEL_SIZE preset (ffn: from 4 x hidden)."""
        m = self.model
        preset = dict(zip(("num_layers", "hidden_size", "num_heads"), SIZES[self.model_size]))
        preset["ffn_hidden_size"] = 4 * m.hidden_size
        return {k: getattr(m, k) for k, v in preset.items() if getattr(m, k) != v}

    def default_run_name(self) -> str:
        m = self.model
        shape = "".join(f"-{_SHAPE_TAGS[k]}{v}" for k, v in self.shape_changes().items())
        experts = m.num_experts if isinstance(m.num_experts, int) else "-".join(map(str, m.num_experts))
        moe = f"moe{experts}-{m.router_type.value}" if m.is_moe else "dense"
        task = f"{self.finetune.task_name}-finetune-" if self.finetune else ""
        return (f"{task}gpt-{self.model_size}{shape}-{moe}-{self.tokenizer}-mb{self.micro_batch}-gb{self.global_batch}"
                f"-seq{m.seq_len}-sp{self.sp_size}-ep{m.ep_size}-ac{m.recompute}-z{self.zero_stage}-{self.precision}")

    def _check_counts(self) -> None:
        for f in fields(self):  # inf passes every range check below; nan fails them with a confusing message
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                _fail("--" + f.name.replace("_", "-"), value, "a finite number")
        positive = {"GPUS_PER_NODE": self.gpus_per_node, "BATCH_SIZE": self.micro_batch, "SP": self.sp_size,
                    "SAVE_INTERVAL": self.save_interval, "GLOBAL_BATCH_SIZE": self.global_batch,
                    "TRAIN_TOKENS": self.train_tokens, "WORLD_SIZE (nodes)": self.num_nodes,
                    "--log-interval": self.log_interval, "--eval-interval": self.eval_interval}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "an integer >= 1")
        if self.exit_interval is not None and (isinstance(self.exit_interval, bool)
                                               or not isinstance(self.exit_interval, int) or self.exit_interval < 1):
            _fail("--exit-interval", self.exit_interval, "an integer >= 1")
        if self.warmup_tokens < 0 or self.eval_iters < 0:
            _fail("WARMUP_TOKENS" if self.warmup_tokens < 0 else "--eval-iters",
                  min(self.warmup_tokens, self.eval_iters), "an integer >= 0")
        if not 0 <= self.node_rank < self.num_nodes:
            _fail("RANK (node rank)", self.node_rank, f"0..{self.num_nodes - 1} (WORLD_SIZE={self.num_nodes} nodes)")
        if not 1 <= self.master_port <= 65535:
            _fail("MASTER_PORT", self.master_port, "1..65535")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise UsageError(f"--lr/--min-lr: got {self.lr}/{self.min_lr}; allowed: lr > 0 and 0 <= min lr <= lr")
        for name, value in (("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)):
            if not 0 <= value < 1:
                _fail(name, value, "0 <= beta < 1")
        for name, value in (("--weight-decay", self.weight_decay), ("--clip-grad", self.clip_grad)):
            if not value >= 0:
                _fail(name, value, "a number >= 0 (0 = off)")
        if self.device_memory_gib is not None and not self.device_memory_gib > 0:
            _fail("--device-memory-gib", self.device_memory_gib, "a number > 0")
        if self.model.vocab_size < MIN_VOCAB:
            _fail("--vocab-size", self.model.vocab_size, f"at least {MIN_VOCAB} (256 bytes + end of document)")
        if self.model.vocab_size > MAX_VOCAB_SIZE:
            _fail("--vocab-size", self.model.vocab_size, f"at most {MAX_VOCAB_SIZE:,}")
        if self.seed < 0:
            _fail("--seed", self.seed, "an integer >= 0")
        if not self.rendezvous_timeout > 0:
            _fail("--rendezvous-timeout", self.rendezvous_timeout, "seconds > 0")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", self.run_name):
            _fail("--run-name", self.run_name, "letters, digits and . _ + - (a folder name under OUTPUT_BASEPATH)")

    def _check_upcycle(self) -> None:
        if not self.upcycle_from:
            return
        if not self.model.is_moe:
            raise UsageError(f"--upcycle-from: this run is dense (MOE none); allowed with an MoE run (MOE an expert "
                             f"count): upcycling starts one from the dense checkpoint {self.upcycle_from}")
        if self.load:
            raise UsageError("--upcycle-from and LOAD: give one; LOAD resumes a run, --upcycle-from starts an MoE run "
                             "from a dense checkpoint")

    def _check_parallelism(self) -> None:
        m = self.model
        nodes = f"(= {self.num_nodes} nodes x {self.gpus_per_node} processes)"
        if self.world_size % m.ep_size:
            raise UsageError(f"EP_SIZE: got {m.ep_size}; allowed: a divisor of the world size {self.world_size} "
                             f"{nodes}")
        if self.world_size % self.sp_size:
            raise UsageError(f"SP: got {self.sp_size}; allowed: a divisor of the world size {self.world_size} {nodes}")
        if m.num_heads % self.sp_size:
            raise UsageError(f"SP: got {self.sp_size}; allowed: a divisor of the head count {m.num_heads} "
                             f"(--num-attention-heads)")
        if m.seq_len % self.sp_size:
            raise UsageError(f"SP: got {self.sp_size}; allowed: a divisor of SEQ_LEN={m.seq_len}")

    def _check_batch(self) -> None:
        per_step = self.micro_batch * self.dp_size
        if self.global_batch % per_step:
            raise UsageError(
                f"GLOBAL_BATCH_SIZE: got {self.global_batch} sequences; allowed: a multiple of micro batch x "
                f"data-parallel size = {self.micro_batch} x {self.dp_size} = {per_step}")
        if self.train_iters < 1:
            raise UsageError(f"TRAIN_TOKENS: got {self.train_tokens}; allowed: at least one global batch "
                             f"({self.global_batch} x {self.model.seq_len} = {self.tokens_per_iter} tokens)")

    # ---------------- derived ----------------
    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def dp_size(self) -> int:
        """Ranks that see different samples: the ranks of one sequence-parallel group share a sample."""
        return self.world_size // self.sp_size

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    @property
    def tokens_per_iter(self) -> int:
        return self.global_batch * self.model.seq_len

    @property
    def train_iters(self) -> int:
        return self.train_tokens // self.tokens_per_iter

    @property
    def warmup_iters(self) -> int:
        return min(self.train_iters, math.ceil(self.warmup_tokens / self.tokens_per_iter))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_basepath) / self.run_name

    @property
    def resolved_data_path(self) -> str:
        return self.data_path or str(self.default_data_dir / "stdlib_text_document")

    @property
    def default_data_dir(self) -> Path:
        """The embedded corpus (the Python standard library's sources), tokenized for this run's tokenizer."""
        # The folder build_stdlib_corpus(OUTPUT_BASEPATH/data, ...) creates for this tokenizer and vocab.
        return Path(self.output_basepath) / "data" / f"stdlib-{self.tokenizer}-{self.model.vocab_size}"

    @property
    def resolved_tokenizer_path(self) -> str:
        if self.tokenizer_path:
            return self.tokenizer_path
        if self.data_path:
            # beside the data, where `python -m launcher.preprocess` writes a tokenizer it trained
            return str(Path(self.data_path.split()[-1]).parent / "tokenizer")
        return str(self.default_data_dir / "tokenizer")

    def model_config(self, vocab_size: int | None = None) -> GPTMoEConfig:
        """The GPTMoEConfig this run trains; `vocab_size`: the tokenizer's, where it differs from the setting."""
        if vocab_size is None or vocab_size == self.model.vocab_size:
            return self.model
        try:
            return dataclasses.replace(self.model, vocab_size=vocab_size)
        except ConfigError as exc:
            raise _relabel(exc) from None

    # ---------------- persistence ----------------
    def settings(self) -> dict:
        """Every setting, flat (run and model fields side by side), the router kind by name."""
        run = {f: getattr(self, f) for f in RUN_FIELDS}
        return {**run, **self.model.to_dict(), **(self.finetune.to_dict() if self.finetune else {})}

    def to_dict(self) -> dict:
        return {**{f: getattr(self, f) for f in RUN_FIELDS}, "model": self.model.to_dict(),
                "finetune": self.finetune.to_dict() if self.finetune else None}

    @property
    def script(self) -> str:
        """The launch script of this kind of run."""
        return "run_finetune_text_generation_gpt.sh" if self.finetune else "dlc_run_pretrain_megatron_gpt.sh"

    def to_yaml(self, given: Iterable[str] = ()) -> str:
        """The resolved settings as a run file (`--config`), by flag name. Left out: MODE (said on the line),
        the cluster (discovered on each node), unset paths, a run name derived from the settings, and the
        device and precision found on this machine unless `given` (settings the user set) names them."""
        import yaml

        skip = set(NOT_IN_RUN_FILE) | {k for k in MACHINE_DEFAULTS if k not in set(given)}
        if self.finetune:  # derived from EPOCH and the data again when the file is read back
            skip |= {*FINETUNE_RESOLVED, *DERIVED_ALWAYS, *(k for k in DERIVED_UNLESS_GIVEN if k not in set(given))}
        settings = self.settings()
        if self.run_name == self.default_run_name():
            skip.add("run_name")
        positional = [s for s in POSITIONAL.values() if s in settings]
        order = positional + [k for k in settings if k not in positional]
        data = {flag_name(k)[2:]: settings[k] for k in order if k not in skip and settings[k] is not None}
        header = (f"# Settings of run {self.run_name},\n# as the launcher resolved them. Repeat the run with\n"
                  f"#   bash examples/megatron/{self.script} run --config THIS_FILE\n"
                  f"# Positional arguments, flags and environment variables given there win over this file.\n")
        return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(self.to_dict(), path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunConfig:
        """The RunConfig a launcher saved (`run_config.json`). (Not `load`: that is the LOAD setting.)
        Files written before the model settings were nested (flat, `router_type` a digit) read too."""
        data = json.loads(Path(path).read_text())
        try:
            if "model" not in data:
                flat = upgrade_legacy_fields(data)
                return cls.from_settings({_FLAT_RUN_CONFIG.get(k, k): v for k, v in flat.items()})
            check_known_keys(data, (*RUN_FIELDS, "model", "finetune"), str(path), UsageError)
            return cls(**{**data, "model": GPTMoEConfig.from_dict(data["model"])})
        except ConfigError as exc:
            raise _relabel(exc) from None
        except UsageError:
            raise
        except ValueError as exc:  # unknown model fields
            raise UsageError(f"{path}: {exc}") from None


# Settings a run file leaves out: MODE is said on the line; the cluster is discovered on each node.
NOT_IN_RUN_FILE = ("mode", "num_nodes", "node_rank", "master_addr", "master_port")
# Settings whose default depends on the machine the launcher runs on.
MACHINE_DEFAULTS = ("device", "precision")
_SHAPE_TAGS = {"num_layers": "L", "hidden_size": "h", "num_heads": "a", "ffn_hidden_size": "f"}
RUN_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RunConfig) if f.name not in ("model", "finetune"))
# run_config.json before the model settings were nested: the field names that differed.
_FLAT_RUN_CONFIG = {"moe_interval": "moe_layer_interval"}


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken CUDA driver must not stop a dryrun
        return False


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()
