"""Fine-tuning examples from .tsv (prompt<TAB>target, the tutorial's poetry format) or .jsonl.

An example is encode(prompt) + encode(target) + [eod]: prompt and target are tokenized
apart and joined with nothing between (the tab separates fields; it is not text), so
generation from encode(prompt) continues exactly as training saw it.

Labels follow the transformers convention: aligned with the inputs, shifted inside the model.
Each item: input_ids (LongTensor[seq_len]) and labels (LongTensor[seq_len]) where labels[t] is
input_ids[t] when that token is part of the target (its end-of-document token included), else
-100: prompt, padding, and the first token of an example (nothing before it predicts it: an
example with an empty prompt learns its target from the second token on). Loss therefore falls
on target tokens only.
  - `GPTMoEForCausalLM(input_ids=..., labels=...)` (and a transformers Trainer) take an item as is.
  - `GPTMoE`, which the pretraining loop feeds with pre-shifted labels, takes
    `labels=model.shift_labels(labels)` (from the `model` package): position t is scored on the
    token at t+1.

Too long: an example is cut to seq_len tokens keeping the end of the prompt and the start of
the target, with at least half the window for the target; `num_truncated` counts them and a
warning reports the count.
pack=False: one example per item, padded with pad_id. pack=True: whole examples placed
greedily, in file order, into windows of seq_len tokens, the rest padded; an example is never
split between items (attention is not masked between examples of one window).
"""
import logging
from pathlib import Path

import numpy as np
import torch

from launcher.data.sources import input_kind, iter_jsonl, iter_lines
from launcher.data.tokenizer import Tokenizer
from launcher.errors import UsageError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


def _tsv_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        if "\t" not in line:
            raise UsageError(f"{path}:{lineno}: no tab; each line is prompt<TAB>target")
        prompt, target = line.split("\t", 1)
        pairs.append((prompt, target))
    return pairs


def read_pairs(path, prompt_key: str = "prompt", target_key: str = "target") -> list[tuple[str, str]]:
    """(prompt, target) pairs of a .tsv or .jsonl file; UsageError naming the line of bad input."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"fine-tuning data not found: {path}")
    kind = input_kind(path)
    if kind == "json":
        pairs = [(r[prompt_key], r[target_key]) for _, r in iter_jsonl(path, [prompt_key, target_key])]
    elif kind == "tsv":
        pairs = _tsv_pairs(path)
    else:
        raise UsageError(f"{path}: fine-tuning data is a .tsv (prompt<TAB>target) or .jsonl file")
    if not pairs:
        raise UsageError(f"{path} holds no examples")
    return pairs


def _fit(prompt: list[int], target: list[int], budget: int) -> tuple[list[int], list[int]]:
    keep_target = min(len(target), max(budget - len(prompt), budget // 2))
    keep_prompt = budget - keep_target
    return prompt[len(prompt) - keep_prompt:] if keep_prompt else [], target[:keep_target]


def _pack(lengths: list[int], budget: int) -> list[list[int]]:
    windows, used = [], budget
    for i, n in enumerate(lengths):
        if used + n > budget:
            windows.append([])
            used = 0
        windows[-1].append(i)
        used += n
    return windows


class SFTDataset:
    """Prompt/target examples as fixed-length (input_ids, labels) items; see the module docstring."""

    def __init__(self, path, tokenizer: Tokenizer, seq_len: int, pack: bool = False,
                 prompt_key: str = "prompt", target_key: str = "target"):
        if seq_len < 2:
            raise UsageError(f"seq_len must be at least 2 for fine-tuning, got {seq_len}")
        self.seq_len, self.pack, self.pad_id = seq_len, pack, tokenizer.pad_id
        pairs = read_pairs(path, prompt_key, target_key)
        # encode_texts, not encode_batch: Rust threads started here would make the tokenizers library warn in
        # (and disable parallelism for) every DataLoader worker forked later. For jiebabpe it segments and
        # looks up the whole list at once, many times faster than one encode() per text.
        prompts = tokenizer.encode_texts([p for p, _ in pairs])
        targets = tokenizer.encode_texts([t for _, t in pairs])
        budget = seq_len
        self.examples: list[tuple[np.ndarray, int]] = []  # (ids, number of prompt tokens)
        self.num_truncated = 0
        for prompt, target in zip(prompts, targets):
            target = target + [tokenizer.eod_id]
            if len(prompt) + len(target) > budget:
                self.num_truncated += 1
                prompt, target = _fit(prompt, target, budget)
            self.examples.append((np.asarray(prompt + target, dtype=np.int64), len(prompt)))
        if self.num_truncated:
            logger.warning("%s: %d of %d examples are longer than seq_len = %d tokens and were truncated",
                           path, self.num_truncated, len(self.examples), budget)
        lengths = [len(ids) for ids, _ in self.examples]
        self._windows = _pack(lengths, budget) if pack else [[i] for i in range(len(lengths))]

    def __len__(self) -> int:
        return len(self._windows)

    def __getitem__(self, i: int) -> dict:
        input_ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        pos = 0
        for j in self._windows[i]:
            ids, n_prompt = self.examples[j]  # len(ids) <= seq_len - pos: truncation and packing saw to it
            input_ids[pos:pos + len(ids)] = ids
            first = max(n_prompt, 1)  # the first target token, unless it would open the example
            labels[pos + first:pos + len(ids)] = ids[first:]
            pos += len(ids)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
