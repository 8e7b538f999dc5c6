"""Prompt files for batch generation, and the jsonl it writes.

A prompt file is
  .jsonl / .json  one JSON object a line, its `prompt` field (else its `text` field);
  .tsv            one prompt a line, the first column (a fine-tuning file's prompts, targets ignored);
  anything else   one prompt a line.
Blank lines are skipped. Output: one JSON object a line, in prompt order:
  {"prompt": ..., "generation": ..., "tokens": <generated token count>, "finish_reason": ...}
"""
from __future__ import annotations

import json
from pathlib import Path

from launcher.data.sources import input_kind, iter_lines, json_object, string_field
from launcher.errors import UsageError
from launcher.files import write_text_atomic

PROMPT_KEYS = ("prompt", "text")


def read_prompts(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompt file not found: {path}")
    kind = input_kind(path)
    prompts = []
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        if kind == "json":
            prompts.append(_json_prompt(line, f"{path}:{lineno}"))
        elif kind == "tsv":
            prompts.append(line.split("\t", 1)[0])
        else:
            prompts.append(line)
    if not prompts:
        raise UsageError(f"{path} holds no prompts")
    return prompts


def _json_prompt(line: str, where: str) -> str:
    record = json_object(line, where)
    key = next((k for k in PROMPT_KEYS if k in record), None)
    if key is None:
        raise UsageError(f"{where}: no key 'prompt' or 'text' (keys: {', '.join(map(repr, record)) or 'none'})")
    return string_field(record, key, where)


def completions_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_completions(records: list[dict], path) -> Path:
    """All records at once, atomically: an interrupted run leaves no partial output file."""
    return write_text_atomic(completions_jsonl(records), path)
