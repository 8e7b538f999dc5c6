"""Greedy generation speed: our Decoder (model.generation) vs transformers' `generate` on the same weights
through GPTMoEForCausalLM, at batch 1 and batch 8, with the KV cache and without it.

    .venv/bin/python benchmarks/generate.py                  # tiny MoE-8 top-1, 32-token prompts, 200 new tokens
    .venv/bin/python benchmarks/generate.py --size nano --new-tokens 50 --repeats 1

"No cache" is, for ours, a plain greedy loop that runs GPTMoE.forward over the whole sequence each step, and for
transformers `generate(use_cache=False)`. Every run generates exactly --new-tokens tokens per row (no stop token);
the figure is new tokens (all rows) per second, the best of --repeats runs (ours and theirs alternate). Each pair is checked to produce the
same tokens. Prints the load average beside the figures; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from launcher.inference import set_threads  # noqa: E402
from model import GPTMoE, GPTMoEConfig, GPTMoEForCausalLM  # noqa: E402
from model.generation import Decoder, Request, SamplingParams  # noqa: E402


def ours(model, prompts, new_tokens, cache: bool):
    if not cache:
        ids = prompts
        with torch.no_grad():
            for _ in range(new_tokens):
                ids = torch.cat([ids, model(ids, logits_to_keep=1).logits[:, -1:].argmax(-1)], dim=1)
        return ids[:, prompts.shape[1]:]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    done = Decoder(model).run([Request(row, params) for row in prompts.tolist()])
    return torch.tensor([c.token_ids for c in done])


def theirs(hf, prompts, new_tokens, cache: bool):
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, use_cache=cache, eos_token_id=None,
                      pad_token_id=0)
    return out[:, prompts.shape[1]:]


def timed_pair(fn_a, fn_b, repeats):
    """Best time and output of each, run alternately so both see the same machine load."""
    best, outs = [float("inf"), float("inf")], [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((fn_a, fn_b)):
            start = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best, outs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--router", default="top1", help="top1 | expert_choice | top2")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    threads_line = set_threads(args.threads)
    seq_len = args.prompt_tokens + args.new_tokens
    cfg = GPTMoEConfig.from_size(args.size, vocab_size=args.vocab, seq_len=seq_len, num_experts=args.experts,
                                 router_type=args.router, init_std=0.3)  # context-dependent greedy output
    torch.manual_seed(0)
    model = GPTMoE(cfg).eval()
    hf = GPTMoEForCausalLM.from_gpt_moe(model).eval()
    print(f"{threads_line}; model {args.size} MoE-{args.experts} {args.router}, vocab {args.vocab}, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, best of {args.repeats}")

    theirs(hf, torch.zeros(1, 4, dtype=torch.long), 4, True)  # warm-up: first calls pay for lazy imports
    ours(model, torch.zeros(1, 4, dtype=torch.long), 4, True)
    results = {}
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = torch.randint(0, args.vocab, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(batch))
        for cache in (True, False):
            (t_ours, t_hf), (ids_ours, ids_hf) = timed_pair(lambda: ours(model, prompts, args.new_tokens, cache),
                                                            lambda: theirs(hf, prompts, args.new_tokens, cache),
                                                            args.repeats)
            tokens = batch * args.new_tokens
            key = f"b{batch}_{'cache' if cache else 'nocache'}"
            results[key] = {"ours_tok_s": round(tokens / t_ours, 1), "transformers_tok_s": round(tokens / t_hf, 1),
                            "ratio": round(t_hf / t_ours, 2), "same_tokens": bool(torch.equal(ids_ours, ids_hf))}
            r = results[key]
            print(f"batch {batch:2d} {'cache   ' if cache else 'no cache'}  ours {r['ours_tok_s']:8.1f} tok/s   "
                  f"transformers {r['transformers_tok_s']:8.1f} tok/s   ours/theirs speed {r['ratio']:.2f}x   "
                  f"same tokens {r['same_tokens']}   load {os.getloadavg()[0]:.2f}", flush=True)
    import transformers

    print(json.dumps({"benchmark": "generate", "model": f"{args.size}-moe{args.experts}-{args.router}",
                      "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                      "threads": torch.get_num_threads(), "transformers": transformers.__version__,
                      "torch": torch.__version__, "loadavg": [round(x, 2) for x in os.getloadavg()], **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
