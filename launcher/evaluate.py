"""Evaluate a trained checkpoint: `python -m launcher.evaluate CHECKPOINT [--data ...] [--tasks ...]`.

    python -m launcher.evaluate runs/mine                      # the run's validation split (+ stdlib tasks)
    python -m launcher.evaluate runs/mine --data data/other_text_document --data-split test
    python -m launcher.evaluate runs/mine --data heldout.jsonl --tasks none
    python -m launcher.evaluate runs/mine --tasks stdlib my_task.jsonl --limit 200 --lm-eval

CHECKPOINT is a run folder, its checkpoints folder or one tag folder; it loads into this one process
whatever expert-parallel size wrote it. Results are merged into <tag folder>/evaluation.json (or --output)
and shown as a table. Metrics and task formats: launcher/evaluation/.
"""
from __future__ import annotations

import argparse
import os
import sys

from launcher.errors import UsageError

NONE = "none"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m launcher.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run folder, checkpoints folder or tag folder (iter_NNNNNNN)")
    p.add_argument("--data", nargs="+", action="append", metavar="PATH",
                   help="an indexed dataset prefix (PREFIX.bin/.idx), or text/jsonl files and folders; repeat for "
                        "several sources; 'none' for no data (default: the run's own data)")
    p.add_argument("--split", help="train,valid,test fractions for an indexed dataset (default: the run's)")
    p.add_argument("--data-split", default="valid", choices=("train", "valid", "test"),
                   help="which part of an indexed dataset (default valid)")
    p.add_argument("--json-key", default="text", help="field of jsonl data files (default text)")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="task .jsonl files, 'stdlib' (the project's own tasks) or 'none' (default: stdlib when "
                        "the run trained on the embedded corpus)")
    p.add_argument("--task-dir", default="data/tasks", help="where the stdlib tasks are written (default data/tasks)")
    p.add_argument("--limit", type=int, help="at most this many sequences, documents or examples per entry")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, all cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lm-eval", action="store_true", help="also run the tasks through lm-evaluation-harness")
    p.add_argument("--lm-eval-include", metavar="DIR", help="an lm-eval task folder (YAML configs, local data)")
    p.add_argument("--lm-eval-tasks", nargs="+", default=(), metavar="NAME", help="tasks of --lm-eval-include")
    p.add_argument("--output", help="results JSON (default: evaluation.json in the checkpoint's tag folder)")
    return p


def _sources(values):
    if values is None:
        return None
    flat = [v for group in values for v in group]
    return [] if flat == [NONE] else values


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        from launcher.inference import resolve_device

        resolve_device(args.device)  # an unknown or absent device: one line, before the checkpoint is read
        if args.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # spares DeepSpeed's "no GPU found" warning
        from launcher.evaluation import evaluate_checkpoint
        from launcher.evaluation.report import format_results

        tasks = None if args.tasks is None else [] if args.tasks == [NONE] else args.tasks
        results = evaluate_checkpoint(
            args.checkpoint, _sources(args.data), tasks, split=args.split, output=args.output, device=args.device,
            threads=args.threads, data_split=args.data_split, json_key=args.json_key, limit=args.limit,
            batch_size=args.batch_size, task_dir=args.task_dir, lm_eval=args.lm_eval,
            lm_eval_include=args.lm_eval_include, lm_eval_tasks=args.lm_eval_tasks, progress=sys.stderr.isatty())
    except (UsageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no results written", file=sys.stderr)
        return 130
    print(format_results(results))
    print(f"\nresults: {results['results_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
