"""Dynamic batching: concurrent requests gathered for a few ms (or up to a token cap), one model call, split answers.

The model runs in one worker thread, never on the event loop: while it computes a batch, new requests queue up
and form the next one. The worker shares nothing with the loop but each call's arguments and result: it counts
its forwards into a Counter of that call, which the loop adds to the metrics once the call has returned.

A request may wait in the queue until a deadline; past it, and not yet taken into a batch, it leaves the queue
unrun. `Backlog` bounds the texts admitted and not yet answered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from budgetune.serve.registry import Row
from budgetune.serve.telemetry import Metrics


@dataclass
class Job:
    """One request's rows and the future its handler awaits."""

    rows: Sequence[Row]
    future: asyncio.Future
    tokens: int = field(init=False)
    taken: bool = field(default=False, init=False)  # gathered into a batch: answered, however long it runs

    def __post_init__(self):
        self.tokens = sum(len(r.features["input_ids"]) for r in self.rows)


class DynamicBatcher:
    """Gathers jobs until `max_wait_s` after the first one or `max_tokens` real tokens, then runs them together.

    `enabled=False` runs each request on its own (the baseline bench/serve.py compares against).
    """

    def __init__(self, run: Callable[[Sequence[Row], Counter[str]], np.ndarray], executor: Executor,
                 metrics: Metrics, *,
                 max_wait_s: float = 0.005, max_tokens: int = 4096, enabled: bool = True):
        self.run, self.executor, self.metrics = run, executor, metrics
        self.max_wait_s, self.max_tokens, self.enabled = max_wait_s, max_tokens, enabled
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Answer every queued job, then end the loop (the caller has stopped taking requests)."""
        if self.task is not None:
            await self.queue.put(None)
            await self.task
            self.task = None

    async def submit(self, rows: Sequence[Row], deadline: float | None = None) -> np.ndarray:
        """Logits for these rows, computed in some batch with other requests' rows.

        TimeoutError when no batch has taken them by `deadline` (the loop's clock); they leave the queue unrun.
        """
        loop = asyncio.get_running_loop()
        job = Job(rows, loop.create_future())
        self.queue.put_nowait(job)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), None if deadline is None else
                                          deadline - loop.time())
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            if not job.taken:
                raise
            return await job.future
        finally:
            if not job.future.done():  # timed out, or the client went away: the batcher skips it
                job.future.cancel()

    @staticmethod
    def _take(job: Job | None) -> bool:
        """Whether a job from the queue joins a batch (one that left the queue is dropped)."""
        if job is None or job.future.done():
            return False
        job.taken = True
        return True

    async def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """(jobs for one batch, whether the stop marker was seen)."""
        jobs, tokens = [first], first.tokens
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while self.enabled and tokens < self.max_tokens:
            left = deadline - loop.time()
            try:  # past the deadline, still take what is already waiting
                job = self.queue.get_nowait() if left <= 0 else await asyncio.wait_for(self.queue.get(), left)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if job is None:
                return jobs, True
            if self._take(job):
                jobs.append(job)
                tokens += job.tokens
        return jobs, False

    async def _loop(self) -> None:
        stopping = False
        while True:
            if stopping and self.queue.empty():
                return
            first = self.queue.get_nowait() if stopping else await self.queue.get()
            if first is None:
                stopping = True
                continue
            if not self._take(first):
                continue
            jobs, seen_stop = await self._gather(first)
            stopping = stopping or seen_stop
            await self._run_batch(jobs)

    def _count(self, forwards: Counter[str]) -> None:
        for kind, n in forwards.items():
            self.metrics.forwards[kind] += n

    async def _run_batch(self, jobs: list[Job]) -> None:
        rows = [r for j in jobs for r in j.rows]
        self.metrics.batch_texts.observe(len(rows))
        self.metrics.batch_requests.observe(len(jobs))
        forwards: Counter[str] = Counter()  # the worker's until its call returns, then the loop's
        try:
            logits = await asyncio.get_running_loop().run_in_executor(self.executor, self.run, rows, forwards)
        except Exception as e:  # answered as an error to these requests; the loop and the worker live on
            self._count(forwards)
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        self._count(forwards)
        start = 0
        for j in jobs:
            if not j.future.done():  # a client that went away cancelled its future
                j.future.set_result(logits[start:start + len(j.rows)])
            start += len(j.rows)


class Backlog:
    """Texts admitted and not yet answered (tokenizing, queued or in a batch): at most `limit`."""

    def __init__(self, limit: int):
        self.limit, self.texts = limit, 0

    def fits(self, n: int) -> bool:
        return self.texts + n <= self.limit

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        self.texts += n
        try:
            yield
        finally:
            self.texts -= n


@contextlib.asynccontextmanager
async def running(batcher: DynamicBatcher):
    """The batcher's loop for the duration of the block; queued work is answered before it ends."""
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop()
