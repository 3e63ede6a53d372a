"""KV-cache bookkeeping per session, shared by the draft and verify services.

Requests are stateless-correct: each carries the full context. A service keeps, per session, a
``transformers`` DynamicCache laid out as ``[prefix | tail]``: ``prefix`` holds the KV of real
context tokens in sequence; ``tail`` holds the KV of the token tree explored in the last round
(draft beams, or the tree the target verified), in tree order.

When the next request arrives, :meth:`SessionKV.sync` keeps what the new context can reuse: the
tail nodes along the accepted path are moved into the prefix (gather/compact along the sequence
axis) and rejected branches are dropped; then the cache is cropped to the longest common prefix
with the new context. At least one context token is always left to feed, because the logits at
the context end are not cached. A mismatch (eviction, restart, another replica) costs a prefill,
never correctness.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from specdec import telemetry
from specdec.contexts import context_digest, shared_prefix
from specdec.errors import SessionLost


def _layers(cache: DynamicCache):
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", False) and layer.keys is not None]


def cache_select(cache: DynamicCache, keep: torch.Tensor) -> None:
    """Keep only the sequence positions ``keep`` (1D long tensor) in every layer, in that order."""
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(-2, keep.to(layer.keys.device))
        layer.values = layer.values.index_select(-2, keep.to(layer.values.device))


def cache_crop(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` sequence positions in every layer."""
    for layer in _layers(cache):
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


def cache_nbytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in _layers(cache))


@dataclass
class SessionKV:
    """One session's cache and the tokens its entries stand for. Only the model's thread
    (:class:`specdec.batching.BatchWorker`) changes it."""

    session_id: str
    cache: DynamicCache = field(default_factory=DynamicCache)
    prefix_tokens: list[int] = field(default_factory=list)  # [P], sequential context tokens in the cache
    tail_tokens: list[int] = field(default_factory=list)  # [T], tree nodes cached after the prefix
    tail_parents: list[int] = field(default_factory=list)  # [T], -1 = child of the last prefix token
    # The whole context of the session's last call: a call may send only what follows a prefix of
    # it (``context_start``; :meth:`SessionStore.context`).
    context: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def cached_len(self) -> int:
        return len(self.prefix_tokens) + len(self.tail_tokens)

    @property
    def nbytes(self) -> int:
        return cache_nbytes(self.cache)

    def sync(self, context: list[int]) -> int:
        """Make the cache a prefix of ``context`` minus at least its last token; returns the reused length.

        After this the tail is empty and ``prefix_tokens == context[:reused]``.
        """
        with telemetry.span("specdec.cache.sync") as span:
            reused = self._sync(context)
            span.set_attribute("specdec.context_tokens", len(context))
            span.set_attribute("specdec.reused_tokens", reused)
        return reused

    def _sync(self, context: list[int]) -> int:
        prefix_len = len(self.prefix_tokens)
        reused = shared_prefix(self.prefix_tokens, context)
        if reused == prefix_len and self.tail_tokens:
            accepted = self._tail_path(context[prefix_len:])
            if accepted:
                keep = torch.tensor(list(range(prefix_len)) + [prefix_len + i for i in accepted], dtype=torch.long)
                with telemetry.span("specdec.cache.compact") as span:
                    cache_select(self.cache, keep)
                    span.set_attribute("specdec.cache.kept_tail_nodes", len(accepted))
                    span.set_attribute("specdec.cache.dropped_tail_nodes", len(self.tail_tokens) - len(accepted))
                self.prefix_tokens = self.prefix_tokens + [self.tail_tokens[i] for i in accepted]
                reused = len(self.prefix_tokens)
        self.tail_tokens, self.tail_parents = [], []
        reused = min(reused, len(context) - 1)
        cache_crop(self.cache, reused)
        del self.prefix_tokens[reused:]
        self.last_used = time.monotonic()
        return reused

    def _tail_path(self, continuation: list[int]) -> list[int]:
        """Tail nodes along ``continuation``, root first, as far as the tail goes."""
        children = {(p, t): i for i, (t, p) in enumerate(zip(self.tail_tokens, self.tail_parents))}
        path, node = [], -1
        for token in continuation:
            node = children.get((node, token))
            if node is None:
                break
            path.append(node)
        return path

    def extend_prefix(self, tokens: list[int]) -> None:
        """Record sequential tokens just fed into the cache (the tail must be empty)."""
        if tokens:
            assert not self.tail_tokens, "sequential tokens go before any tree nodes"
            self.prefix_tokens.extend(tokens)

    def extend_tail(self, tokens: list[int], parents: list[int]) -> None:
        """Record tree nodes just fed into the cache (parents index the whole tail)."""
        self.tail_tokens.extend(tokens)
        self.tail_parents.extend(parents)


class SessionStore:
    """Sessions bounded by count and by KV memory, evicted least recently used first, and dropped
    once unused for ``ttl_s`` seconds (a client that vanished without releasing its session)."""

    def __init__(self, max_sessions: int = 64, max_bytes: int = 8 << 30, ttl_s: float = 0.0, clock=time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self._sessions: OrderedDict[str, SessionKV] = OrderedDict()
        self._used_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self.evictions = 0
        self.expirations = 0
        self.shared_tokens = 0  # context tokens copied from another session's cache (share_prefix)

    def get(self, session_id: str) -> SessionKV:
        """The session's cache, created empty on a miss; marks it most recently used."""
        with self._lock:
            self._expire()
            session = self._sessions.get(session_id)
            if session is None:
                session = self._sessions[session_id] = SessionKV(session_id)
            self._sessions.move_to_end(session_id)
            self._used_at[session_id] = self.clock()
            return session

    def expire(self) -> int:
        """Drop every session unused for longer than the TTL; returns how many."""
        with self._lock:
            return self._expire()

    def _expire(self) -> int:
        if not self.ttl_s:
            return 0
        cutoff = self.clock() - self.ttl_s
        # Least recently used first: stop at the first session still fresh.
        stale = []
        for session_id in self._sessions:
            if self._used_at.get(session_id, cutoff) > cutoff:
                break
            stale.append(session_id)
        for session_id in stale:
            self._sessions.pop(session_id)
            self._used_at.pop(session_id, None)
        self.expirations += len(stale)
        return len(stale)

    def start_sweeper(self, interval_s: float | None = None) -> threading.Thread | None:
        """Expire idle sessions in the background too, so memory falls back without new traffic."""
        if not self.ttl_s:
            return None
        interval = interval_s or max(0.05, min(30.0, self.ttl_s / 4))
        stop = self._stop_sweeper = threading.Event()

        def sweep() -> None:
            while not stop.wait(interval):
                self.expire()

        thread = threading.Thread(target=sweep, name="session-sweeper", daemon=True)
        thread.start()
        return thread

    def open(self, session_id: str, context: list[int]) -> tuple[SessionKV, int]:
        """The session's cache made ready for ``context`` (:meth:`SessionKV.sync`), a new one started
        from another session's shared prefix (:meth:`share_prefix`); returns it and how many
        context tokens it holds."""
        session = self.get(session_id)
        self.share_prefix(session, context)
        if not session.context:  # else the call's arrival recorded it (:meth:`context`)
            session.context = context
        return session, session.sync(context)

    def context(self, session_id: str, start: int, tail: list[int], digest: int = 0) -> list[int]:
        """The whole context of a call that sent only ``tail``, the tokens after the first ``start``
        of its session's last context; raises :class:`~specdec.errors.SessionLost` when the session
        is gone, holds fewer, or (``digest``, :func:`specdec.contexts.context_digest`) holds other
        ones than the caller meant. (Read off the model's thread: the session's last context is
        replaced whole, never changed in place.)"""
        session = self.peek(session_id)
        if start <= 0:
            return self._arrived(session, tail)
        held = session.context if session is not None else []
        if len(held) < start:
            raise SessionLost(f"session {session_id} holds {len(held)} context tokens, the call builds on {start}: "
                              f"send the whole context (context_start 0)")
        if digest and context_digest(held[:start]) != digest:
            raise SessionLost(f"session {session_id} holds other first {start} context tokens than the call builds on: "
                              f"send the whole context (context_start 0)")
        return self._arrived(session, held[:start] + tail)

    @staticmethod
    def _arrived(session: SessionKV | None, context: list[int]) -> list[int]:
        """The session's last context is the last call's to arrive, as its caller sent them (calls of
        a session in flight together run in turn, later; the cache follows each as it runs)."""
        if session is not None:
            session.context = context
        return context

    def share_prefix(self, session: SessionKV, context: list[int], min_tokens: int = 8) -> int:
        """Start an empty ``session`` from the cache of the session sharing the longest prefix with
        ``context`` (a system prompt, a few-shot preamble, the same document asked about twice):
        those tokens' keys and values are copied rather than computed again. Returns how many.

        Exact: a token's keys and values depend only on the tokens before it, and in a
        batch-invariant model (the verify service's) not on the pass that computed them either.
        Only sequential context (a donor's prefix, never its tree) is shared, and at least one
        context token is always left to feed. Runs on the model thread, like every cache change."""
        if session.cached_len:
            return 0
        with self._lock:
            donors = [s for s in self._sessions.values() if s is not session and s.prefix_tokens]
        best, shared = None, 0
        for donor in donors:
            n = shared_prefix(donor.prefix_tokens, context)
            if n > shared:
                best, shared = donor, n
        shared = min(shared, len(context) - 1)
        if best is None or shared < min_tokens:
            return 0
        with telemetry.span("specdec.cache.share_prefix") as span:
            for index, layer in enumerate(best.cache.layers):
                session.cache.update(layer.keys[..., :shared, :].clone(), layer.values[..., :shared, :].clone(), index)
            session.prefix_tokens = list(context[:shared])
            span.set_attribute("specdec.shared_tokens", shared)
        self.shared_tokens += shared
        return shared

    def peek(self, session_id: str) -> SessionKV | None:
        with self._lock:
            return self._sessions.get(session_id)

    def release(self, session_id: str) -> bool:
        with self._lock:
            self._used_at.pop(session_id, None)
            return self._sessions.pop(session_id, None) is not None

    def enforce_limits(self, keep: str | set[str] | None = None) -> None:
        """Evict least recently used sessions (never those in ``keep``: one id or a set) until within both budgets."""
        keep = {keep} if isinstance(keep, str) else keep or set()
        with self._lock:
            total = sum(s.nbytes for s in self._sessions.values())
            for session_id in list(self._sessions):
                over_count = len(self._sessions) > self.max_sessions
                if not over_count and total <= self.max_bytes:
                    break
                if session_id in keep:
                    continue
                total -= self._sessions.pop(session_id).nbytes
                self._used_at.pop(session_id, None)
                self.evictions += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def cached_tokens(self) -> int:
        with self._lock:
            return sum(s.cached_len for s in self._sessions.values())

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._sessions.values())
