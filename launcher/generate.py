"""Sample from a trained run: `python -m launcher.generate CHECKPOINT --prompt TEXT`.

CHECKPOINT is a run folder, its checkpoints folder, or one checkpoint's tag folder. The model is loaded into
this one process with every expert local, whatever the expert-parallel size it was trained with; routing is
deterministic and dropless at inference, so with --temperature 0 the output depends on the prompt only.
"""
from __future__ import annotations

import argparse
import os
import sys

from launcher.errors import UsageError


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m launcher.generate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run folder, checkpoints folder or tag folder (iter_NNNNNNN)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 = off")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: got {args.max_new_tokens}; allowed: an integer >= 1")
    if args.temperature < 0 or args.top_k < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        raise UsageError("--temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    return args


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                  top_p: float | None, seed: int, device: str = "cpu") -> str:
    """The continuation of `prompt` (without the prompt), stopping at the end-of-document token."""
    import torch

    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eod_id]
    room = model.config.seq_len - len(ids)
    if room < 1:
        raise UsageError(f"--prompt: {len(ids)} tokens leave no room in the model's seq_len={model.config.seq_len}")
    ids = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, min(max_new_tokens, room), temperature=temperature, top_k=top_k or None,
                         top_p=top_p, eos_id=tokenizer.eod_id, generator=generator)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t != tokenizer.eod_id]
    return tokenizer.decode(new)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # spares DeepSpeed's "no GPU found" warning
        from launcher.training.checkpoint import load_for_inference

        model, tokenizer, tag_dir = load_for_inference(args.checkpoint, args.device)
        print(f"# {tag_dir}", file=sys.stderr, flush=True)
        text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                             args.top_p, args.seed, args.device)
    except (UsageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
