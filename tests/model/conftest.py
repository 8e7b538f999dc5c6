"""Shared helpers for the model tests: tiny configs and a seeded model factory."""
import pytest
import torch

from model import GPTMoEConfig, GPTMoE


def nano(**overrides) -> GPTMoEConfig:
    """The `nano` size with a small vocabulary and context: a forward pass takes milliseconds."""
    base = dict(vocab_size=97, seq_len=32, num_experts=4)
    base.update(overrides)
    return GPTMoEConfig.from_size("nano", **base)


def build(cfg: GPTMoEConfig, seed: int = 0, **kw) -> GPTMoE:
    torch.manual_seed(seed)
    return GPTMoE(cfg, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
