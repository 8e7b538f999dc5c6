"""The embedded corpus: which stdlib files, deterministic builds, reuse of a complete build."""

import pytest

from launcher import preprocess as cli
from launcher.data import stdlib_corpus
from launcher.data.indexed import IndexedDataset
from launcher.data.stdlib_corpus import build_stdlib_corpus, stdlib_files, stdlib_root
from launcher.data.tokenizer import load_tokenizer
from launcher.errors import UsageError


def test_stdlib_files():
    files = stdlib_files()
    root = stdlib_root()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and files == stdlib_files()
    assert "argparse.py" in rel and "json/decoder.py" in rel
    for r in rel:
        parts = r.split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), r
        assert r.endswith(".py")
    assert all(f.stat().st_size > 0 for f in files)
    assert sum(f.stat().st_size for f in files) > 5_000_000  # a real corpus, ~12 MB on CPython 3.11


@pytest.fixture
def small_stdlib(monkeypatch):
    """A few stdlib files stand in for all of them, to keep the tests quick."""
    few = [f for f in stdlib_files() if f.relative_to(stdlib_root()).as_posix()
           in ("argparse.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "bisect.py")]
    assert len(few) == 5
    monkeypatch.setattr(stdlib_corpus, "stdlib_files", lambda: few)
    return few


def test_build_reuse_and_determinism(tmp_path, small_stdlib, kind):
    prefix, tok_dir = build_stdlib_corpus(tmp_path / "a", kind, vocab_size=300, workers=2)
    ds, tok = IndexedDataset(prefix), load_tokenizer(tok_dir)
    assert tok.kind == kind and len(ds) == 5
    assert tok.decode(ds[0][:-1]) == small_stdlib[0].read_text(encoding="utf-8")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file() and p.name != ".lock"}
    assert build_stdlib_corpus(tmp_path / "a", kind, vocab_size=300, workers=1) == (prefix, tok_dir)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # reused as it was
    # Another folder, another worker count: the same bytes.
    prefix_b, tok_dir_b = build_stdlib_corpus(tmp_path / "b", kind, vocab_size=300, workers=1)
    for a, b in ((prefix + ".bin", prefix_b + ".bin"), (prefix + ".idx", prefix_b + ".idx"),
                 (tok_dir + "/tokenizer.json", tok_dir_b + "/tokenizer.json")):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_incomplete_build_is_redone_keeping_the_tokenizer(tmp_path, small_stdlib):
    prefix, tok_dir = build_stdlib_corpus(tmp_path, "gpt2bpe", vocab_size=300, workers=1)
    tok_stamp = (tmp_path / "stdlib-gpt2bpe-300" / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    (tmp_path / "stdlib-gpt2bpe-300" / "stdlib_text_document.bin").unlink()
    assert build_stdlib_corpus(tmp_path, "gpt2bpe", vocab_size=300, workers=1) == (prefix, tok_dir)
    assert IndexedDataset(prefix).num_tokens > 0
    assert (tmp_path / "stdlib-gpt2bpe-300" / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == tok_stamp


def test_cli(tmp_path, small_stdlib, capsys):
    assert cli.main(["--stdlib", "--output-dir", str(tmp_path), "--vocab-size", "300", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"DATA_PATH={tmp_path}/stdlib-gpt2bpe-300/stdlib_text_document",
                   f"TOKENIZER_DIR={tmp_path}/stdlib-gpt2bpe-300/tokenizer"]


def test_bad_settings(tmp_path):
    with pytest.raises(UsageError, match="too small"):
        build_stdlib_corpus(tmp_path, vocab_size=10)
    with pytest.raises(UsageError, match="not one of"):
        build_stdlib_corpus(tmp_path, tokenizer_kind="wordpiece")
