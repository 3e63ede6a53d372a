"""gRPC clients for the draft and verify services, shaped as the controller's DraftClient and
VerifyClient: plain data in and out (a draft's ``specdec.speculation.Proposal``; the target's tokens).
Between rounds only the context tokens a session lacks travel (:class:`SentContexts`)."""

from __future__ import annotations

import time
from typing import Any, Callable

import grpc

from specdec.contexts import context_digest, shared_prefix
from specdec.cost import CostCurve, EarlyStop, Link
from specdec.errors import NotReady
from specdec.processors import Processing
from specdec.rpc.channels import internal_channel
from specdec.rpc.convert import processing_pb
from specdec.sampling import SamplingParams
from specdec.speculation import Proposal
from specdec.tree import TokenTree
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc

RELEASE_TIMEOUT_S = 2.0


class _Client:
    stub_class: type

    def __init__(self, address: str, max_message_mb: int = 64, span_attributes: dict | None = None) -> None:
        self.address = address
        self.channel = internal_channel(address, max_message_mb, span_attributes)
        self.stub = self.stub_class(self.channel)
        self.contexts = SentContexts()

    def info(self, timeout_s: float = 10.0) -> common_pb2.ModelInfo:
        return self.stub.GetInfo(common_pb2.GetInfoRequest(), timeout=timeout_s, wait_for_ready=True)

    def release(self, session_id: str) -> None:
        self.contexts.forget(session_id)
        self.stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session_id), timeout=RELEASE_TIMEOUT_S)

    def close(self) -> None:
        self.channel.close()


class GrpcDraftClient(_Client):
    stub_class = draft_pb2_grpc.DraftServiceStub

    def __init__(self, address: str, name: str | None = None, max_message_mb: int = 64, model: str = "") -> None:
        self.name = name or address  # draft-0, draft-1, ...: how records, metrics and spans name it
        super().__init__(address, max_message_mb, {"specdec.draft": self.name})
        self.model = model  # the model the service serves (its GetInfo), recorded beside the name

    def draft(self, session_id: str, context: list[int], paths: int, depth: int, timeout_s: float,
              sampling: SamplingParams = SamplingParams(), stop: EarlyStop = EarlyStop(),
              processing: Processing | None = None, prompt_len: int = 0) -> Proposal:
        """Beams, best first (sampled: ranked under the target's noise), each token with the draft's
        probability of it where the draft has one, grown less deep where ``stop`` says."""
        def call(start: int, tail: list[int], digest: int):
            return self.stub.DraftBeams(
                draft_pb2.DraftBeamsRequest(
                    session_id=session_id, context_token_ids=tail, context_start=start, context_digest=digest, beam_width=paths, beam_depth=depth,
                    temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed,
                    min_path_probability=stop.min_path_probability, confidence_calibration=stop.calibration,
                    processing=processing_pb(processing, prompt_len),
                ),
                timeout=timeout_s,
            )

        reply = self.contexts.call(session_id, context, call)
        beams = [list(beam.token_ids) for beam in reply.beams]
        confidences = [list(beam.token_probabilities) for beam in reply.beams]
        return Proposal(self.name, beams, confidences=confidences if confidences and all(confidences) else None,
                        context_rows=max(1, len(context) - reply.reused_tokens))


class GrpcVerifyClient(_Client):
    stub_class = verify_pb2_grpc.VerifyServiceStub

    def __init__(self, address: str, max_message_mb: int = 64, span_attributes: dict | None = None) -> None:
        super().__init__(address, max_message_mb, span_attributes)
        self.link = Link()  # each call's time outside the service's queue and passes (the round's cost model reads it)

    def verify(self, session_id: str, context: list[int], tree: TokenTree, timeout_s: float,
               sampling: SamplingParams = SamplingParams(), top: int = 0, processing: Processing | None = None,
               prompt_len: int = 0) -> tuple[list[int], list | None]:
        """The target's token at the context end and after each node (greedy, or sampled with
        ``sampling``'s seed) and, with ``top`` > 0, at each of the same places its ``top`` most
        likely tokens and their log-probabilities (else None)."""
        def call(start: int, tail: list[int], digest: int):
            return self.stub.VerifyTree(
                verify_pb2.VerifyTreeRequest(
                    session_id=session_id, context_token_ids=tail, context_start=start, context_digest=digest,
                    tree_token_ids=tree.tokens, tree_parents=tree.parents, top_logprobs=top,
                    temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed,
                    processing=processing_pb(processing, prompt_len),
                ),
                timeout=timeout_s,
            )

        start = time.perf_counter()
        reply = self.contexts.call(session_id, context, call)
        self.link.observe((time.perf_counter() - start) * 1e3, reply.compute_ms + reply.queue_ms)
        tops = [(list(t.token_ids), list(t.logprobs)) for t in reply.target_logprobs] if top > 0 else None
        return list(reply.target_token_ids), tops


class SentContexts:
    """The lean wire's one rule, for every client: a session's call sends only the context tokens
    after the part it shares with the context the session's last call sent (``context_start``),
    with a digest of that part (:mod:`specdec.contexts`), and the whole context when the service
    answers that it holds another (NOT_FOUND: restarted, evicted, another replica, or a call of the
    same session sent ahead of this one that reached it first) or the last call failed."""

    def __init__(self) -> None:
        self._last: dict[str, list[int]] = {}

    def call(self, session_id: str, context: list[int], send: Callable[[int, list[int], int], Any]):
        """``send(context_start, tokens, digest)``'s reply, the context sent as short as the session allows."""
        last = self._last.get(session_id) if session_id else None
        start = shared_prefix(last, context) if last else 0
        if session_id:
            self._last[session_id] = context  # the service records a context as its call arrives
        try:
            try:
                return send(start, context[start:], context_digest(context[:start])) if start else send(0, context, 0)
            except grpc.RpcError as exc:
                if start == 0 or exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return send(0, context, 0)
        except BaseException:
            self.forget(session_id)
            raise

    def forget(self, session_id: str) -> None:
        self._last.pop(session_id, None)


def cost_curve(info: common_pb2.ModelInfo) -> CostCurve:
    """A service's forward cost by rows fed, as its ``GetInfo`` reports it (empty when it measured none)."""
    return CostCurve.of((c.rows, c.ms) for c in info.forward_costs)


def check_fingerprints(target: common_pb2.ModelInfo, drafts: dict[str, common_pb2.ModelInfo], own: str | None = None) -> None:
    """Refuse drafts (or an orchestrator tokenizer) whose vocabulary differs from the target's."""
    for name, info in drafts.items():
        if info.tokenizer_fingerprint != target.tokenizer_fingerprint:
            raise NotReady(
                f"draft {name} ({info.model}) has tokenizer fingerprint {info.tokenizer_fingerprint[:16]}… but the "
                f"target {target.model} has {target.tokenizer_fingerprint[:16]}…: drafts must share the target's vocabulary"
            )
    if own is not None and own != target.tokenizer_fingerprint:
        raise NotReady(
            f"the orchestrator's tokenizer (fingerprint {own[:16]}…) differs from the target {target.model}'s "
            f"({target.tokenizer_fingerprint[:16]}…): give both the same --target-model"
        )
