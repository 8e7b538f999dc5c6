"""Preprocessing throughput: MB/s and tokens/s of the tokenizing pass, per tokenizer and worker count.

    .venv/bin/python benchmarks/preprocess.py                      # the stdlib corpus, 1 and 2 workers
    .venv/bin/python benchmarks/preprocess.py --input ../shared/data/zh-poetry/songci.jsonl --workers 1 2 4

Each tokenizer is trained once on the corpus first (timed apart); the timed pass then reads
the files, tokenizes and writes PREFIX.bin/.idx, as `python -m launcher.preprocess` does.
The last line printed is one JSON object with every figure.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.data.pipeline import default_workers, preprocess, train_on_documents  # noqa: E402
from launcher.data.sources import expand_inputs, iter_documents  # noqa: E402
from launcher.data.stdlib_corpus import stdlib_files  # noqa: E402
from launcher.data.tokenizer import TOKENIZER_TYPES  # noqa: E402


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers: unlike wall time, barely moved by other load."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", help="files/folders to use instead of the stdlib corpus")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--tokenizers", nargs="+", default=["gpt2bpe", "jiebabpe"], choices=TOKENIZER_TYPES)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=2, help="timed passes per setting; the best is kept")
    args = parser.parse_args()

    files = expand_inputs(args.input) if args.input else stdlib_files()
    corpus_bytes = sum(f.stat().st_size for f in files)
    report = {"corpus": "stdlib" if not args.input else [str(p) for p in args.input], "files": len(files),
              "file_mb": round(corpus_bytes / 1e6, 2), "cores": default_workers(), "vocab_size": args.vocab_size,
              # Other processes on the machine slow every figure: the load when we started says how much.
              "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
              "train_seconds": {}, "results": []}
    print(f"corpus: {report['corpus']}, {len(files)} files, {corpus_bytes / 1e6:.1f} MB; {report['cores']} cores, "
          f"load average {report['load_avg_1min']}")
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        for kind in args.tokenizers:
            start = time.perf_counter()
            tokenizer = train_on_documents(kind, iter_documents(files, args.json_key), args.vocab_size,
                                           max(args.workers))
            report["train_seconds"][kind] = round(time.perf_counter() - start, 2)
            tokenizer.save(os.path.join(tmp, kind))
            print(f"{kind}: tokenizer of {tokenizer.vocab_size} trained in {report['train_seconds'][kind]:.1f} s")
            for workers in args.workers:
                best, best_cpu = None, None
                for _ in range(args.repeat):
                    cpu_before = _cpu_seconds()
                    result = preprocess(files, os.path.join(tmp, f"{kind}-{workers}"),
                                        tokenizer_path=os.path.join(tmp, kind), json_key=args.json_key,
                                        workers=workers, progress=False)
                    cpu = _cpu_seconds() - cpu_before
                    if best is None or result.seconds < best.seconds:
                        best, best_cpu = result, cpu
                row = {"tokenizer": kind, "workers": workers, "mb_per_s": round(best.mb_per_s, 2),
                       "tokens_per_s": round(best.tokens_per_s), "seconds": round(best.seconds, 2),
                       "cpu_seconds": round(best_cpu, 2), "tokens": best.tokens,
                       "text_mb": round(best.text_bytes / 1e6, 2)}
                report["results"].append(row)
                print(f"  {workers} worker{'s' if workers > 1 else ' '}: {row['mb_per_s']:6.2f} MB/s "
                      f"{row['tokens_per_s']:>11,} tokens/s  ({row['seconds']:.2f} s wall, "
                      f"{row['cpu_seconds']:.2f} s CPU, {row['tokens']:,} tokens)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
