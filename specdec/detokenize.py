"""Detokenisation, in one place: the text each generated token adds, and a generation's text as it
streams, cut before its first stop string.

Built on ``tokenizers``' ``DecodeStream``, which decodes only a short window of the latest tokens
at each step, so the cost is linear in the output length (decoding every prefix again would be
quadratic). A token that ends inside a multi-byte character (byte-level BPE splits emoji and most
CJK characters over several tokens) adds no text until the character is complete; special tokens
add none (``skip_special_tokens``). Joined, the pieces are exactly
``tokenizer.decode(token_ids, skip_special_tokens=True)``, for every tokenizer that does not clean
up tokenization spaces (a WordPiece-era string rewrite that transformers already skips for BPE).
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


def backend(tokenizer) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer (or the one given)."""
    inner = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not isinstance(inner, Tokenizer):
        raise TypeError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend to detokenise with")
    return inner


class _Decoder:
    """``DecodeStream`` and what it lacks for a generation's end: the text of tokens it still holds."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = backend(tokenizer)
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []  # every token fed
        self._chars = 0  # length of the text returned so far
        self._complete = 0  # tokens whose text has been returned

    def step(self, token: int) -> str:
        """The text ``token`` completes ("" while it ends inside a character, and for special tokens)."""
        self._ids.append(token)
        piece = self._stream.step(self._tokenizer, token)
        if piece is None:
            return ""
        self._chars += len(piece)
        self._complete = len(self._ids)
        return piece

    def flush(self) -> str:
        """At the end: what the held tokens decode to when nothing follows (an unfinished character
        decodes to U+FFFD, as ``tokenizer.decode`` renders it). One full decode, and only if held."""
        if self._complete == len(self._ids):
            return ""
        rest = self._tokenizer.decode(self._ids, skip_special_tokens=True)[self._chars :]
        self._chars += len(rest)
        self._complete = len(self._ids)
        return rest


def token_texts(tokenizer, token_ids: Iterable[int]) -> list[str]:
    """The text each token adds: they join to ``tokenizer.decode(token_ids, skip_special_tokens=True)``.

    A token that ends inside a multi-byte character adds "" and the token that completes it adds the
    whole character; tokens still held at the end give their text to the last token.
    """
    decoder = _Decoder(tokenizer)
    pieces = [decoder.step(token) for token in token_ids]
    if pieces:
        pieces[-1] += decoder.flush()
    return pieces


class TextStream:
    """One generation's text as its tokens arrive, cut before the first stop string.

    ``push(tokens)`` returns the text those tokens completed, less a tail that may be the start of a
    stop string: the next tokens may complete it, and it is released once they show it is not. A
    generation stops at the first token whose text completes a stop string: ``stopped`` turns true,
    the text up to where that stop string starts has been released, and later tokens add nothing.
    ``finish()`` releases the rest when the generation ends another way; ``text`` is then the whole
    output text.
    """

    def __init__(self, tokenizer, stop: Iterable[str] = ()) -> None:
        self._decoder = _Decoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.stopped = False
        self.stopped_by: str | None = None  # the stop string found (the earliest in the text)
        self._released: list[str] = []
        # Decoded, not yet released: no stop string starts in released text (the held tail always
        # covers the earliest place one could), so looking here alone finds every stop.
        self._held = ""

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._released)

    def push(self, tokens: Iterable[int]) -> str:
        released = []
        for token in tokens:
            if self.stopped:
                break
            released.append(self._add(self._decoder.step(token)))
        return "".join(released)

    def finish(self) -> str:
        """The text still held back at the end of the generation (all of it: no stop string came)."""
        if self.stopped:
            return ""
        rest = self._add(self._decoder.flush())
        if not self.stopped:
            rest += self._held
            self._released.append(self._held)
            self._held = ""
        return rest

    def _add(self, piece: str) -> str:
        if not piece:
            return ""
        held = self._held + piece
        starts = [(i, s) for s, i in ((s, held.find(s)) for s in self.stop) if i >= 0]
        if starts:
            self.stopped = True
            ready, self.stopped_by = min(starts)
        else:
            ready = len(held) - self._stop_prefix(held)
        out, self._held = held[:ready], ("" if self.stopped else held[ready:])
        self._released.append(out)
        return out

    def _stop_prefix(self, held: str) -> int:
        """Length of the longest tail of ``held`` that is the start of a stop string (none is in it whole)."""
        longest = 0
        for s in self.stop:
            start = max(0, len(held) - len(s) + 1)
            while (start := held.find(s[0], start)) >= 0:
                if s.startswith(held[start:]):
                    longest = max(longest, len(held) - start)
                    break
                start += 1
        return longest
