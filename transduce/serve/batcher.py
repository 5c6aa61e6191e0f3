"""Dynamic batching: inputs of requests that arrive close together are decoded together.

Each request becomes a `Job` of inputs sharing a key (model, endpoint, decoding options) and a
function that turns a list of inputs into their results (`inference.decode`, a task's `predict`).
One dispatcher task on the event loop forms batches: it waits for a free decoding thread, then for
up to `max_wait_s` after the oldest waiting input arrived unless its key's inputs already fill
`max_batch_tokens` (source tokens, padded: inputs x the longest, as CTranslate2's
batch_type=tokens), and takes the inputs of the oldest input's key nearest to it in length, so that
short and long inputs are not padded against each other more than the budget asks. Batches run on
`workers` threads (`decode.workers`); the event loop keeps answering meanwhile.

The queue holds at most `max_queue` requests (beyond it `Overloaded`, a 503). A request past its
deadline, or whose client went away, is cancelled: its inputs not yet in a batch are dropped.
`max_batch_tokens=0` decodes each request alone (the naive server, for comparison).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from transduce.serve.metrics import Metrics


class Overloaded(Exception):
    """The queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    pass


class ClientGone(Exception):
    pass


_ids = itertools.count()


@dataclass(eq=False)
class Job:
    key: tuple
    fn: Callable[[list], list]
    inputs: list
    lengths: list[int]
    model: str                      # metric label
    max_items: int                  # most inputs in one batch of this job's key (decode.batch_size)
    deadline: float                 # time.monotonic() past which it is answered 504
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    results: list = field(default_factory=list)
    left: int = 0                   # inputs not yet decoded
    untaken: int = 0                # inputs not yet in a batch
    cancelled: bool = False
    id: int = field(default_factory=lambda: next(_ids))


@dataclass(eq=False)
class Item:
    job: Job
    index: int

    @property
    def length(self) -> int:
        return max(1, self.job.lengths[self.index])


class Batcher:
    def __init__(self, metrics: Metrics, max_batch_tokens: int = 4096, max_wait_s: float = 0.005,
                 max_queue: int = 256, workers: int = 1):
        if max_batch_tokens < 0 or max_wait_s < 0 or max_queue < 1 or workers < 1:
            raise ValueError("need max_batch_tokens >= 0, max_wait >= 0, max_queue >= 1 and workers >= 1")
        self.metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.workers = workers
        self.pending: list[Item] = []    # in arrival order
        self.waiting: set[Job] = set()   # jobs with inputs not yet in a batch: the queue
        self.batches = 0                 # batches started
        self._arrived: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Future] = set()

    # -- life -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="transduce-serve")
        self._task = asyncio.create_task(self._dispatch())

    async def stop(self) -> None:
        """Finish what is queued and in flight, then stop."""
        while self.pending or self._running:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, key: tuple, fn: Callable[[list], list], inputs: list, lengths: list[int], model: str,
               max_items: int, timeout_s: float) -> Job:
        if len(self.waiting) >= self.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded(f"the queue is full ({self.max_queue} requests waiting, --max-queue); "
                             "retry later", retry_after=1)
        job = Job(key, fn, list(inputs), list(lengths), model, max(1, max_items),
                  time.monotonic() + timeout_s, asyncio.get_running_loop().create_future())
        job.results = [None] * len(inputs)
        job.left = job.untaken = len(inputs)
        if not inputs:
            job.future.set_result([])
            return job
        self.pending.extend(Item(job, i) for i in range(len(inputs)))
        self.waiting.add(job)
        self.metrics.queue_size.set(len(self.waiting))
        self._arrived.set()
        return job

    async def wait(self, job: Job, disconnected: Callable[[], Any] | None = None) -> list:
        """The job's results; DeadlineExceeded past its deadline, ClientGone once the awaitable
        `disconnected()` returns (the client left); either cancels the job."""
        watch = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            waits = {job.future} | ({watch} if watch is not None else set())
            done, _ = await asyncio.wait(waits, timeout=max(0.0, job.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watch is not None:
                watch.cancel()
        if job.future.done() and not job.future.cancelled():
            return job.future.result()  # or raises what decoding raised (DeadlineExceeded if dropped)
        self.cancel(job)
        if watch is not None and watch in done:
            self.metrics.rejected.labels("client_gone").inc()
            raise ClientGone()
        self.metrics.rejected.labels("deadline").inc()
        raise DeadlineExceeded()

    def cancel(self, job: Job, error: Exception | None = None) -> None:
        """Drop the job's inputs that are not yet in a batch (those decoding finish, unread); its
        future gets `error`, or is cancelled."""
        job.cancelled = True
        if job.untaken:
            self.pending = [it for it in self.pending if it.job is not job]
            job.untaken = 0
        self._left_queue(job)
        if not job.future.done():
            job.future.set_exception(error) if error is not None else job.future.cancel()

    def _left_queue(self, job: Job) -> None:
        self.waiting.discard(job)
        self.metrics.queue_size.set(len(self.waiting))

    # -- batches ----------------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        while True:
            if not self.pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._slots.acquire()
            try:
                await self._fill()
                batch = self._take()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            self._run(batch)

    async def _fill(self) -> None:
        """Wait until the oldest input's key has a full batch, or it has waited max_wait_s."""
        while True:
            self._drop_expired()
            if not self.pending or self.max_batch_tokens == 0:
                return
            oldest = self.pending[0]
            group = [it for it in self.pending if it.job.key == oldest.job.key]
            if len(group) >= oldest.job.max_items or \
                    len(group) * max(it.length for it in group) >= self.max_batch_tokens:
                return
            wait = oldest.job.enqueued + self.max_wait_s - time.monotonic()
            if wait <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except asyncio.TimeoutError:
                return

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for job in {it.job for it in self.pending if it.job.deadline <= now}:
            self.metrics.rejected.labels("deadline").inc()
            self.cancel(job, DeadlineExceeded())

    def _take(self) -> list[Item]:
        """The batch of the oldest waiting input, removed from the queue."""
        if not self.pending:
            return []
        oldest = self.pending[0]
        if self.max_batch_tokens == 0:  # the naive server: one request alone
            chosen = [it for it in self.pending if it.job is oldest.job]
        else:
            chosen = self._nearest(oldest, [it for it in self.pending if it.job.key == oldest.job.key])
        taken = set(map(id, chosen))
        self.pending = [it for it in self.pending if id(it) not in taken]
        now = time.monotonic()
        for it in chosen:
            it.job.untaken -= 1
            if it.job.untaken == 0:
                self._left_queue(it.job)
            self.metrics.queue_time.labels(it.job.model).observe(now - it.job.enqueued)
        return chosen

    def _nearest(self, oldest: Item, group: list[Item]) -> list[Item]:
        """The oldest input and its neighbours in length, while inputs x longest <= the budget."""
        ranked = sorted(group, key=lambda it: it.length)
        p = next(i for i, it in enumerate(ranked) if it is oldest)
        lo, hi, longest = p, p + 1, oldest.length
        limit = oldest.job.max_items
        while hi - lo < limit:
            n = hi - lo
            left = longest * (n + 1) if lo > 0 else None                       # a shorter one: no more padding
            right = max(longest, ranked[hi].length) * (n + 1) if hi < len(ranked) else None
            options = [(c, side) for c, side in ((left, "left"), (right, "right")) if c is not None]
            if not options:
                break
            cost, side = min(options)
            if cost > self.max_batch_tokens:
                break
            if side == "left":
                lo -= 1
            else:
                longest = max(longest, ranked[hi].length)
                hi += 1
        return ranked[lo:hi]

    def _run(self, batch: list[Item]) -> None:
        self.batches += 1
        model = batch[0].job.model
        self.metrics.batch_size.labels(model).observe(len(batch))
        self.metrics.tokens_in.labels(model).inc(sum(it.job.lengths[it.index] for it in batch))
        self.metrics.in_flight.inc()
        fn = batch[0].job.fn
        inputs = [it.job.inputs[it.index] for it in batch]

        def work():
            t0 = time.perf_counter()
            try:
                return fn(inputs)
            finally:
                self.metrics.inference_time.labels(model).observe(time.perf_counter() - t0)

        fut = asyncio.get_running_loop().run_in_executor(self._pool, work)
        self._running.add(fut)
        fut.add_done_callback(lambda f: self._finish(batch, f))

    def _finish(self, batch: list[Item], fut: asyncio.Future) -> None:
        self._running.discard(fut)
        self._slots.release()
        self.metrics.in_flight.dec()
        error = fut.exception()
        outs = None if error is not None else fut.result()
        for k, it in enumerate(batch):
            job = it.job
            if job.future.done():
                continue
            if error is not None:
                self.cancel(job, error)
                continue
            job.results[it.index] = outs[k]
            job.left -= 1
            if job.left == 0:
                job.future.set_result(job.results)

