"""Batched log-likelihoods for any causal LM: continuations after a context, and losses over token windows.

`model(input_ids)` must return logits (B, T, V) or an object with `.logits` (GPTMoE, the transformers
wrapper). Batches are right-padded: under causal attention, and with MoE routing that is per token at
inference (dropless, no capacity shared across the batch), a real position's logits do not depend on the
padding after it or on the other rows, so batching changes no score.

Shape suffixes: B batch, T positions, V vocabulary, C continuation tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p(continuation token | everything before it), natural log
    greedy: float  # probability that greedy decoding yields exactly the continuation, ties broken at random
    num_tokens: int  # continuation tokens scored


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def _batches(order: Sequence[int], batch_size: int) -> Iterable[list[int]]:
    for start in range(0, len(order), batch_size):
        yield list(order[start:start + batch_size])


def greedy_probability(logits_CV: torch.Tensor, targets_C: torch.Tensor) -> float:
    """Chance that argmax decoding (teacher-forced on the targets, so it is the greedy continuation while it
    matches) emits every target, a tie among k best tokens counting 1/k: 1.0 or 0.0 for a real model, and
    exactly chance for a uniform one."""
    best = logits_CV.max(dim=-1, keepdim=True).values
    tied_CV = logits_CV == best
    target_is_best = tied_CV.gather(-1, targets_C[:, None]).squeeze(-1)
    if not bool(target_is_best.all()):
        return 0.0
    return float(torch.exp(-torch.log(tied_CV.sum(-1).double()).sum()))


@torch.no_grad()
def score_continuations(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int,
                        batch_size: int = 16, device: str | torch.device = "cpu", pad_id: int = 0,
                        progress: Callable[[int], None] | None = None) -> list[Score]:
    """Score each (context ids, continuation ids): log p(continuation | context) and its greedy probability.

    The model sees at most `max_len` tokens: a longer pair loses tokens from the left of its context (as
    lm-eval truncates). Every continuation must be non-empty and at most `max_len` tokens, and a pair must
    have at least one token before the continuation (callers put the end-of-document token before an empty
    context). `progress(n)` is called after each batch with the number of requests it held.
    """
    pieces = []
    for i, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        if not continuation or len(continuation) > max_len or not context:
            raise ValueError(f"request {i}: {len(context)} context and {len(continuation)} continuation tokens; "
                             f"need >= 1 and 1..{max_len}")
        tokens = (context + continuation)[-(max_len + 1):]
        pieces.append((tokens[:-1], tokens[-len(continuation):]))  # model input, the tokens it must predict
    # Longest first: each batch pads to its first row; equal inputs sit together.
    order = sorted(range(len(pieces)), key=lambda i: (-len(pieces[i][0]), pieces[i][0]))
    scores: list[Score | None] = [None] * len(pieces)
    for batch in _batches(order, batch_size):
        width = len(pieces[batch[0]][0])
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, :len(pieces[i][0])] = torch.tensor(pieces[i][0])
        logits_BTV = logits_of(model, input_ids.to(device)).float().cpu()
        for row, i in enumerate(batch):
            inputs, targets = pieces[i]
            n = len(targets)
            # Positions len(inputs)-n .. len(inputs)-1 predict the continuation's n tokens.
            logits_CV = logits_BTV[row, len(inputs) - n:len(inputs)]
            targets_C = torch.tensor(targets)
            logprob = F.log_softmax(logits_CV, dim=-1).gather(-1, targets_C[:, None]).sum()
            scores[i] = Score(float(logprob), greedy_probability(logits_CV, targets_C), n)
        if progress is not None:
            progress(len(batch))
    return scores


def rolling_windows(tokens: Sequence[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) windows that predict every token of `tokens` after the first exactly once, each
    from at most `max_len` tokens of context within `tokens`: chunks of `max_len` predictions, the last one
    given as much context as fits (lm-eval's rolling log-likelihood). Labels of -100 are context only."""
    windows = []
    for start in range(1, len(tokens), max_len):  # predict tokens[start:end]
        end = min(start + max_len, len(tokens))
        first_input = max(0, end - 1 - max_len)
        inputs = list(tokens[first_input:end - 1])
        labels = [-100] * (start - 1 - first_input) + list(tokens[start:end])
        windows.append((inputs, labels))
    return windows


@torch.no_grad()
def window_losses(model, windows: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16,
                  device: str | torch.device = "cpu", pad_id: int = 0,
                  progress: Callable[[int], None] | None = None) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens counted) over (input ids, labels) windows; labels are
    aligned with the inputs (label t is the token after input t), -100 where not counted."""
    total, count = 0.0, 0
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    for batch in _batches(order, batch_size):
        width = len(windows[batch[0]][0])
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, i in enumerate(batch):
            inputs, targets = windows[i]
            input_ids[row, :len(inputs)] = torch.as_tensor(inputs)
            labels[row, :len(targets)] = torch.as_tensor(targets)
        logits_BTV = logits_of(model, input_ids.to(device)).float()
        labels = labels.to(logits_BTV.device)
        total += float(F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
        if progress is not None:
            progress(len(batch))
    return total, count


def perplexity(nll_sum: float, count: int) -> float:
    if not count:
        return float("nan")
    mean = nll_sum / count
    return math.exp(mean) if mean < 700 else float("inf")
