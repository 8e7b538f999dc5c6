"""The jiebabpe tokenizer as a `transformers` fast tokenizer: jieba word splitting, then byte-level BPE.

Copied as it is into exported model folders, so `AutoTokenizer.from_pretrained(folder,
trust_remote_code=True)` encodes every text to the ids training saw. Needs transformers and jieba; nothing
of the toolkit.

Words are cut as the jiebabpe tokenizer defines them (launcher/data/jieba_split.py, whose faster segmenters
must give the same words): each run of Han characters is cut by jieba (its HMM on, a private dictionary),
every other run stays whole for the byte-level pre-tokenizer. The words go on to the Rust tokenizer as
pre-split input (`is_split_into_words`), so BPE merges never cross a jieba word. Input that is already split
into words (`is_split_into_words=True`) is passed on untouched. Offsets, when asked for, are relative to each
word. Decoding is plain byte-level BPE.
"""
from __future__ import annotations

import logging
import re

from transformers import PreTrainedTokenizerFast

# CJK Unified Ideographs, Extension A, compatibility ideographs, and Extensions B-H (planes 2-3).
HAN_RUN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]+")
_jieba = []  # one private jieba.Tokenizer, loaded on first use


def split_words(text: str) -> list[str]:
    """`text` cut into words whose concatenation is `text`: jieba on runs of Han characters."""
    if not _jieba:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        segmenter = jieba.Tokenizer()  # words added to jieba's global dictionary must not change the ids
        segmenter.initialize()
        _jieba.append(segmenter)
    words, pos = [], 0
    for match in HAN_RUN.finditer(text):
        if match.start() > pos:
            words.append(text[pos:match.start()])
        words.extend(_jieba[0].cut(match.group(), HMM=True))
        pos = match.end()
    if pos < len(text):
        words.append(text[pos:])
    return words


def _words(text):
    """A text -> its words; a batch of texts (or of (text, pair) tuples) -> each one's words."""
    if text is None or isinstance(text, str):
        return None if text is None else split_words(text)
    return [tuple(_words(t) for t in item) if isinstance(item, tuple) else _words(item) for item in text]


class GPTMoEJiebaTokenizer(PreTrainedTokenizerFast):
    """Byte-level BPE over jieba words; `<|endoftext|>` ends a document (and serves as bos and pad)."""

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        if not kwargs.get("is_split_into_words"):
            text, text_pair = _words(text), _words(text_pair)
            kwargs["is_split_into_words"] = True
        return super()._encode_plus(text, text_pair, *args, **kwargs)

    def _batch_encode_plus(self, batch_text_or_text_pairs, *args, **kwargs):
        # transformers 4.x encodes batches here (5.x has `_encode_plus` only)
        if not kwargs.get("is_split_into_words"):
            batch_text_or_text_pairs = _words(batch_text_or_text_pairs)
            kwargs["is_split_into_words"] = True
        return super()._batch_encode_plus(batch_text_or_text_pairs, *args, **kwargs)
