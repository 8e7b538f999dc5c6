"""Starts and drives GPT-MoE runs: positional launcher, configs, data, entry points."""
import sys
from pathlib import Path

# `model` is a common module name: a user's own model.py beside the directory they launch from
# would shadow our `model` package under `python -m`. Put this checkout first on the path.
_ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path[:1] != [_ROOT]:
    sys.path.insert(0, _ROOT)
