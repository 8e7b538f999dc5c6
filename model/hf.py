"""Hugging Face wrapper: `GPTMoEForCausalLM` (model_type "gpt_moe", config in model/hf_config.py).

Registered with AutoConfig / AutoModelForCausalLM once `model` is imported (model/hf_registry.py), so a folder
written by `save_pretrained` (config.json + model.safetensors + the standalone code) loads with
`AutoModelForCausalLM.from_pretrained` and generates with `generate()` (KV cache included).

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
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .gpt import GPTMoE, shift_labels
from .hf_config import GPTMoEHFConfig
from .standalone import AUTO_MAP
from .standalone.modeling_gpt_moe import CACHE_FIELD, GPTMoEPreTrainedModel


@dataclass
class GPTMoECausalLMOutput(MoeCausalLMOutputWithPast):
    lm_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class GPTMoEForCausalLM(GPTMoEPreTrainedModel, GenerationMixin):
    """The trainable GPTMoE behind transformers' interface. The interface itself (cache names, left padding,
    generation steps) is the standalone model's (model/standalone/modeling_gpt_moe.py), shared, not copied."""

    config_class = GPTMoEHFConfig

    def __init__(self, config: GPTMoEHFConfig):
        super().__init__(config)
        self.model = GPTMoE(config.to_gpt_moe_config())
        self.post_init()

    def _init_weights(self, module):
        """GPTMoE initialises itself (GPT-style, per-expert seeds); loading fills the rest."""

    @classmethod
    def from_gpt_moe(cls, model: GPTMoE, **config_kwargs) -> "GPTMoEForCausalLM":
        """Wrap a trained (EP=1) GPTMoE: same config, its state dict under the "model." prefix.
        `config_kwargs` go to the config: the tokenizer's `eos_token_id`, `pad_token_id`, `bos_token_id`."""
        if model.config.ep_size != 1:
            raise ValueError(f"from_gpt_moe: the model holds 1/{model.config.ep_size} of its experts; load the "
                             "checkpoint into an ep_size=1 model first (model.checkpoint.load_deepspeed_checkpoint)")
        hf = cls(GPTMoEHFConfig.from_gpt_moe_config(model.config, **config_kwargs))
        hf.model.load_state_dict(model.state_dict())
        return hf.to(next(model.parameters()).dtype)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """config.json + model.safetensors, plus the model's code (model/standalone) and the config's
        `auto_map` naming it, so the folder loads with `trust_remote_code=True` where this toolkit is not
        installed (and as this class, with no flag, where `model` is imported)."""
        from .standalone import write_code

        self.config.auto_map = dict(AUTO_MAP)
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del self.config.auto_map
        write_code(save_directory)

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
        cache, attention_mask, position_ids = self.step_inputs(input_ids, attention_mask, position_ids, cache,
                                                               past_key_values, use_cache)
        out = self.model(input_ids, labels=None if labels is None else shift_labels(labels),
                         position_ids=position_ids, attention_mask=attention_mask, past_key_values=cache,
                         logits_to_keep=0 if labels is not None else logits_to_keep)
        loss = None if out.loss is None else out.total_loss
        return GPTMoECausalLMOutput(loss=loss, logits=out.logits, aux_loss=out.aux_loss, lm_loss=out.loss,
                                    z_loss=out.z_loss, **{CACHE_FIELD: cache})


AutoConfig.register("gpt_moe", GPTMoEHFConfig, exist_ok=True)
AutoModelForCausalLM.register(GPTMoEHFConfig, GPTMoEForCausalLM, exist_ok=True)
