"""DraftService over gRPC: converts messages at the edge and calls :class:`BeamDrafter`."""

from __future__ import annotations

import argparse

from specdec import config
from specdec.cost import EarlyStop
from specdec.draft_service.drafter import BeamDrafter
from specdec.errors import InvalidRequest, check_range
from specdec.rpc.convert import processing_of, sampling_params
from specdec.grammar import Grammars
from specdec.quantize import quantize_model
from specdec.rpc.server import ModelServicer, load_for_service, observe_batches, run_model_service
from specdec.rpc.status import rpc_method
from specdec.v1 import draft_pb2, draft_pb2_grpc

SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


MAX_CALIBRATION_BINS = 100


class DraftServicer(ModelServicer, draft_pb2_grpc.DraftServiceServicer):
    """``DraftBeams``; ``GetInfo`` and ``ReleaseSession`` come from :class:`ModelServicer`."""

    @rpc_method
    def DraftBeams(self, request, context):
        # The largest beams a request may ask for: config.SpeculationLimits.
        width = check_range("beam_width", request.beam_width, 1, self.settings.max_beam_width)
        depth = check_range("beam_depth", request.beam_depth, 1, self.settings.max_beam_depth)
        context_ids = self.context_ids(request)
        if self.info.max_context and len(context_ids) + depth > self.info.max_context:
            raise InvalidRequest(
                f"context_token_ids ({len(context_ids)} tokens) plus beam_depth {depth} exceeds the model's context of {self.info.max_context}"
            )
        sampling, stop = sampling_params(request, seed=request.seed), early_stop(request)
        processing, prompt_len = processing_of(request.processing)
        outcome = self.in_session("DraftBeams", request, context, lambda session, caller: self.engine.propose(
            session, context_ids, width, depth, caller, stop, sampling, processing, prompt_len))
        return draft_pb2.DraftBeamsResponse(
            beams=[draft_pb2.DraftBeam(token_ids=b.tokens, logprob=b.logprob, token_probabilities=b.probabilities)
                   for b in outcome.beams],
            reused_tokens=outcome.reused_tokens,
            fed_tokens=outcome.fed_tokens,
            compute_ms=outcome.forward_s * 1e3,
            batch_sessions=outcome.batch.sessions,
            batch_rows=outcome.batch.rows,
            queue_ms=outcome.queue_s * 1e3,
        )


def early_stop(request) -> EarlyStop:
    """The request's early stop, its numbers checked (a NaN or a probability above 1 is refused)."""
    calibration = tuple(request.confidence_calibration)
    if len(calibration) > MAX_CALIBRATION_BINS:
        raise InvalidRequest(f"confidence_calibration has {len(calibration)} entries; at most {MAX_CALIBRATION_BINS}")
    for name, value in [("min_path_probability", request.min_path_probability), *(("confidence_calibration", c) for c in calibration)]:
        if not 0.0 <= value <= 1.0:  # NaN fails this too
            raise InvalidRequest(f"{name} = {value} is not a probability")
    return EarlyStop(request.min_path_probability, calibration)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="specdec serve draft", description="Run a draft service (one small model).")
    settings = config.parse_or_exit(parser, config.DraftSettings, argv, "draft")  # a refused setting: one line, exit 2
    run_model_service(
        "draft",
        settings,
        settings.draft_model,
        lambda model, store, info, metrics, tokenizer: DraftServicer(
            BeamDrafter(model, store, settings.draft_vocab, settings.max_batch_rows, settings.batch_wait_ms / 1e3,
                        observe_batches(metrics), grammars=Grammars(tokenizer, info.vocab_size, info.eos_token_ids)),
            info, settings, metrics),
        draft_pb2_grpc.add_DraftServiceServicer_to_server,
        SERVICE_NAME,
        load=load_draft,
    )


def load_draft(service: str, name: str, settings):
    """The draft model as every model service loads it, then quantized as ``--draft-quantize`` says
    (before the cost calibration, so that the curve it reports is the quantized model's)."""
    model, tokenizer, info = load_for_service(service, name, settings)
    return quantize_model(model, settings.draft_quantize), tokenizer, info


if __name__ == "__main__":
    main()
