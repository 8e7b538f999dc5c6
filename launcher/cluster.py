"""Where this run's processes live, and the command that starts them.

Sources, first match wins: a DeepSpeed hostfile (`--hostfile`), SLURM (`SLURM_NNODES`, `SLURM_NODEID`,
`SLURM_JOB_NODELIST`), PAI DLC (`WORLD_SIZE` = nodes, `RANK` = node rank, `MASTER_ADDR`, `MASTER_PORT`),
else one node on localhost.
"""
from __future__ import annotations

import os
import re
import shlex
import socket
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
        # launcher.job runs torch.distributed.run (torchrun) as a process that dies with the launcher.
        argv = [sys.executable, "-m", "launcher.job", "--nproc_per_node", str(cfg.gpus_per_node),
                "--nnodes", str(cfg.num_nodes), "--node_rank", str(cfg.node_rank),
                "--master_addr", cfg.master_addr, "--master_port", str(cfg.master_port), "-m", module]
    return argv + list(entry_args), env


def format_command(argv: list[str], env: dict[str, str]) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(a) for a in argv])


def rendezvous(cfg, timeout_s: float, say=print) -> None:
    """Roll call of the nodes (WORLD_SIZE > 1) before torchrun starts, on MASTER_ADDR:MASTER_PORT.

    Says whom it waits for, and gives up after `timeout_s` with UsageError naming the missing nodes (torchrun's
    own rendezvous waits silently). Node 0 serves a TCPStore on the port and closes it once every node has
    answered, so torchrun can bind it next.
    """
    import time
    from datetime import timedelta

    from torch.distributed import TCPStore

    n, rank, where = cfg.num_nodes, cfg.node_rank, f"{cfg.master_addr}:{cfg.master_port}"
    deadline = time.monotonic() + timeout_s
    give_up = f"gives up after {timeout_s:g} s: --rendezvous-timeout"

    def missing_line(missing: list[int]) -> str:
        return (f"rendezvous: nodes {', '.join(map(str, missing))} of {n} did not join {where} within "
                f"{timeout_s:g} s (--rendezvous-timeout); allowed: start the script on every node with WORLD_SIZE={n}, "
                f"RANK=0..{n - 1} and the same MASTER_ADDR/MASTER_PORT, or a longer --rendezvous-timeout")

    if rank == 0:
        store = TCPStore(cfg.master_addr, cfg.master_port, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=max(timeout_s, 1)))
    else:
        say(f"rendezvous: node {rank} of {n} ({socket.gethostname()}) waiting for node 0 at {where} ({give_up})",
            flush=True)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UsageError(missing_line([0]))
            try:
                store = TCPStore(cfg.master_addr, cfg.master_port, is_master=False,
                                 timeout=timedelta(seconds=min(5.0, max(left, 0.5))))
                break
            except RuntimeError:  # not up yet (DistNetworkError, DistStoreError)
                time.sleep(0.5)
    store.set(f"node/{rank}", socket.gethostname())
    keys = [f"node/{r}" for r in range(n)]
    told = 0.0
    while True:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        if not missing:
            break
        now = time.monotonic()
        if now >= deadline:
            raise UsageError(missing_line(missing))
        if rank == 0 and now - told >= 30:
            say(f"rendezvous: node 0 of {n} ({socket.gethostname()}) at {where} waiting for node(s) "
                f"{', '.join(map(str, missing))} ({give_up}; {deadline - now:.0f} s left)", flush=True)
            told = now
        time.sleep(0.2)
    store.set(f"ready/{rank}", "1")
    if rank == 0:  # every node has read the roll before the store (and the port) goes away
        end = time.monotonic() + 30
        while time.monotonic() < end and not store.check([f"ready/{r}" for r in range(n)]):
            time.sleep(0.1)
    del store
