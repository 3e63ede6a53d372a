"""Continuous batching for a model service: the calls of many sessions share each forward pass.

A model call (a verify pass, a beam search, a sampled draft) is written as a *job*: a generator
that yields the :class:`~specdec.engine.Part` it needs computed next (a prefill chunk, a tree, a
beam level) and receives that part's logits, until it returns the call's result. The
:class:`BatchWorker` runs every job on one model thread: before each forward pass it admits the
calls that arrived (waiting up to ``gather_s`` for more once one came), drops the jobs whose caller
has gone or whose deadline has passed, and feeds one part of each waiting job into a single
:func:`~specdec.engine.forward_batch` call, within ``max_rows`` rows, least recently served first.
Jobs join and leave between passes; a long prefill is cut into chunks (:func:`feed`) so that it
never holds the others up for more than one pass.

Why one thread: on a CPU each calling thread would get its own OpenMP team, and concurrent passes
would only split the same cores (or the same GPU stream). Since every call that touches a session's
cache runs on it, no cache is changed by two calls at once, and two calls of one session never
share a pass (the second waits for the first).

Hand-written rather than ``transformers``' continuous batching (``generate_batch``/paged
attention): that manager schedules its own sampling loop over fresh requests, while here each pass
carries per-session trees over caches that outlive the call, and the rows must keep the bits they
get alone (``specdec.kernels``).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterable

import torch

from specdec import telemetry
from specdec.engine import Part, forward_attributes
from specdec.errors import Cancelled, DeadlineExceeded

Steps = Generator[Part, torch.Tensor, object]
STALE_S = 60.0  # a session away this much longer than usual is no longer expected back


@dataclass(frozen=True)
class Caller:
    """Who waits for a call: ``alive()`` turns false when the caller has gone (a gRPC context's
    ``is_active``); ``deadline`` is when it stops waiting (``time.monotonic()``)."""

    alive: Callable[[], bool] | None = None
    deadline: float | None = None

    @classmethod
    def of_rpc(cls, context) -> Caller:
        """The caller of a gRPC call (``context``: its ``grpc.ServicerContext``)."""
        remaining = context.time_remaining()
        return cls(context.is_active, None if remaining is None else time.monotonic() + remaining)


@dataclass(frozen=True)
class BatchInfo:
    """The forward pass a call's last part ran in."""

    sessions: int = 1
    rows: int = 1


@dataclass
class BatchStats:
    """What a call saw of batching: time queued before its first pass, and its last pass's batch."""

    queue_s: float = 0.0
    batch: BatchInfo = field(default_factory=BatchInfo)


@dataclass(eq=False)
class _Job:
    make_steps: Callable[[], Steps]
    session_id: str
    future: Future
    caller: Caller
    context: contextvars.Context
    queued_at: float = field(default_factory=time.monotonic)
    steps: Steps | None = None
    part: Part | None = None
    created_session: bool = False
    released: bool = False  # ReleaseSession arrived while the job ran
    served_at: float = 0.0
    stats: BatchStats = field(default_factory=BatchStats)

    def gone(self, now: float) -> Exception | None:
        if self.caller.alive is not None and not self.caller.alive():
            return Cancelled("the caller went away before the call ran")
        if self.caller.deadline is not None and now >= self.caller.deadline:
            return DeadlineExceeded("the call's deadline passed while it waited for the model")
        return None


def feed(session, pending: list[int], new_tokens=(), new_parents=(), keep: int = 1, reduce=None, head=None,
         chunk: int = 0) -> Generator[Part, torch.Tensor, torch.Tensor]:
    """Steps that feed ``pending`` then the tree nodes, as :func:`~specdec.engine.tree_forward` does in
    one pass, but with the sequential tokens cut into passes of at most ``chunk`` rows (0: no limit)
    before the last part; returns the last part's logits. Row by row the result is the same: each
    token attends to the same keys whichever pass it is in."""
    pending, new_tokens = list(pending), list(new_tokens)
    need = max(0 if new_tokens else 1, keep - len(new_tokens))  # pending tokens the last part must hold
    while chunk and len(pending) + len(new_tokens) > chunk and len(pending) > need:
        n = min(chunk, len(pending) - need)
        yield Part(session, pending[:n], keep=0)
        pending = pending[n:]
    return (yield Part(session, pending, new_tokens, list(new_parents), keep, reduce, head))


class PassSchedule:
    """When the next pass starts and which calls it takes: the scheduling policy alone, no thread
    and no model (:class:`BatchWorker` consults it under its lock before every pass).

    It remembers, per session, when its last call ended and how long it usually stays away (the
    other service's part of a round), and the recent passes' duration: a pass may wait a little for
    the sessions about to come back (:meth:`start_at`), so that the rounds of many generations keep
    sharing passes instead of splitting into cohorts."""

    def __init__(self, max_rows: int = 256, gather_s: float = 0.002, company_wait: float = 0.5) -> None:
        self.max_rows, self.gather_s = max(1, max_rows), gather_s
        self.company_wait = company_wait  # share of a pass a pass may wait for sessions due back
        self._returns: dict[str, list[float]] = {}  # session -> [when its last call ended, its usual time away]
        self.pass_s = 0.0  # recent passes' duration (a running mean)

    def arrived(self, session_id: str, now: float) -> None:
        """A call of the session came in: how long it was away joins its usual time away."""
        if (back := self._returns.get(session_id)) is not None and back[0]:
            away = now - back[0]
            back[1] = away if back[1] is None else back[1] + 0.3 * (away - back[1])
            back[0] = 0.0  # here now

    def ended(self, session_id: str, now: float) -> None:
        """A call of the session completed: it is expected back."""
        self._returns.setdefault(session_id, [0.0, None])[0] = now

    def forget(self, session_id: str) -> None:
        """The session is gone (released, or its call failed): never waited for."""
        self._returns.pop(session_id, None)

    def passed(self, took_s: float) -> None:
        self.pass_s = took_s if not self.pass_s else self.pass_s + 0.2 * (took_s - self.pass_s)

    def start_at(self, now: float) -> float:
        """When to start the next pass, waiting for sessions due back soon.

        Under load, each generation's rounds come back to this service after the other service's
        part of the round: the verify service sees a session again a drafting step after it
        answered it. Sessions that fall out of step would split into cohorts that each pay for a
        pass of their own, so a pass waits for the sessions whose usual time away says they are
        about to arrive, up to ``company_wait`` of a pass; a session that is late past that, or
        away longer than that, is not waited for (the draft service, whose sessions are away for a
        whole verify pass, never waits this way)."""
        bound = now + self.company_wait * self.pass_s
        start = now
        for session_id, (ended, away) in list(self._returns.items()):
            if ended and now > ended + (away or 0.0) + STALE_S:
                del self._returns[session_id]  # a caller that never came back nor released its session
            elif ended and away is not None and now <= ended + away + self.gather_s <= bound:
                start = max(start, ended + away + self.gather_s)
        return start

    def choose(self, active: list[_Job]) -> list[_Job]:
        """The pass's calls: least recently served first, within ``max_rows`` rows (a call whose part
        does not fit waits for the next pass; the first always goes)."""
        batch, rows = [], 0
        for job in sorted(active, key=lambda j: j.served_at):
            if batch and rows + job.part.rows > self.max_rows:
                continue
            batch.append(job)
            rows += job.part.rows
        return batch


class BatchWorker:
    """Runs a model's jobs on one thread, batching their parts; see the module docstring.

    ``forward(parts)`` is the model's :func:`~specdec.engine.forward_batch`; ``store`` the service's
    :class:`~specdec.kv_cache.SessionStore` (a job's session is created by its first part only, and
    dropped again when the job fails or is cancelled before it ends).
    """

    def __init__(self, forward: Callable[[list[Part]], list[torch.Tensor]], store, max_rows: int = 256,
                 gather_s: float = 0.002, observe: Callable[[BatchInfo, float], None] | None = None,
                 company_wait: float = 0.5) -> None:
        self.forward, self.store = forward, store
        self.gather_s = gather_s
        self.schedule = PassSchedule(max_rows, gather_s, company_wait)
        self.observe = observe  # (a pass's batch, seconds it waited in the queue), for metrics
        self._incoming: deque = deque()
        self._waiting: list[_Job] = []  # admitted, not started (their session is busy)
        self._active: list[_Job] = []
        self._cond = threading.Condition()
        self._last_arrival = 0.0
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called from any thread

    def submit(self, make_steps: Callable[[], Steps], session_id: str, caller: Caller | None = None):
        """Run the job ``make_steps()`` to its end; returns ``(result, BatchStats)``. When the
        ``caller`` has gone or its deadline has passed before a pass, the job is dropped with
        :class:`Cancelled` / :class:`DeadlineExceeded` and leaves no session it created behind."""
        job = _Job(make_steps, session_id, Future(), caller or Caller(), contextvars.copy_context())
        self._put(job)
        return job.future.result(), job.stats

    def run(self, fn, *args, **kwargs):
        """``fn`` alone on the model thread, between passes (start-up calibration, maintenance)."""
        future: Future = Future()
        self._put((future, contextvars.copy_context(), fn, args, kwargs))
        return future.result()

    def release(self, session_id: str) -> bool:
        """Drop the session's cache now, and again when a job still running in it ends."""
        with self._cond:
            for job in self._active:
                if job.session_id == session_id:
                    job.released = True
            self.schedule.forget(session_id)
        return self.store.release(session_id)

    @property
    def load(self) -> int:
        """Calls queued or running."""
        with self._cond:
            return len(self._incoming) + len(self._waiting) + len(self._active)

    def _put(self, item) -> None:
        with self._cond:
            self._incoming.append(item)
            self._last_arrival = now = time.monotonic()
            if isinstance(item, _Job):
                self.schedule.arrived(item.session_id, now)
            self._cond.notify()

    # ------------------------------------------------------------------ the model thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._incoming and not self._active and not self._waiting:
                    self._cond.wait()
                # A call that just arrived may have company on its way (the other sessions of a
                # round): wait for a quiet moment, at most one gather window.
                if self._incoming and self.gather_s > 0:
                    end = time.monotonic() + self.gather_s
                    while (now := time.monotonic()) < min(end, self._last_arrival + self.gather_s / 4):
                        self._cond.wait(min(end, self._last_arrival + self.gather_s / 4) - now)
                while (now := time.monotonic()) < (start := self.schedule.start_at(now)):
                    self._cond.wait(start - now)
                incoming = list(self._incoming)
                self._incoming.clear()
            for item in incoming:
                if isinstance(item, _Job):
                    self._waiting.append(item)
                else:
                    _run_call(*item)
            self._start_waiting()
            if self._active:
                self._step()

    def _start_waiting(self) -> None:
        now = time.monotonic()
        busy = {job.session_id for job in self._active}
        still = []
        for job in self._waiting:
            if (error := job.gone(now)) is not None:
                job.future.set_exception(error)
            elif job.session_id in busy:
                still.append(job)  # another call of this session runs: this one waits its turn
            else:
                busy.add(job.session_id)
                job.stats.queue_s = now - job.queued_at
                job.created_session = self.store.peek(job.session_id) is None
                job.steps = job.context.run(job.make_steps)
                self._advance(job, None, first=True)
        self._waiting = still

    def _advance(self, job: _Job, output, first: bool = False) -> None:
        """Send ``output`` into the job (start it when ``first``): it either asks for its next part or ends."""
        try:
            job.part = job.context.run(job.steps.__next__ if first else job.steps.send, *(() if first else (output,)))
        except StopIteration as done:
            self._finish(job)
            job.future.set_result(done.value)
            return
        except BaseException as exc:  # noqa: BLE001 - the caller gets the error; the service goes on
            self._fail(job, exc)
            return
        if first:
            with self._cond:
                self._active.append(job)

    def _finish(self, job: _Job, completed: bool = True) -> None:
        with self._cond:
            if job in self._active:
                self._active.remove(job)
            if completed and not job.released:
                self.schedule.ended(job.session_id, time.monotonic())
            else:
                self.schedule.forget(job.session_id)
        if job.released:
            self.store.release(job.session_id)
        self.store.enforce_limits(keep={j.session_id for j in self._active} | {job.session_id})

    def _fail(self, job: _Job, error: BaseException) -> None:
        if job.steps is not None:
            job.steps.close()
        self._finish(job, completed=False)
        if job.created_session or job.released:
            self.store.release(job.session_id)  # no cache is kept for a call that did not complete
        job.future.set_exception(error)

    def _step(self) -> None:
        now = time.monotonic()
        for job in list(self._active):
            if (error := job.gone(now)) is not None:
                self._fail(job, error)
        batch = self.schedule.choose(self._active)
        if not batch:
            return
        rows = sum(job.part.rows for job in batch)
        for job in batch:  # each call's trace gets a span over the pass it shared
            job.part.span = job.context.run(_forward_span, job.part, len(batch), rows)
        started = time.monotonic()
        try:
            outputs = self._forward(batch)
            self.schedule.passed(time.monotonic() - started)
        finally:
            for job in batch:
                if job.part.span is not None:
                    job.part.span.end()
        info = BatchInfo(len(batch), rows)
        served = time.monotonic()
        if self.observe is not None:
            for job in batch:
                if job.served_at == 0.0:
                    self.observe(info, job.stats.queue_s)
        for job, output in zip(batch, outputs):
            job.served_at, job.stats.batch = served, info
            if isinstance(output, BaseException):
                self._fail(job, output)
            else:
                self._advance(job, output)

    def _forward(self, batch: list[_Job]) -> list:
        """One pass over the batch's parts; when it fails, each part alone, so that one bad part
        fails only its own call."""
        try:
            return batch[0].context.run(self.forward, [job.part for job in batch])
        except Exception as exc:  # noqa: BLE001 - isolated below
            if len(batch) == 1:
                return [exc]
        outputs = []
        for job in batch:
            try:
                outputs.extend(job.context.run(self.forward, [job.part]))
            except Exception as exc:  # noqa: BLE001 - this call's error
                outputs.append(exc)
        return outputs


def _forward_span(part: Part, sessions: int, rows: int):
    """A ``specdec.forward`` span, child of the current one, that the caller ends; None when tracing is off."""
    if not telemetry.enabled():
        return None
    span = telemetry.tracer().start_span("specdec.forward")
    forward_attributes(span, part, sessions, rows)
    return span


def _run_call(future: Future, context: contextvars.Context, fn, args, kwargs) -> None:
    try:
        future.set_result(context.run(fn, *args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - handed to the caller
        future.set_exception(exc)
