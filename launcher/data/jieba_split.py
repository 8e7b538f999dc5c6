"""Word splitting for the jiebabpe tokenizer: jieba on runs of Chinese characters, nothing else.

jieba cuts every space and punctuation mark into its own word, so code and English
would lose all whitespace and punctuation merges (4-space indents become 4 tokens).
Only runs of Han characters go to jieba; every other run is passed on whole and the
byte-level pre-tokenizer splits it the GPT-2 way. Concatenating the words gives back
the input exactly, which is what makes the tokenizer's round trip exact.
"""
import logging
import re

# CJK Unified Ideographs, Extension A, compatibility ideographs, and Extensions B-H (planes 2-3).
_HAN_RUN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]+")

_segmenter = None  # one jieba.Tokenizer per process, loaded on first use (~0.5 s)


def load():
    """Load jieba's dictionary now, e.g. before forking workers, so they share it instead of each loading it."""
    return _jieba()


def _jieba():
    global _segmenter
    if _segmenter is None:
        import jieba

        # jieba logs its dictionary loading to stderr at DEBUG level.
        jieba.setLogLevel(logging.WARNING)
        # A private instance: words a user adds to jieba's global dictionary must not change our ids.
        _segmenter = jieba.Tokenizer()
        _segmenter.initialize()
    return _segmenter


def split_words(text: str) -> list[str]:
    """Split `text` into words whose concatenation is `text`; merges never cross these words."""
    words: list[str] = []
    pos = 0
    for match in _HAN_RUN.finditer(text):
        if match.start() > pos:
            words.append(text[pos:match.start()])
        words.extend(_jieba().cut(match.group(), HMM=True))
        pos = match.end()
    if pos < len(text):
        words.append(text[pos:])
    return words
