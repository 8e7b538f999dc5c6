"""Preprocessing: input files -> tokenizer (loaded, reused or trained) -> PREFIX.bin/.idx, on all cores.

Documents are read in the main process, cut into ~256 KB chunks, tokenized by a pool of
worker processes and written back in input order, so the output does not depend on the
number of workers. Nothing is left under a final name unless the whole run succeeds:
the dataset is written through temporaries (IndexedDatasetWriter), a newly trained
tokenizer is saved to a temporary folder and renamed at the end.
"""
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from launcher.data.indexed import IndexedDatasetWriter, best_dtype, paths
from launcher.data.sources import expand_inputs, input_kind, iter_documents
from launcher.data.tokenizer import (TOKENIZER_FILE, Tokenizer, check_kind, check_vocab_size, load_tokenizer,
                                     train_from_words)
from launcher.errors import UsageError
from launcher.job import alive
from launcher.preflight import check_writable

CHUNK_CHARS = 256 * 1024


@dataclass
class PreprocessResult:
    prefix: str
    tokenizer_dir: str
    documents: int
    tokens: int
    text_bytes: int
    seconds: float  # the tokenizing pass
    train_seconds: float = 0.0  # 0 where the tokenizer was loaded or reused

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (f"wrote {self.prefix}.bin/.idx: {self.documents:,} documents, {self.tokens:,} tokens from "
                f"{self.text_bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({self.mb_per_s:.2f} MB/s, {self.tokens_per_s:,.0f} tokens/s)"
                + (f"; tokenizer trained in {self.train_seconds:.1f} s" if self.train_seconds else ""))


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def max_workers() -> int:
    """More processes than this only cost memory: tokenizing is CPU bound."""
    return max(64, 4 * default_workers())


# --- running a function over chunks of documents, in order, on a process pool ---

_worker_fn: Callable | None = None  # set in each worker process by its initializer


def _set_worker_fn(fn: Callable) -> None:
    global _worker_fn
    _worker_fn = fn
    # The parent decides what a Ctrl-C means (and terminates the pool with SIGTERM): workers keep out of it,
    # rather than each printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _call_worker_fn(item):
    return _worker_fn(item)


@contextmanager
def _pool(workers: int, fn: Callable):
    if workers <= 1:
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # Workers encode one document at a time, without Rust threads. Forking after the parent
    # has run them (e.g. training) is only safe with them off, and `tokenizers` warns unless told.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = context.Pool(workers, _set_worker_fn, (fn,))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _ordered_map(fn: Callable, items: Iterable, pool, workers: int) -> Iterator:
    """fn over items, results in input order; at most 4 chunks per worker in flight, so memory stays
    bounded however large the input (Pool.imap would read all of it ahead)."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(_call_worker_fn, (item,)))
        if len(pending) >= 4 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _chunks(documents: Iterable[str], max_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in documents:
        chunk.append(text)
        size += len(text)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _ChunkEncoder:
    """Picklable: documents -> (concatenated ids, lengths, UTF-8 bytes read)."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, append_eod: bool):
        self.tokenizer, self.dtype, self.eod = tokenizer, dtype, [tokenizer.eod_id] if append_eod else []

    def __call__(self, texts: list[str]):
        flat, lengths = self.tokenizer.encode_flat(texts)
        if self.eod:
            flat = np.insert(flat, np.cumsum(lengths), self.eod[0])
            lengths = lengths + 1
        return flat.astype(self.dtype), lengths, sum(map(len, map(str.encode, texts)))


def _share_jieba(workers: int) -> None:
    """Load the jieba segmenter's dictionary before forking, so workers share it instead of each loading it."""
    if workers > 1:
        from launcher.data import jieba_split

        jieba_split.load()


def _split_chunk(texts: list[str]) -> list[list[str]]:
    from launcher.data.jieba_split import split_texts

    return split_texts(texts)


# --- the two passes ---

def train_on_documents(kind: str, documents: Iterable[str], vocab_size: int, workers: int,
                       meta: dict | None = None) -> Tokenizer:
    """Train a tokenizer; jiebabpe's word splitting (Python) runs on the worker pool."""
    check_kind(kind)
    if kind == "gpt2bpe":
        return train_from_words(kind, documents, vocab_size, meta)  # pre-tokenizes in Rust threads
    _share_jieba(workers)
    with _pool(workers, _split_chunk) as pool:
        word_lists = itertools.chain.from_iterable(_ordered_map(_split_chunk, _chunks(documents), pool, workers))
        return train_from_words(kind, word_lists, vocab_size, meta)


def encode_to_indexed(documents: Iterable[str], tokenizer: Tokenizer, prefix: str, workers: int,
                      append_eod: bool = True, total_bytes: int | None = None, progress: bool = True):
    """Tokenize documents into PREFIX.bin/.idx; returns (documents, tokens, text bytes, seconds)."""
    from tqdm import tqdm

    dtype = best_dtype(tokenizer.vocab_size)
    encoder = _ChunkEncoder(tokenizer, dtype, append_eod)
    text_bytes = 0
    start = time.perf_counter()
    if tokenizer.kind == "jiebabpe":
        _share_jieba(workers)
    # The pool first: forking after tqdm has started its monitor thread is best avoided.
    with _pool(workers, encoder) as pool, \
            IndexedDatasetWriter(prefix, dtype, vocab_size=tokenizer.vocab_size) as writer, \
            tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
                 mininterval=0.5, dynamic_ncols=True) as bar:
        for flat, lengths, nbytes in _ordered_map(encoder, _chunks(documents), pool, workers):
            writer.add_documents(flat, lengths)
            text_bytes += nbytes
            bar.set_postfix_str(f"{writer.num_tokens / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)
            bar.update(nbytes)
        if len(writer) == 0:
            raise UsageError("the input holds no text")
    return len(writer), writer.num_tokens, text_bytes, time.perf_counter() - start


# --- the whole job ---

def input_fingerprint(files: Sequence[Path], json_key: str) -> str:
    """Identifies the training input (paths, sizes, modification times) without reading it."""
    listing = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps([listing, json_key]).encode()).hexdigest()[:16]


def reusable_tokenizer(directory: Path, kind: str, vocab_size: int, fingerprint: str) -> Tokenizer | None:
    """The tokenizer in `directory` if it was trained with these settings on this input."""
    if not (directory / TOKENIZER_FILE).is_file():
        return None
    try:
        found = load_tokenizer(directory)
    except UsageError:
        return None
    meta = found.meta
    if found.kind == kind and meta.get("requested_vocab_size") == vocab_size and meta.get("trained_on") == fingerprint:
        return found
    return None


STAGING = ".tmp-"  # a tokenizer being saved: <folder>.tmp-<host>-<pid>, renamed into place when complete


def remove_stale_staging(final_dir: Path) -> list[Path]:
    """Remove staging folders of `final_dir` left by preprocess runs that were killed (their process is gone)
    on this host; returns what was removed. Folders of another host's run are left alone: it may be alive."""
    removed = []
    host = socket.gethostname()
    for path in final_dir.parent.glob(f"{final_dir.name}{STAGING}*"):
        tag = path.name[len(final_dir.name) + len(STAGING):]
        owner, _, pid = tag.rpartition("-")
        if not pid.isdigit() or owner not in (host, "") or alive(int(pid)) and int(pid) != os.getpid():
            continue  # not ours to judge, or a live run's
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _make_dirs(directory: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last), so a failed run can remove them."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir()
    return missing[::-1]


def preprocess(inputs: Sequence, output_prefix, tokenizer_kind: str | None = None, tokenizer_path=None,
               vocab_size: int | None = None, tokenizer_dir=None, json_key: str = "text",
               workers: int | None = None, append_eod: bool = True, progress: bool = True) -> PreprocessResult:
    """Tokenize `inputs` into OUTPUT_PREFIX.bin/.idx with the tokenizer at `tokenizer_path`, or one
    trained with `vocab_size` into `tokenizer_dir` (default: OUTPUT_PREFIX's folder/tokenizer)."""
    workers = default_workers() if workers is None else workers
    if not 1 <= workers <= max_workers():
        raise UsageError(f"--workers: got {workers}; allowed: 1 to {max_workers()} (this machine has "
                         f"{default_workers()} core(s))")
    if tokenizer_kind is not None:
        check_kind(tokenizer_kind)
    if (tokenizer_path is None) == (vocab_size is None):
        raise UsageError("give either --tokenizer (an existing tokenizer) or --vocab-size (to train one), not "
                         + ("both" if tokenizer_path is not None else "neither"))
    if vocab_size is not None:
        check_vocab_size(vocab_size)
    prefix = Path(output_prefix)
    if not str(output_prefix) or str(output_prefix).endswith(os.sep) or prefix.is_dir():
        raise UsageError(f"--output-prefix {str(output_prefix)!r} must name files (PREFIX.bin/.idx), not a folder")
    # Before the inputs are read or a tokenizer trained (minutes): where the results go must take them.
    check_writable(prefix.parent, "--output-prefix", given=output_prefix)
    if tokenizer_path is None and tokenizer_dir is not None:  # a new tokenizer is staged beside its folder
        check_writable(Path(tokenizer_dir).parent, "tokenizer folder")
    files = expand_inputs(inputs)
    # File sizes are the bar's total only where documents are whole files: jsonl and tsv lose bytes to syntax.
    total = sum(f.stat().st_size for f in files) if all(input_kind(f) == "text" for f in files) else None

    staged, train_seconds = None, 0.0
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path, tokenizer_kind)
        # A (vocab.json, merges.txt) pair is reported by its vocab.json.
        final_dir = Path(tokenizer_path[0] if isinstance(tokenizer_path, (tuple, list)) else tokenizer_path)
    else:
        kind = tokenizer_kind or "gpt2bpe"
        final_dir = Path(tokenizer_dir) if tokenizer_dir is not None else prefix.parent / "tokenizer"
        fingerprint = input_fingerprint(files, json_key)
        tokenizer = reusable_tokenizer(final_dir, kind, vocab_size, fingerprint)
        remove_stale_staging(final_dir)
        if tokenizer is None:
            if final_dir.exists():
                raise UsageError(f"{final_dir} already holds a tokenizer trained on other input or settings: "
                                 f"pass --tokenizer {final_dir} to use it, or remove it to train a new one")
            start = time.perf_counter()
            tokenizer = train_on_documents(kind, iter_documents(files, json_key), vocab_size, workers,
                                           {"trained_on": fingerprint})
            train_seconds = time.perf_counter() - start
            staged = final_dir.with_name(f"{final_dir.name}{STAGING}{socket.gethostname()}-{os.getpid()}")

    if tokenizer.kind == "jiebabpe":
        from launcher.data import jieba_split

        jieba_split.resolve()  # a bad JIEBABPE_SEGMENTER stops us before anything is written
    created = _make_dirs(prefix.parent)
    published = False
    try:
        if staged is not None:
            tokenizer.save(staged)  # before the data: a tokenizer that cannot be written stops us early
        documents, tokens, text_bytes, seconds = encode_to_indexed(
            iter_documents(files, json_key), tokenizer, str(prefix), workers, append_eod, total, progress)
        published = True
        if staged is not None:
            os.rename(staged, final_dir)
    except BaseException:
        if published:  # data whose tokenizer could not be put in place would be unusable
            for path in paths(prefix):
                Path(path).unlink(missing_ok=True)
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        for folder in reversed(created):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return PreprocessResult(str(prefix), str(final_dir), documents, tokens, text_bytes, seconds, train_seconds)
