"""What a client may send: the two request shapes, checked field by field into prompts and SamplingParams.

`POST /` is the tutorial's processor: {"text": str | [str], "max_length", "top_k", "top_p", "temperature"}
(all but text optional) -> {"text": str | [str]}. `POST /v1/completions` is OpenAI's completions request.
Anything wrong is a RequestError naming the field (its JSON path), what was given and what is allowed; the
app answers it with a 4xx and OpenAI's error body. Token-level limits (prompt length, new tokens against the
position table) are checked once the prompts are tokenized: see `budgets`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from launcher.errors import UsageError


class RequestError(ValueError):
    """A request the server will not run; `param` is the offending field (None: the body as a whole)."""

    def __init__(self, param: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.param, self.message, self.status = param, message, status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": None}}


def _got(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, float) or math.isfinite(value) \
        else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(name: str, value, allowed: str):
    raise RequestError(name, f"{name}: got {_got(value)}; allowed: {allowed}")


@dataclass(frozen=True)
class Limits:
    """The server's bounds on one request and on the work it holds: flags of `python -m launcher.serve`."""

    max_prompt_tokens: int  # tokens of one prompt
    max_new_tokens: int  # new tokens of one prompt
    max_batch_size: int = 16  # rows decoded together
    max_queue: int = 64  # prompts waiting for a row; beyond it, 503
    max_request_bytes: int = 1 << 20
    seq_len: int = 0  # the model's positions: prompt + new tokens fit in it

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_new_tokens", "max_batch_size", "max_queue", "max_request_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')}: got {value!r}; allowed: an integer >= 1")
        if self.seq_len:
            if self.max_prompt_tokens >= self.seq_len:
                raise UsageError(f"--max-prompt-tokens: got {self.max_prompt_tokens}; allowed: at most "
                                 f"{self.seq_len - 1} (the model has {self.seq_len} positions, one is left to "
                                 "generate)")
            if self.max_new_tokens >= self.seq_len:
                raise UsageError(f"--max-new-tokens: got {self.max_new_tokens}; allowed: at most "
                                 f"{self.seq_len - 1} (the model has {self.seq_len} positions)")


@dataclass
class Completions:
    """One request, checked: the prompts (text, or token ids for OpenAI's array form) and how to decode them."""

    prompt_field: str  # "text" or "prompt": named in errors about the prompts
    budget_field: str  # "max_length" or "max_tokens"
    texts: list[str] | None  # None when the prompts came as token ids
    token_prompts: list[list[int]] | None
    max_tokens: int
    max_tokens_given: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    single: bool = True  # the prompt was one string (POST / answers {"text": str}, not a list)
    model: str | None = None

    def sampling_params(self, budgets: list[int], stop_token_ids: tuple[int, ...]):
        """SamplingParams per prompt: prompt i samples with seed + i, as launcher.generate does."""
        from model.generation import SamplingParams

        return [SamplingParams(max_new_tokens=b, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                               repetition_penalty=self.repetition_penalty, stop_token_ids=stop_token_ids,
                               stop_strings=self.stop, seed=None if self.seed is None else self.seed + i)
                for i, b in enumerate(budgets)]


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise RequestError(None, "body: not UTF-8; allowed: a JSON object") from None
    except json.JSONDecodeError as err:
        raise RequestError(None, f"body: not JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                                 "allowed: a JSON object") from None
    if not isinstance(body, dict):
        raise RequestError(None, f"body: got a JSON {type(body).__name__}; allowed: a JSON object")
    return body


# ---------------------------------------------------------------------------------------------- field checks
def _int(body, name, default, low, high=None, *, null_ok=False):
    value = body.get(name, default)
    if value is None and (null_ok or name not in body):
        return default
    allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        _fail(name, value, allowed)
    return value


def _temperature(body, highest: float) -> float:
    from model.generation import MIN_TEMPERATURE  # the decoder's own floor (lower ones overflow into NaN)

    return _number(body, "temperature", 1.0, lambda v: v == 0 or MIN_TEMPERATURE <= v <= highest,
                   f"0 (greedy) or a number from {MIN_TEMPERATURE} to {highest}")


def _repetition_penalty(body) -> float:
    from model.generation import REPETITION_PENALTY_RANGE

    low, high = REPETITION_PENALTY_RANGE
    return _number(body, "repetition_penalty", 1.0, lambda v: low <= v <= high,
                   f"a number from {low} to {high:g} (1 = off)")


def _number(body, name, default, ok, allowed):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        _fail(name, value, allowed)
    return float(value)


def _bool(body, name, default):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        _fail(name, value, "true or false")
    return value


def _unknown(body, known, where: str):
    for name in body:
        if name not in known:
            raise RequestError(name, f"{name}: not a field of {where}; allowed: {', '.join(sorted(known))}")


def _texts(body, name, max_prompts) -> tuple[list[str], bool]:
    if name not in body:
        raise RequestError(name, f"{name}: missing; allowed: a non-empty string or a list of them")
    value = body[name]
    if isinstance(value, str):
        if not value:
            _fail(name, value, "a non-empty string or a list of them")
        return [value], True
    if not isinstance(value, list) or not value:
        _fail(name, value, "a non-empty string or a non-empty list of them")
    if len(value) > max_prompts:
        raise RequestError(name, f"{name}: {len(value)} prompts; allowed: at most {max_prompts} in one request "
                                 "(--max-queue)")
    for i, text in enumerate(value):
        if not isinstance(text, str) or not text:
            _fail(f"{name}[{i}]", text, "a non-empty string")
    return list(value), False


def _stop(body) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or \
            any(not isinstance(s, str) or not s for s in stops):
        _fail("stop", value, "a non-empty string or a list of 1 to 4 of them")
    return tuple(stops)


# ---------------------------------------------------------------------------------------------- the two shapes
PROCESSOR_FIELDS = ("text", "max_length", "top_k", "top_p", "temperature", "seed", "repetition_penalty", "stop")


def parse_processor(body: dict, limits: Limits) -> Completions:
    """The tutorial's contract. max_length counts new tokens (the continuation, which is what comes back);
    top_p 0 and 1 are off, top_k 1 (or temperature 0) is greedy; defaults: 64 new tokens, temperature 1,
    top_k and top_p off."""
    _unknown(body, PROCESSOR_FIELDS, "POST /")
    texts, single = _texts(body, "text", limits.max_queue)
    given = body.get("max_length") is not None
    max_tokens = _int(body, "max_length", min(64, limits.max_new_tokens), 1, limits.max_new_tokens)
    top_p = _number(body, "top_p", 1.0, lambda v: 0 <= v <= 1, "a number from 0 to 1 (0 or 1 = off)")
    return Completions(
        prompt_field="text", budget_field="max_length", texts=texts, token_prompts=None, max_tokens=max_tokens,
        max_tokens_given=given, single=single,
        temperature=_temperature(body, highest=100),
        top_k=_int(body, "top_k", 0, 0), top_p=top_p if top_p > 0 else 1.0,
        repetition_penalty=_repetition_penalty(body),
        stop=_stop(body), seed=_int(body, "seed", None, 0, null_ok=True))


COMPLETIONS_FIELDS = ("prompt", "model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n",
                      "stream", "stream_options", "repetition_penalty", "user", "echo", "logprobs", "best_of",
                      "suffix", "presence_penalty", "frequency_penalty", "logit_bias")


def _token_prompts(value, vocab_size: int, max_prompts: int) -> list[list[int]] | None:
    """OpenAI's token-id forms of `prompt`: [int, ...] or [[int, ...], ...]; None for text."""
    if not isinstance(value, list) or not value or isinstance(value[0], str):
        return None
    rows = [value] if not isinstance(value[0], list) else value
    if len(rows) > max_prompts:
        raise RequestError("prompt", f"prompt: {len(rows)} prompts; allowed: at most {max_prompts} in one request "
                                     "(--max-queue)")
    for i, row in enumerate(rows):
        name = "prompt" if rows is not value else f"prompt[{i}]"
        if not isinstance(row, list) or not row or any(
                isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in row):
            _fail(name, row, f"a non-empty list of token ids from 0 to {vocab_size - 1}")
    return rows


def parse_completions(body: dict, limits: Limits, vocab_size: int) -> Completions:
    """OpenAI's completions request. Defaults as OpenAI's: 16 new tokens, temperature 1, top_p 1; `top_k` and
    `repetition_penalty` are extensions (off by default); n, best_of, echo, logprobs and the penalties take
    their neutral values only."""
    _unknown(body, COMPLETIONS_FIELDS, "POST /v1/completions")
    tokens = _token_prompts(body.get("prompt"), vocab_size, limits.max_queue)
    if tokens is None:
        texts, single = _texts(body, "prompt", limits.max_queue)
    else:
        texts, single = None, not isinstance(body["prompt"][0], list)
    if body.get("model") is not None and not isinstance(body["model"], str):
        _fail("model", body["model"], "a string")
    if body.get("user") is not None and not isinstance(body["user"], str):
        _fail("user", body["user"], "a string")
    _int(body, "n", 1, 1, 1, null_ok=True)
    _int(body, "best_of", 1, 1, 1, null_ok=True)
    if _bool(body, "echo", False):
        _fail("echo", True, "false (the prompt is not echoed)")
    if body.get("logprobs") not in (None, 0):
        _fail("logprobs", body["logprobs"], "null (log-probabilities are not returned)")
    if body.get("suffix") not in (None, ""):
        _fail("suffix", body["suffix"], "null (no insertion mode)")
    for name in ("presence_penalty", "frequency_penalty"):
        _number(body, name, 0.0, lambda v: v == 0, "0 (use repetition_penalty)")
    if body.get("logit_bias") not in (None, {}):
        _fail("logit_bias", body["logit_bias"], "null or {}")
    stream = _bool(body, "stream", False)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            _fail("stream_options", options, "null unless stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            _fail("stream_options", options, '{"include_usage": true | false}')
        include_usage = _bool(options, "include_usage", False)
    given = body.get("max_tokens") is not None
    max_tokens = _int(body, "max_tokens", min(16, limits.max_new_tokens), 1, limits.max_new_tokens, null_ok=True)
    return Completions(
        prompt_field="prompt", budget_field="max_tokens", texts=texts, token_prompts=tokens,
        max_tokens=max_tokens, max_tokens_given=given, single=single, stream=stream, include_usage=include_usage,
        temperature=_temperature(body, highest=2),
        top_p=_number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
        top_k=_int(body, "top_k", 0, 0, null_ok=True),
        repetition_penalty=_repetition_penalty(body),
        stop=_stop(body), seed=_int(body, "seed", None, 0, null_ok=True), model=body.get("model"))


def budgets(request: Completions, prompts: list[list[int]], limits: Limits) -> list[int]:
    """Each prompt's new-token budget; RequestError for an empty or over-long prompt, or a max_tokens (or
    max_length) that does not fit beside its prompt in the model's positions. A default budget shrinks."""
    out = []
    for i, ids in enumerate(prompts):
        name = request.prompt_field if request.single else f"{request.prompt_field}[{i}]"
        if not ids:
            raise RequestError(name, f"{name}: no tokens; allowed: text of 1 to {limits.max_prompt_tokens} tokens")
        if len(ids) > limits.max_prompt_tokens:
            raise RequestError(name, f"{name}: {len(ids)} tokens; allowed: 1 to {limits.max_prompt_tokens} "
                                     "tokens (--max-prompt-tokens)")
        room = limits.seq_len - len(ids)
        if request.max_tokens > room and request.max_tokens_given:
            raise RequestError(request.budget_field, f"{request.budget_field}: got {request.max_tokens}; allowed: "
                                                     f"at most {room} beside a {len(ids)}-token {name} (the model "
                                                     f"has {limits.seq_len} positions)")
        out.append(min(request.max_tokens, room))
    return out
