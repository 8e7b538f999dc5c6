"""Node and process discovery, and the launch command for each kind of cluster."""
import sys

import pytest

from launcher.cli import build_run_config
from launcher.cluster import discover_cluster, expand_slurm_nodelist, launch_command, read_hostfile
from launcher.errors import UsageError

ARGS = "dryrun {gpus} gpt2bpe nano 8 0 1 1 none none 100"


def config(gpus, env, *flags):
    return build_run_config(ARGS.format(gpus=gpus).split() + list(flags), {"GLOBAL_BATCH_SIZE": "64", **env})


def test_single_process_runs_plain_python_with_distributed_env():
    cfg = config(1, {})
    assert (cfg.num_nodes, cfg.node_rank, cfg.world_size) == (1, 0, 1)
    argv, env = launch_command(cfg, ["--run-config", "x.json"])
    assert argv == [sys.executable, "-m", "launcher.pretrain", "--run-config", "x.json"]
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29500"


def test_one_node_several_processes_uses_torchrun(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    cfg = config(4, {})
    argv, env = launch_command(cfg, ["--run-config", "x.json"])
    assert argv[:3] == [sys.executable, "-m", "launcher.job"]  # torchrun, as a process that dies with the launcher
    assert argv[argv.index("--nproc_per_node") + 1] == "4" and argv[argv.index("--nnodes") + 1] == "1"
    assert argv[-4:] == ["-m", "launcher.pretrain", "--run-config", "x.json"]
    assert env["OMP_NUM_THREADS"] == "4"  # 16 cores / 4 processes
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= 300  # time to save a checkpoint on SIGTERM
    assert "RANK" not in env  # torchrun sets per-process ranks


def test_dlc_environment_counts_nodes():
    env = {"WORLD_SIZE": "4", "RANK": "3", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "23456"}
    cfg = config(8, env)
    assert (cfg.num_nodes, cfg.node_rank, cfg.world_size) == (4, 3, 32)
    assert (cfg.master_addr, cfg.master_port) == ("10.0.0.5", 23456)
    argv, _ = launch_command(cfg, [])
    assert argv[argv.index("--nnodes") + 1] == "4" and argv[argv.index("--node_rank") + 1] == "3"
    assert argv[argv.index("--master_addr") + 1] == "10.0.0.5"
    assert argv[argv.index("--master_port") + 1] == "23456"


def test_hostfile_uses_the_deepspeed_launcher(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nworker-0 slots=8\n\nworker-1 slots=8\n")
    assert read_hostfile(str(hostfile)) == [("worker-0", 8), ("worker-1", 8)]
    cfg = config(8, {}, "--hostfile", str(hostfile))
    assert (cfg.num_nodes, cfg.world_size, cfg.master_addr) == (2, 16, "worker-0")
    argv, _ = launch_command(cfg, ["--run-config", "x.json"])
    assert argv[:3] == ["deepspeed", "--hostfile", str(hostfile)]
    assert argv[argv.index("--num_gpus") + 1] == "8"
    assert argv[argv.index("--module") + 1] == "launcher.pretrain"


@pytest.mark.parametrize("text,message", [
    ("worker-0 slots=x\n", "allowed: 'HOST slots=N'"),
    ("worker-0 slots=0\n", "allowed: 'HOST slots=N'"),
    ("# nothing\n", "lists no hosts"),
])
def test_bad_hostfile(tmp_path, text, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    with pytest.raises(UsageError, match=message):
        read_hostfile(str(hostfile))


def test_missing_hostfile():
    with pytest.raises(UsageError, match="--hostfile: /nonexistent does not exist"):
        config(1, {}, "--hostfile", "/nonexistent")


def test_slurm_variables():
    env = {"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-08],head1",
           "WORLD_SIZE": "24", "GLOBAL_BATCH_SIZE": "48"}  # a stray WORLD_SIZE must not be read as DLC's
    cfg = config(8, env)
    assert (cfg.num_nodes, cfg.node_rank, cfg.master_addr, cfg.world_size) == (3, 2, "gpu07", 24)


def test_slurm_nodelist_expansion():
    assert expand_slurm_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_slurm_nodelist("a1") == ["a1"]


def test_no_cluster_variables_means_localhost():
    assert discover_cluster({}) == dict(num_nodes=1, node_rank=0, master_addr="127.0.0.1", master_port=29500)
