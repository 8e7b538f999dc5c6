"""Write the project's zero-shot task files: `python -m launcher.make_tasks [--output-dir data/tasks]`.

Two jsonl tasks from the held-out part of the embedded stdlib corpus (see launcher/evaluation/stdlib_tasks.py),
with lm-eval YAML configs beside them. Deterministic; an up-to-date set is reused.
"""
from __future__ import annotations

import argparse
import sys

from launcher.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def main(argv: list[str] | None = None) -> int:
    from launcher.evaluation.stdlib_tasks import DEFAULT_EXAMPLES, DEFAULT_SPLIT, write_stdlib_tasks

    p = _Parser(prog="python -m launcher.make_tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="data/tasks", help="default data/tasks")
    p.add_argument("--split", default=DEFAULT_SPLIT, help=f"the corpus split whose validation part is used "
                                                          f"(default {DEFAULT_SPLIT})")
    p.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, help="per task, at most")
    p.add_argument("--force", action="store_true", help="rewrite even an up-to-date set")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        if args.examples < 1:
            raise UsageError(f"--examples: got {args.examples}; allowed: an integer >= 1")
        paths = write_stdlib_tasks(args.output_dir, args.split, args.examples, args.force)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        count = sum(1 for line in path.read_text().splitlines() if line.strip())
        print(f"{name}: {count} examples in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
