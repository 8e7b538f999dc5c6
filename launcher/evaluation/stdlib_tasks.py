"""The project's own zero-shot tasks, written from the validation part of the embedded stdlib corpus.

    python -m launcher.make_tasks [--output-dir data/tasks]

Two task files (format: launcher/evaluation/tasks.py), from the standard-library files that the default
split (98,2,0, documents shuffled by SPLIT_SEED) holds out for validation; any split with a train
fraction of 98% or less holds them out too. Examples are spread evenly over those files and chosen by a
fixed seed, so one Python version always writes the same bytes.

- stdlib_last_identifier (completion): a few lines of code, then a line up to its last identifier; the
  target is that identifier (with the space before it, if any). Only identifiers of 3+ characters that
  start with a letter, are not keywords, and occur earlier in the context are asked for: like LAMBADA's
  words, they can be inferred from the context, not only guessed from the line.
- stdlib_next_line (multiple choice, 4 choices): a few lines of code; which line comes next? The three
  distractors are other lines of the same file with the same indentation, none of them in the context.

Beside them, lm_eval/<task>.yaml: the same tasks for lm-evaluation-harness (dataset_path: json, the
jsonl's absolute path), and manifest.json, which says what was written from what; a later call with
the same corpus and settings reuses the files.
"""
from __future__ import annotations

import io
import json
import keyword
import platform
import random
import re
import tokenize
from pathlib import Path

from launcher.files import write_text_atomic

GENERATOR_VERSION = 1
DEFAULT_SPLIT = "98,2,0"
DEFAULT_EXAMPLES = 500
TASK_SEED = 4242
CONTEXT_CHARS = 320  # the tiny model's 128 tokens hold about this much code
CONTEXT_LINES = 6
NUM_CHOICES = 4
MIN_LINE_CHARS = 8
MANIFEST = "manifest.json"
LAST_IDENTIFIER = "stdlib_last_identifier"
NEXT_LINE = "stdlib_next_line"
TASK_NAMES = (LAST_IDENTIFIER, NEXT_LINE)


def validation_files(split: str = DEFAULT_SPLIT) -> list[Path]:
    """The stdlib files (documents of the embedded corpus, in its order) in the validation part of `split`."""
    from launcher.data.gpt_dataset import parse_split, split_documents
    from launcher.data.stdlib_corpus import stdlib_files

    files = stdlib_files()
    return [files[i] for i in split_documents(len(files), parse_split(split))[1]]


def _context(lines: list[str], end: int, reserved: int = 0, max_lines: int = CONTEXT_LINES) -> str:
    """Up to `max_lines` lines before line `end` (right-stripped), at most CONTEXT_CHARS - `reserved`
    characters, cut at a line boundary."""
    kept: list[str] = []
    size = reserved
    for line in reversed(lines[max(0, end - max_lines):end]):
        line = line.rstrip()
        if kept and size + len(line) + 1 > CONTEXT_CHARS:
            break
        kept.append(line)
        size += len(line) + 1
    return "\n".join(reversed(kept)).lstrip("\n")  # no blank lines before the first


def _last_names(text: str) -> dict[int, tuple[int, str]]:
    """Line index (0-based) -> (column, name) of the last NAME token on that line: code, not strings or
    comments. {} where the file does not tokenize."""
    last: dict[int, tuple[int, str]] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NAME:
                last[tok.start[0] - 1] = (tok.start[1], tok.string)
    except (tokenize.TokenError, SyntaxError):
        return {}
    return last


def _identifier_examples(name: str, text: str) -> list[dict]:
    lines = text.split("\n")
    examples = []
    for row, (column, identifier) in sorted(_last_names(text).items()):
        line = lines[row]
        if (len(identifier) < 3 or not identifier[0].isalpha() or keyword.iskeyword(identifier)
                or keyword.issoftkeyword(identifier) or line[column:column + len(identifier)] != identifier):
            continue
        before = _context(lines, row, reserved=column)
        context = f"{before}\n{line[:column]}" if before else line[:column]
        if not re.search(rf"\b{identifier}\b", context):
            continue  # not inferable from the context
        # Whitespace before the name goes with it, as tokenizers attach a space to the word after it.
        stripped = context.rstrip()
        examples.append({"context": stripped, "target": context[len(stripped):] + identifier,
                         "source": f"{name}:{row + 1}"})
    return examples


def _next_line_examples(name: str, text: str, rng: random.Random) -> list[dict]:
    lines = text.split("\n")

    def usable(line: str) -> bool:
        stripped = line.strip()
        return len(stripped) >= MIN_LINE_CHARS and not stripped.startswith("#")

    by_indent: dict[int, list[str]] = {}
    for line in lines:
        if usable(line):
            by_indent.setdefault(len(line) - len(line.lstrip()), []).append(line.rstrip())
    examples = []
    for row in range(2, len(lines)):
        line = lines[row].rstrip()
        if not usable(line) or not lines[row - 1].strip():
            continue
        context = _context(lines, row)
        # Distractors: not the right line, and none of the lines just read (a repeat is a give-away).
        seen = {line.strip()} | {c.strip() for c in context.split("\n")}
        pool = sorted({c for c in by_indent[len(line) - len(line.lstrip())] if c.strip() not in seen})
        if len(pool) < NUM_CHOICES - 1:
            continue
        choices = ["\n" + c for c in rng.sample(pool, NUM_CHOICES - 1)]
        label = rng.randrange(NUM_CHOICES)
        choices.insert(label, "\n" + line)
        examples.append({"context": context, "choices": choices, "label": label,
                         "source": f"{name}:{row + 1}"})
    return examples


def _spread(per_file: list[list[dict]], count: int, rng: random.Random) -> list[dict]:
    """Up to `count` examples taken from the files in turn, each file's examples in a seeded random order."""
    queues = [rng.sample(examples, len(examples)) for examples in per_file]
    chosen: list[dict] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return chosen


def build_examples(split: str = DEFAULT_SPLIT, count: int = DEFAULT_EXAMPLES,
                   files: list[Path] | None = None) -> dict[str, list[dict]]:
    """{task name: examples}, deterministic for one stdlib and settings; `files`: validation_files(split)."""
    from launcher.data.stdlib_corpus import stdlib_root

    root = stdlib_root()
    files = validation_files(split) if files is None else files
    identifiers, next_lines = [], []
    for path in files:
        name = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8")
        identifiers.append(_identifier_examples(name, text))
        next_lines.append(_next_line_examples(name, text, random.Random(f"{TASK_SEED}:{name}")))
    rng = random.Random(TASK_SEED)
    return {LAST_IDENTIFIER: _spread(identifiers, count, rng), NEXT_LINE: _spread(next_lines, count, rng)}


def _expected_manifest(split: str, count: int, files: list[Path]) -> dict:
    from launcher.data.gpt_dataset import SPLIT_SEED
    from launcher.data.stdlib_corpus import stdlib_root

    root = stdlib_root()
    return {"generator_version": GENERATOR_VERSION, "python": platform.python_version(), "stdlib": str(root),
            "split": split, "split_seed": SPLIT_SEED, "examples_per_task": count,
            "files": [p.relative_to(root).as_posix() for p in files]}


def write_stdlib_tasks(output_dir: str | Path, split: str = DEFAULT_SPLIT, count: int = DEFAULT_EXAMPLES,
                       force: bool = False) -> dict[str, Path]:
    """Write (or reuse) the task files under output_dir; returns {task name: jsonl path}."""
    from launcher.evaluation.harness import task_yaml

    output_dir = Path(output_dir)
    paths = {name: output_dir / f"{name}.jsonl" for name in TASK_NAMES}
    files = validation_files(split)  # a walk over the whole stdlib: once
    expected = _expected_manifest(split, count, files)
    manifest = output_dir / MANIFEST
    if not force and manifest.is_file() and all(p.is_file() for p in paths.values()):
        try:
            if {k: v for k, v in json.loads(manifest.read_text()).items() if k != "tasks"} == expected:
                return paths
        except ValueError:
            pass
    examples = build_examples(split, count, files)
    manifest.unlink(missing_ok=True)  # written last: marks a complete set
    counts = {}
    for name, rows in examples.items():
        write_text_atomic("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), paths[name])
        kind = "multiple_choice" if name == NEXT_LINE else "completion"
        write_text_atomic(task_yaml(name, kind, paths[name]), output_dir / "lm_eval" / f"{name}.yaml")
        counts[name] = {"kind": kind, "examples": len(rows)}
    write_text_atomic(json.dumps({**expected, "tasks": counts}, indent=1) + "\n", manifest)
    return paths
