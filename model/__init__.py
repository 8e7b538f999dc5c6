"""The GPT-MoE model: config, single-device decoder with DeepSpeed-compatible MoE layers, HF wrapper.

`GPTMoEForCausalLM` and `GPTMoEHFConfig` are imported on first use, so `import model` does not pay for
importing transformers; accessing them registers the "gpt_moe" model type with transformers' Auto classes.
"""
from .config import SIZES, GPTMoEConfig
from .gpt import GPTMoE, GPTMoEOutput, shift_labels

__all__ = ["SIZES", "GPTMoEConfig", "GPTMoE", "GPTMoEOutput", "shift_labels", "GPTMoEForCausalLM", "GPTMoEHFConfig"]


def __getattr__(name):
    if name in ("GPTMoEForCausalLM", "GPTMoEHFConfig"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
