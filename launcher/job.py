"""One job, one unit: the lock on a run folder, and the processes a run is made of.

    launcher            the launch script's own pid (it execs `python -m launcher`)
      └─ torchrun       `python -m launcher.job ...`: torchrun that dies with the launcher; own process group
           └─ workers   `python -m launcher.pretrain`, one per process of the node (torchrun: a session each)
    One process: the launcher execs the worker, and the job is that one process.

Each process below the launcher asks the kernel to SIGKILL it when its parent dies (PR_SET_PDEATHSIG), then
checks that the launcher is still its ancestor (it may have died in between). No handler has to run, so a
SIGKILL of the launcher or of its process group still takes every process of the job with it, and a job that
torchrun abandons (torchrun killed) dies too. torchrun's own process group keeps a terminal's Ctrl-C away
from it and its workers: the launcher alone receives it and hands the stop request on (see `Supervisor`).

A run folder holds one job: `RunLock` is an flock on `<run dir>/.job-node<R>.lock` (one per node rank, so
the nodes of one job share the folder) held for the job's lifetime; the kernel drops it when the job dies,
so a lock left by a dead job is simply taken over.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from launcher.errors import UsageError
from launcher.training.signals import CTRL_C_HINT

LEADER_ENV = "GPTMOE_LAUNCHER_PID"  # the launcher's pid, for the processes it starts
PR_SET_PDEATHSIG = 1
STARTUP_GRACE_S = 30  # a stop during start-up: how long workers get to leave before they are killed


# ---------------------------------------------------------------------------- processes
def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when its parent exits. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name in (...) may hold spaces


def ancestors(pid: int, depth: int = 4) -> list[int]:
    found = []
    while len(found) < depth:
        pid = parent_of(pid)
        if not pid:
            break
        found.append(pid)
    return found


def join_job() -> None:
    """First act of every process the launcher starts: die with the parent, and leave now if the launcher is
    already gone (it died between our start and the prctl). No-op outside a launched job."""
    leader = os.environ.get(LEADER_ENV, "")
    if not leader.isdigit() or int(leader) == os.getpid():
        return
    die_with_parent()
    if int(leader) not in ancestors(os.getpid()):
        os._exit(1)


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before children."""
    found, frontier = [], [pid]
    while frontier:
        frontier = [c for p in frontier for c in children(p)]
        found += frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Supervisor:
    """Runs torchrun under the launcher and turns signals into what the job should do.

    - SIGTERM or a first Ctrl-C: handed to the workers (torchrun's children), which save a checkpoint and stop
      after the same iteration; torchrun then exits 0 and so does the job. Before training begins, workers stop
      at once; the job exits 128 + the signal number (nothing was saved).
    - A second Ctrl-C: every process of the job is killed at once (`latest` still names a complete checkpoint).
    - Workers that do not leave within STARTUP_GRACE_S of a stop during start-up (blocked in a rendezvous, say)
      are killed.
    """

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.argv, self.env = argv, dict(env, **{LEADER_ENV: str(os.getpid())})
        self.proc: subprocess.Popen | None = None
        self.stop: int | None = None  # the first stop signal
        self.told: set[int] = set()  # workers the stop was handed to
        self.training = False  # a worker said the first iteration is under way (SIGUSR1)
        self.killed_at_once = False
        self.deadline: float | None = None

    # -- signal handlers (run in the main thread, between the wait loop's polls)
    def _on_stop(self, signum, _frame) -> None:
        if self.stop is None:
            self.stop = signum
            if signum == signal.SIGINT and self.training:
                print(CTRL_C_HINT, file=sys.stderr, flush=True)
            if not self.training:
                self.deadline = time.monotonic() + STARTUP_GRACE_S
            self._hand_on()
        elif signum == signal.SIGINT:
            self.kill_all()
            self.killed_at_once = True

    def _on_training(self, _signum, _frame) -> None:
        self.training = True

    def _hand_on(self) -> None:
        """The stop request to every worker not yet told (workers torchrun starts later get it too)."""
        if self.stop is None or self.proc is None:
            return
        if self.proc.returncode is not None:
            return
        for pid in children(self.proc.pid):
            if pid not in self.told:
                self.told.add(pid)
                _signal(pid, self.stop)

    def kill_all(self) -> None:
        # Only while torchrun is not reaped: after that its pid may be another process's. (Its workers die
        # with it anyway: PR_SET_PDEATHSIG.)
        if self.proc is None or self.proc.returncode is not None:
            return
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            _signal(pid, signal.SIGKILL)

    def run(self) -> int:
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        # torchrun and its workers start with the stop signals blocked: a worker takes them once its own
        # handler is in place, and torchrun never does (it is told nothing; the launcher speaks to workers).
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT))
        try:
            signal.signal(signal.SIGTERM, self._on_stop)
            signal.signal(signal.SIGINT, self._on_stop)
            signal.signal(signal.SIGUSR1, self._on_training)
            self.proc = subprocess.Popen(self.argv, env=self.env, process_group=0)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
        try:
            code = self._wait()
        finally:
            self.kill_all()  # nothing of the job outlives the launcher, whatever happened above
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.killed_at_once:
            print("interrupted again: every process of the job was stopped at once; the newest complete "
                  "checkpoint (checkpoints/latest) is kept", file=sys.stderr, flush=True)
            return 128 + signal.SIGINT
        if self.stop is not None and not self.training:
            return 128 + self.stop
        return code

    def _wait(self) -> int:
        while True:
            try:
                return self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            self._hand_on()
            if self.deadline is not None and not self.training and time.monotonic() > self.deadline:
                print(f"error: the job did not stop within {STARTUP_GRACE_S} s of "
                      f"{signal.Signals(self.stop).name} during start-up: killed", file=sys.stderr, flush=True)
                self.kill_all()
                self.deadline = None


def tell_launcher_training_began() -> None:
    """Called by a worker (local rank 0) when its first iteration starts; the launcher then knows a stop
    request will end in a checkpoint."""
    leader = os.environ.get(LEADER_ENV, "")
    if leader.isdigit() and int(leader) != os.getpid() and os.environ.get("LOCAL_RANK", "0") == "0":
        _signal(int(leader), signal.SIGUSR1)


def remove_stale_build_locks(min_age_s: float = 30.0) -> list[Path]:
    """torch builds C++ extensions (DeepSpeed's ops, compiled on a job's first use) under a lock file that only
    the builder removes, holding it open meanwhile. A builder killed with its job leaves the file, and every
    later build waits on it, silently, forever. A lock is stale when it is older than `min_age_s`, no process
    holds it open, and no process works in its folder (compilers a killed build left behind finish their file
    first: a new build must not race them). Returns the locks removed."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    now = time.time()
    locks = []
    for lock in [*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")]:
        try:
            if now - lock.stat().st_mtime > min_age_s:  # a lock just taken: its builder may not be seen yet
                locks.append(lock)
        except OSError:
            pass
    if not locks:
        return []
    in_use = set()  # files held open, and the folders processes work in
    for proc in Path("/proc").glob("[0-9]*"):
        for link in [proc / "cwd", *proc.glob("fd/*")]:
            try:
                in_use.add(os.readlink(link))
            except OSError:
                pass
    removed = []
    for lock in locks:
        if str(lock.resolve()) not in in_use and str(lock.parent.resolve()) not in in_use:
            lock.unlink(missing_ok=True)
            removed.append(lock)
    return removed


def clear_stale_build_locks_while(busy, every_s: float = 10.0) -> None:
    """A daemon thread removing stale build locks every `every_s` while `busy()`: a worker waiting on a lock
    whose builder was killed (its compilers still finishing when the job started) goes on once they are done."""
    import threading

    def loop():
        while busy():
            try:
                remove_stale_build_locks()
            except Exception:  # noqa: BLE001 - a janitor must never take the worker down
                pass
            time.sleep(every_s)

    threading.Thread(target=loop, name="build-lock-janitor", daemon=True).start()


# ---------------------------------------------------------------------------- the run folder's lock
def _lock_identity(cfg) -> str:
    """Nodes of one job share it; two jobs (almost) never do."""
    return f"{cfg.master_addr}:{cfg.master_port}/{cfg.num_nodes}"


class RunLock:
    """The flock that says a job is running in a run folder; see the module docstring."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.path = self.run_dir / f".job-node{cfg.node_rank}.lock"
        self.fd: int | None = None
        self._created: list[Path] = []

    # -- reading
    @staticmethod
    def holder(path: Path) -> dict | None:
        """The record of the live job holding `path`, or None when no live job does (stale or absent)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None  # nobody holds it: the job that wrote it is gone
            except BlockingIOError:
                held = True
            except OSError:  # a filesystem without flock: judge by pid, on this host only
                held = None
            try:
                record = json.loads(os.read(fd, 65536).decode() or "{}")
            except (OSError, ValueError):
                record = {}
            if held is None:
                same_host = record.get("host") == socket.gethostname()
                if same_host and not alive(int(record.get("pid", 0)) or -1):
                    return None
            return {"pid": "?", "host": "?", **record, "path": str(path)}
        finally:
            os.close(fd)

    def live_jobs(self, other_nodes_of_this_job_ok: bool) -> list[dict]:
        found = []
        for path in sorted(self.run_dir.glob(".job-node*.lock")):
            if path == self.path and self.fd is not None:
                continue
            record = self.holder(path)
            if record is None:
                continue
            if (other_nodes_of_this_job_ok and path != self.path
                    and record.get("job") == _lock_identity(self.cfg)):
                continue  # another node of this same job, sharing the folder
            found.append(record)
        return found

    def _busy(self, record: dict) -> UsageError:
        return UsageError(
            f"{self.run_dir}: a job is running in this run folder (pid {record['pid']} on {record['host']}, "
            f"since {record.get('started', '?')}); allowed: wait for it or stop it (kill -TERM {record['pid']} "
            f"on {record['host']}), or give this run another folder (--run-name, OUTPUT_BASEPATH)")

    def check_free(self, other_nodes_of_this_job_ok: bool = True) -> None:
        """Raise UsageError naming the live job in the run folder, if any. Writes nothing."""
        if self.run_dir.is_dir():
            jobs = self.live_jobs(other_nodes_of_this_job_ok)
            if jobs:
                raise self._busy(jobs[0])

    # -- holding
    def acquire(self) -> None:
        """Take the lock for this process (inherited across exec) or raise UsageError naming the holder."""
        import fcntl

        missing = []
        folder = self.run_dir
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._created = list(reversed(missing))
        existed = self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not existed:
            self._created.append(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            record = self.holder(self.path) or {"pid": "?", "host": "?"}
            self._remove_created()
            raise self._busy(record) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                self._remove_created()
                raise
            record = self.holder(self.path)  # no flock on this filesystem: the pid (same host) is the lock
            if record is not None:
                os.close(fd)
                self._remove_created()
                raise self._busy(record) from None
        self.fd = fd
        others = self.live_jobs(other_nodes_of_this_job_ok=True)
        if others:
            self.release()
            raise self._busy(others[0])
        record = {"pid": os.getpid(), "host": socket.gethostname(), "node_rank": self.cfg.node_rank,
                  "job": _lock_identity(self.cfg), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.set_inheritable(fd, True)  # the one-process path execs the worker, which keeps holding it

    def release(self) -> None:
        """Drop the lock; remove what acquire() created (for a launch that stops before it started)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for path in reversed(self._created):
            try:
                path.unlink() if path.is_file() else path.rmdir()
            except OSError:
                break  # not empty: the run folder of an earlier run
        self._created = []

    def keep(self) -> None:
        """The job started: what acquire() created belongs to the run now."""
        self._created = []


# ---------------------------------------------------------------------------- torchrun that dies with us
def main() -> None:
    """`python -m launcher.job TORCHRUN-ARGS`: torch.distributed.run, as a member of the launcher's job."""
    join_job()
    import runpy

    sys.argv = ["torchrun", *sys.argv[1:]]
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
