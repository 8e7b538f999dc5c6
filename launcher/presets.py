"""The training side of the size table: learning rates, global batch and default lengths per size.

The architecture side (layers, hidden, heads) lives in `model.config.SIZES`; both tables share names.
"""
from dataclasses import dataclass, field

# Tokens per public default training run, by tokenizer (WuDao for jiebabpe, the Pile for gpt2bpe).
TRAIN_TOKENS = {"jiebabpe": 100_000_000_000, "gpt2bpe": 300_000_000_000}
WARMUP_TOKENS = {"jiebabpe": 125_000_000, "gpt2bpe": 375_000_000}
# Vocabulary a tokenizer of each kind is trained to by default (padded up to a multiple of 128 by the model).
VOCAB_SIZE = {"jiebabpe": 50_000, "gpt2bpe": 50_257}


@dataclass(frozen=True)
class TrainPreset:
    lr: float
    min_lr: float
    global_batch_tokens: int
    seq_len: int = 2048
    # Only the tiny CPU sizes override these: their runs are minutes, not months.
    train_tokens: int | None = None
    warmup_tokens: int | None = None
    vocab_size: int | None = None
    # MoE variants train with a lower lr and min lr than their dense base (DeepSpeed-MoE's published scripts:
    # 125M 4.5e-4/4.5e-6, 350M 2.0e-4/2.0e-6, 1.3B 1.2e-4/1.0e-6). None: 0.6 x the dense lr (the ratio at
    # 1.3B) with min lr 1% of it.
    moe_lr: float | None = None
    moe_min_lr: float | None = None
    # Model settings this size trains with unless given: all models, and MoE models with a token-choice
    # router (top-1, top-2). The large sizes keep GPTMoEConfig's defaults (the published settings).
    model_defaults: dict = field(default_factory=dict)
    token_choice_defaults: dict = field(default_factory=dict)

    def lrs(self, moe: bool) -> tuple[float, float]:
        if not moe:
            return self.lr, self.min_lr
        lr = self.moe_lr if self.moe_lr is not None else 0.6 * self.lr
        return lr, self.moe_min_lr if self.moe_min_lr is not None else lr / 100


PRESETS: dict[str, TrainPreset] = {
    "0.125B": TrainPreset(6e-4, 6e-5, 524_288, moe_lr=4.5e-4, moe_min_lr=4.5e-6),
    "0.35B": TrainPreset(3e-4, 3e-5, 524_288, moe_lr=2.0e-4, moe_min_lr=2.0e-6),
    "0.76B": TrainPreset(2.5e-4, 2.5e-5, 524_288),
    "1.3B": TrainPreset(2e-4, 2e-5, 1_048_576, moe_lr=1.2e-4, moe_min_lr=1.0e-6),
    "2.7B": TrainPreset(1.6e-4, 1.6e-5, 1_048_576),
    "3.6B": TrainPreset(1.6e-4, 1.6e-5, 1_048_576),
    "6.7B": TrainPreset(1.2e-4, 1.2e-5, 2_097_152),
    "13B": TrainPreset(1.0e-4, 1.0e-5, 2_097_152),
    # CPU sizes: `nano` for tests (seconds), `tiny` for the demo (minutes); dense and MoE share one lr.
    "nano": TrainPreset(1e-3, 1e-4, 8 * 64, seq_len=64, train_tokens=20 * 8 * 64,
                        warmup_tokens=2 * 8 * 64, vocab_size=512, moe_lr=1e-3, moe_min_lr=1e-4),
    # tiny: 1000 iterations (2M tokens, ~0.6 epoch of the stdlib corpus) take 3-5 minutes on 2 CPU processes;
    # the LM loss falls from ~8.3 to ~4.3. Its routers need three things the published settings (tuned for
    # hidden 768+ and micro batches of tens of thousands of tokens) do not give (README, "Router balance"):
    # - init std 0.02, not 0.006: at hidden 128 the 0.006 token embeddings are soon outweighed by the vector
    #   that every token shares (biases learning the unigram distribution), so within 10 iterations every
    #   router input is nearly the same vector and every token picks the same expert;
    # - the expert bias (auxiliary-loss-free balancing), which levels the experts' load within tens of
    #   iterations where the balancing loss takes hundreds;
    # - capacity factor 2 for token choice: a micro batch is 1,024 tokens from 8 sequences, and even when
    #   the load is level on average an expert's share of one micro batch varies up to ~2x with its content.
    "tiny": TrainPreset(2e-3, 2e-4, 16 * 128, seq_len=128, train_tokens=1000 * 16 * 128,
                        warmup_tokens=20 * 16 * 128, vocab_size=4096, moe_lr=2e-3, moe_min_lr=2e-4,
                        model_defaults={"init_std": 0.02},
                        token_choice_defaults={"expert_bias": True, "expert_bias_rate": 0.01,
                                               "capacity_factor": 2.0}),
}
