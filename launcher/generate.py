"""Generate from a trained run: `python -m launcher.generate CHECKPOINT [--prompt TEXT | --input FILE] ...`.

CHECKPOINT is a run folder, its checkpoints folder, or one checkpoint's tag folder. The model is loaded into
this one process with every expert local, whatever the expert-parallel size it was trained with; routing is
deterministic and dropless at inference, so with --temperature 0 the output depends on the prompt only.

--prompt prints the prompt and its continuation. --input FILE (txt: a line each; tsv: first column; jsonl:
`prompt` or `text`) generates for every prompt, --batch-size at a time with the KV cache (a finished row's
place goes to the next prompt), and writes jsonl (prompt, generation, tokens, finish_reason) to --output or
stdout. Neither: --num-samples unconditional samples (each starts a new document). Prompt i samples with
seed --seed + i, so a prompt's text does not depend on the batch it ran in.

The decoding itself (per-row sampling settings, left-padded batches, requests joining a running batch,
streaming steps) is model.generation.Decoder.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from launcher.errors import UsageError

POSITIONAL = ("CHECKPOINT_PATH", "MODEL_SIZE", "MOE", "SP", "BATCH_SIZE", "SEQ_LEN", "TOP_K", "INPUT_SEQ_LEN",
              "OUTPUT_SEQ_LEN", "INPUT_FILE", "OUTPUT_FILE", "TIME")
USAGE = """\
usage: run_text_generation_gpt.sh CHECKPOINT_PATH MODEL_SIZE MOE SP BATCH_SIZE SEQ_LEN TOP_K INPUT_SEQ_LEN \
OUTPUT_SEQ_LEN INPUT_FILE OUTPUT_FILE TIME [--flag value ...]

  CHECKPOINT_PATH  run folder, checkpoints folder or tag folder (any expert-parallel size)
  MODEL_SIZE       the checkpoint's size (0.125B ... 13B, nano, tiny); checked against it
  MOE              none | expert count; checked against the checkpoint
  SP               1 (generation runs in one process)
  BATCH_SIZE       prompts decoded together, >= 1
  SEQ_LEN          positions for prompt + generation, at most the checkpoint's
  TOP_K            sample from the k likeliest tokens; 0 = off, 1 = greedy
  INPUT_SEQ_LEN    prompt tokens kept (the last ones), >= 1
  OUTPUT_SEQ_LEN   new tokens per prompt at most, >= 1
  INPUT_FILE       prompts (txt, tsv first column, jsonl prompt/text), or none for unconditional samples
  OUTPUT_FILE      jsonl written: prompt, generation, tokens, finish_reason
  TIME             none, or anything else to print latency and tokens/s

flags: any option of `python -m launcher.generate`, e.g. --temperature 0.7 --top-p 0.9 --seed 3
       --repetition-penalty 1.2 --stop "\\n" --num-samples 16 --threads 1 --device cuda"""


def _finite(name):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: got {text!r}; allowed: a number") from None
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints its usage first; one line is enough
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m launcher.generate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run folder, checkpoints folder or tag folder (iter_NNNNNNN)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="one text to continue")
    src.add_argument("--input", default=None, help="prompts file: .txt (a line each), .tsv (first column), "
                                                   ".jsonl (prompt or text)")
    p.add_argument("--output", default=None, help="jsonl to write (atomically); default stdout")
    p.add_argument("--num-samples", type=int, default=1, help="unconditional samples when no prompt is given")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longer prompts keep their last tokens (default: as many as leave room for one new)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="positions for prompt + generation (default and most: the model's)")
    p.add_argument("--temperature", type=_finite("--temperature"), default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 = off; 1 = greedy")
    p.add_argument("--top-p", type=_finite("--top-p"), default=1.0, help="nucleus mass; 0 or 1 = off")
    p.add_argument("--repetition-penalty", type=_finite("--repetition-penalty"), default=1.0, help="1 = off")
    p.add_argument("--stop", action="append", default=[],
                   help="stop when the generation contains this string (repeatable; \\n and \\t understood)")
    p.add_argument("--no-stop-at-eod", dest="stop_at_eod", action="store_false",
                   help="keep going past the end-of-document token")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on a GPU that supports it, else fp32")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: OMP_NUM_THREADS, else the cores not busy with other work)")
    p.add_argument("--time", action="store_true", help="print latency and tokens/s to stderr")
    p.add_argument("--model-size", default=None, help="refuse a checkpoint of another size")
    p.add_argument("--moe", default=None, help="refuse a checkpoint with another expert count (none = dense)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "num_samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: an integer >= 1")
    for name in ("max_prompt_tokens", "seq_len", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: an integer >= 1")
    if args.top_p == 0:
        args.top_p = 1.0  # Megatron's and the tutorial's "off"
    args.stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    return args


def sampling_params(args):
    """SamplingParams of prompt 0 (others differ by seed only); UsageError naming the flag."""
    from model.generation import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              stop_strings=tuple(args.stop), seed=args.seed)
    except ValueError as err:
        name, rest = str(err).split(":", 1)
        raise UsageError(f"--{name.replace('_', '-')}:{rest}") from None


def from_positional(argv: list[str]) -> list[str]:
    """The tutorial's 12 positional arguments (+ --flag value overrides) -> this module's flags."""
    given = next((i for i, a in enumerate(argv) if a.startswith("--")), len(argv))
    if given < len(POSITIONAL):
        raise UsageError(f"{len(POSITIONAL)} positional arguments needed ({' '.join(POSITIONAL)}), got {given}")
    a = dict(zip(POSITIONAL, argv))
    for name in ("BATCH_SIZE", "SEQ_LEN", "INPUT_SEQ_LEN", "OUTPUT_SEQ_LEN"):
        if not a[name].isdigit() or int(a[name]) < 1:
            raise UsageError(f"{name}: got {a[name]!r}; allowed: an integer >= 1")
    if not a["TOP_K"].isdigit():
        raise UsageError(f"TOP_K: got {a['TOP_K']!r}; allowed: an integer >= 0 (0 = off, 1 = greedy)")
    if a["SP"] != "1":
        raise UsageError(f"SP: got {a['SP']!r}; allowed: 1 (generation runs in one process, all experts local)")
    out = [a["CHECKPOINT_PATH"], "--model-size", a["MODEL_SIZE"], "--moe", a["MOE"],
           "--batch-size", a["BATCH_SIZE"], "--seq-len", a["SEQ_LEN"], "--top-k", a["TOP_K"],
           "--max-prompt-tokens", a["INPUT_SEQ_LEN"], "--max-new-tokens", a["OUTPUT_SEQ_LEN"],
           "--output", a["OUTPUT_FILE"],
           # The tutorial's defaults: temperature 1, top-p off; flags after the 12th argument override them.
           "--temperature", "1.0", "--top-p", "0"]
    if a["INPUT_FILE"].lower() != "none":
        out += ["--input", a["INPUT_FILE"]]
    else:
        out += ["--num-samples", a["BATCH_SIZE"]]
    if a["TIME"].lower() != "none":
        out.append("--time")
    return out + argv[len(POSITIONAL):]


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["--positional"]:
            if len(argv) == 1 or argv[1] in ("-h", "--help"):
                print(USAGE)
                return 0 if len(argv) > 1 else 2
            argv = from_positional(argv[1:])
        args = parse_args(argv)
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    from launcher.inference import check_model_matches, load_checkpoint, resolve_device, resolve_dtype, set_threads

    device = resolve_device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before model/ imports DeepSpeed: spares its warning
    args.params = sampling_params(args)
    from launcher.data.prompts import completions_jsonl, read_prompts, write_completions

    texts = read_prompts(args.input) if args.input else None
    if args.output is not None and os.path.isdir(args.output):
        raise UsageError(f"--output: {args.output} is a folder; allowed: a file path")
    threads_line = set_threads(args.threads) if device.type == "cpu" else f"# device: {device}"
    dtype = resolve_dtype(args.dtype, device)

    def expect(mcfg):  # checked before any weight is read
        check_model_matches(mcfg, args.model_size, args.moe)
        if args.seq_len is not None and args.seq_len > mcfg.seq_len:
            raise UsageError(f"SEQ_LEN (--seq-len): got {args.seq_len}; the checkpoint's model has "
                             f"{mcfg.seq_len} positions")

    model, tokenizer, tag_dir = load_checkpoint(args.checkpoint, device, dtype, expect=expect)
    _log(threads_line)  # once the checkpoint loaded: a refusal stays one line
    _log(f"# {tag_dir}")
    seq_len = args.seq_len or model.config.seq_len

    if texts is None:
        texts = [args.prompt] if args.prompt is not None else [""] * args.num_samples
    prompts = [tokenizer.encode(t) if t else [tokenizer.eod_id] for t in texts]  # "": a new document
    prompts, notes = fit_prompts(prompts, args.max_prompt_tokens, args.max_new_tokens, seq_len)
    for note in notes:
        _log(note)

    start = time.perf_counter()
    completions, timing = generate_all(model, tokenizer, prompts, args)
    elapsed = time.perf_counter() - start
    records = [{"prompt": text, "generation": c.text(tokenizer.decode), "tokens": len(c.token_ids),
                "finish_reason": c.finish_reason} for text, c in zip(texts, completions)]
    if args.time:
        _log(timing_line(timing, elapsed, sum(r["tokens"] for r in records)))
    if args.output is not None:
        write_completions(records, args.output)
        _log(f"# wrote {len(records)} generations to {args.output}")
    elif args.prompt is not None:
        print(args.prompt + records[0]["generation"])
    else:
        sys.stdout.write(completions_jsonl(records))
    return 0


def fit_prompts(prompts: list[list[int]], max_prompt_tokens: int | None, max_new_tokens: int,
                seq_len: int) -> tuple[list[tuple[list[int], int]], list[str]]:
    """[(prompt ids, new-token budget)] within the position table, and one line for each kind of cut."""
    keep = min(max_prompt_tokens or seq_len - 1, seq_len - 1)
    out, cut_prompts, cut_budget, shortest = [], 0, 0, max_new_tokens
    for ids in prompts:
        if len(ids) > keep:
            ids, cut_prompts = ids[-keep:], cut_prompts + 1
        budget = min(max_new_tokens, seq_len - len(ids))
        if budget < max_new_tokens:
            cut_budget, shortest = cut_budget + 1, min(shortest, budget)
        out.append((ids, budget))
    notes = []
    if cut_prompts:
        notes.append(f"# {cut_prompts} of {len(prompts)} prompts longer than {keep} tokens keep their last {keep}")
    if cut_budget:
        notes.append(f"# --max-new-tokens {max_new_tokens} cut to as few as {shortest} for {cut_budget} of "
                     f"{len(prompts)} prompts: prompt + generation must fit the model's {seq_len} positions")
    return out, notes


def generate_all(model, tokenizer, prompts: list[tuple[list[int], int]], args):
    """Completions in prompt order, decoding --batch-size prompts at a time; a finished prompt's place goes
    to the next one at once. Also {key: (first token time, done time)} for the timing line."""
    from dataclasses import replace

    from model.generation import Decoder, Request

    stop_ids = (tokenizer.eod_id,) if args.stop_at_eod else ()
    decoder = Decoder(model, decode=tokenizer.decode, pad_id=tokenizer.pad_id)
    done, timing, queued = {}, {}, 0
    while queued < len(prompts) or decoder.has_work():
        while queued < len(prompts) and len(decoder.rows) + len(decoder.pending) < args.batch_size:
            ids, budget = prompts[queued]
            params = replace(args.params, max_new_tokens=budget, seed=args.seed + queued, stop_token_ids=stop_ids)
            decoder.add(Request(ids, params, key=queued))
            timing[queued] = [time.perf_counter(), None, None]  # queued, first token, last token
            queued += 1
        updates = decoder.step()
        now = time.perf_counter()
        for update in updates:
            t = timing[update.key]
            t[1] = t[1] or now
            t[2] = now
        for c in decoder.results():
            done[c.key] = c
    return [done[i] for i in range(len(prompts))], timing


def timing_line(timing: dict, elapsed: float, new_tokens: int) -> str:
    """Throughput over the whole run; latency per prompt from its admission to its last (first) token."""
    latency = sorted(last - queued for queued, _, last in timing.values())
    first = sorted(first - queued for queued, first, _ in timing.values())
    mid = len(latency) // 2
    return (f"# time: {elapsed:.2f} s for {len(timing)} prompts, {new_tokens} new tokens, "
            f"{new_tokens / elapsed:.1f} tokens/s; latency per prompt median {latency[mid]:.3f} s, "
            f"max {latency[-1]:.3f} s; first token median {first[mid]:.3f} s")


if __name__ == "__main__":
    sys.exit(main())
