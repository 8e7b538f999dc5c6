"""`GPTMoEHFConfig`: the transformers config of GPT-MoE (model_type "gpt_moe").

The standalone config that exported folders carry (model/standalone/configuration_gpt_moe.py), with every
value validated by GPTMoEConfig, so both read and write the same config.json. Apart from model/hf.py so that
registering it with AutoConfig imports neither transformers' model classes nor the model (model/hf_registry.py).
"""
from __future__ import annotations

from .config import FIELDS, GPTMoEConfig
from .standalone.configuration_gpt_moe import GPTMoEHFConfig as StandaloneConfig

# Saved by earlier versions (`top_k` under another name, since transformers reads a config's `top_k` as a
# generation setting); GPTMoEConfig.from_dict converts it.
LEGACY_FIELDS = ("moe_top_k",)


class GPTMoEHFConfig(StandaloneConfig):
    """Every GPTMoEConfig field as a flat attribute (validated by GPTMoEConfig; the router kind by name),
    plus transformers' usual names as aliases. Configs saved before router names load too."""

    def __init__(self, **kwargs):
        own = {name: kwargs.pop(name) for name in (*FIELDS, *LEGACY_FIELDS) if name in kwargs}
        super().__init__(**GPTMoEConfig.from_dict(own).to_dict(), **kwargs)

    @classmethod
    def from_gpt_moe_config(cls, config: GPTMoEConfig, **kwargs) -> "GPTMoEHFConfig":
        return cls(**config.to_dict(), **kwargs)

    def to_gpt_moe_config(self) -> GPTMoEConfig:
        return GPTMoEConfig.from_dict({name: getattr(self, name) for name in FIELDS})
