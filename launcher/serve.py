"""Serve a trained checkpoint over HTTP: `python -m launcher.serve CHECKPOINT [--port 8000] ...`.

CHECKPOINT is a run folder, its checkpoints folder or one checkpoint's tag folder (any expert-parallel size;
every expert loads into this process, through the same safe path as launcher.generate). Endpoints:

    POST /                 the tutorial's processor: {"text", "max_length", "top_k", "top_p", "temperature"}
                           -> {"text": continuation} (text may be a list: one continuation each)
    POST /v1/completions   OpenAI's completions: prompt, max_tokens, temperature, top_p, stop, seed, n=1,
                           stream (server-sent events); usage counts tokens
    GET  /v1/models        the one model served
    GET  /health           200 once the model has loaded, 503 before and while shutting down
    GET  /metrics          Prometheus text: requests by endpoint and status, latency, batch sizes, queue depth,
                           tokens

Concurrent requests are decoded together (dynamic batching with the KV cache, at most --max-batch-size rows);
prompts beyond that wait in a queue of --max-queue, and a request that finds it full gets 503 with Retry-After.
Bad requests get a 4xx whose JSON body names the field. SIGTERM (or Ctrl-C): stop accepting, finish what is in
flight, exit 0. The serving parts are launcher/serving/.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from launcher.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m launcher.serve", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run folder, checkpoints folder or tag folder (iter_NNNNNNN)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the one taken is printed)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="tokens of one prompt at most; longer ones get 400 (default: the model's positions - 1)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="max_tokens / max_length at most (default: min(512, the model's positions - 1))")
    p.add_argument("--max-batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--max-queue", type=int, default=64,
                   help="prompts waiting for a place in the batch; beyond it requests get 503 with Retry-After")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="request body size at most (413)")
    p.add_argument("--model-name", default=None, help="the name /v1/models and responses give (default: the run's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on a GPU that supports it, else fp32")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: OMP_NUM_THREADS, else the cores not busy with other work)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _limits(args, seq_len: int):
    from launcher.serving.protocol import Limits

    def given_or(value, default):  # 0 is a value (refused by Limits), not "not given"
        return default if value is None else value

    return Limits(max_prompt_tokens=given_or(args.max_prompt_tokens, seq_len - 1),
                  max_new_tokens=given_or(args.max_new_tokens, min(512, seq_len - 1)),
                  max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                  max_request_bytes=args.max_request_bytes, seq_len=seq_len)


def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise UsageError(f"--port: got {port}; allowed: 0 to 65535 (0: any free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise UsageError(f"--host/--port: cannot listen on {host}:{port} ({err.strerror or err})") from None


def run(args) -> int:
    from launcher.inference import load_checkpoint, resolve_device, resolve_dtype, set_threads
    from launcher.training.checkpoint import find_checkpoint, read_model_config

    device = resolve_device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before model/ imports DeepSpeed: spares its warning
    # What can be checked without reading weights is checked before the port is taken: one line, exit 2.
    found = find_checkpoint(args.checkpoint)
    if found is None:
        load_checkpoint(args.checkpoint)  # raises the one-line UsageError saying what is missing
    folder, tag = found
    limits = _limits(args, read_model_config(folder / tag).seq_len)
    name = args.model_name or (folder.parent.name if folder.name == "checkpoints" else folder.name)
    sock = _listen(args.host, args.port)

    import uvicorn

    from launcher.serving.app import Service, create_app

    threads_line = set_threads(args.threads) if device.type == "cpu" else f"# device: {device}"
    dtype = resolve_dtype(args.dtype, device)
    server: uvicorn.Server | None = None

    def load():
        model, tokenizer, _ = load_checkpoint(folder / tag, device, dtype)
        return model, tokenizer

    def failed(message: str):
        server.should_exit = True

    service = Service(load, lambda mcfg: limits, name, on_failure=failed)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: new requests get 503 while the rest finish
            if service.state in ("ready", "loading"):
                service.state = "draining"
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(service), log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=None)
    server = Server(config)
    host, port = sock.getsockname()[:2]
    print(f"{threads_line}\n# {folder / tag}\n# serving {name} on http://{host}:{port} "
          f"(batch {limits.max_batch_size}, queue {limits.max_queue}, prompt <= {limits.max_prompt_tokens} "
          f"tokens, new <= {limits.max_new_tokens} tokens)", file=sys.stderr, flush=True)
    # uvicorn re-raises the signal that stopped it once it has drained; these handlers make that a no-op, so a
    # drained server exits 0 rather than dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log = logging.getLogger("launcher.serve")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))  # uvicorn's look
    log.addHandler(handler)
    log.setLevel(args.log_level.upper())
    server.run(sockets=[sock])
    if service.state == "failed":
        print(f"error: {service.error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
