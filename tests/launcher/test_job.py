"""One job, one unit, in process: the run folder's lock, dying with the parent, the nodes' roll call, stop signals."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from launcher.cli import build_run_config
from launcher.cluster import free_port, rendezvous
from launcher.errors import UsageError
from launcher.job import RunLock, ancestors

ROOT = Path(__file__).resolve().parents[2]
NANO = "run 1 gpt2bpe nano none 0 1 1 none none 100"


def config(out: Path, *flags: str, **env: str):
    return build_run_config(NANO.split() + list(flags), {"OUTPUT_BASEPATH": str(out), "GLOBAL_BATCH_SIZE": "8",
                                                         **env})


def hold_lock_in_child(cfg_dir: Path, node_rank: int = 0, job: str | None = None) -> subprocess.Popen:
    """Another process holding the run folder's lock, as a live job does; prints 'held' once it does."""
    code = textwrap.dedent(f"""
        import fcntl, json, os, socket, sys, time
        path = {str(cfg_dir / f".job-node{node_rank}.lock")!r}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({{"pid": os.getpid(), "host": socket.gethostname(), "started": "then",
                                  "job": {job!r}}}).encode())
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_job_is_named_and_nothing_is_created(tmp_path):
    cfg = config(tmp_path / "out")
    holder = hold_lock_in_child(cfg.run_dir)
    try:
        before = sorted(p.name for p in cfg.run_dir.iterdir())
        with pytest.raises(UsageError) as err:
            RunLock(cfg).check_free()
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(err.value)
        assert "\n" not in str(err.value) and "kill -TERM" in str(err.value)
        with pytest.raises(UsageError, match=f"pid {holder.pid}"):
            RunLock(cfg).acquire()
        assert sorted(p.name for p in cfg.run_dir.iterdir()) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_jobs_lock_is_taken_over(tmp_path):
    cfg = config(tmp_path / "out")
    holder = hold_lock_in_child(cfg.run_dir)
    holder.kill()
    holder.wait()
    lock_file = cfg.run_dir / ".job-node0.lock"
    assert json.loads(lock_file.read_text())["pid"] == holder.pid  # the record stays; the flock went with it
    RunLock(cfg).check_free()
    lock = RunLock(cfg)
    lock.acquire()
    try:
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
            RunLock(cfg).acquire()  # a second launcher, even in this process, is refused
    finally:
        lock.release()
    RunLock(cfg).acquire()


def test_a_refused_or_abandoned_launch_leaves_no_folder(tmp_path):
    cfg = config(tmp_path / "out")
    lock = RunLock(cfg)
    lock.acquire()
    assert cfg.run_dir.is_dir()
    lock.release()  # e.g. the rendezvous gave up: the launch never started
    assert not (tmp_path / "out").exists()


def test_nodes_of_one_job_share_the_folder_other_jobs_do_not(tmp_path):
    """Two nodes of a DLC job write to one shared run folder, each under its own node-rank lock."""
    port = str(free_port())
    node0 = config(tmp_path / "out", WORLD_SIZE="2", RANK="0", MASTER_PORT=port)
    node1 = config(tmp_path / "out", WORLD_SIZE="2", RANK="1", MASTER_PORT=port)
    holder = hold_lock_in_child(node0.run_dir, 0, job=f"127.0.0.1:{port}/2")
    try:
        lock = RunLock(node1)
        lock.acquire()  # node 1 of the same job
        lock.release()
        other = config(tmp_path / "out", WORLD_SIZE="2", RANK="1", MASTER_PORT=str(free_port()))
        with pytest.raises(UsageError, match=f"pid {holder.pid}"):
            RunLock(other).acquire()  # another job's node 1
    finally:
        holder.kill()
        holder.wait()


def test_dryrun_into_a_live_run_folder_is_refused(tmp_path, capsys, monkeypatch):
    from launcher.__main__ import main

    monkeypatch.setenv("OUTPUT_BASEPATH", str(tmp_path / "out"))
    monkeypatch.setenv("GLOBAL_BATCH_SIZE", "8")
    cfg = config(tmp_path / "out")
    holder = hold_lock_in_child(cfg.run_dir)
    try:
        assert main(["dryrun", *NANO.split()[1:]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {holder.pid}" in err
        assert not (cfg.run_dir / "run_config.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_child_that_joins_the_job_dies_with_its_parent(tmp_path):
    """PR_SET_PDEATHSIG: the parent is SIGKILLed (no handler runs) and the child goes too."""
    child_code = ("import os, sys, time; sys.path.insert(0, sys.argv[1]); from launcher.job import join_job; "
                  "join_job(); print(os.getpid(), flush=True); time.sleep(120)")
    parent_code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        os.environ["GPTMOE_LAUNCHER_PID"] = str(os.getpid())
        subprocess.Popen([sys.executable, "-c", {child_code!r}, {str(ROOT)!r}])
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert parent.pid in ancestors(child)
    parent.kill()
    parent.wait()
    for _ in range(100):
        if not Path(f"/proc/{child}").exists() or " Z " in Path(f"/proc/{child}/stat").read_text():
            break
        threading.Event().wait(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


def test_an_orphan_at_birth_leaves_at_once(tmp_path):
    """The launcher died before the child's prctl: the leader is not among its ancestors, so it exits."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); from launcher.job import join_job; join_job(); print('stayed')"
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "GPTMOE_LAUNCHER_PID": str(os.getpid())})  # its parent: alive
    assert proc.stdout.strip() == "stayed"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "GPTMOE_LAUNCHER_PID": str(dead.pid)})  # a launcher already gone
    assert gone.returncode == 1 and gone.stdout == ""


def test_rendezvous_waits_for_every_node_then_frees_the_port(tmp_path):
    port = str(free_port())
    cfgs = [config(tmp_path / "out", WORLD_SIZE="2", RANK=str(r), MASTER_PORT=port) for r in (0, 1)]
    errors, said = [], []

    def node(cfg):
        try:
            rendezvous(cfg, 60, say=lambda *a, **k: said.append(a[0]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(c,)) for c in reversed(cfgs)]  # node 1 first: it waits
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert any("waiting for node 0" in line for line in said), said
    with socket.socket() as s:  # torchrun binds the port next
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(port)))


def test_rendezvous_gives_up_naming_the_missing_node(tmp_path):
    cfg = config(tmp_path / "out", "--rendezvous-timeout", "1.5", WORLD_SIZE="3", RANK="0", GLOBAL_BATCH_SIZE="6",
                 MASTER_PORT=str(free_port()))
    said = []
    with pytest.raises(UsageError) as err:
        rendezvous(cfg, cfg.rendezvous_timeout, say=lambda *a, **k: said.append(a[0]))
    assert "nodes 1, 2 of 3 did not join" in str(err.value) and "--rendezvous-timeout" in str(err.value)
    assert said and "waiting for node(s) 1, 2" in said[0]


# ---------------------------------------------------------------------------- stop signals in a worker
STOP_CODE = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    from launcher.training.signals import StartupStopped, StopRequest
    stop = StopRequest(startup=sys.argv[2] == "startup", hint=True)
    try:
        stop.install()
        print("ready", flush=True)
        if sys.argv[2] == "training":
            stop.training_begins()
        for _ in range(600):
            time.sleep(0.05)
            if stop.requested == "SIGTERM":
                print("saved and stopped", flush=True)
                sys.exit(0)
    except StartupStopped as exc:
        print(f"{exc} in start-up", flush=True)
        sys.exit(128 + exc.signum)
""")


def _stop_child(phase):
    proc = subprocess.Popen([sys.executable, "-c", STOP_CODE, str(ROOT), phase], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_signal_in_start_up_stops_at_once():
    proc = _stop_child("startup")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and out.strip() == "SIGINT in start-up" and err == ""


def test_repeated_sigterm_is_one_request_and_a_second_ctrl_c_stops_at_once():
    proc = _stop_child("training")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # a cluster signals twice: still one request, saved and stopped
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.strip() == "saved and stopped" and err == ""

    code = STOP_CODE.replace('stop.requested == "SIGTERM"', "False")  # a save that takes long
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), "training"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    assert "Ctrl-C again: stop at once" in proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "stopped at once" in err and "Traceback" not in err


def test_a_build_lock_left_by_a_killed_job_is_removed_a_held_one_is_not(tmp_path, monkeypatch):
    """torch's FileBaton: the builder holds its lock file open until it removes it."""
    from launcher.job import remove_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for name in ("cpu_adam", "shm", "fused", "fresh"):
        (tmp_path / name).mkdir()
    old = os.path.getmtime(tmp_path) - 120
    stale = tmp_path / "cpu_adam" / "lock"
    stale.touch()
    building = tmp_path / "shm" / "lock"  # its builder holds it open
    fd = os.open(building, os.O_CREAT | os.O_EXCL)
    compiling = tmp_path / "fused" / "lock"  # the builder was killed, its compiler still works in the folder
    compiling.touch()
    compiler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path / "fused")
    fresh = tmp_path / "fresh" / "lock"  # just taken
    fresh.touch()
    for lock in (stale, building, compiling):
        os.utime(lock, (old, old))
    try:
        assert remove_stale_build_locks() == [stale]
        assert not stale.exists() and building.exists() and compiling.exists() and fresh.exists()
        compiler.kill()
        compiler.wait()
        assert remove_stale_build_locks() == [compiling]
    finally:
        os.close(fd)
        compiler.kill()
