"""Load on `python -m launcher.serve`: the server runs in a child process on 127.0.0.1 and this process drives it
with the same requests at 1 (one at a time: the baseline), 4 and 16 concurrent clients (keep-alive connections,
a tenth of the requests malformed), then stops it with SIGTERM.

    .venv/bin/python benchmarks/serve_load.py                       # a fresh tiny MoE-8 (random weights)
    .venv/bin/python benchmarks/serve_load.py --checkpoint runs/mine --requests 200 --max-tokens 64

Prints per concurrency: requests/s, new tokens/s, p50/p99 latency of the answered requests, counts by status,
the mean rows per decoding step (from /metrics); the gain of batching as tokens/s at the highest concurrency over
one at a time; the server's RSS after warm-up and at the end; the load average. Without --checkpoint it writes a
tiny GPT-MoE (4 layers, hidden 128, 8 experts top-1, 256 positions, random weights, a BPE tokenizer trained on
standard-library sources) in a training run's layout; random weights rarely emit the end-of-document token, so
nearly every request generates --max-tokens. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BAD_BODIES = [b'{"prompt": "def ', b'{"prompt": "x", "temperature": -1}', b"{}",
              b'{"prompt": "x", "max_new_tokens": 5}', b'{"prompt": ["a", ""]}']


def build_checkpoint(folder: Path) -> Path:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from launcher.data.stdlib_corpus import stdlib_files
    from launcher.data.tokenizer import train_tokenizer
    from launcher.training.checkpoint import write_inference_checkpoint
    from model import GPTMoE, GPTMoEConfig

    tokenizer = train_tokenizer("gpt2bpe", stdlib_files()[:80], 4096)
    torch.manual_seed(0)
    model = GPTMoE(GPTMoEConfig.from_size("tiny", vocab_size=tokenizer.vocab_size, seq_len=256, num_experts=8,
                                          router_type="top1")).eval()
    return write_inference_checkpoint(model, tokenizer, folder / "tiny-moe8", iteration=1)


def prompts(count: int, seed: int = 0) -> list[str]:
    """Lines of standard-library sources, 20 to 200 characters."""
    from launcher.data.stdlib_corpus import stdlib_files

    rng = random.Random(seed)
    lines = [line.strip() for path in stdlib_files()[100:160]
             for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if 20 <= len(line.strip()) <= 200]
    return [rng.choice(lines) for _ in range(count)]


def make_requests(count: int, max_tokens: int) -> list[bytes]:
    """Every tenth malformed; the rest half greedy, half sampled with a seed."""
    out = []
    for i, text in enumerate(prompts(count)):
        if i % 10 == 9:
            out.append(BAD_BODIES[(i // 10) % len(BAD_BODIES)])
        elif i % 2:
            out.append(json.dumps({"prompt": text, "max_tokens": max_tokens, "temperature": 0}).encode())
        else:
            out.append(json.dumps({"prompt": text, "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95,
                                   "seed": i}).encode())
    return out


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Client:
    """One keep-alive connection; returns (status, completion tokens, seconds) per request."""

    def __init__(self, port: int):
        self.port = port
        self.conn = None

    def send(self, body: bytes):
        start = time.perf_counter()
        for attempt in range(2):  # a connection the server closed (after an error answer) is reopened once
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
                self.conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionError):
                self.conn = None
                if attempt:
                    raise
        tokens = json.loads(data)["usage"]["completion_tokens"] if resp.status == 200 else 0
        if resp.getheader("connection", "").lower() == "close":
            self.conn = None
        return resp.status, tokens, time.perf_counter() - start


def drive(port: int, bodies: list[bytes], concurrency: int) -> dict:
    results = [None] * len(bodies)
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()

    def worker():
        client = Client(port)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            results[i] = client.send(bodies[i])

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = sorted(s for status, _, s in results if status == 200)
    statuses = {}
    for status, _, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    tokens = sum(t for _, t, _ in results)
    pick = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] if ok else float("nan")  # noqa: E731
    return {"concurrency": concurrency, "requests": len(bodies), "seconds": round(wall, 2),
            "requests_per_s": round(len(bodies) / wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "new_tokens": tokens, "p50_s": round(pick(0.5), 3), "p99_s": round(pick(0.99), 3), "status": statuses}


def scrape(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_ready(port: int, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not get ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a run to serve (default: a fresh random tiny MoE-8)")
    p.add_argument("--requests", type=int, default=500, help="requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="the first is the baseline")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="the server's --threads")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else build_checkpoint(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "launcher.serve", str(checkpoint), "--port", str(port), "--max-batch-size",
               str(args.max_batch_size), "--max-queue", str(max(64, 2 * max(args.concurrency))),
               "--log-level", "warning"] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_ready(port, proc)
            bodies = make_requests(args.requests, args.max_tokens)
            drive(port, bodies[:2 * max(args.concurrency)], max(args.concurrency))  # warm-up
            rss_start = rss_mb(proc.pid)
            phases = []
            for c in args.concurrency:
                before = scrape(port)
                phase = drive(port, bodies, c)
                after = scrape(port)
                steps = after["gptmoe_batch_size_count"] - before["gptmoe_batch_size_count"]
                rows = after["gptmoe_batch_size_sum"] - before["gptmoe_batch_size_sum"]
                phase["mean_rows_per_step"] = round(rows / steps, 2) if steps else 0.0
                phases.append(phase)
                print(f"{c:>3} clients: {phase['requests_per_s']:7.2f} req/s {phase['tokens_per_s']:8.1f} tokens/s  "
                      f"p50 {phase['p50_s']:.3f} s  p99 {phase['p99_s']:.3f} s  rows/step "
                      f"{phase['mean_rows_per_step']:5.2f}  status {phase['status']}  load {os.getloadavg()[0]:.2f}",
                      flush=True)
            rss_end = rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = proc.wait()
    base, top = phases[0], phases[-1]
    gain = top["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else float("nan")
    fivexx = sum(n for ph in phases for s, n in ph["status"].items() if s.startswith("5"))
    growth = (rss_end - rss_start) / rss_start
    print(f"batching gain: {gain:.2f}x tokens/s at {top['concurrency']} clients over 1 at a time; 5xx answers: "
          f"{fivexx}; server RSS {rss_start:.0f} MB after warm-up, {rss_end:.0f} MB at the end ({growth:+.1%}); "
          f"SIGTERM exit code {exit_code}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(json.dumps({"benchmark": "serve_load", "checkpoint": str(args.checkpoint or "random tiny MoE-8"),
                      "max_tokens": args.max_tokens, "phases": phases, "batching_gain": round(gain, 2),
                      "responses_5xx": fivexx, "rss_mb_after_warmup": round(rss_start, 1),
                      "rss_mb_end": round(rss_end, 1), "rss_growth": round(growth, 4), "server_exit_code": exit_code,
                      "loadavg": [round(x, 2) for x in os.getloadavg()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
