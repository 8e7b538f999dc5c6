"""A tiny tokenized corpus for training tests: a few standard-library files, a 512-token BPE, written with
the data package's own writer (so the tests read what real runs read)."""
from __future__ import annotations

import sysconfig
from pathlib import Path

# Modules that exist on every CPython 3.10+; a few hundred KB of text, tokenized in about a second.
FILES = ("argparse.py", "collections/__init__.py", "dataclasses.py", "enum.py", "functools.py", "json/decoder.py",
         "json/encoder.py", "pathlib.py", "shlex.py", "string.py", "textwrap.py", "typing.py")


def build_tiny_corpus(out_dir: Path, vocab_size: int = 512) -> tuple[str, str]:
    """(dataset prefix, tokenizer dir) under out_dir."""
    from launcher.data.indexed import IndexedDatasetWriter, best_dtype
    from launcher.data.tokenizer import train_tokenizer

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / name).read_text(encoding="utf-8") for name in FILES]
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer = train_tokenizer("gpt2bpe", texts, vocab_size, out_dir=tokenizer_dir)
    prefix = out_dir / "tiny_text_document"
    with IndexedDatasetWriter(prefix, dtype=best_dtype(tokenizer.vocab_size), vocab_size=tokenizer.vocab_size) as w:
        for text in texts:
            # Many short documents, so the 2% validation split holds several.
            for part in text.split("\n\n\n"):
                if part.strip():
                    w.add_document(tokenizer.encode(part) + [tokenizer.eod_id])
    return str(prefix), str(tokenizer_dir)
