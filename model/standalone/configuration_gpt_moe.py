"""Configuration of a GPT-MoE model for `transformers` (model_type "gpt_moe").

Needs transformers only. The attributes are the GPT-MoE toolkit's model settings under their own names;
config.json of an exported model lists every one of them, training-only settings included (dropout,
capacity in training, balancing-loss coefficients, ...), which inference keeps but does not read.
"""
from __future__ import annotations

from transformers import PretrainedConfig

# Router kinds by name, and the digits of the launch script's RT argument that older files hold.
ROUTER_KINDS = ("top1", "expert_choice", "top2")
ROUTER_DIGITS = {0: "top1", 1: "expert_choice", 2: "top2"}


def router_kind(value) -> str:
    """"top1" | "expert_choice" | "top2" for a router kind given by name or by RT digit."""
    value = getattr(value, "value", value)  # an Enum member
    if isinstance(value, int) and not isinstance(value, bool) and value in ROUTER_DIGITS:
        return ROUTER_DIGITS[value]
    if isinstance(value, str) and value in ROUTER_KINDS:
        return value
    raise ValueError(f"router_type: got {value!r}; allowed: {' | '.join(ROUTER_KINDS)} (or the RT digit 0 | 1 | 2)")


class GPTMoEHFConfig(PretrainedConfig):
    """A GPT decoder (pre-LayerNorm, learned positions, tied embeddings) whose every `moe_layer_interval`-th
    feed-forward layer is a mixture of `num_experts` experts (an int, or one count per MoE layer).

    router_type      "top1" (Switch), "top2" (GShard: two experts, weights renormalised) or "expert_choice"
                     (at inference a token goes to every expert whose calibrated threshold its probability
                     reaches; before calibration, to its round(expert_choice_k * capacity_factor) best)
    use_residual     PR-MoE: a dense MLP beside the experts, mixed per token by a learned coefficient
    vocab_pad_multiple  embedding rows are padded to a multiple of this; logits cover `vocab_size` only
    """

    model_type = "gpt_moe"
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                     "max_position_embeddings": "seq_len", "intermediate_size": "ffn_hidden_size"}

    def __init__(self, vocab_size: int = 50304, seq_len: int = 2048, num_layers: int = 12, hidden_size: int = 768,
                 num_heads: int = 12, ffn_hidden_size: int | None = None, num_experts: int | list[int] = 0,
                 moe_layer_interval: int = 2, router_type: str = "top1", expert_choice_k: float | None = None,
                 capacity_factor: float = 1.0, use_residual: bool = False, tie_embeddings: bool = True,
                 layer_norm_eps: float = 1e-5, vocab_pad_multiple: int = 128, init_std: float = 0.006,
                 expert_bias: bool = False, expert_mlp_bias: bool = False, **kwargs):
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.ffn_hidden_size = 4 * hidden_size if ffn_hidden_size is None else ffn_hidden_size
        self.num_experts = list(num_experts) if isinstance(num_experts, (list, tuple)) else num_experts
        self.moe_layer_interval = moe_layer_interval
        self.router_type = router_kind(router_type)
        # Files written before the router had a name call expert_choice_k `moe_top_k`.
        legacy_k = kwargs.pop("moe_top_k", None)
        if expert_choice_k is None:
            expert_choice_k = legacy_k if self.router_type == "expert_choice" and legacy_k is not None else 1.0
        self.expert_choice_k = expert_choice_k
        self.capacity_factor = capacity_factor
        self.use_residual = use_residual
        self.tie_embeddings = tie_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.vocab_pad_multiple = vocab_pad_multiple
        self.init_std = init_std
        # Token-choice routers trained with a selection bias (auxiliary-loss-free balancing) keep it: it picks
        # the experts, the probabilities still weight them.
        self.expert_bias = bool(expert_bias) and self.router_type != "expert_choice"
        # Experts (and PR-MoE's residual MLP) with fc1/fc2 biases: models upcycled from a dense checkpoint.
        self.expert_mlp_bias = bool(expert_mlp_bias)
        # Tying is done by the model itself (logits reuse the embedding matrix), not by transformers.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    def moe_layer_experts(self) -> dict[int, int]:
        """{layer index: expert count} for the MoE layers: every moe_layer_interval-th, ending each interval."""
        if not self.num_experts:
            return {}
        i = self.moe_layer_interval
        layers = [layer for layer in range(self.num_layers) if layer % i == i - 1]
        counts = self.num_experts if isinstance(self.num_experts, list) else [self.num_experts] * len(layers)
        if len(counts) != len(layers):
            raise ValueError(f"num_experts: got {self.num_experts!r}; allowed: one count per MoE layer "
                             f"({len(layers)} with num_layers={self.num_layers}, interval={i})")
        return dict(zip(layers, counts))
