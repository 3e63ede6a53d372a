"""Unit tests of the fault-handling pieces: backoff, draft health, verify retries and failover, the
admission queue, session TTL. (tests/faults/test_faults.py injects real faults into real processes.)"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from specdec.orchestrator.resilience import GenerationQueue, Backoff, DraftHealth, ReplicatedVerifier
from specdec.errors import Cancelled, DeadlineExceeded, Overloaded, Unavailable
from specdec.kv_cache import SessionStore


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_grows_and_is_capped():
    b = Backoff(initial_s=0.1, factor=2.0, max_s=1.0)
    for attempt in range(12):
        cap = min(1.0, 0.1 * 2**attempt)
        assert cap / 2 <= b.delay(attempt) <= cap


def test_draft_health_backs_off_and_brings_a_draft_back():
    clock = Clock()
    health = DraftHealth(Backoff(initial_s=1.0, factor=2.0, max_s=8.0), clock=clock)
    assert health.usable("d")
    health.failed("d", "UNAVAILABLE")
    assert not health.usable("d") and health.down() == ["d"]
    clock.now += 1.0  # the first wait is at most initial_s
    assert health.usable("d")
    health.failed("d", "UNAVAILABLE")  # the probe failed: a longer wait (1..2 s)
    clock.now += 0.49
    assert not health.usable("d")
    clock.now += 1.6
    assert health.usable("d")
    health.succeeded("d")
    assert health.usable("d") and health.down() == []
    health.failed("d", "again")  # the count starts over after a success
    clock.now += 1.0
    assert health.usable("d")


class Replica:
    """A verify replica that fails its first ``fail`` calls with ``code``."""

    def __init__(self, address: str, fail: int = 0, code=grpc.StatusCode.UNAVAILABLE) -> None:
        self.address, self.fail, self.code = address, fail, code
        self.calls, self.released = [], []

    def verify(self, session_id, context, tree, timeout_s, **options):
        self.calls.append(session_id)
        if self.fail:
            self.fail -= 1
            raise FakeRpcError(self.code, "connection refused")
        return [len(context)], None

    def release(self, session_id):
        self.released.append(session_id)


def test_verifier_retries_the_same_replica_until_it_answers():
    replica = Replica("a", fail=3)
    sleeps = []
    verifier = ReplicatedVerifier([replica], Backoff(initial_s=0.01, max_s=0.02), sleep=sleeps.append)
    assert verifier.verify("s", [1, 2], None, timeout_s=5) == ([2], None)
    assert len(replica.calls) == 4 and len(sleeps) == 3 and verifier.retries == 3


def test_verifier_fails_over_and_releases_everywhere_the_session_went():
    a, b = Replica("a", fail=1), Replica("b")
    verifier = ReplicatedVerifier([a, b], Backoff(initial_s=0.0, max_s=0.0), sleep=lambda s: None)
    assert verifier.verify("s1", [1], None, timeout_s=5) == ([1], None)
    assert a.calls == ["s1"] and b.calls == ["s1"]
    verifier.verify("s1", [1, 2], None, timeout_s=5)
    assert b.calls == ["s1", "s1"]  # the session stays on the replica that answered
    verifier.release("s1")
    assert a.released == ["s1"] and b.released == ["s1"]


def test_verifier_spreads_sessions_over_replicas():
    a, b = Replica("a"), Replica("b")
    verifier = ReplicatedVerifier([a, b])
    for i in range(4):
        verifier.verify(f"s{i}", [1], None, timeout_s=5)
    assert len(a.calls) == len(b.calls) == 2


def test_verifier_does_not_retry_bad_input():
    replica = Replica("a", fail=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    verifier = ReplicatedVerifier([replica], sleep=lambda s: None)
    with pytest.raises(grpc.RpcError):
        verifier.verify("s", [1], None, timeout_s=5)
    assert len(replica.calls) == 1


def test_verifier_gives_up_within_its_time():
    replica = Replica("a", fail=10**6)
    verifier = ReplicatedVerifier([replica], Backoff(initial_s=0.05, max_s=0.05))
    start = time.monotonic()
    with pytest.raises((Unavailable, DeadlineExceeded)):
        verifier.verify("s", [1], None, timeout_s=0.3)
    assert time.monotonic() - start < 1.0


def test_admission_queues_then_refuses():
    admission = GenerationQueue(max_active=1, max_queued=1, poll_s=0.01)
    admission.acquire()
    got_slot = threading.Event()

    def waiter():
        admission.acquire(deadline=time.monotonic() + 5)
        got_slot.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    while admission.queued != 1:
        time.sleep(0.005)
    start = time.monotonic()
    with pytest.raises(Overloaded, match="at capacity"):
        admission.acquire()
    assert time.monotonic() - start < 0.1  # refused at once, not after waiting
    admission.release()
    thread.join(5)
    assert got_slot.is_set() and admission.active == 1 and admission.queued == 0
    admission.release()
    assert admission.active == 0 and admission.refused == 1


def test_admission_wait_ends_at_deadline_or_cancellation():
    admission = GenerationQueue(max_active=1, max_queued=4, poll_s=0.01)
    admission.acquire()
    with pytest.raises(DeadlineExceeded):
        admission.acquire(deadline=time.monotonic() + 0.05)
    with pytest.raises(Cancelled):
        admission.acquire(cancelled=lambda: True)
    assert admission.queued == 0 and admission.active == 1


def test_admission_wait_is_bounded_and_says_when_to_retry():
    admission = GenerationQueue(max_active=1, max_queued=4, poll_s=0.5, max_wait_s=0.1)
    admission.acquire()
    start = time.monotonic()
    with pytest.raises(Overloaded, match="no generation slot came free in 0.1 s") as caught:
        admission.acquire(deadline=time.monotonic() + 5)
    assert 0.09 < time.monotonic() - start < 0.4  # at the bound, not at the next poll
    assert caught.value.retry_after_s >= 1
    # A deadline sooner than the bound ends the wait first, as a deadline.
    patient = GenerationQueue(max_active=1, max_queued=4, poll_s=0.5, max_wait_s=5)
    patient.acquire()
    with pytest.raises(DeadlineExceeded):
        patient.acquire(deadline=time.monotonic() + 0.05)
    assert admission.queued == 0 and admission.active == 1 and admission.refused == 1


def test_session_store_expires_idle_sessions():
    clock = Clock()
    store = SessionStore(max_sessions=8, ttl_s=10, clock=clock)
    store.get("old")
    clock.now += 6
    store.get("new")
    clock.now += 5  # "old" idle 11 s, "new" 5 s
    assert store.expire() == 1
    assert store.peek("old") is None and store.peek("new") is not None
    store.get("new")  # use refreshes
    clock.now += 9
    assert store.expire() == 0
    clock.now += 2
    store.get("other")  # expiry also runs on access
    assert store.peek("new") is None and len(store) == 1 and store.expirations == 2


def test_session_store_sweeper_frees_memory_without_traffic():
    store = SessionStore(max_sessions=8, ttl_s=0.1)
    store.get("a")
    assert store.start_sweeper(interval_s=0.02) is not None
    deadline = time.monotonic() + 5
    while len(store) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(store) == 0


def test_no_ttl_keeps_sessions():
    store = SessionStore(max_sessions=8, ttl_s=0)
    store.get("a")
    assert store.expire() == 0 and store.start_sweeper() is None and len(store) == 1
