"""Hugging Face wrapper: `GPTMoEHFConfig` (model_type "gpt_moe") and `GPTMoEForCausalLM`.

Registered with AutoConfig / AutoModelForCausalLM on import, so a folder written by `save_pretrained`
(config.json + model.safetensors) loads with `AutoModelForCausalLM.from_pretrained` and generates with
`generate()` (KV cache included).

State-dict mapping: the wrapper holds a `GPTMoE` as `self.model`, so a trained GPTMoE's state dict loads
with the prefix "model." added to every key (`GPTMoEForCausalLM.from_gpt_moe` does it). Experts are stored
stacked (`...experts.fc1_weight`, all experts of a layer in one tensor): export from an EP=1 model (see
model/checkpoint.py to gather an EP>1 DeepSpeed checkpoint into one).

Labels follow the transformers convention: aligned with `input_ids` (they may equal them), -100 where no
loss is wanted; the shift happens here (`model.shift_labels`). Fine-tuning items from
launcher/data/sft.py are in this convention, so they go in as they are (a transformers Trainer too).
`loss` is what fine-tuning should minimise (LM loss + weighted balancing and z-losses); `lm_loss`,
`aux_loss` and `z_loss` come beside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin, PretrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .config import FIELDS, GPTMoEConfig
from .gpt import GPTMoE, shift_labels

# Saved by earlier versions (`top_k` under another name, since transformers reads a config's `top_k` as a
# generation setting); GPTMoEConfig.from_dict converts it.
LEGACY_FIELDS = ("moe_top_k",)
# transformers 5 renamed the cache field of model outputs from `past_key_values` to `cache`.
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class GPTMoEHFConfig(PretrainedConfig):
    """Every GPTMoEConfig field as a flat attribute (validated by GPTMoEConfig; the router kind by name),
    plus transformers' usual names as aliases. Configs saved before router names load too."""

    model_type = "gpt_moe"
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                     "max_position_embeddings": "seq_len", "intermediate_size": "ffn_hidden_size"}

    def __init__(self, **kwargs):
        own = {name: kwargs.pop(name) for name in (*FIELDS, *LEGACY_FIELDS) if name in kwargs}
        for name, value in GPTMoEConfig.from_dict(own).to_dict().items():
            setattr(self, name, value)
        # Tying happens inside GPTMoE (logits reuse the embedding weight), not through transformers.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @classmethod
    def from_gpt_moe_config(cls, config: GPTMoEConfig, **kwargs) -> "GPTMoEHFConfig":
        return cls(**config.to_dict(), **kwargs)

    def to_gpt_moe_config(self) -> GPTMoEConfig:
        return GPTMoEConfig.from_dict({name: getattr(self, name) for name in FIELDS})


@dataclass
class GPTMoECausalLMOutput(MoeCausalLMOutputWithPast):
    lm_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class GPTMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = GPTMoEHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = True  # transformers 4.4x creates a DynamicCache for generate() only with this

    def __init__(self, config: GPTMoEHFConfig):
        super().__init__(config)
        self.model = GPTMoE(config.to_gpt_moe_config())
        self.post_init()

    def _init_weights(self, module):
        """GPTMoE initialises itself (GPT-style, per-expert seeds); loading fills the rest."""

    @classmethod
    def from_gpt_moe(cls, model: GPTMoE) -> "GPTMoEForCausalLM":
        """Wrap a trained (EP=1) GPTMoE: same config, its state dict under the "model." prefix."""
        if model.config.ep_size != 1:
            raise ValueError(f"from_gpt_moe: the model holds 1/{model.config.ep_size} of its experts; load the "
                             "checkpoint into an ep_size=1 model first (model.checkpoint.load_deepspeed_checkpoint)")
        hf = cls(GPTMoEHFConfig.from_gpt_moe_config(model.config))
        hf.model.load_state_dict(model.state_dict())
        return hf.to(next(model.parameters()).dtype)

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None, labels=None,
                use_cache: bool | None = None, cache=None, logits_to_keep: int = 0,
                **kwargs) -> GPTMoECausalLMOutput:
        """input_ids (B, T): the tokens not yet in the cache. attention_mask (B, past + T), 1 for real tokens
        (left padding allowed). labels (B, T) aligned with input_ids (may equal them): shifted here.
        The cache comes as `cache` (transformers >= 5) or `past_key_values` (4.x); either name works and the
        output carries it under the name the installed transformers reads back."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("GPTMoEForCausalLM takes input_ids, not inputs_embeds")
        cache = _as_cache(cache if cache is not None else past_key_values)
        if use_cache and cache is None:
            cache = _new_cache(self.config)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing to mask: plain causal attention, SDPA's fastest path
        if position_ids is None and attention_mask is not None:
            # Left-padded batches: count positions over real tokens only.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        out = self.model(input_ids, labels=None if labels is None else shift_labels(labels),
                         position_ids=position_ids, attention_mask=attention_mask, past_key_values=cache,
                         logits_to_keep=0 if labels is not None else logits_to_keep)
        loss = None if out.loss is None else out.total_loss
        return GPTMoECausalLMOutput(loss=loss, logits=out.logits, aux_loss=out.aux_loss, lm_loss=out.loss,
                                    z_loss=out.z_loss, **{_CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values=None,
                                      attention_mask: torch.Tensor | None = None, cache=None, **kwargs) -> dict:
        """The inputs of one generation step: the tokens the cache has not seen, the mask over everything.

        Our own rather than GenerationMixin's, whose slicing and keyword names changed between versions
        (cache_position / `past_key_values` in 4.x, next_sequence_length / `cache` in 5.x, none before 4.45).
        The number of new tokens is the mask's length minus the cached length, which also holds for chunked
        prefill, where input_ids is one chunk and the mask ends with it."""
        cache = _as_cache(cache if cache is not None else past_key_values)
        past = cache.get_seq_length() if cache is not None else 0
        total = attention_mask.shape[1] if attention_mask is not None else max(input_ids.shape[1], past + 1)
        new = min(total - past, input_ids.shape[1])
        if new < 1:
            raise ValueError(f"nothing to feed: {past} tokens cached, {total} in the sequence")
        inputs = {"input_ids": input_ids[:, -new:].contiguous(), "attention_mask": attention_mask,
                  "use_cache": kwargs.get("use_cache", True), _CACHE_FIELD: cache}
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


def _new_cache(config) -> DynamicCache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers < 4.56: no config argument
        return DynamicCache()


def _as_cache(cache):
    """A transformers Cache (or our KVCache) as is; a legacy tuple of (k, v) per layer converted."""
    if isinstance(cache, (tuple, list)):
        return DynamicCache.from_legacy_cache(cache) if cache else None
    return cache


AutoConfig.register("gpt_moe", GPTMoEHFConfig, exist_ok=True)
AutoModelForCausalLM.register(GPTMoEHFConfig, GPTMoEForCausalLM, exist_ok=True)
