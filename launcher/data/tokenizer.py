"""Tokenizers for the TOKENIZER positional argument: gpt2bpe and jiebabpe.

Both are a byte-level BPE model from the `tokenizers` library: the alphabet is the 256
bytes, so every string, in any script, round-trips exactly. They differ in how text is
cut into words before BPE, which decides the merges learned and applied:

- gpt2bpe: GPT-2's regex pre-tokenizer, in Rust, stored in tokenizer.json.
- jiebabpe: runs of Chinese characters are cut into words by jieba (Python, see
  jieba_split.py), the rest by the same GPT-2 regex; merges never cross a jieba word.
  jieba cannot be stored in tokenizer.json, so the file holds the GPT-2 regex
  pre-tokenizer and `Tokenizer.encode` runs jieba before handing the words over.

On disk: DIR/tokenizer.json (the `tokenizers` format) + DIR/tokenizer_meta.json
(kind, end-of-document token, vocab size, what it was trained on).
"""
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from launcher.errors import UsageError

TOKENIZER_TYPES = ("jiebabpe", "gpt2bpe")
EOD_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
HF_CODE_FILE = "tokenization_gpt_moe.py"  # the jiebabpe tokenizer class, copied into exported folders
MIN_VOCAB_SIZE = 257  # 256 bytes + the end-of-document token
# Far above any real vocabulary (the largest are ~256K); the BPE trainer sizes its tables by the request, so an
# absurd one exhausts memory or aborts inside `tokenizers`.
MAX_VOCAB_SIZE = 1 << 22


def check_kind(kind: str) -> str:
    if kind not in TOKENIZER_TYPES:
        raise UsageError(f"tokenizer type {kind!r} is not one of {', '.join(TOKENIZER_TYPES)}")
    return kind


def _byte_level(model):
    from tokenizers import Tokenizer as Backend, decoders, pre_tokenizers

    backend = Backend(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


class Tokenizer:
    """A trained byte-level BPE tokenizer of one `kind`; `eod_id` ends every document, `pad_id` pads."""

    def __init__(self, backend, kind: str, meta: dict | None = None):
        self.kind = check_kind(kind)
        self.backend = backend  # a tokenizers.Tokenizer
        self.meta = dict(meta or {})
        # Registering is a no-op where the vocab already has it (GPT-2's id 50256).
        backend.add_special_tokens([EOD_TOKEN])
        self.eod_id: int = backend.token_to_id(EOD_TOKEN)
        self.pad_id: int = self.eod_id  # padding is masked out of the loss, so any id will do
        # max id + 1, not the entry count: what an embedding table and id checks need.
        self.vocab_size: int = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self._piece_encoders: dict = {}  # jiebabpe: segmenter name -> _PieceEncoder, made on first use

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"

    def __getstate__(self):
        return {**self.__dict__, "_piece_encoders": {}}  # memos and dictionaries stay in their process

    def _jieba_encoder(self):
        """None for the reference path (jieba, one text at a time), else this tokenizer's _PieceEncoder."""
        from launcher.data import jieba_split

        name = jieba_split.resolve()
        if name == "jieba":
            return None
        if name not in self._piece_encoders:
            # The dictionary loads on the first Chinese text, not for text without any.
            self._piece_encoders[name] = _PieceEncoder(self.backend, lambda: jieba_split.get_segmenter(name))
        return self._piece_encoders[name]

    def encode(self, text: str) -> list[int]:
        if self.kind != "jiebabpe":
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.encode_texts([text])[0]

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in this thread (no Rust thread pool: safe before forking workers);
        for jiebabpe much faster than one at a time."""
        encoder = self._jieba_encoder() if self.kind == "jiebabpe" else None
        if encoder is None:
            return [self._encode_one(text) for text in texts]
        flat, lengths = encoder.encode_flat(texts)
        flat = flat.tolist()
        ends = np.cumsum(lengths).tolist()
        return [flat[end - n:end] for end, n in zip(ends, lengths.tolist())]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of all texts in one int64 array, and each text's number of ids (as `encode_texts`)."""
        encoder = self._jieba_encoder() if self.kind == "jiebabpe" else None
        if encoder is not None:
            return encoder.encode_flat(texts)
        ids = [self._encode_one(text) for text in texts]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum())), lengths

    def _encode_one(self, text: str) -> list[int]:
        if self.kind != "jiebabpe":
            return self.backend.encode(text, add_special_tokens=False).ids
        from launcher.data.jieba_split import get_segmenter  # the reference path: jieba, one text at a time

        words = get_segmenter("jieba").split(text)
        return self.backend.encode(words, is_pretokenized=True, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes in Rust threads (gpt2bpe); jiebabpe is `encode_texts`."""
        if self.kind == "jiebabpe":
            return self.encode_texts(texts)
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(ids if hasattr(ids, "__len__") else list(ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise UsageError(f"token id {bad} is outside this tokenizer's vocab (0..{self.vocab_size - 1})")
        return self.backend.decode(ids.tolist(), skip_special_tokens=False)

    def save(self, directory) -> str:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))
        meta = {**self.meta, "kind": self.kind, "eod_token": EOD_TOKEN, "vocab_size": self.vocab_size}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return str(directory)

    def to_hf(self):
        """A transformers fast tokenizer with the same vocab, merges and special token, giving the ids `encode`
        gives: for jiebabpe a `GPTMoEJiebaTokenizer` (tokenization_gpt_moe.py), which runs jieba first."""
        from tokenizers import Tokenizer as Backend
        from transformers import PreTrainedTokenizerFast

        from launcher.data.tokenization_gpt_moe import GPTMoEJiebaTokenizer

        cls = GPTMoEJiebaTokenizer if self.kind == "jiebabpe" else PreTrainedTokenizerFast
        return cls(
            tokenizer_object=Backend.from_str(self.backend.to_str()),
            bos_token=EOD_TOKEN,
            eos_token=EOD_TOKEN,
            pad_token=EOD_TOKEN,
            clean_up_tokenization_spaces=False,  # would turn " ." into "." and break the round trip
        )

    def save_hf(self, directory, model_max_length: int | None = None) -> Path:
        """Write the tokenizer as `AutoTokenizer.from_pretrained(directory)` reads it. jiebabpe also writes
        its tokenizer class's code (tokenization_gpt_moe.py), which `trust_remote_code=True` loads.
        `model_max_length`: the model's context, for transformers' length checks."""
        directory = Path(directory)
        hf = self.to_hf()
        if model_max_length is not None:
            hf.model_max_length = model_max_length
        hf.save_pretrained(str(directory))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["model_input_names"] = ["input_ids", "attention_mask"]  # no token_type_ids (transformers 4.x)
        if self.kind == "jiebabpe":
            code = Path(__file__).with_name(HF_CODE_FILE)
            (directory / HF_CODE_FILE).write_text(code.read_text(encoding="utf-8"), encoding="utf-8")
            config["tokenizer_class"] = "GPTMoEJiebaTokenizer"
            config["auto_map"] = {"AutoTokenizer": [None, f"{Path(HF_CODE_FILE).stem}.GPTMoEJiebaTokenizer"]}
        else:
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return directory


class _Growing:
    """A 1-D numpy array that grows at its end (doubling its capacity)."""

    def __init__(self, dtype):
        self.data, self.size = np.empty(1 << 16, dtype), 0

    def extend(self, values: np.ndarray) -> int:
        """Append `values`; returns the index of the first."""
        start, end = self.size, self.size + len(values)
        if end > len(self.data):
            grown = np.empty(max(end, 2 * len(self.data)), self.data.dtype)
            grown[:start] = self.data[:start]
            self.data = grown
        self.data[start:end] = values
        self.size = end
        return start

    def __getitem__(self, index):
        return self.data[:self.size][index]


class _PieceEncoder:
    """jiebabpe's `encode` on a fast segmenter, with the ids of pieces and of words memoized.

    A text is cut into pieces (jieba_split.split_pieces: runs of jieba's Han class, single other Han
    characters, the non-Han text between), pieces into words. Both repeat a lot (punctuation, common
    words and phrases). A piece's ids are those of its words, each encoded alone, which is what
    encoding the text's whole word list gives: byte-level pre-tokenization and BPE never look across
    a word. Memoized ids are entries (start, length) of one int32 token store, so a batch of texts is
    gathered from it with numpy, not a Python list at a time.
    """

    MEMO_LIMIT = 400_000  # pieces + words; the memos are emptied past it, bounding a worker's memory
    STORE_LIMIT = 10_000_000  # tokens in the store (40 MB); likewise
    MAX_MEMO_CHARS = 64  # longer pieces (whole English paragraphs, code) are encoded, not kept

    def __init__(self, backend, get_segmenter: Callable):
        self.backend, self.get_segmenter = backend, get_segmenter
        self._empty()

    def _empty(self) -> None:
        self.store = _Growing(np.int32)  # the ids of all entries, one after another
        self.starts, self.lengths = _Growing(np.int64), _Growing(np.int64)  # entry -> its ids in the store
        self.starts.extend(np.zeros(1, np.int64))
        self.lengths.extend(np.zeros(1, np.int64))
        # Runs and words apart: a run's ids are its words' ids, which differ from its own as one word.
        self.pieces: dict = {"": 0}  # piece -> entry
        self.words: dict = {}  # word -> entry

    def _add_entries(self, ids: np.ndarray, lengths: np.ndarray) -> range:
        """New entries: consecutive `lengths` ids each, out of `ids`."""
        offset = self.store.extend(ids)
        first = self.starts.extend(offset + np.cumsum(lengths) - lengths)
        self.lengths.extend(lengths)
        return range(first, first + len(lengths))

    def _gather(self, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids of `entries`, one after another, and each entry's number of ids."""
        starts, lengths = self.starts[entries], self.lengths[entries]
        ends = np.cumsum(lengths)
        positions = np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)
        return self.store[positions], lengths

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        from launcher.data.jieba_split import split_pieces

        chain = itertools.chain.from_iterable
        pieces = [split_pieces(text) for text in texts]
        missing = [p for p in dict.fromkeys(chain(pieces)) if p not in self.pieces]
        if (len(self.pieces) + len(self.words) + 2 * len(missing) > self.MEMO_LIMIT
                or self.store.size > self.STORE_LIMIT):
            self._empty()
            missing = [p for p in dict.fromkeys(chain(pieces)) if p]
        if missing:
            self._add(missing)
        entries = np.fromiter(map(self.pieces.__getitem__, chain(pieces)), np.int64)
        flat, piece_lengths = self._gather(entries)
        per_text = np.fromiter(map(len, pieces), np.int64, len(pieces))  # every text has a piece, maybe ""
        lengths = np.add.reduceat(piece_lengths, np.cumsum(per_text) - per_text) if len(texts) else per_text
        for p in missing:
            if len(p) > self.MAX_MEMO_CHARS:
                del self.pieces[p]
                self.words.pop(p, None)  # a word of its own unless a run of Han characters
        return flat.astype(np.int64), lengths

    def _add(self, missing: list[str]) -> None:
        """Memoize the ids of new pieces and words; new words are encoded in one call."""
        from launcher.data.jieba_split import jieba_runs

        runs = jieba_runs(missing)
        others = [p for p in missing if p not in runs]  # one word each
        runs = list(runs)
        # The words of all runs, each run's followed by the word "\n".
        run_words = self.get_segmenter().joined_words(runs).split(" ") if runs else []
        new_words = [w for w in dict.fromkeys(itertools.chain(run_words, others, ["\n"])) if w not in self.words]
        if new_words:
            encoding = self.backend.encode(new_words, is_pretokenized=True, add_special_tokens=False)
            per_word = np.bincount(np.asarray(encoding.word_ids, np.int64), minlength=len(new_words))
            self.words.update(zip(new_words, self._add_entries(np.asarray(encoding.ids, np.int32), per_word)))
        self.pieces.update(zip(others, map(self.words.__getitem__, others)))
        if runs:
            words = np.fromiter(map(self.words.__getitem__, run_words), np.int64, len(run_words))
            newline = words == self.words["\n"]
            if newline.sum() != len(runs) or not newline[-1]:
                raise RuntimeError("the segmenter's words do not split into its runs")
            ids, lengths = self._gather(words[~newline])
            run_of_word = np.cumsum(newline)[~newline]  # runs before each word's = its run's index
            per_run = np.bincount(run_of_word, weights=lengths, minlength=len(runs)).astype(np.int64)
            self.pieces.update(zip(runs, self._add_entries(ids, per_run)))


def _bpe_trainer(vocab_size: int):
    from tokenizers import pre_tokenizers, trainers

    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )


def check_vocab_size(vocab_size: int) -> int:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise UsageError(
            f"vocab size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            "(256 bytes + end-of-document)"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise UsageError(f"--vocab-size: got {vocab_size:,}; allowed: {MIN_VOCAB_SIZE} to {MAX_VOCAB_SIZE:,} (the "
                         "largest tokenizers in use have about 256K)")
    return vocab_size


def train_from_words(kind: str, word_lists: Iterable, vocab_size: int, meta: dict | None = None) -> Tokenizer:
    """Train on an iterable of texts (gpt2bpe) or of word lists from `split_words` (jiebabpe).

    Each string of a word list is pre-tokenized on its own, which is what keeps jiebabpe's
    merges inside jieba words. The result may hold fewer than `vocab_size` ids when the
    corpus has too few distinct pairs.
    """
    from tokenizers import models

    check_kind(kind)
    check_vocab_size(vocab_size)
    seen = [0]

    def counted(items):
        for item in items:
            seen[0] += 1
            yield item

    backend = _byte_level(models.BPE())
    backend.train_from_iterator(counted(word_lists), _bpe_trainer(vocab_size))
    if seen[0] == 0:
        raise UsageError("no text to train the tokenizer on")
    return Tokenizer(backend, kind, {**(meta or {}), "requested_vocab_size": vocab_size})


def _read_texts(texts_or_files: Iterable) -> Iterable[str]:
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            try:
                yield Path(item).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise UsageError(f"cannot read {item} as UTF-8 text: {err}") from None
        else:
            yield item


def train_tokenizer(kind: str, texts_or_files: Iterable, vocab_size: int, out_dir=None) -> Tokenizer:
    """Train a `kind` tokenizer on texts (str) or files (pathlib.Path, one document each); save to out_dir."""
    check_kind(kind)
    texts = _read_texts(texts_or_files)
    if kind == "jiebabpe":
        from launcher.data.jieba_split import split_iter

        texts = split_iter(texts)
    tokenizer = train_from_words(kind, texts, vocab_size)
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer


def _load_backend(load, source) -> "object":
    try:
        return load()
    except Exception as err:  # the Rust side raises plain Exception with multi-line text
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot read tokenizer {source}: {first_line}") from None


def _load_gpt2_pair(vocab: Path, merges: Path, kind: str | None) -> Tokenizer:
    if kind not in (None, "gpt2bpe"):
        raise UsageError(f"{vocab} + {merges} is the gpt2bpe format; a {kind} tokenizer is a tokenizer.json")
    for path in (vocab, merges):
        if not path.is_file():
            raise UsageError(f"tokenizer file not found: {path}")
    from tokenizers import models

    backend = _load_backend(lambda: _byte_level(models.BPE.from_file(str(vocab), str(merges))), vocab)
    return Tokenizer(backend, "gpt2bpe", {"loaded_from": [str(vocab), str(merges)]})


def load_tokenizer(path, kind: str | None = None) -> Tokenizer:
    """Load from a directory with tokenizer.json (+ tokenizer_meta.json), a tokenizer.json file,
    a directory or vocab.json path with a GPT-2 vocab.json + merges.txt, or a (vocab, merges) pair."""
    if kind is not None:
        check_kind(kind)
    if isinstance(path, (tuple, list)):
        if len(path) != 2:
            raise UsageError(f"a GPT-2 tokenizer pair is (vocab.json, merges.txt), got {len(path)} paths")
        return _load_gpt2_pair(Path(path[0]), Path(path[1]), kind)
    path = Path(path)
    if not path.exists():
        raise UsageError(f"tokenizer not found: {path}")
    if path.is_file() and path.name != TOKENIZER_FILE:
        return _load_gpt2_pair(path, path.with_name("merges.txt"), kind)
    directory = path.parent if path.is_file() else path
    if not (directory / TOKENIZER_FILE).is_file():
        if (directory / "vocab.json").is_file():
            return _load_gpt2_pair(directory / "vocab.json", directory / "merges.txt", kind)
        raise UsageError(f"{directory} holds neither {TOKENIZER_FILE} nor vocab.json + merges.txt")

    meta = {}
    if (directory / META_FILE).is_file():
        try:
            meta = json.loads((directory / META_FILE).read_text())
        except ValueError:
            raise UsageError(f"{directory / META_FILE} is not valid JSON") from None
    saved_kind = meta.get("kind")
    if kind is not None and saved_kind is not None and kind != saved_kind:
        raise UsageError(f"tokenizer {directory} is {saved_kind}, not {kind}")
    from tokenizers import Tokenizer as Backend

    backend = _load_backend(lambda: Backend.from_file(str(directory / TOKENIZER_FILE)), directory / TOKENIZER_FILE)
    return Tokenizer(backend, kind or saved_kind or "gpt2bpe", meta)
