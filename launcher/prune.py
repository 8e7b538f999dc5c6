"""Prune experts for inference: `python -m launcher.prune CHECKPOINT OUT_DIR --keep N`.

    python -m launcher.prune runs/mine runs/mine-keep4 --keep 4                # every MoE layer keeps 4
    python -m launcher.prune runs/mine runs/mine-pyramid --keep 8,4 --by probability
    python -m launcher.prune runs/mine runs/mine-keep2 --keep 2 --calibration my_domain.jsonl

Counts, on a calibration set (default: the run's own validation split), the tokens each expert of each MoE
layer is routed and the router probability it gets; keeps the N experts with the most; writes OUT_DIR as a
run folder whose checkpoint generate, evaluate, fine-tuning and export take and training resumes from. A layer
keeping one expert becomes a dense feed-forward layer. Prints, and writes into OUT_DIR/pruning.json, the
kept experts and their shares of tokens per layer, and the parameters, validation loss and perplexity before
and after. See launcher/pruning.py.
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
    p = _Parser(prog="python -m launcher.prune", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run folder, checkpoints folder or tag folder (iter_NNNNNNN), any EP size")
    p.add_argument("out_dir", help="the pruned run's folder (new, or empty); its name is the run's name")
    p.add_argument("--keep", required=True, metavar="N|N1,N2,...",
                   help="experts to keep in every MoE layer, or one count per MoE layer (1: a dense layer)")
    p.add_argument("--by", default="tokens", choices=("tokens", "probability"),
                   help="rank experts by routed tokens (default) or by router probability mass")
    p.add_argument("--calibration", nargs="+", metavar="PATH",
                   help="an indexed dataset prefix (its validation split) or text/jsonl files and folders "
                        "(default: the run's own validation split)")
    p.add_argument("--calibration-limit", type=int, metavar="N", help="at most N sequences (indexed) or documents")
    p.add_argument("--eval-data", nargs="+", metavar="PATH",
                   help="where the loss before and after is measured (default: the run's validation split, else "
                        "the calibration set); 'none' to skip")
    p.add_argument("--eval-limit", type=int, metavar="N", help="at most N sequences or documents for the loss")
    p.add_argument("--json-key", default="text", help="field of jsonl files (default text)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, all cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # pruning runs on the CPU; spares DeepSpeed's GPU probe
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads: got {args.threads}; allowed: an integer >= 1")
            import torch

            torch.set_num_threads(args.threads)
        from launcher.pruning import format_report, prune_checkpoint

        eval_data = [] if args.eval_data == [NONE] else args.eval_data
        report = prune_checkpoint(args.checkpoint, args.out_dir, args.keep, by=args.by, calibration=args.calibration,
                                  calibration_limit=args.calibration_limit, eval_data=eval_data,
                                  eval_limit=args.eval_limit, json_key=args.json_key, batch_size=args.batch_size,
                                  progress=sys.stderr.isatty())
    except (UsageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        return 130
    print(format_report(report))
    print(f"\nreport: {os.path.join(report['output'], 'pruning.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
