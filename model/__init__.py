"""The GPT-MoE model: config, single-device decoder with DeepSpeed-compatible MoE layers, HF wrapper.

Importing `model` registers the "gpt_moe" model type with transformers' Auto classes (as soon as transformers
imports them: model/hf_registry.py), so a folder written by `GPTMoEForCausalLM.save_pretrained` loads with
`AutoModelForCausalLM.from_pretrained` as this toolkit's class; the folder also carries standalone code for
`trust_remote_code=True` where the toolkit is absent (model/standalone). `GPTMoEForCausalLM` and
`GPTMoEHFConfig` are imported on first use, so `import model` does not pay for transformers' model classes.
"""
from . import hf_registry
from .config import SIZES, GPTMoEConfig
from .gpt import GPTMoE, GPTMoEOutput, shift_labels

__all__ = ["SIZES", "GPTMoEConfig", "GPTMoE", "GPTMoEOutput", "shift_labels", "GPTMoEForCausalLM", "GPTMoEHFConfig"]

hf_registry.install()


def __getattr__(name):
    if name == "GPTMoEForCausalLM":
        from .hf import GPTMoEForCausalLM

        return GPTMoEForCausalLM
    if name == "GPTMoEHFConfig":
        from .hf_config import GPTMoEHFConfig

        return GPTMoEHFConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
