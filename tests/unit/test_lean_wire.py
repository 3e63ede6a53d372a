"""The lean wire: a session's call sends only the context its service lacks (SentContexts), and the
round's bytes stay small in sampling as in greedy decoding (specdec.tools.wire)."""

import grpc
import pytest

from specdec.contexts import context_digest
from specdec.errors import SessionLost
from specdec.kv_cache import SessionStore
from specdec.orchestrator.clients import SentContexts
from specdec.tools.wire import round_bytes, table


class Lost(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.NOT_FOUND


def test_only_the_new_tokens_travel_and_a_lost_session_gets_the_whole_context():
    contexts, sent = SentContexts(), []
    held = {"context": []}  # what the service holds

    def send(start, tokens, digest):
        sent.append((start, list(tokens)))
        if start > len(held["context"]) or (start and digest != context_digest(held["context"][:start])):
            raise Lost()
        held["context"] = held["context"][:start] + list(tokens)
        return len(held["context"])

    assert contexts.call("s", [1, 2, 3], send) == 3 and sent[-1] == (0, [1, 2, 3])
    assert contexts.call("s", [1, 2, 3, 4, 5], send) == 5 and sent[-1] == (3, [4, 5])
    held["context"] = []  # the service restarted
    assert contexts.call("s", [1, 2, 3, 4, 5, 6], send) == 6 and sent[-2:] == [(5, [6]), (0, [1, 2, 3, 4, 5, 6])]
    # A context that leaves the last one (a round sent ahead on a path the target then rejected)
    # sends what follows the part they share; one that shares nothing goes whole.
    assert contexts.call("s", [1, 2, 3, 4, 7], send) == 5 and sent[-1] == (4, [7])
    assert contexts.call("s", [9, 9], send) == 2 and sent[-1] == (0, [9, 9])
    # A failed call leaves nothing assumed: the next goes whole.
    with pytest.raises(RuntimeError):
        contexts.call("s", [9, 9, 1], lambda start, tokens, digest: (_ for _ in ()).throw(RuntimeError("down")))
    contexts.call("s", [9, 9, 1, 2], send)
    assert sent[-1] == (0, [9, 9, 1, 2])
    contexts.forget("s")
    contexts.call("s", [9, 9, 1, 2, 3], send)
    assert sent[-1] == (0, [9, 9, 1, 2, 3])


def test_other_errors_are_not_retried():
    class Down(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

    contexts, calls = SentContexts(), []
    contexts.call("s", [1, 2], lambda start, tokens, digest: calls.append(start))

    def failing(start, tokens, digest):
        calls.append(start)
        raise Down()

    with pytest.raises(Down):
        contexts.call("s", [1, 2, 3], failing)
    assert calls == [0, 2]


def test_calls_in_flight_together_never_build_on_each_others_context():
    """Two calls of one session sent together (a round sent ahead of the verdict on the one before)
    may reach the service in either order: the service records contexts as calls arrive, and the
    digest of the prefix a call builds on makes it refuse one that holds other tokens there."""
    store = SessionStore()
    store.open("s", [1, 2, 3])  # the first round's call ran: the session holds its context
    store.context("s", 3, [4, 5], context_digest([1, 2, 3]))  # round n, on [1, 2, 3, 4, 5], arrives
    # Round n + 1 was built on a path of round n's tree: [1, 2, 3, 4, 5, 6, 7]. Sent after it, it
    # builds on round n's context; arriving after it, it finds that context.
    assert store.context("s", 5, [6, 7], context_digest([1, 2, 3, 4, 5])) == [1, 2, 3, 4, 5, 6, 7]
    # A call built on a context the session never got from this caller (the other one arrived
    # first, or never) is refused, not answered for the wrong context.
    with pytest.raises(SessionLost):
        store.context("s", 5, [9], context_digest([1, 2, 3, 4, 8]))
    with pytest.raises(SessionLost):
        store.context("s", 9, [9], context_digest(list(range(9))))
    assert store.context("s", 0, [1, 2]) == [1, 2]  # a whole context is always taken


def test_a_round_costs_bytes_not_megabytes():
    rows = {(decoding, nodes): (before, after) for decoding, nodes, before, after in table(1000)}
    # Sampling used to send a dense distribution per node (0.6 MB each); now tokens, as greedy does.
    assert rows[("sampled", 64)][0] > 50e6 and rows[("sampled", 64)][1] < 2000
    assert rows[("greedy", 8)][1] < rows[("greedy", 8)][0] / 10  # the context is no longer resent
    # The lean round does not grow with the context.
    assert sum(round_bytes(30_000, 8, True, lean=True).values()) < 2 * sum(round_bytes(1000, 8, True, lean=True).values())
