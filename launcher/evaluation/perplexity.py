"""Loss and perplexity of a model on held-out data: an indexed dataset's split, or text/jsonl files.

- Indexed dataset (PREFIX.bin/.idx): the split's samples exactly as training builds them (SEQ_LEN+1 tokens
  packed across documents, the document shuffle of launcher/data/gpt_dataset.py), one pass over the split's
  tokens: the validation loss of training, over the whole validation split instead of `eval_iters` batches.
- Text files, folders, jsonl (field `text`): each document on its own, between end-of-document tokens as in
  training ([eod] document [eod]); every token after the first eod is predicted once, from up to seq_len
  tokens of that document (lm-eval's rolling log-likelihood). Besides loss and perplexity per token,
  bits per byte: nats / ln 2 over the documents' UTF-8 bytes, which compares models with other tokenizers.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from launcher.errors import UsageError
from launcher.evaluation.scoring import perplexity, rolling_windows, window_losses

WINDOWS_PER_CHUNK = 256  # windows built at a time, so a large split never sits in memory whole


def indexed_prefix(spec: Sequence[str]) -> str | None:
    """The dataset prefix when `spec` names one indexed dataset (PREFIX, PREFIX.bin or PREFIX.idx)."""
    from launcher.data.indexed import exists

    if len(spec) != 1:
        return None
    prefix = str(spec[0])
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            prefix = prefix[:-len(suffix)]
    return prefix if exists(prefix) else None


def _progress_bar(total: int, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not show, leave=False)


def indexed_split(prefix: str, split: str, data_split: str, seq_len: int, vocab_size: int, limit: int | None):
    """(dataset, count, available): the `data_split` part ("train", "valid" or "test") of `prefix` under `split`
    as training builds its samples (seq_len + 1 tokens each, in the fixed split-seed order), how many of them
    to read (`limit` at most) and how many one pass over the part holds."""
    from launcher.data.gpt_dataset import (SPLIT_NAMES, SPLIT_SEED, build_gpt_datasets, parse_split,
                                           split_documents)
    from launcher.data.indexed import IndexedDataset

    if data_split not in SPLIT_NAMES:
        raise UsageError(f"--data-split: got {data_split!r}; allowed: {' | '.join(SPLIT_NAMES)}")
    part = SPLIT_NAMES.index(data_split)
    fractions = parse_split(split)
    indexed = IndexedDataset(prefix)
    docs = split_documents(len(indexed), fractions)[part]
    tokens = int(indexed.sizes[docs].sum())
    available = (tokens - 1) // seq_len  # windows of seq_len + 1 tokens within one pass, no repeats
    if available < 1:
        raise UsageError(f"{prefix}: the {data_split} part of split {split} holds {tokens} tokens, fewer than "
                         f"one sequence of {seq_len + 1}; choose another --split or --data-split")
    count = available if limit is None else min(limit, available)
    wanted = [0, 0, 0]
    wanted[part] = count
    # Every part's order comes from the fixed split seed, so the same sequences are evaluated every time.
    dataset = build_gpt_datasets(prefix, split, seq_len, SPLIT_SEED, wanted, vocab_size=vocab_size)[part]
    return dataset, count, available


def evaluate_indexed(model, prefix: str, split: str, data_split: str, seq_len: int, vocab_size: int,
                     limit: int | None, batch_size: int, device, pad_id: int, progress: bool = False) -> dict:
    """Loss over one pass of the `data_split` part ("train", "valid" or "test") of `prefix` under `split`."""
    dataset, count, available = indexed_split(prefix, split, data_split, seq_len, vocab_size, limit)
    nll, counted = 0.0, 0
    with _progress_bar(count, f"{os.path.basename(prefix)} {data_split}", progress) as bar:
        for start in range(0, count, WINDOWS_PER_CHUNK):
            windows = []
            for i in range(start, min(start + WINDOWS_PER_CHUNK, count)):
                sample = dataset[i]
                windows.append((sample[:-1], sample[1:]))
            chunk_nll, chunk_count = window_losses(model, windows, batch_size, device, pad_id, bar.update)
            nll, counted = nll + chunk_nll, counted + chunk_count
    return {"kind": "indexed", "source": os.path.abspath(prefix), "split": split, "data_split": data_split,
            "sequences": count, "sequences_in_split": available, "seq_len": seq_len, "tokens": counted,
            "loss": nll / counted, "perplexity": perplexity(nll, counted)}


def read_documents(paths: Sequence[str], json_key: str, limit: int | None, setting: str = "--data") -> list[str]:
    """The first `limit` (all: None) documents of text, folder or jsonl `paths`; UsageError (naming `setting`)
    for none."""
    from launcher.data.sources import expand_inputs, iter_documents

    documents = []
    for text in iter_documents(expand_inputs(list(paths)), json_key):
        documents.append(text)
        if limit is not None and len(documents) >= limit:
            break
    if not documents:
        raise UsageError(f"{setting} {' '.join(map(str, paths))}: no documents in it")
    return documents


def evaluate_text(model, tokenizer, paths: Sequence[str], json_key: str, seq_len: int, limit: int | None,
                  batch_size: int, device, progress: bool = False) -> dict:
    """Loss per token and bits per byte over the documents of text, folder or jsonl `paths`."""
    documents = read_documents(paths, json_key, limit)
    eod = tokenizer.eod_id
    nll, counted, text_bytes = 0.0, 0, 0
    with _progress_bar(len(documents), "documents", progress) as bar:
        for start in range(0, len(documents), WINDOWS_PER_CHUNK):
            chunk = documents[start:start + WINDOWS_PER_CHUNK]
            windows = [w for ids in tokenizer.encode_batch(chunk) for w in rolling_windows([eod, *ids, eod], seq_len)]
            chunk_nll, chunk_count = window_losses(model, windows, batch_size, device, eod)
            nll, counted = nll + chunk_nll, counted + chunk_count
            text_bytes += sum(len(t.encode("utf-8")) for t in chunk)
            bar.update(len(chunk))
    return {"kind": "text", "source": [str(Path(p).resolve()) for p in paths], "documents": len(documents),
            "seq_len": seq_len, "tokens": counted, "bytes": text_bytes, "loss": nll / counted,
            "perplexity": perplexity(nll, counted), "bits_per_byte": nll / math.log(2) / text_bytes}
