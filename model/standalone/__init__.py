"""The GPT-MoE model as plain `transformers` code: files copied as they are into every exported model folder
(and into every `save_pretrained` folder), so that `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` works where only torch and transformers are installed.

Each file imports torch, transformers and its neighbours in this folder only: never `model` or `launcher`,
and never deepspeed. `CODE_FILES` lists what a folder gets; `AUTO_MAP` is the config.json entry that
points the Auto classes at them.
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent
CODE_FILES = ("configuration_gpt_moe.py", "modeling_gpt_moe.py")
AUTO_MAP = {
    "AutoConfig": "configuration_gpt_moe.GPTMoEHFConfig",
    "AutoModelForCausalLM": "modeling_gpt_moe.GPTMoEForCausalLM",
}


def write_code(directory) -> None:
    """Copy the model's code into `directory` (a model folder whose config.json carries AUTO_MAP)."""
    for name in CODE_FILES:
        (Path(directory) / name).write_text((HERE / name).read_text(encoding="utf-8"), encoding="utf-8")
