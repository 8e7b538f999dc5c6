"""GPT pretraining samples over indexed datasets: packing, train/valid/test split, shuffling, blending.

Split: the documents of each PREFIX are shuffled once by a fixed seed (SPLIT_SEED, not the run's --seed)
and cut by the split fractions, so each split is a sample of the whole corpus (a corpus stored in sorted
order, such as the stdlib's files, would otherwise validate on its alphabetical tail), the same for every
run over the same data, whatever its seed. With a fixed cut order, a split with a smaller train fraction
only moves documents out of train: the validation documents of 98,2,0 stay held out under 90,10,0.

Per PREFIX and split: the split's documents are shuffled once per epoch and concatenated into one token
stream, for as many epochs as the requested samples need. Sample k is stream tokens [k*L, k*L + L + 1)
with L = seq_len: SEQ_LEN+1 tokens (inputs and next-token labels overlap by one), packed across document
boundaries, which the end-of-document token marks. The sample order is shuffled again. The train split's
shuffles follow the run's --seed; the validation and test splits' follow SPLIT_SEED, so evaluation sees
the same sequences whatever the seed and losses of different seeds compare (and the first n validation
samples are the same for any larger n). This index - document order, where each sample starts, sample
order - is built once and cached as .npy files beside the data (or in cache_dir); the cache entry records
the split's document shuffle, so caches built by an older layout are rebuilt, never misread.

A blend "0.3 A 0.7 B" draws each split from several prefixes: prefix k supplies its
share of the samples (largest-remainder rounding of w_k * n, so they sum to n exactly),
interleaved evenly, deterministically.
"""
import logging
import math
import os
import re
import time

import numpy as np

from launcher.data.index_cache import cached_arrays, file_stamp
from launcher.data.indexed import IndexedDataset, paths
from launcher.errors import UsageError

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
# Shuffles the documents before the split and orders the validation/test samples. A constant: changing
# it moves documents between train and validation for every existing dataset.
SPLIT_SEED = 1_000_003
INDEX_VERSION = 2  # 1: contiguous document ranges, validation order from --seed


def parse_split(split: str) -> tuple[float, float, float]:
    """'98,2,0' (or '98/2/0', or fewer parts) -> fractions summing to 1."""
    parts = re.split(r"[,/]", split.strip()) if isinstance(split, str) and split.strip() else []
    if not parts or len(parts) > 3:
        raise UsageError(f"split {split!r} must be 1 to 3 numbers like 98,2,0 (train,valid,test)")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"split {split!r} must be numbers like 98,2,0") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise UsageError(f"split {split!r} has a negative or non-finite part")
    total = sum(values)
    if total <= 0:
        raise UsageError(f"split {split!r} does not sum to something positive")
    values += [0.0] * (3 - len(values))
    return tuple(v / total for v in values)


def _as_weight(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def parse_blend(data_path: str) -> list[tuple[float, str]]:
    """'0.3 A 0.7 B' -> [(0.3, 'A'), (0.7, 'B')]; 'A B' -> equal weights; weights normalized to sum 1."""
    tokens = data_path.split() if isinstance(data_path, str) else []
    if not tokens:
        raise UsageError("data path is empty: give PREFIX, or weighted prefixes like '0.3 A 0.7 B'")
    numbers = [_as_weight(t) for t in tokens]
    if all(n is None for n in numbers):
        pairs = [(1.0, t) for t in tokens]
    elif (len(tokens) % 2 == 0 and all(n is not None for n in numbers[0::2])
          and all(n is None for n in numbers[1::2])):
        pairs = list(zip(numbers[0::2], tokens[1::2]))
    else:
        raise UsageError(f"data path {data_path!r}: give PREFIX ... or WEIGHT PREFIX pairs like '0.3 A 0.7 B'")
    if any(not math.isfinite(w) or w < 0 for w, _ in pairs):
        raise UsageError(f"data path {data_path!r} has a negative or non-finite weight")
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise UsageError(f"data path {data_path!r}: the weights do not sum to something positive")
    # Users often paste the file name: "data/x.bin" means prefix "data/x".
    return [(w / total, re.sub(r"\.(bin|idx)$", "", p)) for w, p in pairs if w > 0]


def split_ranges(num_docs: int, fractions) -> list[tuple[int, int]]:
    """Contiguous ranges [lo, hi) of the shuffled document order for train, valid, test."""
    bounds = [0] + [int(math.floor(c * num_docs + 0.5)) for c in np.cumsum(fractions)]
    bounds[-1] = num_docs  # the running sum can fall a hair short of 1.0
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def split_documents(num_docs: int, fractions) -> list[np.ndarray]:
    """Sorted document ids of train, valid and test: all documents shuffled by SPLIT_SEED, then cut by
    `fractions`. Deterministic in (num_docs, fractions) alone."""
    id_type = np.int32 if num_docs < 2 ** 31 else np.int64
    order = np.random.default_rng(SPLIT_SEED).permutation(np.arange(num_docs, dtype=id_type))
    return [np.sort(order[lo:hi]) for lo, hi in split_ranges(num_docs, fractions)]


def apportion(weights, total: int) -> np.ndarray:
    """Integer counts proportional to weights summing to `total` exactly (largest remainder)."""
    exact = np.asarray(weights, dtype=np.float64) * total
    counts = np.floor(exact).astype(np.int64)
    leftover = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:leftover]] += 1
    return counts


def build_sample_index(doc_sizes: np.ndarray, docs: np.ndarray, seq_len: int, num_samples: int,
                       rng: np.random.Generator) -> dict:
    """docs: the split's document ids. doc_order: documents in stream order; starts: (position in
    doc_order, token offset) of each sample; shuffle: the sample order."""
    tokens_per_epoch = int(doc_sizes[docs].sum())
    epochs = -(-(num_samples * seq_len + 1) // tokens_per_epoch)
    doc_order = np.concatenate([rng.permutation(docs) for _ in range(epochs)])
    sizes = doc_sizes[doc_order]
    ends = np.cumsum(sizes)
    first_token = np.arange(num_samples, dtype=np.int64) * seq_len
    position = np.searchsorted(ends, first_token, side="right")  # skips empty documents
    offset = first_token - (ends[position] - sizes[position])
    return {"doc_order": doc_order, "starts": np.stack([position, offset], axis=1),
            "shuffle": rng.permutation(num_samples)}


def _identity(indexed: IndexedDataset) -> dict:
    """Where the data is and which version of it: rebuilding PREFIX.bin/.idx invalidates what was cached."""
    bin_path, idx_path = paths(indexed.prefix)
    return {"prefix": os.path.abspath(indexed.prefix), "bin": file_stamp(bin_path), "idx": file_stamp(idx_path)}


def _cache_root(indexed: IndexedDataset, cache_dir: str | None) -> str:
    return cache_dir or os.path.dirname(os.path.abspath(indexed.prefix))


class GPTDataset:
    """`num_samples` samples of seq_len+1 int64 token ids from one split of one indexed dataset."""

    def __init__(self, indexed: IndexedDataset, fractions, split: str, seq_len: int, num_samples: int, seed: int,
                 cache_dir: str | None = None, docs: np.ndarray | None = None):
        """fractions: the (train, valid, test) split; seed: the run's, which orders the train split only.
        docs: this split's documents where the caller has them (split_documents), else computed."""
        self.indexed, self.seq_len, self.num_samples = indexed, seq_len, num_samples
        split_id = SPLIT_NAMES.index(split)
        order_seed = seed if split == "train" else SPLIT_SEED
        fractions = [float(f) for f in fractions]
        description = {"kind": "gpt-sample-index", "version": INDEX_VERSION, **_identity(indexed),
                       "documents": {"count": len(indexed), "shuffled_by": SPLIT_SEED, "fractions": fractions,
                                     "range": list(split_ranges(len(indexed), fractions)[split_id])},
                       "split": split, "seq_len": seq_len, "num_samples": num_samples, "seed": order_seed}

        def build():
            start = time.perf_counter()
            split_docs = split_documents(len(indexed), fractions)[split_id] if docs is None else docs
            index = build_sample_index(indexed.sizes, split_docs, seq_len, num_samples,
                                       np.random.default_rng([order_seed, split_id]))
            logger.info("built the %s sample index of %s: %d samples in %.2f s", split, indexed.prefix,
                        num_samples, time.perf_counter() - start)
            return index

        index = cached_arrays(_cache_root(indexed, cache_dir), f"{os.path.basename(indexed.prefix)}.{split}",
                              description, ("doc_order", "starts", "shuffle"), build)
        self._doc_order, self._starts, self._shuffle = index["doc_order"], index["starts"], index["shuffle"]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        position, offset = (int(v) for v in self._starts[self._shuffle[i]])
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        filled = 0
        while filled < len(out):
            piece = self.indexed.get(int(self._doc_order[position]), offset, len(out) - filled)
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            position, offset = position + 1, 0
        return out


class BlendedDataset:
    """Samples of several datasets interleaved evenly: dataset k's j-th sample sits near (j + 0.5) / n_k."""

    def __init__(self, datasets: list):
        self.datasets = datasets
        counts = [len(d) for d in datasets]
        keys = np.concatenate([(np.arange(c) + 0.5) / c for c in counts])
        order = np.argsort(keys, kind="stable")
        self._which = np.repeat(np.arange(len(counts), dtype=np.int32), counts)[order]
        self._local = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])[order]

    def __len__(self) -> int:
        return len(self._which)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[self._which[i]][int(self._local[i])]


def _check_vocab(indexed: IndexedDataset, vocab_size: int, cache_dir: str | None) -> None:
    """The max-id scan reads all of PREFIX.bin, so its result is cached like the sample index."""
    found = cached_arrays(_cache_root(indexed, cache_dir), f"{os.path.basename(indexed.prefix)}.stats",
                          {"kind": "max-token-id", **_identity(indexed)}, ("max_token_id",),
                          lambda: {"max_token_id": np.array([indexed.max_token_id()])})
    indexed.check_vocab(vocab_size, max_token_id=int(found["max_token_id"][0]))


def build_gpt_datasets(data_path: str, split: str, seq_len: int, seed: int, num_samples,
                       cache_dir: str | None = None, vocab_size: int | None = None):
    """(train, valid, test) datasets, None where the split's fraction or sample count is 0.

    data_path: PREFIX, several prefixes (equal weights) or 'W1 PREFIX1 W2 PREFIX2 ...'.
    num_samples: samples wanted per split (train, valid, test). vocab_size, when given,
    rejects data holding ids beyond it.
    """
    fractions = parse_split(split)
    blend = parse_blend(data_path)
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise UsageError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    num_samples = tuple(num_samples)
    if len(num_samples) != 3 or any(not isinstance(n, (int, np.integer)) or n < 0 for n in num_samples):
        raise UsageError(f"num_samples must be 3 non-negative integers (train, valid, test), got {num_samples!r}")
    indexed = {prefix: IndexedDataset(prefix) for _, prefix in blend}
    if vocab_size is not None:
        for ds in indexed.values():
            _check_vocab(ds, vocab_size, cache_dir)

    doc_splits = {prefix: split_documents(len(ds), fractions) for prefix, ds in indexed.items()}
    result = []
    for split_id, name in enumerate(SPLIT_NAMES):
        wanted = int(num_samples[split_id])
        if wanted == 0 or fractions[split_id] == 0:
            result.append(None)
            continue
        parts = []
        for (_, prefix), count in zip(blend, apportion([w for w, _ in blend], wanted)):
            if count == 0:
                continue
            ds = indexed[prefix]
            docs = doc_splits[prefix][split_id]
            if ds.sizes[docs].sum() == 0:
                raise UsageError(f"split {split!r} leaves the {name} part of {prefix} without tokens "
                                 f"({len(ds)} documents in all): use more data or another split")
            parts.append(GPTDataset(ds, fractions, name, int(seq_len), int(count), int(seed), cache_dir, docs))
        result.append(parts[0] if len(parts) == 1 else BlendedDataset(parts))
    return tuple(result)
