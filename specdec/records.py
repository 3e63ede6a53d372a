"""The record of one generation, in one place: what every writer and reader of it uses.

The controller builds a :class:`GenerationResult` (its :class:`RoundRecord` list and its
:class:`GenerationStats`); the orchestrator sends it as protobuf (``to_pb``) and writes it as a JSON
log (:class:`GenerationLog`, ``to_json``); the benchmark writes the same log for its baselines and
its runs through the cluster; the analysis and the dashboard read it back (``from_json``). The
decoding modes and their protobuf enum live here too (:class:`DecodingMode`).

The words of a round (drafted, accepted, bonus token, correction) are defined once, in
``specdec.speculation``, which computes them.

The protobuf modules are imported where a conversion needs them, so this module (and
``specdec.config``, which takes the mode names from it) loads before the stubs are generated.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from specdec.errors import InvalidRequest


class DecodingMode(str, enum.Enum):
    """How a generation speculates; the value is the name settings, logs and the CLI use."""

    AUTOREGRESSIVE = "autoregressive"  # no drafts: one target token per verify call
    SEQUENTIAL = "sequential"  # each draft proposes one greedy chain
    TREE = "tree"  # each draft runs beam search; all beams merged into one trie

    def __str__(self) -> str:  # the name, wherever a mode is printed or used as a metric label
        return self.value

    def to_pb(self) -> int:
        from specdec.v1 import generation_pb2

        return generation_pb2.DecodingMode.Value("DECODING_MODE_" + self.name)

    @classmethod
    def from_pb(cls, value: int) -> DecodingMode | None:
        """The mode of a request's enum; ``None`` for UNSPECIFIED (the server's default)."""
        from specdec.v1 import generation_pb2

        if value == generation_pb2.DECODING_MODE_UNSPECIFIED:
            return None
        try:
            return cls[generation_pb2.DecodingMode.Name(value).removeprefix("DECODING_MODE_")]
        except (KeyError, ValueError):
            raise InvalidRequest(f"mode = {value} is not a known DecodingMode") from None

    @classmethod
    def parse(cls, name: str) -> DecodingMode:
        try:
            return cls(name)
        except ValueError:
            raise InvalidRequest(f"mode {name!r} is not one of {', '.join(MODE_NAMES)}") from None


MODE_NAMES = tuple(m.value for m in DecodingMode)

# max_new_tokens reached; the end-of-sequence token; a stop string; one of stop_token_ids. ("stop",
# any of the last three, is what logs written before they were told apart say.)
FINISH_REASONS = ("length", "eos", "stop_string", "stop_token")


def finish_reason_pb(reason: str) -> int:
    from specdec.v1 import generation_pb2

    return generation_pb2.FinishReason.Value("FINISH_REASON_" + reason.upper())


def finish_reason_from_pb(value: int) -> str:
    from specdec.v1 import generation_pb2

    name = generation_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()
    return "" if name == "unspecified" else name


def same_named_fields(record_cls, message, source=None) -> dict[str, Any]:
    """The values of the fields that a record (the dataclass ``record_cls``) and a protobuf message
    (class or instance) both have under one name and that hold plain values (numbers, strings, lists
    of them), read from ``source`` (a record), or from the message itself when there is none. These
    convert as they are, in either direction; each conversion spells out the rest."""
    by_name = message.DESCRIPTOR.fields_by_name
    source = message if source is None else source
    values = {}
    for f in dataclasses.fields(record_cls):
        if f.name in by_name and by_name[f.name].message_type is None:
            value = getattr(source, f.name)
            # A repeated field's container becomes a list.
            values[f.name] = list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else value
    return values


def _fields_in(record_cls, data: dict, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entries of a JSON object that are fields of ``record_cls`` (a log may hold more)."""
    names = {f.name for f in dataclasses.fields(record_cls)} - set(leave_out)
    return {k: v for k, v in data.items() if k in names}


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the target, and the most likely tokens at its place."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, log-probability), best first

    def to_pb(self):
        from specdec.v1 import generation_pb2

        return generation_pb2.TokenLogprob(token_id=self.token_id, logprob=self.logprob,
                                           top_token_ids=[t for t, _ in self.top], top_logprobs=[v for _, v in self.top])

    @classmethod
    def from_pb(cls, message) -> TokenLogprob:
        return cls(message.token_id, message.logprob, list(zip(message.top_token_ids, message.top_logprobs)))

    @classmethod
    def from_json(cls, data: dict) -> TokenLogprob:
        return cls(data["token_id"], data["logprob"], [tuple(t) for t in data.get("top") or []])


def stop_reason_pb(stop_reason: str | int | None) -> dict[str, Any]:
    """The ``stop_reason`` oneof of a response message, as keyword arguments."""
    if isinstance(stop_reason, str):
        return {"stop_string": stop_reason}
    return {"stop_token_id": stop_reason} if stop_reason is not None else {}


# What a generation log holds only with the orchestrator's --log-text (GenerationLog.with_text):
# the tokens and text of the prompt, the output and each round, the stop that ended the output, and
# the stop strings and token ids the request asked for. Without it a log keeps statistics and counts.
ROUND_TEXT_FIELDS = ("proposals", "accepted", "bonus_token", "new_tokens", "text", "logprobs")
RESULT_TEXT_FIELDS = ("text", "token_ids", "logprobs", "stop_reason")
REQUEST_TEXT_FIELDS = ("stop", "stop_token_ids")


@dataclass
class RoundRecord:
    """One round: what each draft proposed and what the target decided."""

    index: int
    proposals: dict[str, list[list[int]]]  # draft name -> beams (best first)
    accepted: list[int]  # draft tokens the target agreed with
    bonus_token: int | None  # the target's own token (None when the round ended on a stop first)
    bonus_is_correction: bool
    winning_draft: str  # whose path was accepted ("" when none)
    tree_nodes: int
    draft_ms: float
    verify_ms: float
    fallback: bool  # no draft proposals this round
    fallback_reason: str = ""
    branching_factor: float = 0.0
    draft_failures: list[str] = field(default_factory=list)  # drafts that failed the round (deadline, error, backing off) and how
    new_tokens: list[int] = field(default_factory=list)  # what this round added (after stop/length cuts)
    accepted_by_draft: dict[str, int] = field(default_factory=dict)
    # The text this round released: complete characters only, and a tail that may begin a stop
    # string waits for the next round (specdec.detokenize.TextStream). "" when not recorded.
    text: str = ""
    # The shape the policy chose (width 0: no speculation) and what it predicted: tokens (accepted
    # plus bonus) and milliseconds (drafting plus verifying; in units of a one-row verify pass when
    # the services reported no cost curves).
    chosen_width: int = 0
    chosen_depth: int = 0
    expected_tokens: float = 0.0
    predicted_ms: float = 0.0
    company_sessions: int = 0  # other generations in flight when the round chose its shape (batched with it)
    # Rounds sent ahead (send_ahead): this round was drafted and sent before the verdict on the one
    # before it, on the path that one was expected to accept; and how many rounds sent ahead were
    # dropped just before this one, the verdict before them having rejected their path.
    sent_ahead: bool = False
    discarded_ahead: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per new_tokens entry, when asked for
    # Only in a round read from a log written without text (GenerationLog.with_text false): the sizes
    # of the token lists above, which such a log leaves out (see counts_json).
    token_counts: dict[str, Any] | None = None

    @property
    def drafted_depth(self) -> int:
        """The longest beam of the round: the most tokens it could have had accepted."""
        return max((n for lengths in self.beam_lengths.values() for n in lengths), default=0)

    @property
    def beam_lengths(self) -> dict[str, list[int]]:
        """Each draft's beams, by length (best first)."""
        if self.token_counts is not None:
            return self.token_counts.get("beams") or {}
        return {name: [len(b) for b in beams] for name, beams in self.proposals.items()}

    @property
    def accepted_count(self) -> int:
        return self.token_counts.get("accepted", 0) if self.token_counts is not None else len(self.accepted)

    @property
    def new_token_count(self) -> int:
        return self.token_counts.get("new_tokens", 0) if self.token_counts is not None else len(self.new_tokens)

    def to_json(self) -> dict:
        if self.token_counts is not None:
            return self.counts_json()
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "token_counts"}

    def counts_json(self) -> dict:
        """The round without its tokens and text (:data:`ROUND_TEXT_FIELDS`): every other field, and
        the token lists' sizes under ``token_counts``."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in ROUND_TEXT_FIELDS and k != "token_counts"}
        bonus = self.token_counts.get("bonus", False) if self.token_counts is not None else self.bonus_token is not None
        data["token_counts"] = {"accepted": self.accepted_count, "new_tokens": self.new_token_count, "bonus": bonus,
                                "beams": self.beam_lengths}
        return data

    @classmethod
    def from_json(cls, data: dict) -> RoundRecord:
        values = _fields_in(cls, data)
        if values.get("token_counts") is not None:  # a log without text: no token lists to read
            values.update(proposals={}, accepted=[], bonus_token=None)
        values.setdefault("new_tokens", list(data.get("accepted", [])) + ([data["bonus_token"]] if data.get("bonus_token") is not None else []))
        values["logprobs"] = [TokenLogprob.from_json(t) for t in values.get("logprobs") or []]
        return cls(**values)

    def to_pb(self):
        from specdec.v1 import generation_pb2

        return generation_pb2.Round(
            **same_named_fields(RoundRecord, generation_pb2.Round, self),
            proposals=[
                generation_pb2.DraftProposal(draft=name, beams=[generation_pb2.DraftBeamTokens(token_ids=b) for b in beams])
                for name, beams in self.proposals.items()
            ],
            accepted_token_ids=self.accepted,
            bonus_token_id=self.bonus_token if self.bonus_token is not None else -1,  # the message has no None
        )

    @classmethod
    def from_pb(cls, message) -> RoundRecord:
        bonus = message.bonus_token_id if message.bonus_token_id >= 0 else None
        accepted = list(message.accepted_token_ids)
        return cls(
            **same_named_fields(cls, message),
            proposals={p.draft: [list(b.token_ids) for b in p.beams] for p in message.proposals},
            accepted=accepted,
            bonus_token=bonus,
            new_tokens=accepted + ([bonus] if bonus is not None else []),
        )


@dataclass
class DraftStats:
    """One draft service's share of a generation. ``draft`` names the service (``draft-0``);
    ``model`` is the model it serves, a field of its own, never parsed out of the name."""

    draft: str
    model: str = ""
    proposed_tokens: int = 0  # every token of every beam, before de-duplication
    proposed_positions: int = 0  # longest beam per round: the most it could have had accepted
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_positions if self.proposed_positions else 0.0

    @classmethod
    def of(cls, draft: str, model: str, rounds: list[RoundRecord]) -> DraftStats:
        """A draft's totals over a generation's rounds."""
        stats = cls(draft, model)
        for r in rounds:
            beams = r.proposals.get(draft)
            if beams:
                stats.proposed_tokens += sum(map(len, beams))
                stats.proposed_positions += max(map(len, beams))
                stats.accepted_tokens += r.accepted_by_draft.get(draft, 0)
        return stats

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"acceptance_rate": self.acceptance_rate}

    @classmethod
    def from_json(cls, draft: str, data: dict) -> DraftStats:
        """A draft's entry of a log's ``stats.drafts`` (keyed by ``draft``)."""
        return cls(draft=draft, **_fields_in(cls, data, leave_out=("draft",)))

    def to_pb(self):
        from specdec.v1 import generation_pb2

        return generation_pb2.DraftStats(**same_named_fields(DraftStats, generation_pb2.DraftStats, self),
                                         acceptance_rate=self.acceptance_rate)

    @classmethod
    def from_pb(cls, message) -> DraftStats:
        # The message carries the rate, not the positions it was computed over: keep the rate.
        rate = message.acceptance_rate
        return cls(**same_named_fields(cls, message),
                   proposed_positions=round(message.accepted_tokens / rate) if rate else 0)


@dataclass
class GenerationStats:
    """The totals of a generation (the ``GenerationStats`` message, and a log's ``stats``)."""

    mode: str
    prompt_tokens: int
    tokens_generated: int
    rounds: int
    draft_tokens_proposed: int = 0  # over all drafts, before de-duplication
    draft_tokens_accepted: int = 0
    bonus_tokens: int = 0
    tree_nodes_total: int = 0
    tree_avg_branching_factor: float = 0.0
    mean_accepted_per_round: float = 0.0  # accepted draft tokens + bonus, per round
    drafts: list[DraftStats] = field(default_factory=list)
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    other_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_second: float = 0.0
    time_to_first_token_ms: float = 0.0

    @classmethod
    def of(cls, mode: str, prompt_tokens: int, tokens_generated: int, rounds: list[RoundRecord], drafts: list[DraftStats],
           total_ms: float, time_to_first_token_ms: float) -> GenerationStats:
        """The totals of a generation's rounds."""
        n = len(rounds)
        tree_rounds = [r for r in rounds if r.tree_nodes]
        draft_ms = sum(r.draft_ms for r in rounds)
        verify_ms = sum(r.verify_ms for r in rounds)
        return cls(
            mode=mode,
            prompt_tokens=prompt_tokens,
            tokens_generated=tokens_generated,
            rounds=n,
            draft_tokens_proposed=sum(d.proposed_tokens for d in drafts),
            draft_tokens_accepted=sum(len(r.accepted) for r in rounds),
            bonus_tokens=sum(r.bonus_token is not None for r in rounds),
            tree_nodes_total=sum(r.tree_nodes for r in rounds),
            tree_avg_branching_factor=sum(r.branching_factor for r in tree_rounds) / len(tree_rounds) if tree_rounds else 0.0,
            mean_accepted_per_round=tokens_generated / n if n else 0.0,
            drafts=drafts,
            draft_ms=draft_ms,
            verify_ms=verify_ms,
            other_ms=max(0.0, total_ms - draft_ms - verify_ms),
            total_ms=total_ms,
            tokens_per_second=tokens_generated / (total_ms / 1e3) if total_ms else 0.0,
            time_to_first_token_ms=time_to_first_token_ms,
        )

    def draft(self, name: str) -> DraftStats | None:
        return next((d for d in self.drafts if d.draft == name), None)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "drafts"} | {
            # Keyed by service name, as logs have always had them.
            "drafts": {d.draft: d.to_json() for d in self.drafts}
        }

    @classmethod
    def from_json(cls, data: dict) -> GenerationStats:
        drafts = [DraftStats.from_json(name, d) for name, d in (data.get("drafts") or {}).items()]
        values = _fields_in(cls, data, leave_out=("drafts",))
        values.setdefault("mode", "")
        values.setdefault("prompt_tokens", 0)
        values.setdefault("tokens_generated", 0)
        values.setdefault("rounds", 0)
        return cls(**values, drafts=drafts)

    def to_pb(self):
        from specdec.v1 import generation_pb2

        return generation_pb2.GenerationStats(
            **same_named_fields(GenerationStats, generation_pb2.GenerationStats, self),
            verification_calls=self.rounds,  # one verify call per round, always
            drafts=[d.to_pb() for d in self.drafts],
        )

    @classmethod
    def from_pb(cls, message) -> GenerationStats:
        return cls(**same_named_fields(cls, message), drafts=[DraftStats.from_pb(d) for d in message.drafts])


@dataclass
class GenerationResult:
    """What a generation produced, with every round and the totals."""

    token_ids: list[int]
    text: str
    finish_reason: str  # one of FINISH_REASONS
    stats: GenerationStats
    rounds: list[RoundRecord] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked for
    request_id: str = ""
    stop_reason: str | int | None = None  # the stop string or stop token that ended it

    @property
    def mode(self) -> str:
        return self.stats.mode

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_json(),
            "rounds": [r.to_json() for r in self.rounds],
            "request_id": self.request_id,
            "stop_reason": self.stop_reason,
            **({"logprobs": [dataclasses.asdict(t) for t in self.logprobs]} if self.logprobs is not None else {}),
        }

    def to_pb(self, include_rounds: bool = True, token_texts: list[str] = ()):
        """The ``GenerateResponse`` message (``token_texts``: the text each token adds, see specdec.detokenize)."""
        from specdec.v1 import generation_pb2

        return generation_pb2.GenerateResponse(
            text=self.text,
            token_ids=self.token_ids,
            finish_reason=finish_reason_pb(self.finish_reason),
            stats=self.stats.to_pb(),
            rounds=[r.to_pb() for r in self.rounds] if include_rounds else [],
            token_texts=token_texts,
            logprobs=[t.to_pb() for t in self.logprobs or ()],
            request_id=self.request_id,
            **stop_reason_pb(self.stop_reason),
        )

    @classmethod
    def from_json(cls, data: dict) -> GenerationResult:
        return cls(
            token_ids=list(data["token_ids"]),
            text=data.get("text", ""),
            finish_reason=data.get("finish_reason", ""),
            stats=GenerationStats.from_json(data.get("stats") or {}),
            rounds=[RoundRecord.from_json(r) for r in data.get("rounds") or []],
            logprobs=[TokenLogprob.from_json(t) for t in data["logprobs"]] if data.get("logprobs") is not None else None,
            request_id=data.get("request_id") or "",
            stop_reason=data.get("stop_reason"),
        )


@dataclass
class GenerationLog:
    """One generation as a JSON file: the orchestrator's ``--log-dir``, and each run of
    ``specdec bench`` (which adds its ``bench`` section). The one format every tool reads."""

    result: GenerationResult
    target_model: str = ""
    request: dict[str, Any] = field(default_factory=dict)  # mode and speculation settings, max_new_tokens, prompt_tokens
    prompt: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)  # the text each generated token adds
    bench: dict[str, Any] | None = None  # the benchmark's own figures (run id, prompt class, wall time, ...)
    metrics: dict[str, Any] | None = None  # figures derived by the analysis, cached by the benchmark
    # False (the orchestrator's default, without --log-text): the file keeps statistics and token
    # counts only, never the prompt's or the output's text or token ids (see counts_json).
    with_text: bool = True

    def to_json(self) -> dict:
        if not self.with_text:
            return self.counts_json()
        data = {"target_model": self.target_model, "request": self.request, **self.result.to_json(), "prompt": self.prompt,
                "token_texts": self.token_texts}
        if self.prompt_token_ids:
            data["prompt_token_ids"] = self.prompt_token_ids
        if self.bench is not None:
            data["bench"] = self.bench
        if self.metrics is not None:
            data["metrics"] = self.metrics
        return data

    def counts_json(self) -> dict:
        """The log as written without text, the one place that decides what such a log holds: the
        statistics, the request's settings (its stop strings and stop token ids only counted), each
        round's figures and token counts (:meth:`RoundRecord.counts_json`); no prompt, no output, no
        token ids, no log-probabilities, no stop string. The analysis's cache (``metrics``, which
        holds token ids) is left out too: it is derived again from the rest."""
        request = {k: v for k, v in self.request.items() if k not in REQUEST_TEXT_FIELDS}
        request |= {f"{k}_count": len(self.request.get(k) or ()) for k in REQUEST_TEXT_FIELDS if k in self.request}
        result = {k: v for k, v in self.result.to_json().items() if k not in RESULT_TEXT_FIELDS}
        data = {"target_model": self.target_model, "request": request, "with_text": False, **result,
                "rounds": [r.counts_json() for r in self.result.rounds]}
        if self.bench is not None:
            data["bench"] = self.bench
        return data

    @staticmethod
    def looks_like(data: Any) -> bool:
        """Whether a parsed JSON file is a generation log (directories may hold other JSON too)."""
        return isinstance(data, dict) and (isinstance(data.get("token_ids"), list) or data.get("with_text") is False) \
            and isinstance(data.get("stats"), dict) and isinstance(data.get("rounds"), list)

    @classmethod
    def from_json(cls, data: dict) -> GenerationLog:
        with_text = data.get("with_text", True) is not False
        return cls(
            with_text=with_text,
            # A log without text has no token ids: an empty output, its size in the statistics.
            result=GenerationResult.from_json(data if "token_ids" in data else {**data, "token_ids": []}),
            target_model=data.get("target_model", ""),
            request=dict(data.get("request") or {}),
            prompt=data.get("prompt") or "",
            prompt_token_ids=list(data.get("prompt_token_ids") or []),
            token_texts=list(data.get("token_texts") or []),
            bench=data.get("bench"),
            metrics=data.get("metrics"),
        )
