"""Launching the positional script from training tests, and reading what a run wrote."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from launcher.cluster import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "megatron" / "dlc_run_pretrain_megatron_gpt.sh"
FINETUNE_SCRIPT = ROOT / "examples" / "megatron" / "run_finetune_text_generation_gpt.sh"

# Every launch: nano (2 layers, hidden 64), 32-token sequences, global batch 8 = 256 tokens per iteration.
SEQ = 32
GLOBAL_BATCH = 8
TOKENS_PER_ITER = SEQ * GLOBAL_BATCH


def train_env(corpus: tuple[str, str], out: Path, iters: int, **extra) -> dict:
    """Environment for a launch: the tiny corpus, a private output folder and port, one thread per process
    (2 processes on 2 cores), and the shared TORCH_EXTENSIONS_DIR (DeepSpeed's compiled ops build once)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOAD", "OFFLOAD",
                        "PRECISION", "EP_SIZE", "SEQ_LEN", "TRAIN_TOKENS", "WARMUP_TOKENS", "GLOBAL_BATCH_SIZE")}
    env.update(DATA_PATH=corpus[0], OUTPUT_BASEPATH=str(out), SEQ_LEN=str(SEQ), GLOBAL_BATCH_SIZE=str(GLOBAL_BATCH),
               TRAIN_TOKENS=str(iters * TOKENS_PER_ITER), WARMUP_TOKENS=str(TOKENS_PER_ITER),
               OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def flags(corpus, *more) -> list[str]:
    return ["--tokenizer-path", corpus[1], "--log-interval", "1", "--eval-iters", "2", *more]


def load_scaled(seconds: float) -> float:
    """A time limit for a launch, stretched by how oversubscribed the machine is (load average per core, up to
    8x): a busy machine makes the suite slower, not red, and a hung launch is still caught."""
    busy = os.getloadavg()[0] / (os.cpu_count() or 1)
    return seconds * min(8.0, max(1.0, busy))


def launch(positional: str, env: dict, *more: str, timeout: float = 240, check: bool = True, script: Path = SCRIPT):
    """Run the positional script; returns the CompletedProcess (stdout and stderr together)."""
    cmd = ["bash", str(script), *positional.split(), *more]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=load_scaled(timeout))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def run_dir(out: Path) -> Path:
    """The one run folder under an output folder (its name encodes the settings)."""
    dirs = [d for d in Path(out).iterdir() if (d / "run_config.json").is_file()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def metrics(run: Path, kind: str = "train") -> dict[int, dict]:
    """iteration -> record of that kind (the last one, if an iteration was logged twice)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == kind:
            out[record["iteration"]] = record
    return out


def run_config(corpus, out: Path, load: Path | None, positional: str, iters: int = 12, **env):
    """The RunConfig the launcher would resolve for `positional` (with the usual flags) and LOAD=load."""
    from launcher.cli import build_run_config

    environ = train_env(corpus, out, iters=iters, **env)
    if load is not None:
        environ["LOAD"] = str(load)
    return build_run_config(positional.split() + flags(corpus), environ)


class Payload:
    """Unpickled without restriction, it creates `marker`: what a planted checkpoint file would do with a shell."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)
