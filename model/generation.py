"""Batched decoding with a KV cache: a running batch of requests, each with its own sampling settings.

Shape suffixes: B rows (requests), T new tokens, S cached positions (left padding included), V vocabulary.

    decoder = Decoder(model, decode=tokenizer.decode)
    decoder.add(Request(prompt_ids, SamplingParams(temperature=0.8, top_k=40, seed=1), key="a"))
    while decoder.has_work():
        for update in decoder.step():        # one new token per running row (streaming)
            ...update.key, update.token, update.finish_reason
    decoder.results()                          # finished Completions, in the order they finished

Requests may be added between steps (dynamic batching): the next step prefills them (left-padded, one
forward pass) and merges their cache into the running batch's, padding on the left to a common length.
A row that finishes (end-of-document, a stop string, its token budget) leaves the batch at once, so the
next steps cost nothing for it; cache columns that every remaining row has as padding are dropped.

Each row's tokens depend only on its prompt, its settings and its own seeded generator: not on its batch
mates or on when it joined (routing is per token and dropless in eval mode; padding is masked). Greedy
rows are exactly reproducible; sampled rows with a seed give the same text run after run.

Single-device model code: the caller brings a tokenizer's `decode` only for stop strings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch
from torch import Tensor

from .gpt import GPTMoE, KVCache


# Below this temperature, or outside these repetition penalties, float32 logits overflow into NaN
# probabilities, which would fail every row decoding in the same batch.
MIN_TEMPERATURE = 1e-3
REPETITION_PENALTY_RANGE = (0.01, 100.0)


def _fail(name: str, value, allowed: str):
    raise ValueError(f"{name}: got {value!r}; allowed: {allowed}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 is greedy; top_k 0 and top_p 1 are off; the repetition
    penalty (CTRL's: a seen token's logit is divided by it when positive, multiplied when negative) is off
    at 1 and covers the prompt and the tokens generated so far. Generation stops at any of
    `stop_token_ids`, at the first occurrence of any of `stop_strings` in the generated text, or after
    `max_new_tokens`. `seed` seeds the row's own generator (None: drawn from torch's global RNG)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        def number(name, ok, allowed):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                _fail(name, v, allowed)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            _fail("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        number("temperature", lambda v: v == 0 or v >= MIN_TEMPERATURE, f"0 (greedy) or a number >= {MIN_TEMPERATURE}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            _fail("top_k", self.top_k, "an integer >= 0 (0 = off)")
        number("top_p", lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)")
        low, high = REPETITION_PENALTY_RANGE
        number("repetition_penalty", lambda v: low <= v <= high, f"a number from {low} to {high:g} (1 = off)")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            _fail("stop_token_ids", self.stop_token_ids, "token ids (integers >= 0)")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            _fail("stop_strings", self.stop_strings, "non-empty strings")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            _fail("seed", self.seed, "an integer or None")


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    key: Hashable = None  # the caller's name for it, echoed in updates and completions


@dataclass
class StepUpdate:
    """What one step did for one row: the token it added, and why the row stopped if it did."""
    key: Hashable
    token: int
    finish_reason: str | None  # None (running), "stop_token", "stop_string", "length" ("cancelled": cancel())


@dataclass
class Completion:
    key: Hashable
    prompt_ids: list[int]
    token_ids: list[int]  # generated, the stop token or the tokens that completed a stop string included
    finish_reason: str
    stop_at: int | None = None  # where the matched stop string starts in decode(token_ids)

    def text(self, decode: Callable[[list[int]], str]) -> str:
        """The generated text, cut before the stop string that ended it; stop tokens are not text."""
        ids = self.token_ids[:-1] if self.finish_reason == "stop_token" else self.token_ids
        return decode(ids)[:self.stop_at] if self.stop_at is not None else decode(ids)


class _Row:
    def __init__(self, request: Request, generator: torch.Generator):
        self.request = request
        self.params = request.params
        self.generator = generator
        self.generated: list[int] = []
        self.stop_at: int | None = None


class Decoder:
    """A running batch over one GPTMoE; see the module docstring. Not thread-safe: one caller steps it."""

    def __init__(self, model: GPTMoE, decode: Callable[[list[int]], str] | None = None, pad_id: int = 0):
        self.model = model
        self.decode = decode
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.pending: list[Request] = []
        self.finished: list[Completion] = []
        self.rows: list[_Row] = []
        self._clear_batch()

    def _clear_batch(self):
        self.rows = []
        self.cache = KVCache(self.model.config.seq_len)
        self.mask_BS: Tensor | None = None  # 1 where the cache holds a real token of the row, 0 for padding
        self.next_token_B: Tensor | None = None  # each row's newest token: not in the cache yet
        self.next_pos_B: Tensor | None = None  # its position (real tokens before it)
        self.seen_BV: Tensor | None = None  # tokens of prompt + generation, for the repetition penalty
        self.settings_B: dict[str, Tensor] = {}
        self.padded = False  # some row has padding in the cache: attention needs the mask

    # ------------------------------------------------------------------ requests in, results out
    def add(self, request: Request) -> None:
        """Queue a request; the next step prefills it. ValueError (one line) on a request that cannot run."""
        ids = request.prompt_ids
        if not ids or any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt_ids: need 1 or more token ids in [0, {self.vocab_size})")
        room = self.model.config.seq_len - len(ids)
        if request.params.max_new_tokens > room:
            raise ValueError(f"max_new_tokens: got {request.params.max_new_tokens}; allowed: at most {room} "
                             f"(a {len(ids)}-token prompt in the model's seq_len={self.model.config.seq_len})")
        if request.params.stop_strings and self.decode is None:
            raise ValueError("stop_strings need a Decoder built with decode=tokenizer.decode")
        self.pending.append(request)

    def cancel(self, key: Hashable) -> bool:
        """Drop a pending or running request (its client went away): a running one leaves the batch now and
        finishes with reason "cancelled" and the tokens it had. False when no such request is here."""
        for i, request in enumerate(self.pending):
            if request.key == key:
                del self.pending[i]
                return True
        for i, row in enumerate(self.rows):
            if row.request.key == key:
                self.finished.append(Completion(key, list(row.request.prompt_ids), row.generated, "cancelled"))
                self._select([j for j in range(len(self.rows)) if j != i])
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.rows or self.pending)

    def results(self) -> list[Completion]:
        """Completions finished since the last call, in the order they finished."""
        done, self.finished = self.finished, []
        return done

    def run(self, requests: list[Request]) -> list[Completion]:
        """Decode `requests` to the end; completions in the order of `requests` (keys default to the index)."""
        for i, r in enumerate(requests):
            self.add(r if r.key is not None else Request(r.prompt_ids, r.params, key=i))
        keys = [r.key if r.key is not None else i for i, r in enumerate(requests)]
        while self.has_work():
            self.step()
        by_key = {c.key: c for c in self.results()}
        return [by_key[k] for k in keys]

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> list[StepUpdate]:
        """One token for every running row (decode), and the first token of every pending request (prefill)."""
        was_training = self.model.training
        if was_training:
            self.model.eval()  # deterministic, dropless routing
        try:
            updates = self._decode_step() if self.rows else []
            if self.pending:
                requests, self.pending = self.pending, []
                updates += self._prefill(requests)
            return updates
        finally:
            if was_training:
                self.model.train()

    def _decode_step(self) -> list[StepUpdate]:
        b = len(self.rows)
        self.mask_BS = torch.cat([self.mask_BS, self.mask_BS.new_ones(b, 1)], dim=1)
        out = self.model(self.next_token_B[:, None], position_ids=self.next_pos_B[:, None],
                         attention_mask=self.mask_BS if self.padded else None, past_key_values=self.cache,
                         logits_to_keep=1)
        self.next_pos_B = self.next_pos_B + 1
        return self._advance(out.logits[:, -1])

    def _prefill(self, requests: list[Request]) -> list[StepUpdate]:
        """Left-pad the new prompts into one batch, run them, and merge them into the running batch."""
        lengths = [len(r.prompt_ids) for r in requests]
        s = max(lengths)
        ids_BS = torch.full((len(requests), s), self.pad_id, dtype=torch.long)
        mask_BS = torch.zeros(len(requests), s, dtype=torch.long)
        for i, r in enumerate(requests):
            ids_BS[i, s - lengths[i]:] = torch.tensor(r.prompt_ids)
            mask_BS[i, s - lengths[i]:] = 1
        ids_BS, mask_BS = ids_BS.to(self.device), mask_BS.to(self.device)
        padded = min(lengths) != s
        cache = KVCache(self.model.config.seq_len)
        out = self.model(ids_BS, position_ids=(mask_BS.cumsum(-1) - 1).clamp(min=0) if padded else None,
                         attention_mask=mask_BS if padded else None, past_key_values=cache, logits_to_keep=1)
        seen_BV = torch.zeros(len(requests), self.vocab_size, dtype=torch.bool, device=self.device)
        row, col = mask_BS.nonzero(as_tuple=True)
        seen_BV[row, ids_BS[row, col]] = True
        new = _Batch(
            rows=[_Row(r, self._generator(r.params.seed)) for r in requests], cache=cache, mask_BS=mask_BS,
            next_pos_B=torch.tensor(lengths, device=self.device), seen_BV=seen_BV,
            settings_B=_settings([r.params for r in requests], self.device))
        self._merge(new)
        # The new rows are the last len(requests) rows: advance them only.
        return self._advance(out.logits[:, -1], first=len(self.rows) - len(requests))

    def _generator(self, seed: int | None) -> torch.Generator:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        return torch.Generator(device=self.device).manual_seed(seed)

    # ------------------------------------------------------------------ sampling and bookkeeping
    def _advance(self, logits_BV: Tensor, first: int = 0) -> list[StepUpdate]:
        """Pick the next token of rows first.. from their logits (one row each), record it, retire
        finished rows."""
        rows = slice(first, len(self.rows))
        tokens_B = next_tokens(logits_BV, {k: v[rows] for k, v in self.settings_B.items()}, self.seen_BV[rows],
                               [r.generator for r in self.rows[rows]])
        if first == 0:
            self.next_token_B = tokens_B
        else:
            self.next_token_B = torch.cat([self.next_token_B[:first], tokens_B])
        self.seen_BV[torch.arange(first, len(self.rows), device=self.device), tokens_B] = True
        updates, keep = [], list(range(first))
        for i, token in enumerate(tokens_B.tolist(), start=first):
            row = self.rows[i]
            row.generated.append(token)
            reason = self._finish_reason(row, token)
            updates.append(StepUpdate(row.request.key, token, reason))
            if reason is None:
                keep.append(i)
            else:
                self.finished.append(Completion(row.request.key, list(row.request.prompt_ids), row.generated,
                                                reason, row.stop_at))
        if len(keep) < len(self.rows):
            self._select(keep)
        return updates

    def _finish_reason(self, row: _Row, token: int) -> str | None:
        p = row.params
        if token in p.stop_token_ids:
            return "stop_token"
        if p.stop_strings:
            # A new match ends in this token, so it lies in the last few tokens: a character is at most 4
            # bytes and a token at least 1. Decoding that tail only keeps each step's cost flat.
            tail = self.decode(row.generated[-(4 * max(map(len, p.stop_strings)) + 4):])
            if any(s in tail for s in p.stop_strings):
                text = self.decode(row.generated)
                row.stop_at = min(i for i in (text.find(s) for s in p.stop_strings) if i >= 0)
                return "stop_string"
        if len(row.generated) >= p.max_new_tokens:
            return "length"
        return None

    def _select(self, keep: list[int]) -> None:
        """Keep these rows only; drop cache columns that are padding in every row left."""
        if not keep:
            self._clear_batch()
            return
        idx = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask_BS = self.mask_BS[idx]
        start = int(self.mask_BS.any(0).nonzero()[0])
        self.mask_BS = self.mask_BS[:, start:]
        self.cache.keys = [k[idx, :, start:] for k in self.cache.keys]
        self.cache.values = [v[idx, :, start:] for v in self.cache.values]
        self.next_token_B, self.next_pos_B, self.seen_BV = self.next_token_B[idx], self.next_pos_B[idx], \
            self.seen_BV[idx]
        self.settings_B = {k: v[idx] for k, v in self.settings_B.items()}
        self.padded = not bool(self.mask_BS.all())

    def _merge(self, new: "_Batch") -> None:
        """Append new rows (whose first token is not sampled yet) after the running ones."""
        if not self.rows:
            self.rows, self.cache, self.mask_BS = new.rows, new.cache, new.mask_BS
            self.next_pos_B, self.seen_BV, self.settings_B = new.next_pos_B, new.seen_BV, new.settings_B
            self.next_token_B = torch.empty(0, dtype=torch.long, device=self.device)
            self.padded = not bool(self.mask_BS.all())
            return
        s = max(self.mask_BS.shape[1], new.mask_BS.shape[1])
        self.mask_BS = torch.cat([_pad_left(self.mask_BS, s, 1), _pad_left(new.mask_BS, s, 1)])
        self.cache.keys = [torch.cat([_pad_left(a, s, 2), _pad_left(b, s, 2)])
                           for a, b in zip(self.cache.keys, new.cache.keys)]
        self.cache.values = [torch.cat([_pad_left(a, s, 2), _pad_left(b, s, 2)])
                             for a, b in zip(self.cache.values, new.cache.values)]
        self.rows = self.rows + new.rows
        self.next_pos_B = torch.cat([self.next_pos_B, new.next_pos_B])
        self.seen_BV = torch.cat([self.seen_BV, new.seen_BV])
        self.settings_B = {k: torch.cat([v, new.settings_B[k]]) for k, v in self.settings_B.items()}
        self.padded = not bool(self.mask_BS.all())


@dataclass
class _Batch:
    rows: list[_Row]
    cache: KVCache
    mask_BS: Tensor
    next_pos_B: Tensor
    seen_BV: Tensor
    settings_B: dict[str, Tensor]


def _pad_left(x: Tensor, size: int, dim: int) -> Tensor:
    """Zeros before x along dim up to `size` (cache padding is masked out, so its value does not matter)."""
    missing = size - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _settings(params: list[SamplingParams], device) -> dict[str, Tensor]:
    return {"temperature": torch.tensor([p.temperature for p in params], device=device),
            "top_k": torch.tensor([p.top_k for p in params], device=device),
            "top_p": torch.tensor([p.top_p for p in params], device=device),
            "repetition_penalty": torch.tensor([p.repetition_penalty for p in params], device=device)}


def next_tokens(logits_BV: Tensor, settings_B: dict[str, Tensor], seen_BV: Tensor | None,
                generators: list[torch.Generator]) -> Tensor:
    """One token per row, each row under its own settings (tensors of shape (B,)) and generator: the
    repetition penalty on seen tokens, then greedy (temperature 0) or temperature, top-k, top-p, sampling."""
    logits_BV = penalize(logits_BV.float(), settings_B["repetition_penalty"], seen_BV)
    tokens_B = logits_BV.argmax(dim=-1)
    sampled = (settings_B["temperature"] > 0).nonzero().flatten()
    if len(sampled) == 0:
        return tokens_B
    values, candidates = warp(logits_BV[sampled], *(settings_B[k][sampled] for k in ("temperature", "top_k", "top_p")))
    probs = values.softmax(dim=-1)
    for j, row in enumerate(sampled.tolist()):
        choice = torch.multinomial(probs[j], 1, generator=generators[row])
        tokens_B[row] = candidates[j, choice[0]] if candidates is not None else choice[0]
    return tokens_B


def penalize(logits_BV: Tensor, penalty_B: Tensor, seen_BV: Tensor | None) -> Tensor:
    """CTRL's repetition penalty on the seen tokens of each row: logit / p where positive, logit * p where not."""
    if seen_BV is None or not bool((penalty_B != 1).any()):
        return logits_BV
    p_B1 = penalty_B[:, None]
    return torch.where(seen_BV, torch.where(logits_BV > 0, logits_BV / p_B1, logits_BV * p_B1), logits_BV)


def warp(logits_BV: Tensor, temperature_B: Tensor, top_k_B: Tensor, top_p_B: Tensor) -> tuple[Tensor, Tensor | None]:
    """(values (B, C), candidates (B, C) or None): the logits to sample from after temperature, top-k (0 = off)
    and top-p (1 = off), -inf where filtered out, and the token id of each column (None: column = token id).

    Candidates in descending order: top-k's own (the largest k of the batch) when every row sets k, else a full
    sort when some row needs top-k or top-p, else the whole vocabulary unsorted (no filter to apply)."""
    scaled = logits_BV / temperature_B[:, None]
    if bool((top_k_B > 0).all()):
        values, candidates = scaled.topk(min(int(top_k_B.max()), scaled.shape[-1]), dim=-1)
    elif bool((top_k_B > 0).any() | (top_p_B < 1).any()):  # rows with and without top-k: filter per row
        values, candidates = scaled.sort(dim=-1, descending=True)
    else:
        return scaled, None
    rank = torch.arange(values.shape[-1], device=values.device)
    values = values.masked_fill((top_k_B[:, None] > 0) & (rank >= top_k_B[:, None]), float("-inf"))
    probs = values.softmax(dim=-1)
    # Nucleus: keep the smallest prefix whose mass reaches p (the token that crosses p included).
    beyond_p = (probs.cumsum(dim=-1) - probs >= top_p_B[:, None]) & (top_p_B[:, None] < 1)
    return values.masked_fill(beyond_p, float("-inf")), candidates
