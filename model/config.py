"""GPTMoEConfig: the whole model in one validated dataclass, plus the table of named sizes.

Every field is checked in `__post_init__`; a bad value raises `ValueError` with one line naming the
field, the value and what is allowed. Parameter counts are analytic (nothing is instantiated), so the
launcher's dryrun can report a 13B model on a laptop.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from enum import Enum

# name -> (layers, hidden, heads). The eight public GPT sizes, plus two CPU sizes:
# `nano` for tests (seconds) and `tiny` for the demo (minutes).
SIZES: dict[str, tuple[int, int, int]] = {
    "0.125B": (12, 768, 12),
    "0.35B": (24, 1024, 16),
    "0.76B": (24, 1536, 16),
    "1.3B": (24, 2048, 32),
    "2.7B": (32, 2560, 32),
    "3.6B": (30, 3072, 32),
    "6.7B": (32, 4096, 32),
    "13B": (40, 5120, 40),
    "nano": (2, 64, 4),
    "tiny": (4, 128, 4),
}

RECOMPUTE = ("none", "sel", "full")


class RouterKind(str, Enum):
    """Which router an MoE layer uses. Stored by name (`"top2"`) in configs and files."""

    TOP1 = "top1"  # Switch: one expert per token, balancing loss
    EXPERT_CHOICE = "expert_choice"  # each expert takes its top-C tokens; no balancing loss
    TOP2 = "top2"  # GShard: two experts per token, weights renormalised, balancing loss

    def __str__(self) -> str:  # "top2" in messages and f-strings, on every Python version
        return self.value

    @property
    def label(self) -> str:
        return {"top1": "top-1 (Switch)", "expert_choice": "expert choice", "top2": "top-2 (GShard)"}[self.value]

    @property
    def top_k(self) -> int | None:
        """Experts each token picks (token-choice routers); None for expert choice."""
        return {"top1": 1, "top2": 2}.get(self.value)

    @classmethod
    def from_rt(cls, digit) -> "RouterKind":
        """The tutorial's RT digit (the launch script's 6th argument; files written before router names
        stored it too): 0 top-1, 1 expert choice, 2 top-2."""
        kinds = {"0": cls.TOP1, "1": cls.EXPERT_CHOICE, "2": cls.TOP2}
        if str(digit) not in kinds or isinstance(digit, bool):
            raise ConfigError("router_type", digit, RT_ALLOWED)
        return kinds[str(digit)]


RT_ALLOWED = "0 (top-1) | 1 (expert choice) | 2 (top-2)"
ROUTER_ALLOWED = " | ".join(kind.value for kind in RouterKind)


class ConfigError(ValueError):
    """A bad GPTMoEConfig value. `field`, `value` and `allowed` stay available to callers that name the
    setting their own way (the launcher names it by its flag or positional argument)."""

    def __init__(self, field: str, value, allowed: str):
        super().__init__(f"GPTMoEConfig.{field}: got {value!r}; allowed: {allowed}")
        self.field, self.value, self.allowed = field, value, allowed


def _fail(name: str, value, allowed: str):
    raise ConfigError(name, value, allowed)


def check_known_keys(data: Iterable[str], known: Iterable[str], where: str, error: type = ValueError) -> None:
    """Refuse keys that are not settings, in one line naming them and what is allowed."""
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise error(f"{where}: unknown fields {unknown}; allowed: {sorted(known)}")


def upgrade_legacy_fields(data: dict) -> dict:
    """Settings as files written before router names hold them: `router_type` a digit (0 top-1, 1 expert
    choice, 2 top-2) and `top_k` (`moe_top_k` in Hugging Face configs), which only expert choice reads."""
    data = dict(data)
    router = data.get("router_type")
    if isinstance(router, int) and not isinstance(router, bool):
        data["router_type"] = router = RouterKind.from_rt(router)
    for old in ("top_k", "moe_top_k"):
        if old in data:
            k = data.pop(old)
            if router in (RouterKind.EXPERT_CHOICE, RouterKind.EXPERT_CHOICE.value) and k is not None:
                data.setdefault("expert_choice_k", k)
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class GPTMoEConfig:
    """A GPT decoder whose every `moe_layer_interval`-th feed-forward layer is a Mixture of Experts.

    Routers (`router_type`, a RouterKind or its name):
      top1           Switch: one expert per token, capacity-limited in training, balancing loss.
      expert_choice  each expert takes its top-C tokens; a token visits `expert_choice_k * capacity_factor`
                     experts on average (the EC paper's capacity factor c). Causal at inference: see
                     model/moe/router.py.
      top2           GShard: two experts per token, weights renormalised, balancing loss.

    `expert_choice_k` is read by expert choice only: the average number of experts a token visits before
    `capacity_factor` scales it (default 1, so the published capacity factor 1.0 means one expert per token
    on average, the same active size as top-1).

    Evaluation and generation never drop a token: routing is dropless in eval mode whatever `drop_tokens`
    says, so a prompt's logits do not depend on the rest of the batch. `eval_capacity_factor` only sets a
    floor on the all-to-all buffer when experts are spread over several ranks (EP > 1).
    """

    vocab_size: int = 50304
    seq_len: int = 2048
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    ffn_hidden_size: int | None = None  # None -> 4 * hidden_size
    dropout: float = 0.0
    num_experts: int | list[int] = 0  # 0 = dense; an int for every MoE layer, or one count per MoE layer
    moe_layer_interval: int = 2  # MoE on 0-based layers interval-1, 2*interval-1, ...
    router_type: RouterKind = RouterKind.TOP1
    expert_choice_k: float = 1.0
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    expert_bias: bool = False  # auxiliary-loss-free balancing (token choice): a per-expert selection bias
    expert_bias_rate: float = 1e-3  # how far the expert bias moves per optimizer step (logit units)
    router_jitter: float = 0.0  # multiplicative noise on the router input in training: x * U(1-eps, 1+eps)
    use_rts: bool = True  # random token selection decides who overflows in training (not first-come)
    top2_2nd_expert_sampling: bool = False  # Gumbel-sample the second expert in training (DeepSpeed's default is on)
    use_residual: bool = False  # PR-MoE: a dense MLP beside the experts, mixed by a learned coefficient
    # Experts (and the residual MLP) with fc1/fc2 biases like a dense feed-forward layer: what a model upcycled
    # from a dense checkpoint needs to start as that model. Off: bias-free experts (Switch, ST-MoE).
    expert_mlp_bias: bool = False
    ep_size: int = 1
    init_std: float = 0.006
    recompute: str = "none"  # none | sel (attention core) | full (whole transformer layer)
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    vocab_pad_multiple: int = 128  # embedding rows are padded to a multiple of this (GEMM-friendly); logits are not

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "num_layers", "hidden_size", "num_heads", "moe_layer_interval",
                     "ep_size", "vocab_pad_multiple"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                _fail(name, v, "an integer >= 1")
        if self.hidden_size % self.num_heads:
            _fail("num_heads", self.num_heads, f"a divisor of hidden_size={self.hidden_size}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if not _is_int(self.ffn_hidden_size) or self.ffn_hidden_size < 1:
            _fail("ffn_hidden_size", self.ffn_hidden_size, "an integer >= 1, or None for 4 * hidden_size")
        if not _is_num(self.dropout) or not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "a number in [0, 1)")
        self._check_experts()
        try:
            self.router_type = RouterKind(self.router_type)
        except ValueError:
            _fail("router_type", self.router_type, ROUTER_ALLOWED)
        for name in ("capacity_factor", "eval_capacity_factor", "init_std"):
            v = getattr(self, name)
            if not _is_num(v) or not v > 0 or math.isinf(v):
                _fail(name, v, "a finite number > 0")
        self._check_expert_choice_k()
        if not _is_int(self.min_capacity) or self.min_capacity < 0:
            _fail("min_capacity", self.min_capacity, "an integer >= 0")
        for name in ("aux_loss_coef", "z_loss_coef", "expert_bias_rate"):
            v = getattr(self, name)
            if not _is_num(v) or not v >= 0 or math.isinf(v):
                _fail(name, v, "a finite number >= 0")
        if not _is_num(self.router_jitter) or not 0.0 <= self.router_jitter < 1.0:
            _fail("router_jitter", self.router_jitter, "a number in [0, 1)")
        if not _is_num(self.layer_norm_eps) or not self.layer_norm_eps > 0:
            _fail("layer_norm_eps", self.layer_norm_eps, "a number > 0")
        for name in ("drop_tokens", "use_rts", "top2_2nd_expert_sampling", "use_residual", "tie_embeddings",
                     "expert_bias", "expert_mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True | False")
        if self.recompute not in RECOMPUTE:
            _fail("recompute", self.recompute, " | ".join(RECOMPUTE))
        if self.expert_bias and self.router_type is RouterKind.EXPERT_CHOICE:
            _fail("expert_bias", self.expert_bias, "False with router_type=expert_choice (each expert takes a fixed "
                  "number of tokens, so there is no load to balance); top1 or top2 for True")

    def _check_experts(self):
        n = self.num_experts
        if isinstance(n, tuple):
            n = self.num_experts = list(n)
        if isinstance(n, list):
            want = len(self._moe_slots())
            if not n or any(not _is_int(e) or e < 0 for e in n):
                _fail("num_experts", n, "0, an integer >= 1, or a non-empty list of integers >= 0 (0: that layer "
                      "is a dense feed-forward layer)")
            if len(n) != want:
                _fail("num_experts", n, f"a list of {want} counts, one per MoE layer "
                      f"(num_layers={self.num_layers}, moe_layer_interval={self.moe_layer_interval})")
            if not any(n):
                n = self.num_experts = 0  # every slot dense: a dense model
        elif not _is_int(n) or n < 0:
            _fail("num_experts", n, "0 (dense), an integer >= 1, or a list of counts per MoE layer")
        elif n and not self._moe_slots():
            _fail("moe_layer_interval", self.moe_layer_interval, f"at most num_layers={self.num_layers} "
                  "so that at least one layer is MoE")
        for e in self.experts_per_moe_layer():
            if e % self.ep_size:
                _fail("ep_size", self.ep_size, f"a divisor of the expert count num_experts={self.num_experts}")
        if not self.is_moe and self.ep_size != 1:
            _fail("ep_size", self.ep_size, "1 for a dense model (num_experts=0)")

    def _check_expert_choice_k(self):
        k = self.expert_choice_k
        if not _is_num(k) or not k > 0 or math.isinf(k):
            _fail("expert_choice_k", k, "a number > 0 (experts per token on average, before capacity_factor)")
        if self.router_type is RouterKind.EXPERT_CHOICE:
            for e in self.experts_per_moe_layer():
                if self.experts_per_token() > e:
                    _fail("expert_choice_k", k, f"expert_choice_k * capacity_factor <= the expert count {e}")

    # ------------------------------------------------------------------ structure
    def _moe_slots(self) -> list[int]:
        i = self.moe_layer_interval
        return [layer for layer in range(self.num_layers) if layer % i == i - 1]

    @property
    def is_moe(self) -> bool:
        return self.num_experts != 0

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    def experts_per_moe_slot(self) -> list[int]:
        """Experts at every MoE slot (every `moe_layer_interval`-th layer), 0 where a list makes the slot dense."""
        if isinstance(self.num_experts, list):
            return list(self.num_experts)
        return [self.num_experts] * len(self._moe_slots()) if self.is_moe else []

    def moe_layer_indices(self) -> list[int]:
        """0-based indices of the MoE layers: every `moe_layer_interval`-th, ending each interval, except slots a
        list of counts sets to 0 (dense there, as a pruned model whose layer kept one expert)."""
        return [layer for layer, n in zip(self._moe_slots(), self.experts_per_moe_slot()) if n]

    def experts_per_moe_layer(self) -> list[int]:
        """Expert counts of the MoE layers, in the order of `moe_layer_indices`."""
        return [n for n in self.experts_per_moe_slot() if n]

    def experts_per_token(self) -> float:
        """Experts a token visits on average: 1 (top-1), 2 (top-2), expert_choice_k * capacity_factor (expert
        choice)."""
        if self.router_type is RouterKind.EXPERT_CHOICE:
            return float(self.expert_choice_k) * self.capacity_factor
        return float(self.router_type.top_k)

    # ------------------------------------------------------------------ sizes
    @classmethod
    def from_size(cls, name: str, **overrides) -> "GPTMoEConfig":
        """`GPTMoEConfig.from_size("0.35B", num_experts=8)`: layers/hidden/heads from SIZES, then overrides."""
        if name not in SIZES:
            raise ValueError(f"GPTMoEConfig.from_size: got {name!r}; allowed: {' | '.join(SIZES)}")
        check_known_keys(overrides, FIELDS, "GPTMoEConfig.from_size")
        layers, hidden, heads = SIZES[name]
        return cls(**{"num_layers": layers, "hidden_size": hidden, "num_heads": heads, **overrides})

    def param_counts(self) -> dict[str, int]:
        """Analytic parameter counts (nothing is built).

        total      every parameter once (tied embeddings once)
        active     what one token touches on average: embeddings, attention, norms, dense FFNs, and per MoE
                   layer the gate, `experts_per_token()` experts and the residual MLP + coefficient if any
        embedding  token + position embeddings (+ an untied output layer)
        expert     all expert parameters (every rank together; divide by ep_size for one rank's share)
        """
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.padded_vocab_size
        norm = 2 * h
        attention = 4 * h * h + 4 * h + norm  # qkv + out projections (with biases) and the pre-attention norm
        mlp = 2 * h * f + f + h  # fc1 + fc2 with biases
        # experts (and PR-MoE's residual MLP) are bias-free unless expert_mlp_bias, see model/moe/experts.py
        expert = 2 * h * f + ((f + h) if self.expert_mlp_bias else 0)
        embedding = v * h + self.seq_len * h + (0 if self.tie_embeddings else v * h)
        total = active = embedding + norm  # + the final norm
        experts_total = 0
        moe_layers = dict(zip(self.moe_layer_indices(), self.experts_per_moe_layer()))
        k = self.experts_per_token()
        for layer in range(self.num_layers):
            total += attention + norm
            active += attention + norm
            if layer not in moe_layers:
                total += mlp
                active += mlp
                continue
            e = moe_layers[layer]
            shared = h * e + ((expert + 2 * h + 2) if self.use_residual else 0)  # gate (+ residual MLP, coefficient)
            experts_total += e * expert
            total += shared + e * expert
            active += shared + k * expert
        return {"total": total, "active": int(round(active)), "embedding": embedding, "expert": experts_total,
                "non_expert": total - experts_total}

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        """JSON- and YAML-safe: the router kind by name."""
        return {**asdict(self), "router_type": self.router_type.value}

    @classmethod
    def from_dict(cls, data: dict) -> "GPTMoEConfig":
        """What `to_dict` wrote, or a file written before router names (see `upgrade_legacy_fields`)."""
        data = upgrade_legacy_fields(data)
        check_known_keys(data, FIELDS, "GPTMoEConfig.from_dict")
        return cls(**data)


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(GPTMoEConfig))
