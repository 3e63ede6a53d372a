"""Protobuf messages to the library's plain values and back, for every service: the algorithm
modules never see a message.

Requests' sampling fields become a checked :class:`~specdec.sampling.SamplingParams`; a model service's :class:`~specdec.service_info.ModelDescription` answers ``GetInfo``.
"""

from __future__ import annotations

from specdec.sampling import SamplingParams
from specdec.service_info import ModelDescription
from specdec.v1 import common_pb2


def sampling_params(message, seed: int = 0) -> SamplingParams:
    """SamplingParams from a request's temperature / top_p / top_k fields, checked."""
    return SamplingParams(temperature=message.temperature, top_k=message.top_k, top_p=message.top_p, seed=seed)


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
    )
