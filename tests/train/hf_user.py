"""A Hugging Face user of an exported folder: torch, transformers and jieba installed, this toolkit and
DeepSpeed not.

`run_as_hf_user(folder, prompts, max_new_tokens, workdir)` runs this file in a fresh interpreter started with
`-I -S` (no PYTHONPATH, no site processing: the toolkit's editable install is never seen) in `workdir`,
outside the repository, offline, with a site-packages folder of links to every installed package except
DeepSpeed and this toolkit. There it loads the folder with `trust_remote_code=True` and returns, as a dict:
which imports failed, the classes loaded, each prompt's token ids, and each prompt's greedy continuation
through `pipeline("text-generation")` and through one left-padded `generate` batch.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

HIDDEN = ("deepspeed", "gptmoe_toolkit", "__editable__", "model", "launcher")


def user_site(workdir: Path) -> Path:
    """Links to everything in this interpreter's site-packages but DeepSpeed and this toolkit."""
    site = workdir / "site-packages"
    if not site.is_dir():
        site.mkdir(parents=True)
        for folder in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
            for entry in Path(folder).iterdir():
                if not entry.name.lower().startswith(HIDDEN) and not entry.name.endswith(".pth") \
                        and not (site / entry.name).exists():
                    (site / entry.name).symlink_to(entry)
    return site


def run_as_hf_user(folder, prompts: list[str], max_new_tokens: int, workdir: Path) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir), "HF_HOME": str(workdir / "hf"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-I", "-S", str(Path(__file__).resolve()), str(user_site(workdir)),
                           str(folder), json.dumps(prompts), str(max_new_tokens)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"the Hugging Face user's process failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _as_user(site: str, folder: str, prompts: list[str], max_new: int) -> dict:
    sys.path.append(site)
    result = {}
    for name in ("model", "launcher", "deepspeed"):
        try:
            __import__(name)
            result[f"import {name}"] = "ok"
        except ImportError as exc:
            result[f"import {name}"] = type(exc).__name__

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    result["classes"] = [type(model).__module__.split(".")[-1] + "." + type(model).__name__,
                         type(tokenizer).__name__]
    result["ids"] = [tokenizer(p)["input_ids"] for p in prompts]

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    result["pipeline"] = [out[0]["generated_text"] for out in
                          generator(prompts, max_new_tokens=max_new, do_sample=False)]

    tokenizer.padding_side = "left"  # one batch: each row must continue as its prompt does alone
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new, do_sample=False)
    new = out[:, batch["input_ids"].shape[1]:]
    result["generate"] = [p + tokenizer.decode(row, skip_special_tokens=True) for p, row in zip(prompts, new)]
    return result


if __name__ == "__main__":
    site_dir, folder_dir, prompt_list, new_tokens = sys.argv[1:5]
    print(json.dumps(_as_user(site_dir, folder_dir, json.loads(prompt_list), int(new_tokens)), ensure_ascii=False))
