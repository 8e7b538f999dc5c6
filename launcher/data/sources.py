"""Input files -> documents (strings), read through `datasets` in streaming mode.

The kind of a file comes from its extension:
- .jsonl / .json: one document per line, the `json_key` field;
- .tsv: one document per line, the whole line (tabs kept);
- anything else: one document per file (text mode, so \\r\\n reads as \\n).
Empty documents are skipped. Streaming reads lazily and writes no Arrow cache; the few
lock files `datasets` still creates go to a temporary folder removed afterwards, never
to ~/.cache or beside the user's data.
"""
import glob
import itertools
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from launcher.errors import UsageError

_JSON_SUFFIXES = (".jsonl", ".json")
# Rows read at a time: a column of a batch is ~10x cheaper per row than a row dict of its own.
_BATCH_ROWS = 1024


def input_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return "json" if suffix in _JSON_SUFFIXES else "tsv" if suffix == ".tsv" else "text"


def expand_inputs(inputs: Sequence) -> list[Path]:
    """Files named, plus the non-empty files under folders named (sorted, recursive), leaving out
    hidden files and folders and __pycache__ (compiled Python, not text)."""
    if not inputs:
        raise UsageError("no input given")
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                f for f in path.rglob("*")
                if f.is_file() and not any(part.startswith(".") or part == "__pycache__"
                                           for part in f.relative_to(path).parts)
            )
            # Empty files are common inside folders (__init__.py) and hold no document.
            found = [f for f in found if f.stat().st_size > 0]
            if not found:
                raise UsageError(f"input folder {raw} holds no non-empty files")
            files.extend(found)
        elif path.is_file():
            if path.stat().st_size == 0:
                raise UsageError(f"input file {raw} is empty")
            files.append(path)
        else:
            raise UsageError(f"input not found: {raw}")
    return files


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its ending) of a UTF-8 file, a leading BOM dropped;
    UsageError naming the first line that is not UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"{path}:{lineno}: not UTF-8 text") from None
            yield lineno, line.rstrip("\r\n")


def iter_jsonl(path: Path, keys: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; UsageError at the first line that is not
    UTF-8, not a JSON object, or lacks one of `keys` as a string."""
    for lineno, line in iter_lines(path):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        record = json_object(line, where)
        for key in keys:
            if key not in record:
                raise UsageError(f"{where}: no key {key!r} (keys: {', '.join(map(repr, record)) or 'none'})")
            string_field(record, key, where)
        yield lineno, record


def json_object(line: str, where: str) -> dict:
    """The JSON object on one line; UsageError naming `where` when it is not valid JSON or not an object."""
    try:
        record = json.loads(line)
    except ValueError as err:
        raise UsageError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a JSON {type(record).__name__}, not an object")
    return record


def string_field(record: dict, key: str, where: str) -> str:
    if not isinstance(record[key], str):
        raise UsageError(f"{where}: {key!r} is a {type(record[key]).__name__}, not a string")
    return record[key]


@contextmanager
def _datasets_quietly():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets  # noqa: F401  (first: importing it resets its logger's level)

    logger = logging.getLogger("datasets")
    level = logger.level
    # datasets logs a parse failure at ERROR before raising it; we report it our way.
    logger.setLevel(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="preprocess-datasets-") as cache_dir:
            yield cache_dir
    finally:
        logger.setLevel(level)


def _stream(builder: str, files: Iterable[Path], cache_dir: str, **options):
    import datasets

    # data_files are glob patterns: escape so "a[1].txt" means that file, not "a1.txt".
    patterns = [glob.escape(str(Path(f).resolve())) for f in files]
    return datasets.load_dataset(builder, data_files=patterns, split="train", streaming=True,
                                 cache_dir=cache_dir, **options)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _json_documents(path: Path, key: str, cache_dir: str) -> Iterator[str]:
    problem = f"a row without a string {key!r}"
    try:
        for batch in _stream("json", [path], cache_dir).iter(batch_size=_BATCH_ROWS):
            texts = batch.get(key)
            if texts is None or not all(isinstance(text, str) for text in texts):
                break
            yield from filter(None, texts)
        else:
            return
    except Exception as err:
        problem = _first_line(err)
    # pyarrow counts rows, not lines (it skips blank ones): find the bad line ourselves.
    for _ in iter_jsonl(path, [key]):
        pass
    raise UsageError(f"cannot read {path}: {problem}")


def _text_documents(files: list[Path], kind: str, cache_dir: str) -> Iterator[str]:
    try:
        stream = _stream("text", files, cache_dir, sample_by="line" if kind == "tsv" else "document")
        for batch in stream.iter(batch_size=_BATCH_ROWS):
            yield from filter(None, batch["text"])
    except UnicodeDecodeError:
        bad = next((f for f in files if not _is_utf8(f)), files[0])
        raise UsageError(f"{bad} is not UTF-8 text") from None


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def iter_documents(files: Sequence[Path], json_key: str = "text") -> Iterator[str]:
    """Documents of `files` in order; UsageError naming the file (and line) of bad input."""
    with _datasets_quietly() as cache_dir:
        for kind, group in itertools.groupby(files, key=input_kind):
            if kind == "json":
                for path in group:  # one file at a time, so an error names its file
                    yield from _json_documents(path, json_key, cache_dir)
            else:
                yield from _text_documents(list(group), kind, cache_dir)
