"""gRPC clients for the draft and verify services, shaped as the controller's DraftClient and
VerifyClient: plain lists in, plain lists out."""

from __future__ import annotations

import grpc

from specdec.errors import NotReady
from specdec.rpc import channel_options
from specdec.tree import TokenTree
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc

RELEASE_TIMEOUT_S = 2.0


class _Client:
    stub_class: type

    def __init__(self, address: str, max_message_mb: int = 64) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=channel_options(max_message_mb))
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
