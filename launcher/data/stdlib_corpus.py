"""The embedded default corpus: the running interpreter's own standard-library .py files.

Always present and nothing to download: about 12 MB in about 730 files on CPython 3.11,
one document per file. The file list is sorted and both tokenizer training and
preprocessing are deterministic, so one machine (one Python) rebuilds the same
tokenizer.json and .bin/.idx byte for byte. The tokenizer is trained on the whole corpus
(a couple of seconds at a vocab of a few thousand).

Layout: OUT_DIR/stdlib-<kind>-<vocab>/{tokenizer/, stdlib_text_document.bin/.idx, corpus.json};
corpus.json is written last and marks a complete build, which later calls reuse.
"""
import json
import platform
import shutil
import sysconfig
from contextlib import contextmanager
from pathlib import Path

from launcher.data.indexed import IndexedDataset
from launcher.data.pipeline import input_fingerprint, preprocess, reusable_tokenizer
from launcher.data.tokenizer import check_kind, check_vocab_size, load_tokenizer
from launcher.errors import UsageError
from launcher.files import write_text_atomic
from launcher.preflight import check_writable

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
DEFAULT_VOCAB_SIZE = 4096
PREFIX_NAME = "stdlib_text_document"
MARKER = "corpus.json"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files() -> list[Path]:
    """Non-empty .py files of the standard library outside test folders and site-packages, sorted."""
    root = stdlib_root()
    files = [
        path for path in root.rglob("*.py")
        if not SKIP_DIRS.intersection(path.relative_to(root).parts[:-1])
        and path.is_file() and path.stat().st_size > 0  # an empty __init__.py is no document
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@contextmanager
def _exclusive(lock_path: Path):
    """Two processes asking for the same corpus at once: the second waits, then reuses it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic renames still keep files whole
        yield
        return
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_complete(home: Path, expected: dict) -> bool:
    try:
        if json.loads((home / MARKER).read_text()) != expected:
            return False
        IndexedDataset(home / PREFIX_NAME)
        load_tokenizer(home / "tokenizer", expected["tokenizer_kind"])
        return True
    except (OSError, ValueError, UsageError):
        return False


def build_stdlib_corpus(out_dir, tokenizer_kind: str = "gpt2bpe", vocab_size: int = DEFAULT_VOCAB_SIZE,
                        workers: int | None = None, progress: bool = False) -> tuple[str, str]:
    """Tokenizer + indexed dataset of the stdlib corpus under out_dir; returns (prefix, tokenizer_dir).

    Reuses a complete earlier build with the same settings; otherwise trains the tokenizer
    (unless one with these settings is already there) and writes the dataset.
    """
    check_kind(tokenizer_kind)
    check_vocab_size(vocab_size)
    files = stdlib_files()
    fingerprint = input_fingerprint(files, "text")
    expected = {"python": platform.python_version(), "stdlib": str(stdlib_root()), "files": len(files),
                "fingerprint": fingerprint, "tokenizer_kind": tokenizer_kind, "vocab_size": vocab_size}
    home = Path(out_dir) / f"stdlib-{tokenizer_kind}-{vocab_size}"
    prefix, tokenizer_dir = home / PREFIX_NAME, home / "tokenizer"
    check_writable(home, "--output-dir")
    home.mkdir(parents=True, exist_ok=True)
    with _exclusive(home / ".lock"):
        if not _is_complete(home, expected):
            (home / MARKER).unlink(missing_ok=True)
            if tokenizer_dir.exists() and reusable_tokenizer(tokenizer_dir, tokenizer_kind, vocab_size,
                                                             fingerprint) is None:
                shutil.rmtree(tokenizer_dir)  # trained on another Python's stdlib: ours to replace
            preprocess(files, prefix, tokenizer_kind=tokenizer_kind, vocab_size=vocab_size,
                       tokenizer_dir=tokenizer_dir, workers=workers, progress=progress)
            write_text_atomic(json.dumps(expected, indent=1, sort_keys=True) + "\n", home / MARKER)
    return str(prefix), str(tokenizer_dir)
