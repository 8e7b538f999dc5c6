"""The decoding thread: one model, one running batch, fed by a bounded queue of prompts (dynamic batching).

Each prompt of a request is a Job. Handlers on the event loop `submit` jobs (all of a request's prompts or
none: QueueFull when they do not fit the queue) and read what happens to them from the job's asyncio queue.
The decoding thread loops: it drops cancelled jobs, moves waiting jobs into free rows of the batch (at most
max_batch_size rows), runs one `Decoder.step` (newcomers are prefilled and merged into the running batch's
KV cache), and posts each row's new token and each finished completion back to the event loop. The model
runs outside the event loop, so health checks, metrics and refusals are answered while it computes.

Every row's tokens depend on its own prompt, settings and seed only (model.generation), so a prompt gives the
same text whatever it was batched with.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from model.generation import Decoder, Request, SamplingParams

from .metrics import Metrics

log = logging.getLogger("launcher.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)  # a job is itself: two equal prompts are two jobs
class Job:
    """One prompt on its way through the batch; `events` gets ("token", job, id) while it runs (when `stream`),
    then ("done", job, Completion) or ("error", job, message)."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    key: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False

    def post(self, kind: str, value) -> None:
        """From the decoding thread: (kind, this job, value) into `events` (shared by a request's jobs)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, self, value))
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass


class Engine:
    def __init__(self, model, tokenizer, max_batch_size: int, max_queue: int, metrics: Metrics):
        self.decoder = Decoder(model, decode=tokenizer.decode, pad_id=tokenizer.pad_id)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.metrics = metrics
        self._keys = itertools.count()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._cancelled: list[Job] = []
        self._running: dict[int, Job] = {}  # touched by the decoding thread only
        self._stopping = False
        self._recent_seconds = 1.0  # a moving average of a job's time in the server, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="decoder", daemon=True)
        metrics.gauges["queue_depth"] = ("Prompts waiting for a row of the batch.", lambda: len(self._waiting))
        metrics.gauges["running_rows"] = ("Prompts being decoded.", lambda: self.running)

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish every job already submitted, then end the decoding thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of `jobs` or none (QueueFull with a Retry-After estimate)."""
        with self._cond:
            if len(self._waiting) + len(jobs) > self.max_queue:
                ahead = len(self._waiting) + self.running
                wait = self._recent_seconds * max(1.0, ahead / self.max_batch_size)
                raise QueueFull(max(1, math.ceil(wait)))
            for job in jobs:
                job.key = next(self._keys)
                self._waiting.append(job)
            self._cond.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """The client went away: its jobs leave the queue or the batch before the next step."""
        with self._cond:
            for job in jobs:
                if job in self._waiting:
                    self._waiting.remove(job)
                else:
                    self._cancelled.append(job)
            self._cond.notify()

    # ------------------------------------------------------------------------------ the decoding thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._cancelled or self.decoder.has_work() or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._waiting or self.decoder.has_work()):
                    return
                cancelled, self._cancelled = self._cancelled, []
                admitted = []
                while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
                    admitted.append(self._waiting.popleft())
            try:
                self._step(cancelled, admitted)
            except Exception as exc:  # a bug or an out-of-memory, not a request's content: fail the batch, go on
                log.exception("decoding step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def _step(self, cancelled: list[Job], admitted: list[Job]) -> None:
        for job in cancelled:
            if self._running.pop(job.key, None) is not None:
                self.decoder.cancel(job.key)
        # Running before they are added: should adding fail on something else than the request (a bug),
        # _fail_all reaches every admitted job, and no client waits for a job nobody decodes.
        self._running.update((job.key, job) for job in admitted)
        for job in admitted:
            try:
                self.decoder.add(Request(job.prompt_ids, job.params, key=job.key))
            except ValueError as exc:  # a request the decoder cannot run (the handlers check first): its own error
                del self._running[job.key]
                job.post("error", str(exc))
                continue
            self.metrics.admitted(len(job.prompt_ids))
        if not self.decoder.has_work():
            self.decoder.results()  # cancelled rows' completions: nobody waits for them
            return
        rows = len(self.decoder.rows) + len(self.decoder.pending)
        updates = self.decoder.step()
        now = time.perf_counter()
        self.metrics.step(rows, len(updates))
        for update in updates:
            job = self._running.get(update.key)
            if job is None:
                continue
            if not job.started:
                job.started = True
                self.metrics.first_token_after(now - job.submitted)
            if job.stream:
                job.post("token", update.token)
        for completion in self.decoder.results():
            job = self._running.pop(completion.key, None)
            if job is not None:
                self._recent_seconds = 0.8 * self._recent_seconds + 0.2 * (now - job.submitted)
                job.post("done", completion)

    def _fail_all(self, message: str) -> None:
        for job in self._running.values():
            job.post("error", message)
        self._running.clear()
        self.decoder = Decoder(self.model, decode=self.tokenizer.decode, pad_id=self.tokenizer.pad_id)

