"""VerifyService over gRPC: converts messages at the edge and calls :class:`TreeVerifier`."""

from __future__ import annotations

import argparse
import logging

from specdec import config, precision
from specdec.errors import InvalidRequest, check_range, check_token_ids
from specdec.rpc.convert import processing_of, sampling_params
from specdec.grammar import Grammars
from specdec.gguf_weights import GgufError, model_gguf
from specdec.model_store import resolve_model
from specdec.quantize import MODEL_DTYPES, quantize_model
from specdec.sampling import MAX_TOP_LOGPROBS
from specdec.rpc.server import ModelServicer, load_for_service, observe_batches, run_model_service
from specdec.rpc.status import rpc_method
from specdec.tree import TokenTree, validate_parents
from specdec.v1 import verify_pb2, verify_pb2_grpc
from specdec.verify_service.verifier import TreeVerifier

log = logging.getLogger("specdec")
SERVICE_NAME = verify_pb2.DESCRIPTOR.services_by_name["VerifyService"].full_name


class VerifyServicer(ModelServicer, verify_pb2_grpc.VerifyServiceServicer):
    """``VerifyTree``; ``GetInfo`` and ``ReleaseSession`` come from :class:`ModelServicer`."""

    @rpc_method
    def VerifyTree(self, request, context):
        vocab = self.info.vocab_size
        # Sizes first, before anything is copied: the largest tree a request may send
        # (config.SpeculationLimits), and a context that fits the model.
        check_range("tree size", len(request.tree_token_ids), 0, self.settings.max_tree_nodes_limit)
        if len(request.tree_parents) != len(request.tree_token_ids):
            raise InvalidRequest(f"tree_parents has {len(request.tree_parents)} entries but tree_token_ids has {len(request.tree_token_ids)}")
        max_context = self.info.max_context or 1 << 30
        context_ids = self.context_ids(request)
        tokens = check_token_ids("tree_token_ids", request.tree_token_ids, vocab, allow_empty=True)
        parents = list(request.tree_parents)
        validate_parents(parents)  # before anything walks the tree: a bad parent index would crash it
        tree = TokenTree(tokens=tokens, parents=parents)
        depth = check_range("tree depth", tree.max_depth(), 0, self.settings.max_beam_depth)
        if len(context_ids) + depth > max_context:
            raise InvalidRequest(
                f"context_token_ids ({len(context_ids)} tokens) plus tree depth {depth} exceeds the model's context of {max_context}"
            )
        sampling = sampling_params(request, seed=request.seed)
        processing, prompt_len = processing_of(request.processing)
        processing.check_vocabulary(vocab)
        top = check_range("top_logprobs", request.top_logprobs, 0, MAX_TOP_LOGPROBS)
        outcome = self.in_session("VerifyTree", request, context,
                                  lambda session, caller: self.engine.verify(session, context_ids, tree, sampling, caller, top, processing, prompt_len))
        return verify_pb2.VerifyTreeResponse(
            target_token_ids=outcome.target_tokens,
            reused_tokens=outcome.reused_tokens,
            fed_tokens=outcome.fed_tokens,
            cached_tokens=outcome.cached_tokens,
            compute_ms=outcome.forward_s * 1e3,
            batch_sessions=outcome.batch.sessions,
            batch_rows=outcome.batch.rows,
            queue_ms=outcome.queue_s * 1e3,
            target_logprobs=[verify_pb2.TopLogprobs(token_ids=ids, logprobs=values)
                             for ids, values in outcome.top_logprobs or ()],
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="specdec serve verify", description="Run the verify service (target model).")
    settings = config.parse_or_exit(parser, config.VerifySettings, argv, "verify")  # a refused setting: one line, exit 2
    run_model_service(
        "verify",
        settings,
        settings.target_model,
        lambda model, store, info, metrics, tokenizer: VerifyServicer(
            TreeVerifier(model, store, settings.max_batch_rows, settings.batch_wait_ms / 1e3, observe_batches(metrics),
                         grammars=Grammars(tokenizer, info.vocab_size, info.eos_token_ids)),
            info, settings, metrics),
        verify_pb2_grpc.add_VerifyServiceServicer_to_server,
        SERVICE_NAME,
        load=load_target,
    )


def load_target(service: str, name: str, settings):
    """The target as every model service loads it, then quantized as ``--target-quantize`` says
    (before the kernels are chosen and the cost calibrated). Where anything is left to measure
    (``--dtype auto``, ``--target-quantize auto``), every exact engine is loaded, checked and timed and
    the fastest round's kept (:mod:`specdec.precision`); ``GetInfo`` says which and why."""
    gguf = target_gguf(name, settings)
    engines = target_engines(settings, gguf)

    def load(engine: str):
        dtype, quantize = engines[engine]
        model, tokenizer, info = load_for_service(service, name, settings, dtype)
        loaded.append((tokenizer, info))
        return quantize_model(model, quantize, gguf=gguf)

    loaded = []
    if settings.dtype != "auto" and settings.target_quantize != "auto":
        model = load(next(iter(engines)))
        return (model, *loaded[0])
    model, choice = precision.choose_precision(load, tuple(engines), reps=3 if settings.calibrate else 1)
    tokenizer, info = loaded[0]
    info.dtype, info.precision = choice.dtype, choice.summary()
    if settings.calibrate:
        info.forward_costs = list(choice.chosen.curve.points)
    return model, tokenizer, info


def target_gguf(name: str, settings):
    """The GGUF file the target was converted from, where the int4 engine may read it (``--target-quantize``
    int4 or auto, on a CPU); None otherwise."""
    if settings.target_quantize not in ("int4", "auto") or settings.device != "cpu":
        return None
    try:
        return model_gguf(resolve_model(name))
    except GgufError as exc:
        if settings.target_quantize == "int4":
            raise
        # auto only offers int4 beside the dtypes: a directory it cannot tell the file in keeps the floats.
        log.warning("int4 engine not measured: %s", exc)
        return None


def target_engines(settings, gguf) -> dict[str, tuple[str, str]]:
    """Every engine the settings leave open, by name: (dtype the model loads in, quantize mode).

    ``--target-quantize auto`` adds the int4 engine only for a target converted from a 4-bit GGUF (the
    embedded models): those are its stored weights, so int4 changes nothing a user chose, while
    quantizing a float checkpoint to 4 bits would be another, lossier model; that stays a choice
    (``int4``). A quantized engine runs the rest of the model in the dtype its kernel takes.
    Smallest first (int4, bfloat16, float32): the start-up selection keeps the fastest so far while
    it measures the next, so the peak is the largest beside a small one."""
    quantize = "none" if settings.target_quantize == "auto" else settings.target_quantize
    if settings.dtype != "auto":
        dtypes = (settings.dtype,)
    else:
        dtypes = precision.CANDIDATES if quantize == "none" else MODEL_DTYPES[quantize][:1]
    engines = {dtype if quantize == "none" else quantize: (dtype, quantize) for dtype in dtypes}
    if settings.target_quantize == "auto" and gguf is not None and "int4" not in engines:
        engines = {"int4": (MODEL_DTYPES["int4"][0], "int4"), **engines}
    return engines


if __name__ == "__main__":
    main()
