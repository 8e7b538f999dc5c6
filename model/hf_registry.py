"""Registering "gpt_moe" with transformers' Auto classes, from `import model`, without importing transformers.

`import model` must be enough for `AutoConfig` / `AutoModelForCausalLM.from_pretrained(folder)` to know the
model type. Importing transformers' model classes to register ours would more than double what `import model`
costs (PreTrainedModel pulls in torch._dynamo, torch.distributed.tensor and sympy: +2.5 s of CPU here), for
every launcher command and every training process, which never use them. So `install()` registers each Auto
mapping as soon as transformers imports it, or at once where it has already:

    transformers.models.auto.configuration_auto   -> AutoConfig: GPTMoEHFConfig (model/hf_config.py, light)
    transformers.models.auto.modeling_auto        -> AutoModelForCausalLM: GPTMoEForCausalLM (model/hf.py)

transformers imports configuration_auto while it imports PreTrainedModel, so that step must not import
model/hf.py (which needs PreTrainedModel); modeling_auto is imported by no part of that chain, and model/hf.py
registers itself when it is imported, so a partly imported model/hf.py is left to finish.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"
_PACKAGE = __name__.rsplit(".", 1)[0]


def register_config() -> None:
    from .hf_config import GPTMoEHFConfig

    sys.modules[CONFIG_AUTO].AutoConfig.register(GPTMoEHFConfig.model_type, GPTMoEHFConfig, exist_ok=True)


def register_model() -> None:
    if f"{_PACKAGE}.hf" not in sys.modules:  # model/hf.py registers itself at the end of its import
        importlib.import_module(f"{_PACKAGE}.hf")


_ACTIONS = {CONFIG_AUTO: register_config, MODELING_AUTO: register_model}


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds the Auto modules as the path finder would, and registers once each has run."""

    def find_spec(self, name, path=None, target=None):
        action = _ACTIONS.get(name)
        if action is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _ThenRun(spec.loader, action)
        return spec


class _ThenRun(importlib.abc.Loader):
    def __init__(self, loader, action):
        self._loader, self._action = loader, action

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._action()

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)


_finder = _RegisterAfterImport()


def install() -> None:
    """Register now what transformers has imported already, and the rest when it does."""
    if CONFIG_AUTO in sys.modules:
        register_config()
    if MODELING_AUTO in sys.modules:
        register_model()
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
