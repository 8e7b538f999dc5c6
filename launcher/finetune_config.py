"""FinetuneConfig: what fine-tuning adds to a run, beside the RunConfig that holds everything else.

A fine-tuning run is a RunConfig whose `finetune` field is set: parallelism, precision, ZeRO, recompute,
optimizer and checkpoints are the run's, and the training length (epochs of TRAIN) is resolved into the run's
own token counts by the launcher (`launcher.finetune_cli`), so the trainer, the schedule and the checkpoints
work on iterations as in pretraining.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

from launcher.errors import UsageError


@dataclass
class FinetuneConfig:
    task_name: str
    train_path: str  # prompt<TAB>target .tsv or .jsonl
    valid_path: str
    pretrained: str  # the pretrained checkpoint's tag folder (the launcher resolves a run or checkpoints folder)
    epochs: int = 1
    pack: bool = False  # whole examples packed into each sequence, instead of one example padded per sequence
    warmup_fraction: float = 0.01  # of the training iterations, then cosine decay
    samples: int = 4  # VALID prompts generated for after each epoch (0 = none)
    sample_tokens: int = 64  # new tokens per sample at most
    prompt_key: str = "prompt"  # .jsonl fields
    target_key: str = "target"
    # Set by the launcher: a digest of TRAIN's bytes and the packing, so a resumed run trains on the same data.
    data_digest: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task_name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", self.task_name):
            _fail("TASK_NAME", self.task_name, "letters, digits and . _ + - (it names the run folder)")
        for name, value in (("TRAIN_DATASET_PATH", self.train_path), ("VALID_DATASET_PATH", self.valid_path),
                            ("PRETRAIN_CHECKPOINT_PATH", self.pretrained)):
            if not isinstance(value, str) or not value:
                _fail(name, value, "a path")
        if not _count(self.epochs, 1):
            _fail("EPOCH", self.epochs, "an integer >= 1")
        if not isinstance(self.pack, bool):
            _fail("--pack", self.pack, "true | false")
        if not (isinstance(self.warmup_fraction, (int, float)) and not isinstance(self.warmup_fraction, bool)
                and math.isfinite(self.warmup_fraction) and 0 <= self.warmup_fraction < 1):
            _fail("--warmup-fraction", self.warmup_fraction, "a number in [0, 1)")
        if not _count(self.samples, 0):
            _fail("--samples", self.samples, "an integer >= 0 (0 = no samples)")
        if not _count(self.sample_tokens, 1):
            _fail("--sample-tokens", self.sample_tokens, "an integer >= 1")
        for name in ("prompt_key", "target_key"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                _fail("--" + name.replace("_", "-"), getattr(self, name), "a field name of the .jsonl records")

    def warmup_iters(self, train_iters: int) -> int:
        return math.ceil(self.warmup_fraction * train_iters)

    def to_dict(self) -> dict:
        return asdict(self)


def _count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _fail(name: str, given, allowed: str) -> None:
    raise UsageError(f"{name}: got {given!r}; allowed: {allowed}")


FINETUNE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(FinetuneConfig))
# Settings no flag sets: what the launcher resolves.
FINETUNE_RESOLVED = ("data_digest",)
# Run settings a fine-tuning run derives from EPOCH and the data: always, or unless the line or a run file gives
# them (a validation, a checkpoint and samples after each epoch; one pass over VALID).
DERIVED_ALWAYS = ("train_tokens", "warmup_tokens")
DERIVED_UNLESS_GIVEN = ("eval_interval", "save_interval", "eval_iters")
