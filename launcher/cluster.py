"""Where this run's processes live, and the command that starts them.

Sources, first match wins: a DeepSpeed hostfile (`--hostfile`), SLURM (`SLURM_NNODES`, `SLURM_NODEID`,
`SLURM_JOB_NODELIST`), PAI DLC (`WORLD_SIZE` = nodes, `RANK` = node rank, `MASTER_ADDR`, `MASTER_PORT`),
else one node on localhost.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import UsageError

if TYPE_CHECKING:
    from launcher.config import RunConfig

DEFAULT_PORT = 29500


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int:
    text = env[name].strip()
    if not text.isdigit() or int(text) < minimum:
        raise UsageError(f"{name}: got {text!r}; allowed: an integer >= {minimum}")
    return int(text)


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """DeepSpeed hostfile lines `host slots=N` (comments and blank lines ignored)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--hostfile: {path} does not exist")
    hosts = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m or int(m.group(2)) < 1:
            raise UsageError(f"--hostfile: {path}:{n}: got {line!r}; allowed: 'HOST slots=N'")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise UsageError(f"--hostfile: {path} lists no hosts")
    return hosts


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """`node[01-03,07],gpu5` -> [node01, node02, node03, node07, gpu5] (what `scontrol show hostnames` does)."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{width}d}")
    return hosts


def discover_cluster(env: Mapping[str, str], hostfile: str | None = None) -> dict:
    """RunConfig fields describing the nodes: num_nodes, node_rank, master_addr, master_port, hostfile."""
    port = _env_int(env, "MASTER_PORT", 1) if env.get("MASTER_PORT", "").strip() else DEFAULT_PORT
    if hostfile:
        hosts = read_hostfile(hostfile)
        # The deepspeed launcher starts every node from this one over ssh.
        return dict(num_nodes=len(hosts), node_rank=0, master_addr=env.get("MASTER_ADDR") or hosts[0][0],
                    master_port=port, hostfile=hostfile)
    if env.get("SLURM_NNODES", "").strip():
        nodes = _env_int(env, "SLURM_NNODES", 1)
        rank = _env_int(env, "SLURM_NODEID", 0) if env.get("SLURM_NODEID", "").strip() else 0
        names = expand_slurm_nodelist(env.get("SLURM_JOB_NODELIST", "") or env.get("SLURM_NODELIST", ""))
        addr = env.get("MASTER_ADDR") or (names[0] if names else "127.0.0.1")
        return dict(num_nodes=nodes, node_rank=rank, master_addr=addr, master_port=port)
    if env.get("WORLD_SIZE", "").strip():
        nodes = _env_int(env, "WORLD_SIZE", 1)
        rank = _env_int(env, "RANK", 0) if env.get("RANK", "").strip() else 0
        return dict(num_nodes=nodes, node_rank=rank, master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
                    master_port=port)
    return dict(num_nodes=1, node_rank=0, master_addr=env.get("MASTER_ADDR") or "127.0.0.1", master_port=port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now, for a run confined to this machine (tests, benchmarks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_threads_per_process(procs_per_node: int) -> int:
    """Cores split evenly: oversubscribed OpenMP threads make CPU ranks several times slower."""
    return max(1, (os.cpu_count() or 1) // procs_per_node)


def launch_command(cfg: RunConfig, entry_args: list[str], module: str = "launcher.pretrain") -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that start `python -m module *entry_args` on every process of this node."""
    env = {"MASTER_ADDR": cfg.master_addr, "MASTER_PORT": str(cfg.master_port),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(cpu_threads_per_process(cfg.gpus_per_node))}
    if cfg.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        # glibc returns big freed blocks (gradients, activations) to the OS and page-faults them back in every
        # step; keeping them in the heap made CPU training ~7% faster (tiny MoE-8, 2 processes).
        env["MALLOC_MMAP_MAX_"] = os.environ.get("MALLOC_MMAP_MAX_", "0")
        env["MALLOC_TRIM_THRESHOLD_"] = os.environ.get("MALLOC_TRIM_THRESHOLD_", str(16 * 1024**3))
    if cfg.hostfile:
        argv = ["deepspeed", "--hostfile", cfg.hostfile, "--num_gpus", str(cfg.gpus_per_node),
                "--master_addr", cfg.master_addr, "--master_port", str(cfg.master_port), "--module", module]
    elif cfg.world_size == 1:
        # One process: no launcher at all; the variables let deepspeed.init_distributed() skip MPI discovery.
        argv = [sys.executable, "-m", module]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    else:
        # On SIGTERM torchrun gives its workers this long to exit before killing them: long enough for the
        # checkpoint they save on the way out (its default, 30 s, is not for a large model).
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.gpus_per_node),
                "--nnodes", str(cfg.num_nodes), "--node_rank", str(cfg.node_rank),
                "--master_addr", cfg.master_addr, "--master_port", str(cfg.master_port), "-m", module]
    return argv + list(entry_args), env


def format_command(argv: list[str], env: dict[str, str]) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(a) for a in argv])


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return found


def run_torchrun(argv: list[str], env: dict[str, str]) -> int:
    """Run torchrun as a child and hand a SIGTERM to its workers rather than to torchrun.

    Preempted, the workers save a checkpoint and exit 0, so torchrun, and the job, exit 0; torchrun
    signalled itself would stop them the same way but then report the job as failed (exit 1). Ctrl-C
    (SIGINT) goes to torchrun and its workers as it would from a terminal.
    """
    proc = subprocess.Popen(argv, env=env, start_new_session=True)

    def forward(signum, _frame):
        targets = (_children(proc.pid) or [proc.pid]) if signum == signal.SIGTERM else [proc.pid]
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return proc.wait()
