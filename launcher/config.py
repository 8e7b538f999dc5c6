"""RunConfig: everything one training run needs, from positional arguments, flags and environment.

Validated once in `__post_init__`; every error names the argument, the value given and what is allowed.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from launcher.errors import UsageError
from launcher.files import write_json_atomic
from launcher.presets import PRESETS, TRAIN_TOKENS, VOCAB_SIZE, WARMUP_TOKENS
from model.config import RECOMPUTE, ROUTER_NAMES as ROUTERS, SIZES

MODES = ("run", "dryrun")
TOKENIZERS = ("jiebabpe", "gpt2bpe")
ZERO_ALIASES = {"none": 0, "0": 0, "z1": 1, "1": 1, "do": 1, "z2": 2, "2": 2}
PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOADS = ("none", "cpu")
LR_DECAY = ("linear", "cosine", "constant")
MIN_VOCAB = 257  # byte-level BPE: every byte, plus the end-of-document token


def _fail(name: str, given, allowed: str) -> None:
    raise UsageError(f"{name}: got {given!r}; allowed: {allowed}")


@dataclass
class RunConfig:
    # --- the 11 positional arguments ---
    mode: str = "dryrun"
    gpus_per_node: int = 1
    tokenizer: str = "gpt2bpe"
    model_size: str = "nano"
    num_experts: int = 0  # 0 = dense (MOE=none)
    router_type: int = 0
    micro_batch: int = 1
    sp_size: int = 1
    recompute: str = "none"
    zero_stage: int = 0
    save_interval: int = 1000

    # --- cluster (PAI DLC convention: WORLD_SIZE counts nodes) ---
    num_nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    hostfile: str | None = None

    # --- environment overrides; None = default from the size table ---
    seq_len: int | None = None
    data_path: str | None = None  # None: the embedded stdlib corpus, built on first use
    output_basepath: str = "runs"
    train_tokens: int | None = None
    warmup_tokens: int | None = None
    global_batch: int | None = None  # sequences
    ep_size: int | None = None
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
    vocab_size: int | None = None  # tokenizer to train when none exists yet
    tokenizer_path: str | None = None
    moe_interval: int = 2
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    use_residual: bool = False  # PR-MoE
    dropout: float = 0.0
    run_name: str | None = None
    device: str | None = None  # cuda | cpu; None = cuda when available
    device_memory_gib: float | None = None  # for dryrun's fit check; None = read from the device

    def __post_init__(self) -> None:
        self._check_choices()
        self._fill_defaults()
        self._check_counts()
        self._check_parallelism()
        self._check_batch()

    # ---------------- validation ----------------
    def _check_choices(self) -> None:
        if self.mode not in MODES:
            _fail("MODE", self.mode, " | ".join(MODES))
        if self.tokenizer not in TOKENIZERS:
            _fail("TOKENIZER", self.tokenizer, " | ".join(TOKENIZERS))
        if self.model_size not in SIZES or self.model_size not in PRESETS:
            _fail("MODEL_SIZE", self.model_size, " | ".join(SIZES))
        if self.router_type not in ROUTERS:
            _fail("RT", self.router_type, "0 (top-1) | 1 (expert choice) | 2 (top-2)")
        if self.recompute not in RECOMPUTE:
            _fail("AC", self.recompute, " | ".join(RECOMPUTE))
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

    def _fill_defaults(self) -> None:
        preset = PRESETS[self.model_size]
        if self.seq_len is None:
            self.seq_len = preset.seq_len
        lr, min_lr = preset.lrs(moe=self.num_experts > 0)
        if self.lr is None:
            self.lr = lr
        if self.min_lr is None:
            self.min_lr = min(min_lr, self.lr)
        if self.global_batch is None:
            self.global_batch = max(1, preset.global_batch_tokens // self.seq_len)
        if self.train_tokens is None:
            self.train_tokens = preset.train_tokens or TRAIN_TOKENS[self.tokenizer]
        if self.warmup_tokens is None:
            self.warmup_tokens = preset.warmup_tokens or WARMUP_TOKENS[self.tokenizer]
        if self.vocab_size is None:
            self.vocab_size = preset.vocab_size or VOCAB_SIZE[self.tokenizer]
        if self.device is None:
            self.device = "cuda" if _cuda_available() else "cpu"
        if self.precision is None:
            self.precision = "bf16" if self.device == "cuda" and _cuda_bf16() else "fp32"
        if self.ep_size is None:
            # EP must divide both the expert count and the world size; for the usual powers of two
            # this is min(experts, world size), the contract's default.
            self.ep_size = math.gcd(self.num_experts, self.world_size) if self.num_experts else 1
        if self.run_name is None:
            moe = f"moe{self.num_experts}-rt{self.router_type}" if self.num_experts else "dense"
            self.run_name = (f"gpt-{self.model_size}-{moe}-{self.tokenizer}-mb{self.micro_batch}-gb{self.global_batch}"
                             f"-seq{self.seq_len}-sp{self.sp_size}-ep{self.ep_size}-ac{self.recompute}"
                             f"-z{self.zero_stage}-{self.precision}")

    def _check_counts(self) -> None:
        positive = {"GPUS_PER_NODE": self.gpus_per_node, "BATCH_SIZE": self.micro_batch, "SP": self.sp_size,
                    "SAVE_INTERVAL": self.save_interval, "SEQ_LEN": self.seq_len, "GLOBAL_BATCH_SIZE": self.global_batch,
                    "TRAIN_TOKENS": self.train_tokens, "EP_SIZE": self.ep_size, "WORLD_SIZE (nodes)": self.num_nodes,
                    "--log-interval": self.log_interval, "--eval-interval": self.eval_interval,
                    "--vocab-size": self.vocab_size, "--moe-interval": self.moe_interval,
                    "--min-capacity": self.min_capacity}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "an integer >= 1")
        if self.num_experts < 0:
            _fail("MOE", self.num_experts, "none | an expert count >= 1")
        if self.warmup_tokens < 0 or self.eval_iters < 0:
            _fail("WARMUP_TOKENS" if self.warmup_tokens < 0 else "--eval-iters",
                  min(self.warmup_tokens, self.eval_iters), "an integer >= 0")
        if not 0 <= self.node_rank < self.num_nodes:
            _fail("RANK (node rank)", self.node_rank, f"0..{self.num_nodes - 1} (WORLD_SIZE={self.num_nodes} nodes)")
        if not 1 <= self.master_port <= 65535:
            _fail("MASTER_PORT", self.master_port, "1..65535")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise UsageError(f"--lr/--min-lr: got {self.lr}/{self.min_lr}; allowed: lr > 0 and 0 <= min lr <= lr")
        for name, value in (("--capacity-factor", self.capacity_factor),
                            ("--eval-capacity-factor", self.eval_capacity_factor)):
            if not value > 0:
                _fail(name, value, "a number > 0")
        if not 0 <= self.dropout < 1:
            _fail("--dropout", self.dropout, "0 <= dropout < 1")
        for name, value in (("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)):
            if not 0 <= value < 1:
                _fail(name, value, "0 <= beta < 1")
        for name, value in (("--weight-decay", self.weight_decay), ("--clip-grad", self.clip_grad)):
            if not value >= 0:
                _fail(name, value, "a number >= 0 (0 = off)")
        if self.device_memory_gib is not None and not self.device_memory_gib > 0:
            _fail("--device-memory-gib", self.device_memory_gib, "a number > 0")
        if self.vocab_size < MIN_VOCAB:
            _fail("--vocab-size", self.vocab_size, f"at least {MIN_VOCAB} (256 bytes + end of document)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", self.run_name):
            _fail("--run-name", self.run_name, "letters, digits and . _ + - (a folder name under OUTPUT_BASEPATH)")

    def _check_parallelism(self) -> None:
        heads = SIZES[self.model_size][2]
        if self.num_experts and self.num_experts % self.ep_size:
            raise UsageError(f"EP_SIZE: got {self.ep_size}; allowed: a divisor of the expert count MOE={self.num_experts}")
        if self.world_size % self.ep_size:
            raise UsageError(f"EP_SIZE: got {self.ep_size}; allowed: a divisor of the world size "
                             f"{self.world_size} (= {self.num_nodes} nodes x {self.gpus_per_node} processes)")
        if not self.num_experts and self.ep_size != 1:
            raise UsageError(f"EP_SIZE: got {self.ep_size}; allowed: 1 for a dense model (MOE=none)")
        if self.world_size % self.sp_size:
            raise UsageError(f"SP: got {self.sp_size}; allowed: a divisor of the world size {self.world_size} "
                             f"(= {self.num_nodes} nodes x {self.gpus_per_node} processes)")
        if heads % self.sp_size:
            raise UsageError(f"SP: got {self.sp_size}; allowed: a divisor of the head count {heads} of {self.model_size}")
        if self.seq_len % self.sp_size:
            raise UsageError(f"SP: got {self.sp_size}; allowed: a divisor of SEQ_LEN={self.seq_len}")
        if self.num_experts and self.num_layers < self.moe_interval:
            raise UsageError(f"--moe-interval: got {self.moe_interval}; allowed: at most the layer count "
                             f"{self.num_layers} of {self.model_size}")

    def _check_batch(self) -> None:
        per_step = self.micro_batch * self.dp_size
        if self.global_batch % per_step:
            raise UsageError(
                f"GLOBAL_BATCH_SIZE: got {self.global_batch} sequences; allowed: a multiple of micro batch x "
                f"data-parallel size = {self.micro_batch} x {self.dp_size} = {per_step}")
        if self.train_iters < 1:
            raise UsageError(f"TRAIN_TOKENS: got {self.train_tokens}; allowed: at least one global batch "
                             f"({self.global_batch} x {self.seq_len} = {self.tokens_per_iter} tokens)")

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
        return self.global_batch * self.seq_len

    @property
    def train_iters(self) -> int:
        return self.train_tokens // self.tokens_per_iter

    @property
    def warmup_iters(self) -> int:
        return min(self.train_iters, math.ceil(self.warmup_tokens / self.tokens_per_iter))

    @property
    def num_layers(self) -> int:
        return SIZES[self.model_size][0]

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
        return Path(self.output_basepath) / "data" / f"stdlib-{self.tokenizer}-{self.vocab_size}"

    @property
    def resolved_tokenizer_path(self) -> str:
        if self.tokenizer_path:
            return self.tokenizer_path
        if self.data_path:
            # beside the data, where `python -m launcher.preprocess` writes a tokenizer it trained
            return str(Path(self.data_path.split()[-1]).parent / "tokenizer")
        return str(self.default_data_dir / "tokenizer")

    def model_config(self, vocab_size: int | None = None):
        """The GPTMoEConfig this run trains."""
        from model.config import GPTMoEConfig

        return GPTMoEConfig.from_size(
            self.model_size, vocab_size=vocab_size or self.vocab_size, seq_len=self.seq_len,
            num_experts=self.num_experts, router_type=self.router_type, moe_layer_interval=self.moe_interval,
            capacity_factor=self.capacity_factor, eval_capacity_factor=self.eval_capacity_factor,
            min_capacity=self.min_capacity, drop_tokens=self.drop_tokens, aux_loss_coef=self.aux_loss_coef,
            z_loss_coef=self.z_loss_coef, use_residual=self.use_residual, ep_size=self.ep_size,
            recompute=self.recompute, dropout=self.dropout)

    # ---------------- persistence ----------------
    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(self.to_dict(), path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "RunConfig":
        """The RunConfig a launcher saved (`run_config.json`). (Not `load`: that is the LOAD setting.)"""
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"{path}: unknown run settings {sorted(unknown)}")
        return cls(**data)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken CUDA driver must not stop a dryrun
        return False


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()
