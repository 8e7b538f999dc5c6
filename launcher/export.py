"""Export a checkpoint as a Hugging Face model folder: `python -m launcher.export CHECKPOINT OUT_DIR`.

CHECKPOINT is a run folder, its checkpoints folder, or one checkpoint's tag folder, trained or fine-tuned at
any expert-parallel size. OUT_DIR gets:

    config.json              the model settings, auto_map, bos/eos/pad ids (<|endoftext|>)
    configuration_gpt_moe.py modeling_gpt_moe.py    the model's code (torch + transformers only)
    model.safetensors        every weight, every expert, in --dtype
    tokenizer.json tokenizer_config.json            (+ tokenization_gpt_moe.py for jiebabpe: jieba first)
    generation_config.json   stops at <|endoftext|>; samples as launcher.generate does by default

Safetensors, JSON and code only: nothing in the folder is unpickled when it loads. Use it with plain
transformers, where this toolkit is not installed:

    AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)
    AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from launcher.errors import UsageError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
# launcher.generate's sampling defaults, which the exported generation_config.json repeats.
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 40}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UsageError(message)


def parse_args(argv) -> argparse.Namespace:
    p = _Parser(prog="python -m launcher.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run folder, checkpoints folder or tag folder (iter_NNNNNNN)")
    p.add_argument("out_dir", help="the folder to write (must not exist, or be empty; see --overwrite)")
    p.add_argument("--dtype", default="float32", help="weights in float32 (default, as trained: exact), "
                   "bfloat16 or float16")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds something")
    args = p.parse_args(argv)
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype: got {args.dtype!r}; allowed: float32 | bfloat16 | float16")
    args.dtype = DTYPES[args.dtype]
    return args


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT_DIR: {out} is a file; allowed: a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"OUT_DIR: {out} is not empty; allowed: a new or empty folder, or --overwrite")
    parent = out.resolve().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"OUT_DIR: cannot write under {existing}")


def write_folder(model, tokenizer, folder: Path, dtype: str) -> None:
    """The Hugging Face folder of `model` (a GPTMoE, every expert local) and its `tokenizer`."""
    import torch
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    from model.hf import GPTMoEForCausalLM

    hf_logging.disable_progress_bar()  # a bar per file written, for a few files

    ids = {"bos_token_id": tokenizer.eod_id, "eos_token_id": tokenizer.eod_id, "pad_token_id": tokenizer.pad_id}
    hf = GPTMoEForCausalLM.from_gpt_moe(model, **ids).to(getattr(torch, dtype))
    hf.save_pretrained(str(folder))  # config.json (auto_map, token ids), model.safetensors, the model's code
    tokenizer.save_hf(folder, model_max_length=model.config.seq_len)
    # No max_length: transformers then generates 20 new tokens unless told (capped at the position table), and
    # warns on no call that passes max_new_tokens.
    GenerationConfig(**ids, **SAMPLING).save_pretrained(str(folder))
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():  # safetensors writes its file private (0600); the folder is for sharing
        path.chmod(0o666 & ~umask)


def check_folder(model, folder: Path) -> float:
    """Max |logit difference| between `model` and the folder loaded by its own (exported) code, in fp32."""
    import torch

    from model.standalone.modeling_gpt_moe import GPTMoEForCausalLM

    exported = GPTMoEForCausalLM.from_pretrained(str(folder)).float().eval()
    n = min(16, model.config.seq_len)
    ids = (torch.arange(n) * 7919 % model.config.vocab_size)[None]  # any tokens: the weights are compared
    with torch.no_grad():
        return float((exported(ids).logits - model(ids).logits).abs().max())


def export(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write the folder; returns what was exported. Nothing appears under out_dir unless all of it is written."""
    from launcher.training.checkpoint import load_for_inference

    out = Path(out_dir)
    check_out_dir(out, overwrite)
    model, tokenizer, tag_dir = load_for_inference(checkpoint)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.resolve().with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.resolve().with_name(f".{out.name}.old-{os.getpid()}")
    try:
        write_folder(model, tokenizer, tmp, dtype)
        diff = check_folder(model, tmp)
        if dtype == "float32" and diff > 1e-3:
            raise RuntimeError(f"the exported model's logits differ from the checkpoint's by {diff:.3g}")
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old.exists():
                os.replace(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    size = (out / "model.safetensors").stat().st_size
    return {"checkpoint": str(tag_dir), "out_dir": str(out), "dtype": dtype, "tokenizer": tokenizer.kind,
            "bytes": size, "max_logit_diff": diff}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # spares DeepSpeed's "no GPU found" warning
        info = export(args.checkpoint, args.out_dir, args.dtype, args.overwrite)
    except (UsageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {info['checkpoint']} -> {info['out_dir']} ({info['dtype']}, {info['bytes'] / 2**20:.1f} MiB, "
          f"{info['tokenizer']} tokenizer; max |logit difference| {info['max_logit_diff']:.2g})")
    print(f"use: AutoModelForCausalLM.from_pretrained({str(info['out_dir'])!r}, trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
