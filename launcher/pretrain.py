"""Per-process pretraining entry point: `python -m launcher.pretrain --run-config RUN_DIR/run_config.json`.

`python -m launcher run ...` (the positional script) writes the run config and the DeepSpeed JSON beside it,
then starts this on every process with the distributed variables set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.config import RunConfig
from launcher.errors import UsageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", required=True, type=Path, help="run_config.json written by the launcher")
    args = parser.parse_args(argv)
    try:
        cfg = RunConfig.read(args.run_config)
    except (OSError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from launcher.training.trainer import pretrain

    return pretrain(cfg, args.run_config.with_name("ds_config.json"))


if __name__ == "__main__":
    sys.exit(main())
