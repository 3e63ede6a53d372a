"""Bytes on the wire per speculative round, as the protobuf messages serialise: the lean wire
(context sent incrementally, sampled verification answered with tokens) beside the wire as it was
(the whole context every call; the target's dense float32 distribution per node and the drafts'
float16 ones under sampling, through the deprecated fields that still parse).

``python -m specdec.tools.wire`` prints the table; no model, no service: the sizes are the messages'.
"""

from __future__ import annotations

import argparse

from specdec.v1 import common_pb2, draft_pb2, verify_pb2

VOCAB = 152_064  # the embedded target's vocabulary (its output layer's rows)


def _chain_tree(nodes: int, width: int) -> tuple[list[int], list[int]]:
    """A tree of ``width`` chains sharing nothing: ``nodes`` nodes in all."""
    tokens, parents, depth = [], [], max(1, nodes // width)
    for chain in range(width):
        for level in range(depth):
            tokens.append(1000 + chain * depth + level)
            parents.append(-1 if level == 0 else len(tokens) - 2)
    return tokens[:nodes], parents[:nodes]


def _dense(dtype_bytes: int, precision) -> common_pb2.Distribution:
    return common_pb2.Distribution(precision=precision, probs=bytes(VOCAB * dtype_bytes), vocab_size=VOCAB)


def round_bytes(context_len: int, nodes: int, sampled: bool, lean: bool, new_tokens: int = 4, width: int = 4) -> dict[str, int]:
    """Serialised bytes of one round's calls: a draft's request and reply, the verify request and reply."""
    context = list(range(100, 100 + context_len))
    sent, start = (context[-new_tokens:], context_len - new_tokens) if lean else (context, 0)
    tokens, parents = _chain_tree(nodes, width)
    sampling = {"temperature": 0.8, "top_p": 0.95, "seed": 12345} if sampled else {}
    depth = max(1, nodes // width)
    beams = [draft_pb2.DraftBeam(token_ids=tokens[i * depth:(i + 1) * depth], logprob=-1.5,
                                 token_probabilities=[0.5] * depth) for i in range(width)]
    draft_reply = draft_pb2.DraftBeamsResponse(beams=beams, reused_tokens=context_len - 1, fed_tokens=depth * width)
    if sampled and not lean:  # each distinct node's float16 distribution, as drafts sent them
        draft_reply.distributions.extend([_dense(2, common_pb2.Distribution.PRECISION_FLOAT16)] * nodes)
    verify_reply = verify_pb2.VerifyTreeResponse(target_token_ids=[7] * (nodes + 1), reused_tokens=context_len - 1,
                                                 fed_tokens=nodes + 1, cached_tokens=context_len + nodes)
    if sampled and not lean:  # the target's float32 distribution at every place
        verify_reply.target_distributions.extend([_dense(4, common_pb2.Distribution.PRECISION_FLOAT32)] * (nodes + 1))
    return {
        "draft request": draft_pb2.DraftBeamsRequest(session_id="gen-" + "0" * 36, context_token_ids=sent, context_start=start,
                                                     beam_width=width, beam_depth=depth, **sampling).ByteSize(),
        "draft reply": draft_reply.ByteSize(),
        "verify request": verify_pb2.VerifyTreeRequest(session_id="gen-" + "0" * 36, context_token_ids=sent, context_start=start,
                                                       tree_token_ids=tokens, tree_parents=parents, **sampling).ByteSize(),
        "verify reply": verify_reply.ByteSize(),
    }


def table(context_len: int = 1000) -> list[tuple[str, int, int, int]]:
    """(decoding, nodes, bytes before, bytes after) per round, one draft."""
    rows = []
    for sampled in (False, True):
        for nodes in (8, 64):
            before = sum(round_bytes(context_len, nodes, sampled, lean=False).values())
            after = sum(round_bytes(context_len, nodes, sampled, lean=True).values())
            rows.append(("sampled" if sampled else "greedy", nodes, before, after))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m specdec.tools.wire", description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1000, help="context tokens at the round (prompt + output so far)")
    args = parser.parse_args(argv)
    print(f"bytes per round, one draft, a {args.context}-token context, 4 new tokens since the last round, vocabulary {VOCAB:,}")
    print(f"{'decoding':<9} {'nodes':>5} {'before':>12} {'after':>8} {'ratio':>8}")
    for decoding, nodes, before, after in table(args.context):
        print(f"{decoding:<9} {nodes:>5} {before:>12,} {after:>8,} {before / after:>7.0f}x")


if __name__ == "__main__":
    main()
