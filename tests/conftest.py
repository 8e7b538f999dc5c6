"""Fixtures shared by more than one test folder."""
import pytest
import torch

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.", "明月几时有？把酒问青天。",
         "import os\nimport sys\nprint(os.getcwd())\n"] * 20


@pytest.fixture(scope="session")
def nano_inference_run(tmp_path_factory):
    """(run folder, model, tokenizer): a nano MoE-4 top-2 with 64 positions and weights for which context
    matters (init std 0.3), written in a training run's checkpoint layout. Tests that damage it copy it first."""
    from launcher.data.tokenizer import train_tokenizer
    from launcher.training.checkpoint import write_inference_checkpoint
    from model import GPTMoE, GPTMoEConfig

    root = tmp_path_factory.mktemp("inference_run")
    tokenizer = train_tokenizer("gpt2bpe", TEXTS, 300, root / "tokenizer")
    torch.manual_seed(0)
    model = GPTMoE(GPTMoEConfig.from_size("nano", vocab_size=tokenizer.vocab_size, seq_len=64, num_experts=4,
                                          router_type="top2", init_std=0.3)).eval()
    return write_inference_checkpoint(model, tokenizer, root / "run", iteration=5), model, tokenizer
