"""A job is one unit, end to end: killed, interrupted, crashed or doubled, through the positional script.

Each launch starts the script in a session of its own, as a terminal or a scheduler does, so "the launcher's
process group" is the group a Ctrl-C or a scheduler's kill reaches. The memory tests read each worker's peak
resident memory (VmHWM) once its steps have run, then kill the job (no checkpoint to write).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_helpers import ROOT, SCRIPT, flags, metrics, train_env

from launcher.job import children, descendants

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]

NANO = "run 2 gpt2bpe nano 8 0 2 1 none none 1000"


def start(positional: str, env: dict, *more: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SCRIPT), *positional.split(), *more], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_folder(out: Path) -> Path | None:
    found = [d for d in out.iterdir() if (d / "run_config.json").is_file()] if out.is_dir() else []
    return found[0] if found else None


def wait_for_iterations(proc, out: Path, n: int, timeout: float = 240) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        run = run_folder(out)
        if run and (run / "metrics.jsonl").is_file() and len(metrics(run)) >= n and max(metrics(run)) >= n:
            return run
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no iteration {n} (exit {proc.poll()}):\n{proc.communicate()[0][-4000:]}")


def workers(leader: int) -> list[int]:
    found = []
    for pid in [leader, *descendants(leader)]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launcher.pretrain" in cmd and b"launcher.job" not in cmd:
            found.append(pid)
    return found


def running(pids) -> list[int]:
    """The pids still alive (zombies waiting for a reaper count as gone)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def assert_all_gone(pids, within: float = 15) -> None:
    deadline = time.time() + within
    while running(pids) and time.time() < deadline:
        time.sleep(0.1)
    left = running(pids)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the job survived: {left}"


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def estimated_peak(positional: str, env: dict, *more: str) -> float:
    from launcher.cli import build_run_config
    from launcher.data.tokenizer import load_tokenizer
    from launcher.memory import estimate_memory

    cfg = build_run_config(positional.replace("run", "dryrun", 1).split() + list(more), env)
    vocab = load_tokenizer(cfg.resolved_tokenizer_path).vocab_size
    return estimate_memory(cfg, cfg.model_config(vocab)).total


# ---------------------------------------------------------------------------- a live 2-process job
# 0.125B with 2 experts per MoE layer over EP=2, ZeRO-1 in bf16: the configuration whose optimizer step
# allocates an fp32 gradient partition. Micro batch 1 x 2 ranks, no accumulation: a few seconds a step.
LIVE = "run 2 gpt2bpe 0.125B 2 0 1 1 none z1 1000"


@pytest.fixture(scope="module")
def live_job(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("live")
    env = train_env(tiny_corpus, out, iters=1, PRECISION="bf16", GLOBAL_BATCH_SIZE=2,
                    TRAIN_TOKENS=50 * 2 * 32)
    more = flags(tiny_corpus, "--eval-interval", "1000", "--eval-iters", "0")
    proc = start(LIVE, env, *more)
    run = wait_for_iterations(proc, out, 3)
    yield proc, run, env, more
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_a_second_launch_into_a_live_run_folder_names_the_job_and_writes_nothing(live_job, monkeypatch, capsys):
    from launcher.__main__ import main

    proc, run, env, more = live_job
    written = {name: ((run / name).read_bytes(), (run / name).stat().st_mtime_ns)
               for name in ("run_config.json", "ds_config.json")}
    for var in ("WORLD_SIZE", "RANK", "LOAD", "EP_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert main(LIVE.split() + more) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"a job is running in this run folder (pid {proc.pid} on " in err
    assert {name: ((run / name).read_bytes(), (run / name).stat().st_mtime_ns) for name in written} == written


def test_peak_memory_of_zero_1_bf16_is_within_a_quarter_of_the_estimate(live_job):
    proc, run, env, more = live_job
    measured = max(peak_rss(pid) for pid in workers(proc.pid))
    estimate = estimated_peak(LIVE, env, *more)
    print(f"\n0.125B MoE-2 EP=2 ZeRO-1 bf16, 2 processes: measured {measured / 2**30:.2f} GiB, "
          f"estimated {estimate / 2**30:.2f} GiB ({estimate / measured - 1:+.0%})")
    assert abs(estimate - measured) <= 0.25 * measured


def test_sigkill_of_the_launchers_group_leaves_no_process_of_the_job(live_job):
    """What a scheduler or a closed terminal does: SIGKILL to the launcher's group. torchrun and the workers
    are in groups of their own, yet die with it."""
    proc, run, env, more = live_job
    job = [proc.pid, *descendants(proc.pid)]
    assert len(workers(proc.pid)) == 2 and len(job) >= 4  # launcher, torchrun, 2 workers
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert_all_gone(job)


def test_peak_memory_of_one_fp32_process_is_within_a_quarter_of_the_estimate(tiny_corpus, tmp_path):
    positional = "run 1 gpt2bpe 0.125B none 0 1 1 none none 1000"
    env = train_env(tiny_corpus, tmp_path, iters=1, PRECISION="fp32", GLOBAL_BATCH_SIZE=1, TRAIN_TOKENS=50 * 32)
    more = flags(tiny_corpus, "--eval-interval", "1000", "--eval-iters", "0")
    proc = start(positional, env, *more)
    try:
        wait_for_iterations(proc, tmp_path, 3)
        measured = peak_rss(proc.pid)  # one process: the launcher exec'd the worker
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    estimate = estimated_peak(positional, env, *more)
    print(f"\n0.125B dense ZeRO-0 fp32, 1 process: measured {measured / 2**30:.2f} GiB, estimated "
          f"{estimate / 2**30:.2f} GiB ({estimate / measured - 1:+.0%})")
    assert abs(estimate - measured) <= 0.25 * measured


# ---------------------------------------------------------------------------- signals
def test_ctrl_c_saves_and_stops_then_a_second_ctrl_c_stops_at_once(tiny_corpus, tmp_path):
    env = train_env(tiny_corpus, tmp_path, iters=5000)
    more = flags(tiny_corpus, "--eval-interval", "1000", "--save-interval", "5")
    proc = start(NANO, env, *more)
    wait_for_iterations(proc, tmp_path, 3)
    job = [proc.pid, *descendants(proc.pid)]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground group
    out = proc.communicate(timeout=120)[0]
    run = run_folder(tmp_path)
    stopped = max(metrics(run))
    assert proc.returncode == 0, out[-4000:]
    assert f"SIGINT: checkpoint saved at iteration {stopped}" in out and "Ctrl-C again: stop at once" in out
    assert "Traceback" not in out and "exitcode" not in out
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped:07d}"
    assert_all_gone(job)

    proc = start(NANO, env, *more)  # the same command resumes; this time Ctrl-C twice
    wait_for_iterations(proc, tmp_path, stopped + 2)
    job = [proc.pid, *descendants(proc.pid)]
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out[-4000:]
    assert "stopped at once" in out and "Traceback" not in out
    assert_all_gone(job, within=5)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "trainer_state.json").is_file()  # a complete checkpoint is named


def test_sigterm_during_start_up_is_one_line(tiny_corpus, tmp_path):
    proc = start(NANO, train_env(tiny_corpus, tmp_path, iters=50), *flags(tiny_corpus))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(workers(proc.pid)) < 2:
        time.sleep(0.05)
    job = [proc.pid, *descendants(proc.pid)]
    assert len(workers(proc.pid)) == 2, proc.communicate()[0][-4000:]
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-4000:]
    assert out.count("stopped during start-up") == 1, out[-4000:]
    assert "Traceback" not in out and "exitcode" not in out
    assert_all_gone(job)
    assert not (run_folder(tmp_path) / "checkpoints" / "latest").exists()


def test_a_worker_crash_takes_the_whole_job_down(tiny_corpus, tmp_path):
    proc = start(NANO, train_env(tiny_corpus, tmp_path, iters=5000), *flags(tiny_corpus, "--eval-interval", "1000"))
    wait_for_iterations(proc, tmp_path, 2)
    job = [proc.pid, *descendants(proc.pid)]
    torchrun = children(proc.pid)
    os.kill(workers(proc.pid)[-1], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and torchrun
    assert_all_gone(job)
