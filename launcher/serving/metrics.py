"""The service's counters, gauges and histograms, written in Prometheus' text exposition format (0.0.4).

Updated from two threads (the event loop and the decoding thread): one lock guards them all.
"""
from __future__ import annotations

import math
import threading
from bisect import bisect_left
from typing import Callable

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            running += n
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum!r}", f"{name}_count{braces} {running}"]
        return out


class Metrics:
    """What GET /metrics shows. `gauges` are read when scraped (queue depth, running rows)."""

    def __init__(self, prefix: str = "gptmoe"):
        self.prefix = prefix
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.latency: dict[str, Histogram] = {}  # endpoint -> seconds from request to last byte
        self.first_token = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.cancelled_prompts = 0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def step(self, rows: int, new_tokens: int) -> None:
        with self.lock:
            self.batch_size.observe(rows)
            self.generated_tokens += new_tokens

    def admitted(self, prompt_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens

    def cancelled(self, prompts: int) -> None:
        with self.lock:
            self.cancelled_prompts += prompts

    def first_token_after(self, seconds: float) -> None:
        with self.lock:
            self.first_token.observe(seconds)

    def render(self) -> str:
        p = self.prefix
        with self.lock:
            out = [f"# HELP {p}_requests_total HTTP requests answered, by endpoint and status code.",
                   f"# TYPE {p}_requests_total counter"]
            out += [f'{p}_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += [f"# HELP {p}_request_latency_seconds Time from a request's arrival to its last byte.",
                    f"# TYPE {p}_request_latency_seconds histogram"]
            for endpoint, hist in sorted(self.latency.items()):
                out += hist.lines(f"{p}_request_latency_seconds", f'endpoint="{endpoint}"')
            out += [f"# HELP {p}_time_to_first_token_seconds Time from a prompt's arrival to its first new token.",
                    f"# TYPE {p}_time_to_first_token_seconds histogram",
                    *self.first_token.lines(f"{p}_time_to_first_token_seconds"),
                    f"# HELP {p}_batch_size Rows in each decoding step.",
                    f"# TYPE {p}_batch_size histogram",
                    *self.batch_size.lines(f"{p}_batch_size"),
                    f"# HELP {p}_prompt_tokens_total Prompt tokens admitted for decoding.",
                    f"# TYPE {p}_prompt_tokens_total counter",
                    f"{p}_prompt_tokens_total {self.prompt_tokens}",
                    f"# HELP {p}_generated_tokens_total New tokens generated.",
                    f"# TYPE {p}_generated_tokens_total counter",
                    f"{p}_generated_tokens_total {self.generated_tokens}",
                    f"# HELP {p}_cancelled_prompts_total Prompts dropped because their client went away.",
                    f"# TYPE {p}_cancelled_prompts_total counter",
                    f"{p}_cancelled_prompts_total {self.cancelled_prompts}"]
        for name, (help_text, read) in sorted(self.gauges.items()):
            out += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} gauge", f"{p}_{name} {read()}"]
        return "\n".join(out) + "\n"
