"""Fixtures for training tests: a tiny corpus and a reference run, each built once per test session (also when
pytest-xdist spreads the test files over several workers: the first worker builds, the others wait and reuse)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_helpers, train_corpus (importlib import mode)

from train_corpus import build_tiny_corpus  # noqa: E402


def _once_per_session(tmp_path_factory, name: str, build):
    """build(folder) -> a JSON-able value, computed by one worker of the session; the others read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            folder = root / name
            folder.mkdir(exist_ok=True)
            done.write_text(json.dumps(build(folder)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> tuple[str, str]:
    return tuple(_once_per_session(tmp_path_factory, "corpus", build_tiny_corpus))


@pytest.fixture(scope="session")
def reference_run(tiny_corpus, tmp_path_factory):
    """One 2-process run that the resume and two-node tests compare against: top-1 MoE-8 over EP=2, ZeRO 0,
    fp32, micro batch 2 x accumulation 2, 6 iterations, a checkpoint every 3. Returns (run dir, output).
    Tests read it and never write into it."""
    from train_helpers import flags, launch, run_dir, train_env

    def build(out: Path):
        proc = launch("run 2 gpt2bpe nano 8 0 2 1 none none 3", train_env(tiny_corpus, out, iters=6),
                      *flags(tiny_corpus, "--eval-interval", "3"))
        return [str(run_dir(out)), proc.stdout]

    run, stdout = _once_per_session(tmp_path_factory, "reference", build)
    return Path(run), stdout
