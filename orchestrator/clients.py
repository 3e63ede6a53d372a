"""gRPC clients for the draft and verify services, shaped as the controller's DraftClient and
VerifyClient: plain data in and out (a draft's ``specdec.speculation.Proposal``; the target's tokens,
or its distributions under sampling)."""

from __future__ import annotations

import torch

from specdec.cost import CostCurve, EarlyStop
from specdec.errors import NotReady
from specdec.rpc.channels import internal_channel
from specdec.rpc.convert import distribution_from_pb
from specdec.sampling import SamplingParams
from specdec.speculation import Proposal
from specdec.tree import TokenTree
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc

RELEASE_TIMEOUT_S = 2.0


class _Client:
    stub_class: type

    def __init__(self, address: str, max_message_mb: int = 64) -> None:
        self.address = address
        self.channel = internal_channel(address, max_message_mb)
        self.stub = self.stub_class(self.channel)

    def info(self, timeout_s: float = 10.0) -> common_pb2.ModelInfo:
        return self.stub.GetInfo(common_pb2.GetInfoRequest(), timeout=timeout_s, wait_for_ready=True)

    def release(self, session_id: str) -> None:
        self.stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session_id), timeout=RELEASE_TIMEOUT_S)

    def close(self) -> None:
        self.channel.close()


class GrpcDraftClient(_Client):
    stub_class = draft_pb2_grpc.DraftServiceStub

    def __init__(self, address: str, name: str | None = None, max_message_mb: int = 64, model: str = "") -> None:
        super().__init__(address, max_message_mb)
        self.name = name or address  # draft-0, draft-1, ...: how records and metrics name it
        self.model = model  # the model the service serves (its GetInfo), recorded beside the name

    def draft(self, session_id: str, context: list[int], paths: int, depth: int, timeout_s: float,
              sampling: SamplingParams = SamplingParams(), seed: int = 0, vocab_size: int = 0,
              stop: EarlyStop = EarlyStop()) -> Proposal:
        """Greedy: beams, best first, each token with the draft's probability of it (where the draft
        has one), grown less deep where ``stop`` says. Sampled: independent chains, and for each
        chain token the exact distribution it was drawn from (the service sends each distinct one once)."""
        reply = self.stub.DraftBeams(
            draft_pb2.DraftBeamsRequest(
                session_id=session_id, context_token_ids=context, beam_width=paths, beam_depth=depth,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=seed,
                min_path_probability=stop.min_path_probability, confidence_calibration=stop.calibration,
            ),
            timeout=timeout_s,
        )
        beams = [list(beam.token_ids) for beam in reply.beams]
        if not reply.distributions:
            confidences = [list(beam.token_probabilities) for beam in reply.beams]
            return Proposal(self.name, beams, confidences=confidences if confidences and all(confidences) else None)
        dists = [distribution_from_pb(d, vocab_size) for d in reply.distributions]
        return Proposal(self.name, beams, [[dists[i] for i in beam.distribution_index] for beam in reply.beams])


class GrpcVerifyClient(_Client):
    stub_class = verify_pb2_grpc.VerifyServiceStub

    def verify(self, session_id: str, context: list[int], tree: TokenTree, timeout_s: float) -> list[int]:
        return self.verify_with_logprobs(session_id, context, tree, timeout_s, 0)[0]

    def verify_with_logprobs(self, session_id: str, context: list[int], tree: TokenTree, timeout_s: float,
                             top: int) -> tuple[list[int], list[tuple[list[int], list[float]]]]:
        """The target's greedy tokens and, at each of the same places, its ``top`` most likely tokens
        and their log-probabilities."""
        reply = self.stub.VerifyTree(
            verify_pb2.VerifyTreeRequest(
                session_id=session_id,
                context_token_ids=context,
                tree_token_ids=tree.tokens,
                tree_parents=tree.parents,
                top_logprobs=top,
            ),
            timeout=timeout_s,
        )
        return list(reply.target_token_ids), [(list(t.token_ids), list(t.logprobs)) for t in reply.target_logprobs]

    def verify_sampled(self, session_id, context, tree: TokenTree, timeout_s: float, sampling, vocab_size: int):
        """The target's warped distributions at the context end and after each node: ``[n + 1, vocab]``."""
        reply = self.stub.VerifyTree(
            verify_pb2.VerifyTreeRequest(
                session_id=session_id, context_token_ids=context, tree_token_ids=tree.tokens, tree_parents=tree.parents,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            ),
            timeout=timeout_s,
        )
        return torch.stack([distribution_from_pb(d, vocab_size) for d in reply.target_distributions])


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
