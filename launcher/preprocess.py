"""Tokenize text into an mmap indexed dataset (PREFIX.bin/.idx) for pretraining.

    python -m launcher.preprocess --input corpus/ more.jsonl --output-prefix data/mine \\
        --tokenizer-type jiebabpe --vocab-size 32000          # trains data/tokenizer first
    python -m launcher.preprocess --input wiki.jsonl --json-key text --output-prefix data/wiki \\
        --tokenizer gpt2/vocab.json                           # GPT-2's vocab.json + merges.txt
    python -m launcher.preprocess --stdlib --output-dir data  # the embedded default corpus

Megatron-style spellings are accepted too (--vocab-file, --merge-file, --json-keys,
--tokenizer-type GPT2BPETokenizer, --dataset-impl mmap). Bad input: `error: ...` on stderr,
exit code 2, nothing written.
"""
import argparse
import shlex
import sys

from launcher.errors import UsageError

_TYPE_ALIASES = {"GPT2BPETokenizer": "gpt2bpe", "JiebaBPETokenizer": "jiebabpe"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m launcher.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", metavar="PATH", help="text files, folders of them, .jsonl or .tsv files")
    p.add_argument("--output-prefix", help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    p.add_argument("--tokenizer-type", help="gpt2bpe or jiebabpe (default: the saved tokenizer's, else gpt2bpe)")
    p.add_argument("--tokenizer", "--vocab-file", "--vocab", dest="tokenizer", metavar="PATH",
                   help="existing tokenizer: a folder with tokenizer.json, or GPT-2's vocab.json (merges.txt beside it)")
    p.add_argument("--merge-file", help="GPT-2 merges.txt, where it is not beside vocab.json")
    p.add_argument("--vocab-size", type=int, help="train a new tokenizer of this size into <output-prefix folder>/tokenizer")
    p.add_argument("--json-key", "--json-keys", dest="json_key", default="text", help="field of each jsonl line (default text)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="end every document with the end-of-document token (default on)")
    p.add_argument("--dataset-impl", default="mmap", help="only mmap (accepted for Megatron's scripts)")
    p.add_argument("--stdlib", action="store_true", help="build the embedded corpus (Python's stdlib) under --output-dir")
    p.add_argument("--output-dir", help="where --stdlib builds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _tokenizer_type(value: str | None) -> str | None:
    return _TYPE_ALIASES.get(value, value) if value is not None else None


def run(args: argparse.Namespace) -> None:
    kind = _tokenizer_type(args.tokenizer_type)
    if args.dataset_impl != "mmap":
        raise UsageError(f"--dataset-impl {args.dataset_impl!r}: only mmap is written")
    if args.stdlib:
        from launcher.data.stdlib_corpus import DEFAULT_VOCAB_SIZE, build_stdlib_corpus

        if args.output_dir is None:
            raise UsageError("--stdlib needs --output-dir")
        if args.input or args.output_prefix or args.tokenizer:
            raise UsageError("--stdlib builds its own input, prefix and tokenizer; drop --input/--output-prefix/--tokenizer")
        prefix, tokenizer_dir = build_stdlib_corpus(
            args.output_dir, kind or "gpt2bpe", args.vocab_size or DEFAULT_VOCAB_SIZE, args.workers,
            progress=not args.quiet)
        # Shell-friendly, so a script can `eval` them.
        print(f"DATA_PATH={shlex.quote(prefix)}")
        print(f"TOKENIZER_DIR={shlex.quote(tokenizer_dir)}")
        return

    from launcher.data.pipeline import preprocess

    if not args.input:
        raise UsageError("--input is required (or --stdlib)")
    if not args.output_prefix:
        raise UsageError("--output-prefix is required")
    tokenizer = args.tokenizer
    if args.merge_file is not None:
        if tokenizer is None:
            raise UsageError("--merge-file needs --vocab-file")
        tokenizer = (tokenizer, args.merge_file)
    result = preprocess(args.input, args.output_prefix, tokenizer_kind=kind, tokenizer_path=tokenizer,
                        vocab_size=args.vocab_size, json_key=args.json_key, workers=args.workers,
                        append_eod=args.append_eod, progress=not args.quiet)
    print(result.summary())
    print(f"tokenizer: {result.tokenizer_dir}")


def main(argv=None) -> int:
    from launcher.training.signals import StartupStopped, StopRequest

    # Ctrl-C and SIGTERM alike: stop, remove what was half written (temporaries), say so in one line.
    with StopRequest(startup=True):
        try:
            run(build_parser().parse_args(argv))
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except StartupStopped as stop:
            print(f"error: {stop}: stopped; nothing was written", file=sys.stderr)
            return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
