"""Fixtures for training tests: a tiny corpus built once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_helpers, train_corpus (importlib import mode)

from train_corpus import build_tiny_corpus  # noqa: E402


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> tuple[str, str]:
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def reference_run(tiny_corpus, tmp_path_factory):
    """One 2-process run that the resume and two-node tests compare against: top-1 MoE-8 over EP=2, ZeRO 0,
    fp32, micro batch 2 x accumulation 2, 6 iterations, a checkpoint every 3. Returns (run dir, output)."""
    from train_helpers import flags, launch, run_dir, train_env

    out = tmp_path_factory.mktemp("reference")
    proc = launch("run 2 gpt2bpe nano 8 0 2 1 none none 3", train_env(tiny_corpus, out, iters=6),
                  *flags(tiny_corpus, "--eval-interval", "3"))
    return run_dir(out), proc.stdout
