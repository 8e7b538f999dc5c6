"""Word splitting for the jiebabpe tokenizer: jieba on runs of Chinese characters, nothing else.

jieba cuts every space and punctuation mark into its own word, so code and English
would lose all whitespace and punctuation merges (4-space indents become 4 tokens).
Only runs of Han characters go to jieba; every other run is passed on whole and the
byte-level pre-tokenizer splits it the GPT-2 way. Concatenating the words gives back
the input exactly, which is what makes the tokenizer's round trip exact.

Two segmenters produce these words, identically:

- `jieba`: the reference, jieba's own `Tokenizer.cut` on each run (pure Python).
- `rjieba`: about 10x faster. jieba-rs (the `rjieba` binding, Rust), holding jieba's own
  dictionary and total, finds the most probable dictionary route; jieba's HMM step runs here,
  batched in numpy, with jieba's own probabilities and tie-breaking. jieba-rs's own HMM is not
  used: its model is jieba's rounded to 6 decimals, which flips near ties ("常在人寰"). HMM
  results are memoized per process.

Both hand jieba only the characters of its Han class (U+4E00..U+9FD5); every other Han
character (extensions A-H, compatibility ideographs, U+9FD6..U+9FFF) is a word alone, as
jieba's `cut` makes it. `JIEBABPE_SEGMENTER` = `auto` (default: rjieba where a verified
version is installed, else jieba), `rjieba` or `jieba` picks one; the ids never depend on it.
"""
import itertools
import logging
import os
import re
from collections import defaultdict, deque
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from launcher.errors import UsageError

# jieba's Han class, the only characters its dictionary and HMM see.
_JIEBA_FIRST, _JIEBA_LAST = 0x4E00, 0x9FD5
_JIEBA_RUN = re.compile("[\u4e00-\u9fd5]+")
# Han characters are CJK Unified Ideographs, Extension A, compatibility ideographs and Extensions B-H
# (planes 2-3). Odd items of .split(): a run of jieba's Han class, or one other Han character; even: the rest.
_PIECES = re.compile("([\u4e00-\u9fd5]+|[\u3400-\u4dbf\u9fd6-\u9fff\uf900-\ufaff\U00020000-\U0003ffff])")

SEGMENTERS = ("auto", "rjieba", "jieba")
ENV_VAR = "JIEBABPE_SEGMENTER"
# rjieba versions whose dictionary route was checked against jieba 0.42.1 (tests/data/test_jieba_split.py):
# at least the first, below the second; setup.py asks for the same range.
_RJIEBA_VERIFIED = ((0, 2, 2), (0, 3, 0))
# HMM memo size (entries) before it is emptied: bounds a worker's memory on any corpus.
_MEMO_LIMIT = 300_000


def split_pieces(text: str) -> list[str]:
    """`text` cut around Han characters: odd items are a run of jieba's Han class (cut into words by a
    segmenter where 2+ characters long) or one other Han character; even items (maybe empty) are the rest."""
    return _PIECES.split(text)


def jieba_runs(pieces: Iterable[str]) -> dict:
    """The pieces of `split_pieces` a segmenter cuts (runs of jieba's Han class, 2+ characters), as dict keys."""
    return dict.fromkeys(p for p in pieces if len(p) > 1 and "\u4e00" <= p[0] <= "\u9fd5")


class Segmenter:
    """Texts -> word lists. Subclasses cut runs of jieba's Han class (2+ characters) in `joined_words`."""

    name = ""

    def split_texts(self, texts: Sequence[str]) -> list[list[str]]:
        chain = itertools.chain.from_iterable
        pieces = [_PIECES.split(text) for text in texts]
        distinct = dict.fromkeys(chain(pieces))
        cut = self.cut_runs(list(jieba_runs(distinct)))
        words_of = {p: cut.get(p) or [p] for p in distinct}  # other pieces are a word each
        words_of[""] = []
        return [list(chain(map(words_of.__getitem__, parts))) for parts in pieces]

    def split(self, text: str) -> list[str]:
        return self.split_texts([text])[0]

    def cut_runs(self, runs: Sequence[str]) -> dict:
        """{run: words} for distinct runs of jieba's Han class, each 2+ characters."""
        if not runs:
            return {}
        segments = (self.joined_words(runs) + " ").split(" \n ")
        return dict(zip(runs, map(str.split, segments)))  # words hold no whitespace

    def joined_words(self, runs: Sequence[str]) -> str:
        """The words of `runs` (each 2+ characters of jieba's Han class), each run's followed by a newline,
        all joined by spaces: "w1 w2 \\n w3 \\n" for runs [w1w2, w3]."""
        raise NotImplementedError


class JiebaSegmenter(Segmenter):
    """The reference: jieba's `cut` with its HMM, on a private dictionary instance (~0.7 s to load)."""

    name = "jieba"

    def __init__(self):
        import jieba

        # jieba logs its dictionary loading to stderr at DEBUG level.
        jieba.setLogLevel(logging.WARNING)
        # A private instance: words a user adds to jieba's global dictionary must not change our ids.
        self.jieba = jieba.Tokenizer()
        self.jieba.initialize()

    def joined_words(self, runs: Sequence[str]) -> str:
        return " ".join(itertools.chain.from_iterable((*self.jieba.cut(run, HMM=True), "\n") for run in runs))


class _JiebaHMM:
    """jieba's finalseg Viterbi over states B, E, M, S, on many buffers at once, bit for bit: the same
    float64 probabilities, the same sums in the same order, the same tie-breaking (the larger state
    letter wins, as Python's max on (probability, state) tuples does)."""

    _STATES = "BEMS"

    def __init__(self):
        import numpy as np
        from jieba import finalseg

        self.np = np
        min_float = finalseg.MIN_FLOAT
        states = self._STATES
        self.start = np.array([finalseg.start_P.get(y, min_float) for y in states])
        self.trans = np.array([[finalseg.trans_P[y0].get(y, min_float) for y in states] for y0 in states])
        self.emit = np.full((4, _JIEBA_LAST - _JIEBA_FIRST + 1), min_float)
        for s, y in enumerate(states):
            for char, p in finalseg.emit_P[y].items():
                if _JIEBA_FIRST <= ord(char) <= _JIEBA_LAST:
                    self.emit[s, ord(char) - _JIEBA_FIRST] = p
        # For each state, the two states that may precede it (finalseg.PrevStatus), lower letter first.
        self.prev = [tuple(sorted(states.index(p) for p in finalseg.PrevStatus[y])) for y in states]
        self.E, self.S = states.index("E"), states.index("S")

    def cut(self, buffers: Sequence[str]) -> dict:
        """{buffer: its words joined by spaces} for buffers of 2+ characters of jieba's Han class."""
        np = self.np
        by_length = defaultdict(list)
        for b in buffers:
            by_length[len(b)].append(b)
        out = {}
        for length, group in by_length.items():
            n = len(group)
            codes = np.frombuffer("".join(group).encode("utf-32-le"), np.uint32).reshape(n, length)
            emit = self.emit[:, codes - _JIEBA_FIRST]  # (4, n, length)
            v = self.start[:, None] + emit[:, :, 0]  # (4, n): log-probability of the best path ending in each state
            back = np.empty((length, 4, n), np.int8)  # back[t, y]: the state before y at t on that path
            for t in range(1, length):
                new_v = np.empty_like(v)
                for y, (lo, hi) in enumerate(self.prev):
                    from_lo = v[lo] + self.trans[lo, y] + emit[y, :, t]
                    from_hi = v[hi] + self.trans[hi, y] + emit[y, :, t]
                    take_hi = from_hi >= from_lo
                    new_v[y] = np.where(take_hi, from_hi, from_lo)
                    back[t, y] = np.where(take_hi, hi, lo)
                v = new_v
            state = np.where(v[self.S] >= v[self.E], self.S, self.E).astype(np.int8)
            # Each buffer as one row: character, separator, character, ..., "\n"; the separator is a space
            # where a word ends (states E and S), else NUL, dropped below.
            row = np.zeros((n, 2 * length), np.uint32)
            row[:, 0::2] = codes
            row[:, -1] = ord("\n")
            columns = np.arange(n)
            for t in range(length - 1, 0, -1):
                state = back[t, state, columns]
                row[:, 2 * t - 1] = np.where((state == self.E) | (state == self.S), ord(" "), 0)
            spaced = row.tobytes().decode("utf-32-le").replace("\0", "").split("\n")
            out.update(zip(group, spaced))
        return out


# In a route joined by spaces: two or more one-character words in a row (never across the "\n" between runs).
_SINGLES = re.compile(r"((?<![^ ])[^ \n](?: [^ \n](?![^ ]))+)")


def _jieba_dictionary() -> tuple[dict, int]:
    """jieba's default dictionary as jieba reads it: {word: frequency} (a later line wins) and the total,
    which counts every line (so a word listed twice counts twice)."""
    import jieba

    lines = Path(jieba.__file__).with_name("dict.txt").read_text("utf-8").splitlines()
    fields = " ".join(lines).split(" ")
    if len(fields) == 3 * len(lines):  # word, frequency, part of speech on every line: split in one go
        frequencies = list(map(int, fields[1::3]))
        return dict(zip(fields[0::3], frequencies)), sum(frequencies)
    frequencies, total = {}, 0
    for line in lines:
        word, frequency = line.strip().split(" ")[:2]
        frequencies[word] = int(frequency)
        total += int(frequency)
    return frequencies, total


class RustSegmenter(Segmenter):
    """jieba-rs's dictionary route + jieba's HMM (see the module docstring); ~0.6 s to load."""

    name = "rjieba"

    def __init__(self):
        import rjieba

        # A private instance holding jieba's own dictionary, not the copy built into jieba-rs, and jieba's
        # total: jieba-rs's counts a word listed twice once, and every route score is log(frequency / total).
        self.rust = rjieba.Jieba.empty()
        frequencies, total = _jieba_dictionary()
        # jieba leaves words of frequency 0 out of its routes.
        added = {w: f for w, f in frequencies.items() if f} if 0 in frequencies.values() else frequencies
        deque(map(self.rust.add_word, added, added.values(), itertools.repeat(None)), maxlen=0)
        missing = total - sum(frequencies.values())
        if missing:
            # Added to a word with a character outside jieba's Han class: one no run can contain.
            inert = next(w for w, f in frequencies.items() if f and not _JIEBA_RUN.fullmatch(w))
            self.rust.add_word(inert, frequencies[inert] + missing, None)
        self.hmm = _JiebaHMM()
        self._buffers: dict = {}  # one-character words joined by spaces -> jieba's words joined by spaces

    def joined_words(self, runs: Sequence[str]) -> str:
        if not runs:
            return ""
        text = "\n".join(runs) + "\n"
        # One call for all runs: "\n" is not in jieba's Han class, so no word crosses it.
        route = " ".join(self.rust.cut(text, False))
        # jieba's __cut_DAG: consecutive one-character words of the route form a buffer; a buffer that is a
        # dictionary word stays single characters, any other goes through the HMM.
        buffers = self._buffers
        if len(buffers) > _MEMO_LIMIT:
            buffers.clear()
        parts = _SINGLES.split(route)  # odd items: the buffers
        to_hmm = {}
        for spaced in set(parts[1::2]) - buffers.keys():
            joined = spaced.replace(" ", "")
            if self.rust.has_word(joined):
                buffers[spaced] = spaced
            else:
                to_hmm[joined] = spaced
        if to_hmm:
            for joined, words in self.hmm.cut(list(to_hmm)).items():
                buffers[to_hmm[joined]] = words
        parts[1::2] = map(buffers.__getitem__, parts[1::2])
        route = "".join(parts)
        if route.replace(" ", "") != text:
            raise RuntimeError("rjieba returned words that do not spell its input")
        return route


_segmenters: dict = {}  # name -> Segmenter, one per process


def rjieba_available() -> bool:
    """Whether an rjieba of a verified version is installed (others are not trusted to give jieba's routes)."""
    from importlib import metadata

    try:
        version = metadata.version("rjieba")
    except metadata.PackageNotFoundError:
        return False
    numbers = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return bool(numbers) and _RJIEBA_VERIFIED[0] <= tuple(map(int, numbers.groups())) < _RJIEBA_VERIFIED[1]


def resolve(name: str | None = None) -> str:
    """The segmenter `name` (default: $JIEBABPE_SEGMENTER, else auto) stands for: rjieba or jieba."""
    name = name or os.environ.get(ENV_VAR) or "auto"
    if name not in SEGMENTERS:
        raise UsageError(f"{ENV_VAR}={name!r} is not one of {', '.join(SEGMENTERS)}")
    if name == "auto":
        return "rjieba" if rjieba_available() else "jieba"
    if name == "rjieba" and not rjieba_available():
        low, high = (".".join(map(str, v)) for v in _RJIEBA_VERIFIED)
        raise UsageError(f"{ENV_VAR}=rjieba but no verified rjieba is installed: pip install "
                         f"'rjieba>={low},<{high}', or use {ENV_VAR}=jieba")
    return name


def get_segmenter(name: str | None = None) -> Segmenter:
    """The process's segmenter `name` (see `resolve`), created and its dictionary loaded on first use."""
    name = resolve(name)
    if name not in _segmenters:
        _segmenters[name] = RustSegmenter() if name == "rjieba" else JiebaSegmenter()
    return _segmenters[name]


def load(name: str | None = None) -> Segmenter:
    """Load the dictionary now, e.g. before forking workers, so they share it instead of each loading it."""
    return get_segmenter(name)


def split_words(text: str) -> list[str]:
    """Split `text` into words whose concatenation is `text`; merges never cross these words."""
    return get_segmenter().split(text)


def split_texts(texts: Iterable[str]) -> list[list[str]]:
    """`split_words` of each text, in one batch (faster than one at a time)."""
    return get_segmenter().split_texts(list(texts))


def split_iter(texts: Iterable[str], batch: int = 256) -> Iterator[list[str]]:
    """`split_words` of each text, lazily, `batch` texts at a time."""
    texts = iter(texts)
    while chunk := list(itertools.islice(texts, batch)):
        yield from split_texts(chunk)


def reset() -> None:
    """Forget this process's segmenters and their memos (the next use loads the dictionary again)."""
    _segmenters.clear()
