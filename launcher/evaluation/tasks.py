"""Zero-shot tasks from local jsonl files, scored by log-likelihood.

One example per line; the file's name (without .jsonl) names the task; every line of a file has one kind:

- completion (LAMBADA style): {"context": str, "target": str}. The model must continue `context` with
  exactly `target`. Metrics: `acc`, the fraction where greedy decoding produces the target's tokens exactly;
  `target_loglikelihood`, the mean over examples of log p(target | context) in nats; `perplexity`,
  exp(-that mean) (lm-eval's LAMBADA perplexity); `loss_per_token`, nats per target token.
- multiple choice (PIQA / HellaSwag / BoolQ style): {"context": str, "choices": [str, ...], "label": int}.
  Each choice is scored by log p(choice | context). Metrics: `acc` picks the highest sum; `acc_norm` the
  highest sum per character of the choice (lm-eval's acc_norm); `acc_per_token` the highest mean per token.

Text is joined as given, context + target (no separator is added: put the leading space or newline in the
target or choice). As in lm-eval, whitespace that ends a context is moved to the start of the
continuation before tokenizing (so " word" stays one token), context + continuation is tokenized whole
and split where the context's own tokens end, an empty context becomes the end-of-document token, and
a pair longer than the model's context loses tokens from the left of its context.

A tie between k best choices that includes the right one counts 1/k (the expected accuracy under random
tie-breaking; lm-eval counts the first), and likewise for greedy decoding token by token: a model that
gives every token the same probability scores exactly chance, whatever the order of the choices.
Each accuracy comes with its standard error over examples (`*_stderr`). `chance` is the expected accuracy
of random guessing: the mean of 1/number of choices; for completion, of vocab_size ** -target tokens.
An example whose continuation (or one of its choices) is longer than the model's context cannot be
scored: it is left out, and counted in `left_out`.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from launcher.errors import UsageError
from launcher.evaluation.scoring import score_continuations

logger = logging.getLogger(__name__)

COMPLETION = "completion"
MULTIPLE_CHOICE = "multiple_choice"
TASK_KINDS = (COMPLETION, MULTIPLE_CHOICE)
NORMALISATION = {"acc_norm": "sum of log-likelihood per character of the choice (lm-eval's acc_norm)",
                 "acc_per_token": "mean log-likelihood per token of the choice"}


@dataclass
class Task:
    name: str
    kind: str
    path: Path
    examples: list[dict]  # each with "line": its line number in the file


def _kind_of(row: dict, where: str) -> str:
    if not isinstance(row.get("context"), str):
        raise UsageError(f"{where}: needs a string \"context\"")
    if "choices" in row:
        choices, label = row["choices"], row.get("label")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)):
            raise UsageError(f"{where}: \"choices\" must be a list of 2 or more non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise UsageError(f"{where}: \"label\" must be the index of the right choice, 0..{len(choices) - 1}")
        return MULTIPLE_CHOICE
    if isinstance(row.get("target"), str) and row["target"]:
        return COMPLETION
    raise UsageError(f"{where}: needs a non-empty string \"target\" (completion) or \"choices\" and \"label\" "
                     "(multiple choice)")


def load_task(path: str | Path) -> Task:
    """Read and check a task file; UsageError naming the file and line of anything malformed."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise UsageError(f"task file {path}: must be a .jsonl file (one example per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"task file {path}: cannot be read ({err})") from None
    examples, kind = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError:
            raise UsageError(f"{where}: not valid JSON") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where}: each line must be a JSON object")
        row_kind = _kind_of(row, where)
        if kind is not None and row_kind != kind:
            raise UsageError(f"{where}: a {row_kind} example in a {kind} task; one kind per file")
        kind = row_kind
        examples.append({**row, "line": number})
    if not examples:
        raise UsageError(f"task file {path}: no examples")
    return Task(path.stem, kind, path, examples)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), tokenized as described in the module docstring."""
    trailing = len(context) - len(context.rstrip())
    if trailing:
        context, continuation = context[:-trailing], context[-trailing:] + continuation
    if not context:
        return [tokenizer.eod_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    n = len(tokenizer.encode(context))
    return whole[:n], whole[n:]


def _mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def choice_credit(scores: Sequence[float], label: int) -> float:
    """1/k when the right choice is among the k highest scores, else 0."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    return 1.0 / len(tied) if label in tied else 0.0


def choice_metrics(loglikelihoods: Sequence[Sequence[float]], token_counts: Sequence[Sequence[int]],
                   choices: Sequence[Sequence[str]], labels: Sequence[int]) -> dict:
    """acc, acc_norm (per character), acc_per_token with standard errors, from per-choice log-likelihoods."""
    rules = {
        "acc": lambda ll, n, text: ll,
        "acc_norm": lambda ll, n, text: ll / len(text),
        "acc_per_token": lambda ll, n, text: ll / n,
    }
    out = {}
    for name, rule in rules.items():
        credits = [choice_credit([rule(ll, n, t) for ll, n, t in zip(lls, ns, texts)], label)
                   for lls, ns, texts, label in zip(loglikelihoods, token_counts, choices, labels)]
        out[name], out[f"{name}_stderr"] = _mean_and_stderr(credits)
    out["chance"] = sum(1 / len(c) for c in choices) / len(choices)
    return out


def completion_metrics(loglikelihoods: Sequence[float], greedy: Sequence[float], token_counts: Sequence[int],
                       vocab_size: int) -> dict:
    acc, acc_stderr = _mean_and_stderr(greedy)
    mean_ll = sum(loglikelihoods) / len(loglikelihoods)
    return {"acc": acc, "acc_stderr": acc_stderr, "target_loglikelihood": mean_ll,
            "perplexity": math.exp(-mean_ll) if -mean_ll < 700 else float("inf"),
            "loss_per_token": -sum(loglikelihoods) / sum(token_counts),
            "target_tokens": sum(token_counts) / len(token_counts),
            "chance": sum(vocab_size ** -n for n in token_counts) / len(token_counts)}


def scorable(task: Task, tokenizer, max_len: int) -> tuple[list[dict], list[tuple[list[int], list[int]]]]:
    """(examples kept, their requests in order): an example with a continuation longer than the model's
    context cannot be scored and is left out."""
    kept, requests = [], []
    for example in task.examples:
        continuations = example["choices"] if task.kind == MULTIPLE_CHOICE else [example["target"]]
        pairs = [encode_pair(tokenizer, example["context"], c) for c in continuations]
        if any(not 1 <= len(c) <= max_len for _, c in pairs):
            continue
        kept.append(example)
        requests += pairs
    return kept, requests


def evaluate_task(model, tokenizer, task: Task, max_len: int, vocab_size: int, batch_size: int = 16,
                  device="cpu", limit: int | None = None, progress: bool = False) -> dict:
    """Metrics of one task on the first `limit` examples (all by default)."""
    from tqdm import tqdm

    examples = task.examples if limit is None else task.examples[:limit]
    kept, requests = scorable(Task(task.name, task.kind, task.path, examples), tokenizer, max_len)
    if not kept:
        raise UsageError(f"task {task.path}: no example's continuation fits the model's {max_len} tokens")
    if len(kept) < len(examples):
        logger.warning("%s: %d of %d examples left out, their continuation is longer than the model's %d tokens",
                       task.name, len(examples) - len(kept), len(examples), max_len)
    with tqdm(total=len(requests), desc=task.name, unit="req", disable=not progress, leave=False) as bar:
        scores = score_continuations(model, requests, max_len, batch_size, device, tokenizer.eod_id, bar.update)
    result = {"kind": task.kind, "file": str(task.path.resolve()), "examples": len(kept),
              "left_out": len(examples) - len(kept)}
    if task.kind == COMPLETION:
        result.update(completion_metrics([s.logprob for s in scores], [s.greedy for s in scores],
                                         [s.num_tokens for s in scores], vocab_size))
        return result
    lls, counts, choices, labels, at = [], [], [], [], 0
    for example in kept:
        k = len(example["choices"])
        lls.append([s.logprob for s in scores[at:at + k]])
        counts.append([s.num_tokens for s in scores[at:at + k]])
        choices.append(example["choices"])
        labels.append(example["label"])
        at += k
    result.update(choice_metrics(lls, counts, choices, labels))
    result["normalisation"] = NORMALISATION
    return result
