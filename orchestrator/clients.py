"""gRPC clients for the draft and verify services, shaped as the controller's DraftClient and
VerifyClient: plain lists in, plain lists out."""

from __future__ import annotations

import grpc
import torch

from specdec.errors import NotReady
from specdec.rpc.server import client_options, distribution_from_pb
from specdec.rpc.tracing import traced_channel
from specdec.rpc.security import client_channel
from specdec.tree import TokenTree
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc

RELEASE_TIMEOUT_S = 2.0


class _Client:
    stub_class: type

    def __init__(self, address: str, max_message_mb: int = 64) -> None:
        self.address = address
        self.channel = traced_channel(client_channel(address, options=client_options(max_message_mb)), address)
        self.stub = self.stub_class(self.channel)

    def info(self, timeout_s: float = 10.0) -> common_pb2.ModelInfo:
        return self.stub.GetInfo(common_pb2.GetInfoRequest(), timeout=timeout_s, wait_for_ready=True)

    def release(self, session_id: str) -> None:
        self.stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session_id), timeout=RELEASE_TIMEOUT_S)

    def close(self) -> None:
        self.channel.close()


class GrpcDraftClient(_Client):
    stub_class = draft_pb2_grpc.DraftServiceStub

    def __init__(self, address: str, name: str | None = None, max_message_mb: int = 64) -> None:
        super().__init__(address, max_message_mb)
        self.name = name or address

    def draft(self, session_id: str, context: list[int], beam_width: int, depth: int, timeout_s: float) -> list[list[int]]:
        reply = self.stub.DraftBeams(
            draft_pb2.DraftBeamsRequest(
                session_id=session_id, context_token_ids=context, beam_width=beam_width, beam_depth=depth
            ),
            timeout=timeout_s,
        )
        return [list(beam.token_ids) for beam in reply.beams]

    def draft_sampled(self, session_id, context, chains, depth, timeout_s, sampling, seed, vocab_size):
        """Sampled chains and, for each chain token, the exact distribution it was drawn from."""
        reply = self.stub.DraftBeams(
            draft_pb2.DraftBeamsRequest(
                session_id=session_id, context_token_ids=context, beam_width=chains, beam_depth=depth,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=seed,
            ),
            timeout=timeout_s,
        )
        dists = [distribution_from_pb(d, vocab_size) for d in reply.distributions]
        return (
            [list(beam.token_ids) for beam in reply.beams],
            [[dists[i] for i in beam.distribution_index] for beam in reply.beams],
        )


class GrpcVerifyClient(_Client):
    stub_class = verify_pb2_grpc.VerifyServiceStub

    def verify(self, session_id: str, context: list[int], tree: TokenTree, timeout_s: float) -> list[int]:
        reply = self.stub.VerifyTree(
            verify_pb2.VerifyTreeRequest(
                session_id=session_id,
                context_token_ids=context,
                tree_token_ids=tree.tokens,
                tree_parents=tree.parents,
            ),
            timeout=timeout_s,
        )
        return list(reply.target_token_ids)

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
