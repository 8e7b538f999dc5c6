"""Per-process pretraining entry point: `python -m launcher.pretrain --run-config RUN_DIR/run_config.json`.

`python -m launcher run ...` (the positional script) writes the run config and the DeepSpeed JSON beside it,
then starts this on every process with the distributed variables set.
"""
from __future__ import annotations

import os
import sys

# Only what the first lines of main() need: the stop handler goes in before torch is imported.
from launcher.job import LEADER_ENV, clear_stale_build_locks_while, join_job
from launcher.training.signals import StartupStopped, StopRequest


def main(argv: list[str] | None = None) -> int:
    """Train what the run config describes; does not return: the process exits with the run's exit code."""
    join_job()  # die with the launcher's job, whatever kills it
    alone = os.environ.get(LEADER_ENV) == str(os.getpid())  # the launcher exec'd this one process
    stop = StopRequest(startup=True, hint=alone)
    try:
        stop.install()  # a stop already pending (signals were blocked until now) is raised right here
        clear_stale_build_locks_while(lambda: stop.in_startup)  # DeepSpeed compiles its ops in start-up
        code = _pretrain(argv, stop)
    except StartupStopped as exc:
        # Nothing to save yet. One line per node.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"{exc}: stopped during start-up, before the first iteration; nothing was saved",
                  file=sys.stderr, flush=True)
        # Under torchrun the launcher reports the signal in its exit code; torchrun must not call it a failure.
        code = 128 + exc.signum if alone else 0
    # os._exit either way. Stopped in start-up: a half-built process group must not be waited on. Finished:
    # everything is written and closed and the ranks have left the process group together, but a
    # communication thread destroyed in the interpreter's teardown can still abort the process ("terminate
    # called without an active exception", SIGABRT), which torchrun reports as a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _pretrain(argv, stop) -> int:
    import argparse
    from pathlib import Path

    from launcher.config import RunConfig
    from launcher.errors import UsageError

    parser = argparse.ArgumentParser(prog="python -m launcher.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", required=True, type=Path, help="run_config.json written by the launcher")
    args = parser.parse_args(argv)
    try:
        cfg = RunConfig.read(args.run_config)
    except (OSError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from launcher.training.trainer import pretrain

    return pretrain(cfg, args.run_config.with_name("ds_config.json"), stop)


if __name__ == "__main__":
    sys.exit(main())
