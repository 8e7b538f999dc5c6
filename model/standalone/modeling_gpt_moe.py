"""GPT-MoE for `transformers`, inference only: torch and transformers are all it needs.

The model the GPT-MoE toolkit trains, with the routing it uses in evaluation: deterministic and dropless (no
capacity, no token dropping, no random token selection), so a prompt's logits never depend on the rest of
the batch. Top-1 weights a token's expert by its router probability; top-2 renormalises its two
probabilities; expert choice sends a token to every expert whose calibrated threshold (`ec_threshold`, set
in training) its probability reaches. PR-MoE's residual MLP, tied embeddings, a KV cache (transformers'
Cache) and left padding (attention_mask) are supported. Fine-tuning needs the toolkit (balancing losses,
capacity, expert parallelism); `labels` here give the LM loss, for evaluation.

Parameter names are the toolkit's own (under "model."), so a folder written by the toolkit loads unchanged.
Shape suffixes: B batch, T new tokens, S keys (cached + new), C model dim, H heads, Dh head dim, N tokens
(B*T), D model dim, E experts, R routes (token-expert pairs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_gpt_moe import GPTMoEHFConfig

# transformers 5 names the cache `cache` in model inputs and outputs; 4.x called it `past_key_values`.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def new_cache(config) -> DynamicCache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers < 4.56: no config argument
        return DynamicCache()


def as_cache(cache):
    """A transformers Cache (or any object with its update/get_seq_length) as is; a legacy tuple of (k, v)
    per layer converted."""
    if isinstance(cache, (tuple, list)):
        return DynamicCache.from_legacy_cache(cache) if cache else None
    return cache


class MLP(nn.Module):
    """D -> F -> D with exact (erf) GELU: a dense feed-forward layer (with biases) or PR-MoE's residual (without)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)
        self.fc2.scaled_init = True  # output of a residual branch

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, config: GPTMoEHFConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj.scaled_init = True

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, cache) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, T, H, Dh)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, Dh)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, H, S, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Router(nn.Module):
    """fp32 router logits -> routes (token_R, expert_R, weight_R), deterministic and dropless."""

    def __init__(self, config: GPTMoEHFConfig, num_experts: int):
        super().__init__()
        self.kind = config.router_type
        self.num_experts = num_experts
        self.wg = nn.Linear(config.hidden_size, num_experts, bias=False)
        if self.kind == "expert_choice":
            # Each expert's acceptance threshold, calibrated in training; NaN if it never was.
            self.register_buffer("ec_threshold", torch.full((num_experts,), float("nan")))
            self.fallback_k = max(1, min(num_experts, round(config.expert_choice_k * config.capacity_factor)))
        biased = getattr(config, "expert_bias", False) and self.kind != "expert_choice"
        # chooses experts, never weights them
        self.register_buffer("selection_bias", torch.zeros(num_experts) if biased else None)

    def forward(self, x_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits_NE = F.linear(x_ND.float(), self.wg.weight.float())
        probs_NE = torch.softmax(logits_NE, dim=-1)
        n = probs_NE.shape[0]
        if self.kind == "expert_choice":
            if torch.isnan(self.ec_threshold).any():
                chosen_NE = torch.zeros_like(probs_NE, dtype=torch.bool).scatter_(
                    1, probs_NE.topk(self.fallback_k, dim=-1).indices, True)
            else:
                chosen_NE = probs_NE >= self.ec_threshold
            token_R, expert_R = chosen_NE.nonzero(as_tuple=True)
            return token_R, expert_R, probs_NE[token_R, expert_R]
        select_NE = logits_NE if self.selection_bias is None else logits_NE + self.selection_bias.float()
        first_N = select_NE.argmax(dim=-1)
        first_p_N = probs_NE.gather(1, first_N[:, None]).squeeze(1)
        tokens_N = torch.arange(n, device=x_ND.device)
        if self.kind == "top1":
            return tokens_N, first_N, first_p_N
        second_N = select_NE.scatter(1, first_N[:, None], float("-inf")).argmax(dim=-1)
        gates_2N = torch.stack([first_p_N, probs_NE.gather(1, second_N[:, None]).squeeze(1)])
        gates_2N = gates_2N / gates_2N.sum(dim=0, keepdim=True).clamp(min=torch.finfo(gates_2N.dtype).eps)
        return tokens_N.repeat(2), torch.cat([first_N, second_N]), gates_2N.flatten()


class Experts(nn.Module):
    """E GELU MLPs, stored stacked: fc1_weight (E, D, F), fc2_weight (E, F, D); biases fc1_bias (E, F) and
    fc2_bias (E, D) only with `bias` (upcycled models)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, bias: bool = False):
        super().__init__()
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, ffn_hidden_size)) if bias else None
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None

    def forward(self, x_ND: Tensor, token_R: Tensor, expert_R: Tensor, weight_R: Tensor) -> Tensor:
        """out[n] = sum over n's routes r of weight_R[r] * expert_{expert_R[r]}(x[n]), summed in fp32."""
        out_ND = torch.zeros(x_ND.shape, dtype=torch.promote_types(x_ND.dtype, torch.float32), device=x_ND.device)
        order_R = torch.argsort(expert_R, stable=True)
        counts = torch.bincount(expert_R, minlength=self.fc1_weight.shape[0]).tolist()
        start = 0
        for e, count in enumerate(counts):
            if count:
                routes = order_R[start:start + count]
                tokens = token_R[routes]
                if self.fc1_bias is None:
                    h = F.gelu(x_ND[tokens] @ self.fc1_weight[e]) @ self.fc2_weight[e]
                else:
                    h = F.gelu(x_ND[tokens] @ self.fc1_weight[e] + self.fc1_bias[e]) @ self.fc2_weight[e] \
                        + self.fc2_bias[e]
                out_ND.index_add_(0, tokens, h.to(out_ND.dtype) * weight_R[routes, None].to(out_ND.dtype))
            start += count
        return out_ND.to(x_ND.dtype)


class RoutedExperts(nn.Module):
    """Router + experts. Held as `deepspeed_moe` by MoE below: the name the toolkit's checkpoints use."""

    def __init__(self, config: GPTMoEHFConfig, num_experts: int):
        super().__init__()
        self.gate = Router(config, num_experts)
        self.experts = Experts(num_experts, config.hidden_size, config.ffn_hidden_size,
                               bias=getattr(config, "expert_mlp_bias", False))

    def forward(self, x_ND: Tensor) -> Tensor:
        return self.experts(x_ND, *self.gate(x_ND))


class MoE(nn.Module):
    def __init__(self, config: GPTMoEHFConfig, num_experts: int):
        super().__init__()
        self.deepspeed_moe = RoutedExperts(config, num_experts)
        self.use_residual = config.use_residual
        if self.use_residual:
            self.mlp = MLP(config.hidden_size, config.ffn_hidden_size, bias=getattr(config, "expert_mlp_bias", False))
            self.coefficient = nn.Linear(config.hidden_size, 2)

    def forward(self, x: Tensor) -> Tensor:
        x_ND = x.reshape(-1, x.shape[-1])
        y_ND = self.deepspeed_moe(x_ND)
        if self.use_residual:
            # PR-MoE: every token also takes a dense MLP; a learned per-token coefficient mixes the two.
            coef_N2 = torch.softmax(self.coefficient(x_ND), dim=-1)
            y_ND = y_ND * coef_N2[:, :1] + self.mlp(x_ND) * coef_N2[:, 1:]
        return y_ND.view_as(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer layer; its feed-forward part is a dense MLP or a MoE layer."""

    def __init__(self, config: GPTMoEHFConfig, layer_idx: int, num_experts: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = (MoE(config, num_experts) if num_experts
                    else MLP(config.hidden_size, config.ffn_hidden_size, bias=True))

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, cache) -> Tensor:
        x = x + self.attn(self.ln1(x), mask, is_causal, cache)
        return x + self.mlp(self.ln2(x))


def attention_mask_for(attention_mask: Tensor | None, past: int, t: int, device) -> tuple[Tensor | None, bool]:
    """(mask, is_causal) for SDPA: T new queries over `past` cached + T new keys, padding keys (0 in the
    (B, S) attention_mask) hidden. A padding query still sees itself, so no row is empty (NaN)."""
    if attention_mask is None and past == 0:
        return None, True
    if attention_mask is None and t == 1:
        return None, False
    s = past + t
    q_pos = torch.arange(past, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        keys = attention_mask[:, None, None, :s].bool()  # (B, 1, 1, S)
        allowed = allowed & (keys | (k_pos == q_pos))
    return allowed, False


class GPTMoEDecoder(nn.Module):
    """Embeddings, blocks, final norm and the output projection (tied to the token embedding by default)."""

    def __init__(self, config: GPTMoEHFConfig):
        super().__init__()
        self.config = config
        experts = config.moe_layer_experts()
        self.wte = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.seq_len, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i, experts.get(i, 0)) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = (None if config.tie_embeddings
                        else nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False))

    def forward(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, position_ids: Tensor | None,
                attention_mask: Tensor | None, cache, logits_to_keep: int = 0) -> Tensor:
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        t = x.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device)[None]
        if position_ids.numel() and int(position_ids.max()) >= self.config.seq_len:
            raise ValueError(f"position {int(position_ids.max())} is beyond the model's seq_len="
                             f"{self.config.seq_len}: shorten the prompt or max_new_tokens")
        mask, is_causal = attention_mask_for(attention_mask, past, t, x.device)
        x = x + self.wpe(position_ids)
        for block in self.blocks:
            x = block(x, mask, is_causal, cache)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.ln_f(x)
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight[:self.config.vocab_size])  # (B, T, V): the real vocabulary's rows


class GPTMoEPreTrainedModel(PreTrainedModel):
    """What GPT-MoE's transformers models share (the toolkit's model/hf.py wrapper derives from it too): the
    cache under either name, left padding, and the inputs of each generation step. A model that generates
    also names GenerationMixin among its direct bases (transformers checks for it there)."""

    config_class = GPTMoEHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = True  # transformers 4.4x creates a DynamicCache for generate() only with this

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def step_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, cache,
                    past_key_values, use_cache: bool | None):
        """(cache, attention_mask, position_ids) for one forward. The cache comes as `cache` (transformers >= 5)
        or `past_key_values` (4.x) and is created when use_cache is set; an all-ones mask is dropped (plain
        causal attention, SDPA's fastest path); with left padding, positions count real tokens only."""
        cache = as_cache(cache if cache is not None else past_key_values)
        if use_cache and cache is None:
            cache = new_cache(self.config)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        return cache, attention_mask, position_ids

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values=None,
                                      attention_mask: Tensor | None = None, cache=None, **kwargs) -> dict:
        """The inputs of one generation step: the tokens the cache has not seen, the mask over everything.

        Our own rather than GenerationMixin's, whose slicing and keyword names changed between versions
        (cache_position / `past_key_values` in 4.x, next_sequence_length / `cache` in 5.x, none before 4.45).
        The number of new tokens is the mask's length minus the cached length, which also holds for chunked
        prefill, where input_ids is one chunk and the mask ends with it."""
        cache = as_cache(cache if cache is not None else past_key_values)
        past = cache.get_seq_length() if cache is not None else 0
        total = attention_mask.shape[1] if attention_mask is not None else max(input_ids.shape[1], past + 1)
        new = min(total - past, input_ids.shape[1])
        if new < 1:
            raise ValueError(f"nothing to feed: {past} tokens cached, {total} in the sequence")
        inputs = {"input_ids": input_ids[:, -new:].contiguous(), "attention_mask": attention_mask,
                  "use_cache": kwargs.get("use_cache", True), CACHE_FIELD: cache}
        if attention_mask is None and kwargs.get("position_ids") is not None:
            inputs["position_ids"] = kwargs["position_ids"][..., -new:]
        # With a mask, forward counts positions over its real tokens: transformers 4.5x's chunked prefill
        # passes position_ids that ignore left padding.
        if kwargs.get("logits_to_keep"):
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _reorder_cache(self, past_key_values, beam_idx):
        """Beam search in transformers 4.x before caches reordered themselves."""
        past_key_values.reorder_cache(beam_idx)
        return past_key_values


class GPTMoEForCausalLM(GPTMoEPreTrainedModel, GenerationMixin):
    def __init__(self, config: GPTMoEHFConfig):
        super().__init__(config)
        self.model = GPTMoEDecoder(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """For a model built from a config alone (from_pretrained loads every weight): the toolkit's
        GPT-2-style init, output projections of each residual branch scaled by 1/sqrt(2 * layers)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, out_std if getattr(module, "scaled_init", False) else std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, Experts):
            nn.init.normal_(module.fc1_weight, 0.0, std)
            nn.init.normal_(module.fc2_weight, 0.0, out_std)


    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, past_key_values=None,
                inputs_embeds: Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_dict: bool | None = None, **kwargs):
        """Logits (B, T, vocab_size) for input_ids (B, T), the tokens not yet in the cache. attention_mask
        (B, past + T), 1 for real tokens (left padding allowed). `labels` may equal input_ids: position t is
        scored against token t+1 (-100 ignored). logits_to_keep: logits of the last N positions only."""
        ids = input_ids if input_ids is not None else inputs_embeds[..., 0]
        cache, attention_mask, position_ids = self.step_inputs(ids, attention_mask, position_ids, cache,
                                                               past_key_values, use_cache)
        logits = self.model(input_ids, inputs_embeds, position_ids, attention_mask, cache,
                            0 if labels is not None else logits_to_keep)
        loss = None
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100).to(logits.device)  # position t predicts t+1
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return out.to_tuple() if return_dict is False else out
