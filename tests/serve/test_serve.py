"""`python -m launcher.serve`: real HTTP against a server on a free port, in this process (uvicorn in a thread)
or as a subprocess (SIGTERM). The checkpoint is written in a training run's layout from a nano MoE whose output
depends on its context (init std 0.3), so a batch or cache that mixed rows or positions would change the text.
For the queue and drain tests the model is slowed (a sleep before each forward) so that requests are
provably still in flight when the test acts."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launcher.cluster import free_port
from launcher.generate import main as generate_main
from launcher.inference import load_checkpoint
from launcher.serve import main as serve_main
from launcher.serving.app import Service, create_app
from launcher.serving.protocol import Limits

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["def add(a, b):", "The quick brown", "x", "明月几时有？把酒问", "import os", "print(", "lazy dog", "return a"]
LIMITS = dict(max_prompt_tokens=32, max_new_tokens=40, max_batch_size=8, max_queue=16, max_request_bytes=4096)


@pytest.fixture(scope="module")
def checkpoint(nano_inference_run):
    """The shared nano inference run's folder (tests/conftest.py)."""
    return nano_inference_run[0]


class Running:
    """uvicorn serving create_app(service) in a thread on a free port of 127.0.0.1."""

    def __init__(self, service: Service, wait: bool = True):
        import uvicorn

        self.service = service
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        if wait:
            assert service.loaded.wait(60) and service.state == "ready", service.error
            wait_for(lambda: get(self.port, "/health")[0] == 200)

    def drain(self):
        """What SIGTERM does to the command line's server (see launcher.serve)."""
        self.service.state = "draining"
        self.server.should_exit = True

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def serve(checkpoint, slow: float = 0.0, **limits) -> Running:
    def load():
        model, tokenizer, _ = load_checkpoint(checkpoint)
        if slow:
            model.register_forward_pre_hook(lambda *_: time.sleep(slow))
        return model, tokenizer

    return Running(Service(load, lambda mcfg: Limits(**{**LIMITS, **limits}, seq_len=mcfg.seq_len), "nano-run"))


@pytest.fixture(scope="module")
def server(checkpoint):
    running = serve(checkpoint)
    yield running
    running.close()


# ------------------------------------------------------------------------------------------ a small client
def request(port: int, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 60):
    """(status, headers, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = text
    return resp.status, dict(resp.getheaders()), parsed


def get(port, path):
    try:
        status, _, body = request(port, "GET", path, timeout=5)
    except OSError:
        return None, None
    return status, body


def post(port, path, body=None, raw=None):
    status, headers, parsed = request(port, "POST", path, body, raw)
    return status, parsed, headers


def stream(port: int, body: dict, on_first=None) -> list:
    """The parsed data of each server-sent event (the last is "[DONE]"); on_first() runs after the first one."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = []
    for line in resp:
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
            if len(events) == 1 and on_first:
                on_first()
    conn.close()
    return events


def wait_for(condition, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def metric(port: int, name: str) -> float:
    """A sample's value from /metrics; `name` may carry labels; a histogram's _count, _sum or bucket."""
    text = get(port, "/metrics")[1]
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def greedy(port, prompt, n, path="/v1/completions"):
    status, body, _ = post(port, path, {"prompt": prompt, "max_tokens": n, "temperature": 0})
    assert status == 200, body
    return body


# ------------------------------------------------------------------------------------------ endpoints
def test_health_is_ready_only_once_the_model_has_loaded(checkpoint):
    release = threading.Event()

    def load():
        release.wait(30)
        model, tokenizer, _ = load_checkpoint(checkpoint)
        return model, tokenizer

    running = Running(Service(load, lambda mcfg: Limits(**LIMITS, seq_len=mcfg.seq_len), "nano-run"), wait=False)
    port = running.port
    try:
        wait_for(lambda: get(port, "/health")[0] is not None)
        assert get(port, "/health") == (503, {"status": "loading"})
        status, body, headers = post(port, "/", {"text": "x"})
        assert status == 503 and headers["retry-after"] == "5" and "loading" in body["error"]["message"]
        release.set()
        wait_for(lambda: get(port, "/health")[0] == 200)
        assert post(port, "/", {"text": "x", "max_length": 2})[0] == 200
    finally:
        release.set()
        running.close()


def test_health_models_and_metrics(server):
    assert get(server.port, "/health") == (200, {"status": "ready", "model": "nano-run"})
    status, models = get(server.port, "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["nano-run"]
    status, text = get(server.port, "/metrics")
    for name in ("gptmoe_requests_total", "gptmoe_request_latency_seconds_bucket", "gptmoe_batch_size_bucket",
                 "gptmoe_queue_depth", "gptmoe_generated_tokens_total", "gptmoe_running_rows"):
        assert re.search(rf"^{name}(\{{.*\}})? \S+$", text, re.M), name
    assert 'gptmoe_requests_total{endpoint="/health",status="200"}' in text


def test_processor_contract_matches_launcher_generate(server, checkpoint, tmp_path):
    """POST / with top_k 1 is greedy and gives launcher.generate's continuations, for one text and a list."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in PROMPTS), encoding="utf-8")
    out = tmp_path / "gen.jsonl"
    assert generate_main([str(checkpoint), "--input", str(prompts), "--output", str(out), "--temperature", "0",
                          "--max-new-tokens", "20", "--threads", "1"]) == 0
    want = [json.loads(line)["generation"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(set(want)) == len(want)
    status, body, _ = post(server.port, "/", {"text": PROMPTS, "max_length": 20, "top_k": 1, "top_p": 0,
                                              "temperature": 0.7})
    assert status == 200 and body == {"text": want}
    status, body, _ = post(server.port, "/", {"text": PROMPTS[0], "max_length": 20, "top_k": 1})
    assert status == 200 and body == {"text": want[0]}


def test_completions_shape_and_usage(server):
    body = greedy(server.port, PROMPTS[:2], 7)
    assert body["object"] == "text_completion" and body["model"] == "nano-run" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] in ("stop", "length") and c["logprobs"] is None for c in body["choices"])
    usage = body["usage"]
    assert usage["completion_tokens"] <= 14 and usage["total_tokens"] == usage["prompt_tokens"] + \
        usage["completion_tokens"]
    tokens = greedy(server.port, [[5, 6, 7]], 5)  # OpenAI's token-id prompts
    assert tokens["usage"]["prompt_tokens"] == 3


def test_concurrent_requests_are_batched_and_each_gets_its_own_text(server):
    alone = [greedy(server.port, p, 12 + i)["choices"][0]["text"] for i, p in enumerate(PROMPTS)]
    steps_before = metric(server.port, "gptmoe_batch_size_count")
    single_before = metric(server.port, 'gptmoe_batch_size_bucket{le="1.0"}')
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda ip: greedy(server.port, ip[1], 12 + ip[0])["choices"][0]["text"],
                                 enumerate(PROMPTS)))
    assert together == alone
    steps = metric(server.port, "gptmoe_batch_size_count") - steps_before
    single = metric(server.port, 'gptmoe_batch_size_bucket{le="1.0"}') - single_before
    assert steps > 0 and single < steps  # some steps decoded more than one request
    assert metric(server.port, "gptmoe_batch_size_sum") > metric(server.port, "gptmoe_batch_size_count")


def test_seeded_sampling_is_reproducible(server):
    body = {"prompt": PROMPTS[1], "max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "top_k": 50}
    texts = [post(server.port, "/v1/completions", {**body, "seed": seed})[1]["choices"][0]["text"]
             for seed in (3, 3, 4)]
    assert texts[0] == texts[1] != texts[2]


def test_streaming_gives_the_same_text_piece_by_piece(server):
    whole = greedy(server.port, PROMPTS[0], 20)["choices"][0]
    events = stream(server.port, {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0,
                                  "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert len(chunks) > 3 and all(e["object"] == "text_completion" for e in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["finish_reason"]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] <= 20
    # Several prompts in one stream: each choice's pieces, by index, make its whole text.
    wholes = greedy(server.port, PROMPTS[:3], 15)["choices"]
    events = stream(server.port, {"prompt": PROMPTS[:3], "max_tokens": 15, "temperature": 0})
    for whole in wholes:
        mine = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == whole["index"]]
        assert "".join(c["text"] for c in mine) == whole["text"] and mine[-1]["finish_reason"] == whole["finish_reason"]


def test_stop_strings_cut_the_text_and_the_stream(server):
    full = greedy(server.port, PROMPTS[1], 30)["choices"][0]["text"]
    stop = full[5:8]
    cut = post(server.port, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 30, "temperature": 0,
                                                "stop": [stop]})[1]["choices"][0]
    assert cut == {"index": 0, "text": full[:full.index(stop)], "logprobs": None, "finish_reason": "stop"}
    events = stream(server.port, {"prompt": PROMPTS[1], "max_tokens": 30, "temperature": 0, "stop": stop})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut["text"]


# ------------------------------------------------------------------------------------------ bad requests
LONG = "The quick brown fox jumps over the lazy dog. " * 8  # > 32 tokens
BAD = [  # (path, body or raw bytes, status, param)
    ("/v1/completions", b'{"prompt": ', 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b'\xff\xfe{"prompt": "x"}', 400, None),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["ok", ""]}, 400, "prompt[1]"),
    ("/v1/completions", {"prompt": ["ok", 3]}, 400, "prompt[1]"),
    ("/v1/completions", {"prompt": [[1, 99999]]}, 400, "prompt[0]"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 17}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 41}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1] * 30, "max_tokens": 40}, 400, "max_tokens"),  # 30 + 40 > 64
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 1e-50}, 400, "temperature"),
    ("/", {"text": "x", "temperature": 1e-50}, 400, "temperature"),
    ("/", {"text": "x", "repetition_penalty": 1e-50}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -1}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "top_k": 2.5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "stop": 7}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": "x"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": True}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "logprobs": 5}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_new_tokens": 5}, 400, "max_new_tokens"),
    ("/v1/completions", {"prompt": "x" * 5000}, 413, None),
    ("/", {}, 400, "text"),
    ("/", {"text": 12}, 400, "text"),
    ("/", {"text": ["a", ""]}, 400, "text[1]"),
    ("/", {"text": LONG}, 400, "text"),
    ("/", {"text": "x", "max_length": 0}, 400, "max_length"),
    ("/", {"text": "x", "top_p": 2}, 400, "top_p"),
    ("/", {"text": "x", "temperature": "hot"}, 400, "temperature"),
    ("/", {"text": "x", "top_k": None, "prompt": "y"}, 400, "prompt"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_a_4xx_naming_the_field(server, path, body, status, param):
    got, reply, _ = post(server.port, path, raw=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert got == status, reply
    error = reply["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "allowed" in error["message"] or param is None
    if param is not None:
        assert error["message"].startswith(param.split("[")[0])


def test_unknown_paths_and_methods_are_json_4xx(server):
    assert post(server.port, "/v2/chat", {"prompt": "x"})[0] == 404
    status, body = get(server.port, "/v1/completions")
    assert status == 405 and "error" in body
    assert get(server.port, "/health")[0] == 200  # nothing above hurt the server


# ------------------------------------------------------------------------------------------ load and lifetime
def test_full_queue_answers_503_and_a_gone_client_frees_its_row(checkpoint):
    slow = serve(checkpoint, slow=0.03, max_batch_size=1, max_queue=1)
    port = slow.port
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, port, "/v1/completions", {"prompt": "x", "max_tokens": 30, "temperature": 0})
            wait_for(lambda: metric(port, "gptmoe_running_rows") == 1)
            second = pool.submit(post, port, "/", {"text": "y", "max_length": 5, "top_k": 1})
            wait_for(lambda: metric(port, "gptmoe_queue_depth") == 1)
            status, body, headers = post(port, "/v1/completions", {"prompt": "z", "max_tokens": 5})
            assert status == 503 and int(headers["retry-after"]) >= 1 and "queue is full" in body["error"]["message"]
            assert first.result()[0] == 200 and second.result()[0] == 200
        assert metric(port, 'gptmoe_requests_total{endpoint="/v1/completions",status="503"}') == 1

        # A streaming client that leaves after its first token: its row is freed before its 30 tokens are made.
        generated = metric(port, "gptmoe_generated_tokens_total")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 30, "stream": True}))
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_for(lambda: metric(port, "gptmoe_cancelled_prompts_total") == 1 and
                 metric(port, "gptmoe_running_rows") == 0)
        assert metric(port, "gptmoe_generated_tokens_total") - generated < 30
        # So is one that leaves while waiting for a whole answer.
        generated = metric(port, "gptmoe_generated_tokens_total")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/", body=json.dumps({"text": "x", "max_length": 30}))
        wait_for(lambda: metric(port, "gptmoe_running_rows") == 1)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_for(lambda: metric(port, "gptmoe_cancelled_prompts_total") == 2 and
                 metric(port, "gptmoe_running_rows") == 0)
        assert metric(port, "gptmoe_generated_tokens_total") - generated < 30
        assert post(port, "/", {"text": "y", "max_length": 3, "top_k": 1})[0] == 200
    finally:
        slow.close()


def test_drain_finishes_what_is_in_flight(checkpoint):
    """What SIGTERM starts: requests in flight (one streaming, two whole) finish; new ones are refused."""
    slow = serve(checkpoint, slow=0.03, max_batch_size=2, max_queue=4)
    port = slow.port
    try:
        with ThreadPoolExecutor(3) as pool:
            started = threading.Event()
            streamed = pool.submit(stream, port, {"prompt": "x", "max_tokens": 30, "temperature": 0},
                                   on_first=started.set)
            whole = [pool.submit(greedy, port, p, 30) for p in PROMPTS[:2]]
            started.wait(30)
            wait_for(lambda: metric(port, "gptmoe_queue_depth") + metric(port, "gptmoe_running_rows") >= 2)
            slow.drain()
            try:  # while the listener is still open, a new request is refused politely
                assert post(port, "/", {"text": "y"})[0] == 503
            except ConnectionError:  # or the listener has closed already
                pass
            events = streamed.result()
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
            assert all(w.result()["choices"][0]["finish_reason"] in ("stop", "length") for w in whole)
        slow.thread.join(30)
        assert not slow.thread.is_alive()
        with pytest.raises(OSError):
            request(port, "GET", "/health", timeout=2)
    finally:
        slow.close()


def test_server_script_serves_and_sigterm_drains_with_exit_0(checkpoint):
    """run_server.sh CHECKPOINT PORT: /health turns ready; SIGTERM mid-stream lets the stream finish, exit 0."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(ROOT / "examples" / "megatron" / "run_server.sh"), str(checkpoint),
                             str(port), "--max-batch-size", "4", "--log-level", "warning"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: get(port, "/health")[0] == 200 or proc.poll() is not None, 120)
        assert proc.poll() is None
        events = stream(port, {"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0},
                        on_first=lambda: proc.send_signal(signal.SIGTERM))
        assert events[-1] == "[DONE]"
        assert proc.wait(60) == 0
        out = proc.stdout.read()
        assert f"serving run on http://127.0.0.1:{port}" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_command_line_refuses_bad_input_in_one_line(checkpoint, tmp_path, capsys):
    cases = [([str(tmp_path / "nothing")], "not found"),
             ([str(checkpoint), "--max-prompt-tokens", "64"], "--max-prompt-tokens: got 64; allowed: at most 63"),
             ([str(checkpoint), "--max-batch-size", "0"], "--max-batch-size: got 0"),
             ([str(checkpoint), "--max-prompt-tokens", "0"], "--max-prompt-tokens: got 0"),
             ([str(checkpoint), "--max-new-tokens", "0"], "--max-new-tokens: got 0"),
             ([str(checkpoint), "--port", "70000"], "--port: got 70000")]
    for argv, message in cases:
        assert serve_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_prompt_the_decoder_refuses_fails_alone_and_its_batch_mates_finish():
    """The handlers check every prompt before it is queued; should one still be refused when its row is filled,
    that job gets an error and the jobs admitted with it (before and after it) are decoded, none left waiting."""
    import asyncio
    from types import SimpleNamespace

    import torch

    from launcher.serving.engine import Engine, Job
    from launcher.serving.metrics import Metrics
    from model import GPTMoE, GPTMoEConfig
    from model.generation import SamplingParams

    torch.manual_seed(0)
    model = GPTMoE(GPTMoEConfig.from_size("nano", vocab_size=64, seq_len=16, num_experts=4)).eval()
    engine = Engine(model, SimpleNamespace(decode=lambda ids: "", pad_id=0), max_batch_size=4, max_queue=8,
                    metrics=Metrics())
    greedy = dict(temperature=0.0)

    async def run():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [Job([1, 2, 3], SamplingParams(max_new_tokens=4, **greedy), loop, events=events),
                Job([5] * 10, SamplingParams(max_new_tokens=10, **greedy), loop, events=events),  # 10 + 10 > 16
                Job([4, 5], SamplingParams(max_new_tokens=3, **greedy), loop, events=events)]
        engine.submit(jobs)
        outcome = {}
        while len(outcome) < len(jobs):
            kind, job, value = await asyncio.wait_for(events.get(), timeout=60)
            if kind != "token":
                outcome[jobs.index(job)] = (kind, value)
        return outcome

    engine.start()
    try:
        outcome = asyncio.run(run())
    finally:
        engine.stop()
    assert outcome[1][0] == "error" and outcome[1][1].startswith("max_new_tokens: got 10")
    assert outcome[0][0] == "done" and len(outcome[0][1].token_ids) == 4
    assert outcome[2][0] == "done" and len(outcome[2][1].token_ids) == 3
    assert engine.running == 0
