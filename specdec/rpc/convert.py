"""Protobuf messages to the library's plain values and back, for every service: the algorithm
modules never see a message.

Requests' sampling fields become a checked :class:`~specdec.sampling.SamplingParams`; a model service's :class:`~specdec.service_info.ModelDescription` answers ``GetInfo``.
"""

from __future__ import annotations

from specdec.grammar import Grammar
from specdec.processors import Processing
from specdec.sampling import SamplingParams
from specdec.service_info import ModelDescription
from specdec.v1 import common_pb2


def sampling_params(message, seed: int = 0) -> SamplingParams:
    """SamplingParams from a request's temperature / top_p / top_k fields, checked."""
    return SamplingParams(temperature=message.temperature, top_k=message.top_k, top_p=message.top_p, seed=seed)


def processing_of(message: common_pb2.LogitsProcessing) -> tuple[Processing, int]:
    """A request's logits processors, checked, and the prompt length they count the output from."""
    return Processing.of(
        presence_penalty=message.presence_penalty, frequency_penalty=message.frequency_penalty,
        repetition_penalty=message.repetition_penalty or 1.0, logit_bias=dict(message.logit_bias), min_p=message.min_p,
        min_tokens=message.min_tokens, eos_token_ids=tuple(message.eos_token_ids),
        bad_words_ids=[list(words.token_ids) for words in message.bad_words_ids],
        grammar=Grammar(message.grammar_kind, message.grammar) if message.grammar_kind else None,
    ), message.prompt_length


def processing_pb(processing: Processing | None, prompt_len: int = 0) -> common_pb2.LogitsProcessing | None:
    """The message for a call to a model service (None when nothing is processed)."""
    if processing is None or not processing.active:
        return None
    return common_pb2.LogitsProcessing(
        presence_penalty=processing.presence_penalty, frequency_penalty=processing.frequency_penalty,
        repetition_penalty=processing.repetition_penalty, logit_bias=dict(processing.logit_bias), min_p=processing.min_p,
        min_tokens=processing.min_tokens, prompt_length=prompt_len, eos_token_ids=processing.eos_token_ids,
        bad_words_ids=[common_pb2.TokenIds(token_ids=words) for words in processing.bad_words_ids],
        grammar_kind=processing.grammar.kind if processing.grammar else "",
        grammar=processing.grammar.spec if processing.grammar else "",
    )


def model_info_pb(info: ModelDescription, store) -> common_pb2.ModelInfo:
    """``GetInfo``'s answer: the model as described at start-up, and the session store now."""
    return common_pb2.ModelInfo(
        service=info.service,
        model=info.model,
        vocab_size=info.vocab_size,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        device=info.device,
        dtype=info.dtype,
        max_context=info.max_context,
        active_sessions=len(store),
        cached_tokens=store.cached_tokens(),
        eos_token_ids=info.eos_token_ids,
        version=info.version,
        forward_costs=[common_pb2.ForwardCost(rows=rows, ms=ms) for rows, ms in info.forward_costs],
        precision=info.precision,
        host=info.host,
    )
