"""Preprocessing throughput: MB/s and tokens/s of the tokenizing pass, per tokenizer and worker count.

    .venv/bin/python benchmarks/preprocess.py                      # stdlib corpus + generated Chinese, 1 and 2 workers
    .venv/bin/python benchmarks/preprocess.py --cases zh --zh ../shared/data/zh-poetry/songci.jsonl \\
        ../shared/data/zh-poetry/yuanqu.jsonl                      # jiebabpe on real Chinese: rjieba vs plain jieba
    .venv/bin/python benchmarks/preprocess.py --input my_corpus/ --workers 1 2 4

Case `stdlib` (or `--input`): each tokenizer is trained once on the corpus first (timed apart); the
timed pass then reads the files, tokenizes and writes PREFIX.bin/.idx, as `python -m launcher.preprocess`
does. Case `zh`: jiebabpe on Chinese text (`--zh` files, or text generated here from jieba's dictionary),
once with each segmenter (JIEBABPE_SEGMENTER=jieba, the plain jieba reference, and rjieba): training
time, MB/s of wall time and per core (MB per CPU-second of the main process and its workers), the
speed-up of rjieba over jieba, and whether both wrote byte-identical data and tokenizers.
The last line printed is one JSON object with every figure.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.data import jieba_split  # noqa: E402
from launcher.data.pipeline import default_workers, preprocess, train_on_documents  # noqa: E402
from launcher.data.sources import expand_inputs, iter_documents  # noqa: E402
from launcher.data.stdlib_corpus import stdlib_files  # noqa: E402
from launcher.data.tokenizer import TOKENIZER_TYPES  # noqa: E402

SEGMENTERS = ("jieba", "rjieba")  # the reference first: the others are compared with it


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers: unlike wall time, barely moved by other load."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def _load() -> float | None:
    # Other processes on the machine slow every wall-time figure: the load says how much.
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _timed_pass(files, prefix, tokenizer_dir, json_key, workers, repeat):
    """The best of `repeat` preprocessing passes: (result, its CPU seconds)."""
    best, best_cpu = None, None
    for _ in range(repeat):
        jieba_split.reset()  # each pass loads its dictionary and starts with empty memos
        cpu_before = _cpu_seconds()
        result = preprocess(files, prefix, tokenizer_path=tokenizer_dir, json_key=json_key, workers=workers,
                            progress=False)
        cpu = _cpu_seconds() - cpu_before
        if best is None or result.seconds < best.seconds:
            best, best_cpu = result, cpu
    return best, best_cpu


def generated_chinese(path: Path, megabytes: float, seed: int = 0) -> None:
    """A jsonl of short documents: jieba dictionary words (common ones mostly), free-standing characters
    (for jieba's HMM), a few rare ones, Chinese punctuation and line breaks; seeded."""
    import jieba

    rng = random.Random(seed)
    lines = Path(jieba.__file__).with_name("dict.txt").read_text("utf-8").splitlines()
    entries = sorted((line.split(" ")[:2] for line in lines), key=lambda e: -int(e[1]))
    common, rest = [w for w, _ in entries[:5000]], [w for w, _ in entries[5000:]]
    chars = [w for w in common if len(w) == 1]
    rare = [chr(rng.randint(0x3400, 0x4DBF)) for _ in range(30)]
    punctuation = list("，，，。。、；？！\n") + ["“", "”", "。\n"]
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            parts = []
            for _ in range(rng.randint(20, 200)):
                r = rng.random()
                parts.append(rng.choice(common) if r < 0.45 else rng.choice(rest) if r < 0.55
                             else rng.choice(chars) if r < 0.82 else rng.choice(rare) if r < 0.83
                             else rng.choice(punctuation))
            line = json.dumps({"text": "".join(parts)}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))


def stdlib_case(args, tmp) -> dict:
    files = expand_inputs(args.input) if args.input else stdlib_files()
    corpus_bytes = sum(f.stat().st_size for f in files)
    report = {"corpus": "stdlib" if not args.input else [str(p) for p in args.input], "files": len(files),
              "file_mb": round(corpus_bytes / 1e6, 2), "load_avg_1min": _load(), "train_seconds": {}, "results": []}
    print(f"corpus: {report['corpus']}, {len(files)} files, {corpus_bytes / 1e6:.1f} MB; "
          f"load average {report['load_avg_1min']}")
    for kind in args.tokenizers:
        start = time.perf_counter()
        tokenizer = train_on_documents(kind, iter_documents(files, args.json_key), args.vocab_size, max(args.workers))
        report["train_seconds"][kind] = round(time.perf_counter() - start, 2)
        tokenizer.save(os.path.join(tmp, kind))
        print(f"{kind}: tokenizer of {tokenizer.vocab_size} trained in {report['train_seconds'][kind]:.1f} s")
        for workers in args.workers:
            best, cpu = _timed_pass(files, os.path.join(tmp, f"{kind}-{workers}"), os.path.join(tmp, kind),
                                    args.json_key, workers, args.repeat)
            row = {"tokenizer": kind, "workers": workers, "mb_per_s": round(best.mb_per_s, 2),
                   "tokens_per_s": round(best.tokens_per_s), "seconds": round(best.seconds, 2),
                   "cpu_seconds": round(cpu, 2), "tokens": best.tokens, "text_mb": round(best.text_bytes / 1e6, 2)}
            report["results"].append(row)
            print(f"  {workers} worker{'s' if workers > 1 else ' '}: {row['mb_per_s']:6.2f} MB/s "
                  f"{row['tokens_per_s']:>11,} tokens/s  ({row['seconds']:.2f} s wall, "
                  f"{row['cpu_seconds']:.2f} s CPU, {row['tokens']:,} tokens)")
    return report


def _same_files(a: str, b: str) -> bool:
    return all(Path(a + ext).read_bytes() == Path(b + ext).read_bytes() for ext in (".bin", ".idx"))


def zh_case(args, tmp) -> dict:
    if args.zh:
        files = expand_inputs(args.zh)
    else:
        files = [Path(tmp) / "generated-zh.jsonl"]
        generated_chinese(files[0], args.zh_mb)
    segmenters = [s for s in SEGMENTERS if s == "jieba" or jieba_split.rjieba_available()]
    report = {"corpus": [str(p) for p in args.zh] if args.zh else f"generated ({args.zh_mb} MB)",
              "file_mb": round(sum(f.stat().st_size for f in files) / 1e6, 2), "vocab_size": args.zh_vocab_size,
              "load_avg_1min": _load(), "train_seconds": {}, "results": [], "speedup": {}}
    print(f"jiebabpe on Chinese: {report['corpus']}, {report['file_mb']} MB; load average {report['load_avg_1min']}")
    if segmenters == ["jieba"]:
        print("  rjieba is not installed (or not a verified version): only plain jieba is measured")
    saved = os.environ.get(jieba_split.ENV_VAR)
    try:
        for segmenter in segmenters:
            os.environ[jieba_split.ENV_VAR] = segmenter
            jieba_split.reset()
            start = time.perf_counter()
            tokenizer = train_on_documents("jiebabpe", iter_documents(files, args.json_key), args.zh_vocab_size,
                                           max(args.workers))
            report["train_seconds"][segmenter] = round(time.perf_counter() - start, 2)
            tokenizer.save(os.path.join(tmp, f"zh-tok-{segmenter}"))
            print(f"  {segmenter:>6}: tokenizer of {tokenizer.vocab_size} trained in "
                  f"{report['train_seconds'][segmenter]:.1f} s ({max(args.workers)} workers)")
        report["tokenizers_identical"] = len({(Path(tmp) / f"zh-tok-{s}" / "tokenizer.json").read_bytes()
                                              for s in segmenters}) == 1
        tokenizer_dir = os.path.join(tmp, "zh-tok-jieba")
        for workers in args.workers:
            for segmenter in segmenters:
                os.environ[jieba_split.ENV_VAR] = segmenter
                prefix = os.path.join(tmp, f"zh-{segmenter}-{workers}")
                best, cpu = _timed_pass(files, prefix, tokenizer_dir, args.json_key, workers, args.repeat)
                row = {"segmenter": segmenter, "workers": workers, "mb_per_s": round(best.mb_per_s, 3),
                       "mb_per_s_per_core": round(best.text_bytes / 1e6 / cpu, 3), "seconds": round(best.seconds, 2),
                       "cpu_seconds": round(cpu, 2), "tokens": best.tokens, "text_mb": round(best.text_bytes / 1e6, 2),
                       "identical_to_jieba": _same_files(prefix, os.path.join(tmp, f"zh-jieba-{workers}")),
                       "load_avg_1min": _load()}
                report["results"].append(row)
                print(f"  {segmenter:>6}, {workers} worker{'s' if workers > 1 else ' '}: {row['mb_per_s']:6.2f} MB/s, "
                      f"{row['mb_per_s_per_core']:6.2f} MB/s per core ({row['seconds']:.1f} s wall, "
                      f"{row['cpu_seconds']:.1f} s CPU; same data as jieba: {row['identical_to_jieba']}; "
                      f"load {row['load_avg_1min']})")
    finally:
        if saved is None:
            os.environ.pop(jieba_split.ENV_VAR, None)
        else:
            os.environ[jieba_split.ENV_VAR] = saved
    by = {(r["segmenter"], r["workers"]): r for r in report["results"]}
    for workers in args.workers:
        if ("rjieba", workers) in by:
            new, old = by["rjieba", workers], by["jieba", workers]
            report["speedup"][str(workers)] = {
                "per_core": round(new["mb_per_s_per_core"] / old["mb_per_s_per_core"], 2),
                "wall": round(new["mb_per_s"] / old["mb_per_s"], 2)}
            print(f"  rjieba / jieba, {workers} worker{'s' if workers > 1 else ''}: "
                  f"{report['speedup'][str(workers)]['per_core']:.1f}x per core, "
                  f"{report['speedup'][str(workers)]['wall']:.1f}x wall")
    if "jieba" in report["train_seconds"] and "rjieba" in report["train_seconds"]:
        report["speedup"]["train"] = round(report["train_seconds"]["jieba"] / report["train_seconds"]["rjieba"], 2)
    print(f"  training: {report['train_seconds']}, identical tokenizers: {report['tokenizers_identical']}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["stdlib", "zh"], choices=["stdlib", "zh"])
    parser.add_argument("--input", nargs="+", help="files/folders to use instead of the stdlib corpus")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--tokenizers", nargs="+", default=["gpt2bpe", "jiebabpe"], choices=TOKENIZER_TYPES)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--zh", nargs="+", metavar="PATH", help="Chinese files/folders for the zh case "
                        "(default: text generated from jieba's dictionary)")
    parser.add_argument("--zh-mb", type=float, default=3.0, help="size of the generated Chinese text")
    parser.add_argument("--zh-vocab-size", type=int, default=8000)
    parser.add_argument("--repeat", type=int, default=2, help="timed passes per setting; the best is kept")
    args = parser.parse_args()

    report = {"cores": default_workers(), "load_avg_1min": _load()}
    print(f"{report['cores']} cores, load average {report['load_avg_1min']}")
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        if "stdlib" in args.cases:
            report["stdlib"] = stdlib_case(args, tmp)
        if "zh" in args.cases:
            report["zh"] = zh_case(args, tmp)
    report["load_avg_1min_end"] = _load()
    print(json.dumps(report, ensure_ascii=False))


if __name__ == "__main__":
    main()
