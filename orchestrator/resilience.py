"""What keeps a generation going when services fail or load peaks: draft health with backoff, a
verify client that retries and fails over between replicas, and the bounded generation queue.

Neither changes what is generated. A draft only ever changes speed (greedy output is the target's
own whatever the drafts propose), and a verify call is a pure function of the context and the tree:
a replica that never saw the session rebuilds its cache from the full context it is sent.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from specdec.cost import Link
from specdec.errors import Cancelled, DeadlineExceeded, Overloaded, Unavailable

log = logging.getLogger("specdec.orchestrator")

# Statuses worth another try on another (or the same, restarted) replica: the call never reached a
# model, or the process serving it went away.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED})


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` waits up to ``initial * factor**n`` s."""

    initial_s: float = 0.1
    factor: float = 2.0
    max_s: float = 5.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        cap = min(self.max_s, self.initial_s * self.factor ** min(attempt, 32))
        return cap / 2 + self.rng.uniform(0, cap / 2)


class DraftHealth:
    """Which drafts to ask this round. A draft that fails or misses its deadline is left out for a
    backoff period that grows with each consecutive failure; when it is due it is asked again (the
    real call is the probe), and one success brings it fully back."""

    def __init__(self, backoff: Backoff | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff = backoff or Backoff(initial_s=0.5, max_s=5.0)
        self.clock = clock
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def usable(self, name: str) -> bool:
        with self._lock:
            return self.clock() >= self._retry_at.get(name, 0.0)

    def failed(self, name: str, reason: str) -> None:
        with self._lock:
            n = self._failures.get(name, 0)
            self._failures[name] = n + 1
            wait = self.backoff.delay(n)
            self._retry_at[name] = self.clock() + wait
        if n == 0:
            log.warning("draft %s left out: %s; retrying in %.1f s", name, reason, wait)
        else:
            log.info("draft %s still failing (%d in a row): %s; next try in %.1f s", name, n + 1, reason, wait)

    def succeeded(self, name: str) -> None:
        with self._lock:
            was_down = self._failures.pop(name, 0)
            self._retry_at.pop(name, None)
        if was_down:
            log.warning("draft %s is back after %d failed calls", name, was_down)

    def down(self) -> list[str]:
        with self._lock:
            return sorted(name for name, n in self._failures.items() if n)


class ReplicatedVerifier:
    """A verify client over one or more replicas of the verify service.

    Each session sticks to one replica (its KV cache lives there); sessions are spread round-robin.
    A call that fails with a retryable status (UNAVAILABLE: process gone, connection lost) is
    retried with backoff within the time it was given, on the next replica when there are several;
    the session moves there and is rebuilt from its full context. Other statuses (bad input, a
    deadline the caller set) are not retried.
    """

    def __init__(self, replicas: list, backoff: Backoff | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        if not replicas:
            raise ValueError("a verify client needs at least one replica")
        self.replicas = replicas
        self.backoff = backoff or Backoff(initial_s=0.1, max_s=2.0)
        self.sleep = sleep
        self._next = itertools.cycle(range(len(replicas)))
        self._home: dict[str, int] = {}  # session -> replica index
        self._used: dict[str, set[int]] = {}  # every replica a session touched, to release them all
        self._lock = threading.Lock()
        self.retries = 0  # calls retried, over the client's lifetime (for tests and metrics)
        self.link = Link()  # the replicas' calls' time outside the service, one estimate for all
        for replica in replicas:
            if hasattr(replica, "link"):
                replica.link = self.link

    @property
    def address(self) -> str:
        return ",".join(r.address for r in self.replicas)

    def info(self, timeout_s: float = 10.0):
        return self.replicas[0].info(timeout_s)

    def verify(self, session_id, context, tree, timeout_s: float, **options):
        return self._call("verify", session_id, timeout_s, context, tree, **options)

    def release(self, session_id: str) -> None:
        with self._lock:
            used = self._used.pop(session_id, set())
            self._home.pop(session_id, None)
        for index in sorted(used):
            try:
                self.replicas[index].release(session_id)
            except grpc.RpcError as exc:  # a replica that is down holds nothing worth freeing
                log.debug("release on %s failed: %s", self.replicas[index].address, exc)

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()

    def _replica(self, session_id: str) -> int:
        with self._lock:
            if session_id not in self._home:
                self._home[session_id] = next(self._next)
            index = self._home[session_id]
            self._used.setdefault(session_id, set()).add(index)
            return index

    def _move(self, session_id: str, failed: int) -> str:
        """Send the session to the replica after ``failed``; returns the address it now uses."""
        with self._lock:
            if self._home.get(session_id) == failed:
                self._home[session_id] = (failed + 1) % len(self.replicas)
            return self.replicas[self._home[session_id]].address

    def _call(self, method: str, session_id: str, timeout_s: float, *args, **kwargs):
        deadline = time.monotonic() + timeout_s
        for attempt in itertools.count():
            index = self._replica(session_id)
            replica = self.replicas[index]
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"VerifyTree found no serving verify service within {timeout_s:.1f} s")
            try:
                return getattr(replica, method)(session_id, *args, timeout_s=left, **kwargs)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code not in RETRYABLE:
                    raise
                self.retries += 1
                next_address = self._move(session_id, index)
                pause = min(self.backoff.delay(attempt), max(0.0, deadline - time.monotonic()))
                log.warning(
                    "VerifyTree on %s failed (%s: %s); retry %d in %.2f s on %s", replica.address, code.name,
                    exc.details() if hasattr(exc, "details") else exc, attempt + 1, pause, next_address,
                )
                if time.monotonic() + pause >= deadline:
                    raise Unavailable(
                        f"no verify service answered within {timeout_s:.1f} s (last: {replica.address}: {code.name})"
                    ) from None
                self.sleep(pause)
        raise AssertionError("unreachable")


class GenerationQueue:
    """A bounded queue in front of the generations: up to ``max_active`` run at once, up to
    ``max_queued`` more wait their turn, and anything beyond is refused at once (RESOURCE_EXHAUSTED)
    instead of piling up. A waiting request gives up at its deadline or when its client goes away."""

    def __init__(self, max_active: int, max_queued: int, poll_s: float = 0.05, max_wait_s: float = 0.0) -> None:
        self.max_active = max_active
        self.max_queued = max_queued
        self.max_wait_s = max_wait_s  # 0: a request waits until its deadline
        self.poll_s = poll_s
        self.active = 0
        self.queued = 0
        self.refused = 0
        self._cond = threading.Condition()

    def acquire(self, deadline: float | None = None, cancelled: Callable[[], bool] | None = None) -> None:
        with self._cond:
            if self.active < self.max_active and not self.queued:
                self.active += 1
                return
            if self.queued >= self.max_queued:
                self.refused += 1
                raise Overloaded(
                    f"the server is at capacity: {self.active} generations running and {self.queued} waiting "
                    f"(max_active_generations = {self.max_active}, max_queued_generations = {self.max_queued}); retry later",
                    retry_after_s=max(1.0, self.max_wait_s),
                )
            self.queued += 1
            given_up = time.monotonic() + self.max_wait_s if self.max_wait_s else None
            try:
                while self.active >= self.max_active:
                    if cancelled is not None and cancelled():
                        raise Cancelled("the client cancelled the request while it waited for a slot")
                    now = time.monotonic()
                    left = None if deadline is None else deadline - now
                    if left is not None and left <= 0:
                        raise DeadlineExceeded("the request's deadline passed while it waited for a slot")
                    if given_up is not None and now >= given_up:
                        self.refused += 1
                        raise Overloaded(
                            f"no generation slot came free in {self.max_wait_s:g} s ({self.active} running, "
                            f"{self.queued} waiting; max_queue_wait_s = {self.max_wait_s:g}); retry later",
                            retry_after_s=max(1.0, self.max_wait_s),
                        )
                    waits = [self.poll_s] + [t - now for t in (deadline, given_up) if t is not None]
                    self._cond.wait(max(0.0, min(waits)))
                self.active += 1
            finally:
                self.queued -= 1

    def release(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify()
