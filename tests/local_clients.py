"""In-process draft and verify clients over the engines themselves, shaped as the controller's
DraftClient and VerifyClient: the accept/fallback loop runs in one process, with no gRPC between."""

from __future__ import annotations

import functools

from specdec.detokenize import TextStream
from specdec.cost import EarlyStop
from specdec.draft_service.drafter import BeamDrafter
from specdec.generation import GenerationParams, Speculation
from specdec.orchestrator.controller import Limits, SpeculativeController
from specdec.sampling import SamplingParams
from specdec.speculation import Proposal
from specdec.verify_service.verifier import TreeVerifier
from specdec.engine import tree_forward
from specdec.kv_cache import SessionKV
from specdec.tools.gpu_check import mismatched_nodes as check_mismatched_nodes
from specdec.tree import TokenTree
from tiny_models import EOS, VOCAB, tiny_tokenizer


class LocalDraft:
    def __init__(self, name: str, model, vocab_limit: int = 0, **engine) -> None:
        self.name, self.model = name, type(model).__name__
        self.drafter = BeamDrafter(model, vocab_limit=vocab_limit, **engine)

    def draft(self, session_id, context, paths, depth, timeout_s, sampling=SamplingParams(), stop=EarlyStop(),
              processing=None, prompt_len=0) -> Proposal:
        outcome = self.drafter.propose(session_id, context, paths, depth, None, stop, sampling, processing, prompt_len)
        return Proposal(self.name, [b.tokens for b in outcome.beams], confidences=[b.probabilities for b in outcome.beams],
                        context_rows=max(1, len(context) - outcome.reused_tokens))

    def release(self, session_id):
        self.drafter.release(session_id)


class LocalVerify:
    def __init__(self, model, **batching) -> None:
        self.verifier = TreeVerifier(model, **batching)

    def verify(self, session_id, context, tree, timeout_s, sampling=SamplingParams(), top=0, processing=None, prompt_len=0):
        outcome = self.verifier.verify(session_id, context, tree, sampling, top_logprobs=top, processing=processing,
                                       prompt_len=prompt_len)
        return outcome.target_tokens, outcome.top_logprobs

    def release(self, session_id):
        self.verifier.release(session_id)


@functools.cache
def detokenizer():
    """``detokenizer(stop)``: a TextStream over the tiny models' tokenizer."""
    return functools.partial(TextStream, tiny_tokenizer())


def local_controller(verify: LocalVerify, drafts: list, eos_token_ids=(), max_new_tokens_limit: int = 1000,
                     tokenizer=None, vocab_size: int = VOCAB, **kwargs) -> SpeculativeController:
    """The controller over in-process clients, with the tiny models' tokenizer for its text (or
    ``tokenizer``'s, with the model's ``vocab_size``, for a real model)."""
    vocab = vocab_size
    limits = Limits(vocab_size=vocab, max_context=4096 if tokenizer else 512, max_new_tokens_limit=max_new_tokens_limit,
                    eos_token_ids=frozenset(eos_token_ids))
    text = detokenizer() if tokenizer is None else functools.partial(TextStream, tokenizer)
    return SpeculativeController(verify, drafts, limits, text, **kwargs)


def params(prompt_ids, max_new_tokens: int, mode: str, draft_length: int = 2, beam_width: int = 2, beam_depth: int = 4,
           max_tree_nodes: int = 64, adaptive: bool = False, **fields) -> GenerationParams:
    """Resolved generation parameters for the controller, fixed shapes unless ``adaptive``."""
    return GenerationParams.of(prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, mode=mode,
                               speculation=Speculation(draft_length, beam_width, beam_depth, max_tree_nodes, adaptive), **fields)


def mismatched_nodes(model, tree: TokenTree, context: list[int], cached: int) -> list[int]:
    """Nodes (-1: the context end) whose tree-pass logits differ in any bit from stepping their
    path one token per forward (``tools/gpu_check.py`` runs the same check on a GPU)."""
    steps = SessionKV("steps")
    last = [tree_forward(model, steps, [token])[-1] for token in context][-1]
    return check_mismatched_nodes(model, tree, context, cached, (steps, last))


def stepped_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The model alone, one token per forward, greedy, stopping at EOS."""
    session, out = SessionKV("greedy"), []
    logits = [tree_forward(model, session, [t])[-1] for t in prompt][-1]
    while len(out) < max_new_tokens:
        out.append(int(logits.argmax()))
        if out[-1] == EOS:
            break
        logits = tree_forward(model, session, [out[-1]])[-1]
    return out
