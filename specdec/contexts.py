"""The lean wire's one check, shared by the clients and the services: a digest of a context's
first tokens, sent beside ``context_start`` (``VerifyTreeRequest.context_digest``,
``DraftBeamsRequest.context_digest``).

A call that sends only the tokens after ``context_start`` builds on the first ``context_start``
tokens of the context its session's last call gave the service. Calls of one generation in flight
together (a round sent ahead of the verdict on the round before it) may reach the service in either
order, so "the last call" is not always the one the caller has in mind; the digest makes the service
check that the prefix it holds is the one the caller meant, and answer NOT_FOUND (send it whole)
when it is not. Cheap: one hash over the token ids' bytes."""

from __future__ import annotations

import hashlib
from array import array


def context_digest(tokens: list[int]) -> int:
    """A 64-bit digest of ``tokens`` (never 0, which means "unchecked" on the wire)."""
    digest = int.from_bytes(hashlib.blake2b(array("q", tokens).tobytes(), digest_size=8).digest(), "little")
    return digest or 1


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens ``a`` and ``b`` share (the usual case, ``a`` a prefix of ``b``, at C speed)."""
    if len(a) <= len(b) and b[: len(a)] == a:
        return len(a)
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
