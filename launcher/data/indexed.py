"""Memory-mapped indexed dataset of token ids, in Megatron's MMIDIDX layout.

PREFIX.bin: every document's token ids back to back, in one integer dtype, nothing else.
PREFIX.idx, little-endian:
    magic b"MMIDIDX\\x00\\x00" (9 bytes), version u64 = 1, dtype code u8
    (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16), sequence count N u64,
    document-index count D u64 (= documents + 1),
    N x int32 sequence lengths (tokens), N x int64 byte offsets into .bin,
    D x int64 document index: document d is sequences [doc[d], doc[d+1]).
Megatron's preprocess writes one sequence per document unless it splits sentences; both
load here, a document being the concatenation of its sequences. Files written here are
byte-for-byte what Megatron's writer produces for the same ids, so either side reads them.
"""
import os
import struct
from array import array

import numpy as np

from launcher.errors import UsageError

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count
_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}  # 6, 7 are floats
_CODE_OF = {np.dtype(t): c for c, t in _CODES.items()}
_MAX_SEQUENCE = np.iinfo(np.int32).max  # lengths are stored as int32


def best_dtype(vocab_size: int) -> np.dtype:
    """uint16 where every id fits (half the disk and page cache of int32), else int32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def paths(prefix) -> tuple[str, str]:
    prefix = str(prefix)
    return prefix + ".bin", prefix + ".idx"


def exists(prefix) -> bool:
    return all(os.path.isfile(p) for p in paths(prefix))


class IndexedDatasetWriter:
    """Writes PREFIX.bin.tmp/.idx.tmp and renames them to PREFIX.bin/.idx on a clean close.

    On an exception inside `with`, or `abort()`, the temporaries are deleted and any
    existing PREFIX.bin/.idx is left untouched. `vocab_size` (optional) rejects ids beyond it.
    """

    def __init__(self, prefix, dtype=np.uint16, vocab_size: int | None = None):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise UsageError(f"indexed datasets hold integer token ids; {self.dtype} is not one of them")
        self.prefix = str(prefix)
        self._final = paths(prefix)
        self._tmp = tuple(p + ".tmp" for p in self._final)
        info = np.iinfo(self.dtype)
        self._limit = min(vocab_size, info.max + 1) if vocab_size is not None else info.max + 1
        self._lengths = array("q")
        self._bin = open(self._tmp[0], "wb")
        self.num_tokens = 0

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _check(self, ids: np.ndarray) -> np.ndarray:
        if ids.size == 0:
            return ids.astype(self.dtype, copy=False)
        if ids.dtype.kind not in "iu":
            raise UsageError(f"token ids must be integers, got {ids.dtype}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self._limit:
            raise UsageError(f"token id {low if low < 0 else high} is outside the vocab (0..{self._limit - 1})")
        return ids.astype(self.dtype, copy=False)

    def add_document(self, ids) -> None:
        self.add_documents(np.asarray(ids), [len(ids)])

    def add_documents(self, flat_ids, lengths) -> None:
        """Append several documents at once: `flat_ids` is their ids concatenated."""
        flat = self._check(np.asarray(flat_ids).reshape(-1))
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {flat.size} ids were given")
        if lengths.size and int(lengths.max()) > _MAX_SEQUENCE:
            raise UsageError(f"a document of {int(lengths.max())} tokens is longer than the format's int32 limit")
        self._bin.write(flat.tobytes())
        self._lengths.extend(lengths.tolist())
        self.num_tokens += flat.size

    def __len__(self) -> int:
        return len(self._lengths)

    def close(self) -> None:
        if self._bin.closed:
            return
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            lengths = np.frombuffer(self._lengths, dtype=np.int64)
            pointers = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
            with open(self._tmp[1], "wb") as idx:
                idx.write(_HEADER.pack(_MAGIC, 1, _CODE_OF[self.dtype], len(lengths), len(lengths) + 1))
                idx.write(lengths.astype(np.int32).tobytes())
                idx.write(pointers.tobytes())
                idx.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
                idx.flush()
                os.fsync(idx.fileno())
        except BaseException:
            self.abort()
            raise
        # .bin first: a reader that finds the new .idx also finds the .bin it describes.
        os.replace(self._tmp[0], self._final[0])
        os.replace(self._tmp[1], self._final[1])

    def abort(self) -> None:
        self._bin.close()
        for tmp in self._tmp:
            if os.path.exists(tmp):
                os.remove(tmp)


class IndexedDataset:
    """Read-only view of PREFIX.bin/.idx; `ds[i]` is document i's ids (a view into the mmap)."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        bin_path, idx_path = paths(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise UsageError(f"indexed dataset {self.prefix}: {path} not found")
        self._read_index(idx_path)
        self._map_tokens(bin_path)

    def _corrupt(self, path: str, why: str) -> UsageError:
        return UsageError(f"{path} is truncated or corrupt: {why}")

    def _read_index(self, idx_path: str) -> None:
        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise self._corrupt(idx_path, f"{size} bytes, shorter than the {_HEADER.size}-byte header")
        magic, version, code, n_seq, n_doc = _HEADER.unpack(header)
        if magic != _MAGIC:
            raise UsageError(f"{idx_path} is not an MMIDIDX index (magic {magic[:7]!r})")
        if version != 1:
            raise UsageError(f"{idx_path}: index version {version} is not supported (1 is)")
        if code not in _CODES:
            raise UsageError(f"{idx_path}: dtype code {code} is not an integer token type")
        self.dtype = np.dtype(_CODES[code])
        expected = _HEADER.size + n_seq * 12 + n_doc * 8
        # Megatron's multimodal variant appends one int8 mode per sequence; the ids read the same.
        if size not in (expected, expected + n_seq):
            raise self._corrupt(idx_path, f"{size} bytes, the header's counts need {expected}")
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        offset = _HEADER.size
        seq_lengths = index[offset:offset + 4 * n_seq].view(np.int32)
        offset += 4 * n_seq
        pointers = index[offset:offset + 8 * n_seq].view(np.int64)
        offset += 8 * n_seq
        doc_index = index[offset:offset + 8 * n_doc].view(np.int64)

        if seq_lengths.size and seq_lengths.min() < 0:
            raise self._corrupt(idx_path, "negative sequence length")
        token_starts = np.zeros(n_seq + 1, dtype=np.int64)
        np.cumsum(seq_lengths, out=token_starts[1:])
        if not np.array_equal(pointers, token_starts[:-1] * self.dtype.itemsize):
            raise self._corrupt(idx_path, "sequence offsets do not follow the lengths")
        if n_doc < 1 or doc_index[0] != 0 or doc_index[-1] != n_seq or np.any(np.diff(doc_index) < 0):
            raise self._corrupt(idx_path, "document index does not run from 0 to the sequence count")
        self.num_tokens = int(token_starts[-1])
        self._doc_starts = token_starts[doc_index]  # token offset of each document, plus the end
        self.sizes = np.diff(self._doc_starts)  # tokens per document, int64

    def _map_tokens(self, bin_path: str) -> None:
        size = os.path.getsize(bin_path)
        if size != self.num_tokens * self.dtype.itemsize:
            raise self._corrupt(bin_path, f"{size} bytes, the index says {self.num_tokens * self.dtype.itemsize}")
        # np.memmap refuses empty files; an empty dataset is still a valid one.
        self._tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if size else np.empty(0, self.dtype)

    def __getstate__(self) -> dict:
        # Pickling a memmap copies the whole file into the pickle: send the prefix and re-open instead
        # (DataLoader workers under the spawn start method).
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of document `doc` (to its end when length is None)."""
        n = len(self.sizes)
        if not -n <= doc < n:
            raise IndexError(f"document {doc} out of range for {n} documents")
        doc %= n
        start, end = int(self._doc_starts[doc]), int(self._doc_starts[doc + 1])
        begin = start + offset
        stop = end if length is None else min(end, begin + length)
        return np.asarray(self._tokens[begin:stop])

    def max_token_id(self, chunk: int = 1 << 24) -> int:
        """Largest id in PREFIX.bin (-1 when empty); reads the whole file in chunks."""
        high = -1
        for start in range(0, self.num_tokens, chunk):
            high = max(high, int(self._tokens[start:start + chunk].max()))
        return high

    def check_vocab(self, vocab_size: int, max_token_id: int | None = None) -> None:
        """UsageError if PREFIX.bin holds an id >= vocab_size (`max_token_id` spares the scan when known)."""
        high = self.max_token_id() if max_token_id is None else max_token_id
        if high >= vocab_size:
            raise UsageError(
                f"{self.prefix}.bin holds token id {high}, beyond the tokenizer's vocab of {vocab_size}: "
                "was it built with another tokenizer?"
            )
