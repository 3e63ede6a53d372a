"""GenerationService, the public gRPC API: a thin door over the orchestrator's generations.

Requests become a :class:`~specdec.generation.GenerationParams` (:func:`params_of`), run by
:class:`~specdec.orchestrator.generations.Generations` as every door's are; results go back through
the records' own ``to_pb`` (``specdec.records``). At start-up it asks the verify service
and every draft service for their model info and refuses a draft (or its own tokenizer) whose
tokenizer fingerprint differs from the target's.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import sys
from pathlib import Path

from specdec import config
from specdec.cost import SHARED_SLOWDOWN, RoundCosts, shares_device
from specdec.errors import InvalidRequest, NotReady
from specdec.generation import GenerationParams
from specdec.orchestrator.calls import Call, Stall
from specdec.orchestrator.clients import GrpcDraftClient, GrpcVerifyClient, check_fingerprints, cost_curve
from specdec.orchestrator.generations import Generations
from specdec.orchestrator.resilience import ReplicatedVerifier
from specdec.records import DecodingMode, finish_reason_pb, stop_reason_pb
from specdec.rpc.convert import processing_of
from specdec.rpc.security import SecurityConfigError, auth_interceptors, describe_server_tls, load_token, use_client_tls
from specdec.rpc.server import announce, exit_if_ports_in_use, serve_until_signalled, setup_logging, start_server, start_telemetry
from specdec.rpc.status import rpc_method
from specdec.v1 import common_pb2, generation_pb2, generation_pb2_grpc

log = logging.getLogger("specdec.orchestrator")
TRACE_ID_KEY = "x-trace-id"  # gRPC metadata: the generation's trace id (the HTTP door's X-Trace-Id)
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


def params_of(request: generation_pb2.GenerateRequest, max_context: int = 0) -> GenerationParams:
    """A ``GenerateRequest`` as the generation's parameters (checked by their one constructor)."""
    # A repeated field knows its length: counted against the context before it is copied (a
    # message may carry millions of ids, the context holds far fewer).
    if max_context and len(request.prompt_token_ids) >= max_context:
        raise InvalidRequest(f"prompt has {len(request.prompt_token_ids)} tokens; the model's context is {max_context}")
    if max_context and len(request.prediction_token_ids) > max_context:
        raise InvalidRequest(f"prediction_token_ids has {len(request.prediction_token_ids)} tokens; the model's context is {max_context}")
    spec, sampling = request.speculation, request.sampling
    return GenerationParams.of(
        prompt=request.prompt,
        prompt_ids=request.prompt_token_ids,
        max_new_tokens=request.max_new_tokens,
        mode=DecodingMode.from_pb(request.mode),
        speculation={"draft_length": spec.draft_length, "beam_width": spec.beam_width, "beam_depth": spec.beam_depth,
                     "max_tree_nodes": spec.max_tree_nodes, "adaptive": spec.adaptive if spec.HasField("adaptive") else None},
        sampling={"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k, "seed": sampling.seed},
        stop=request.stop,
        stop_token_ids=request.stop_token_ids,
        ignore_eos=request.ignore_eos,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        include_rounds=request.include_rounds,
        prediction=request.prediction,
        prediction_ids=request.prediction_token_ids,
        processing=processing_of(request.processing)[0],  # its prompt_length and eos_token_ids are the server's to set
        bad_words=request.bad_words,
        suffix=request.suffix,
    )


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """The gRPC door: ``GenerateRequest`` to :class:`~specdec.generation.GenerationParams`, the
    generation run by :class:`~specdec.orchestrator.generations.Generations`, the result back to messages."""

    def __init__(self, generations: Generations) -> None:
        self.generations = generations

    def params_of(self, request) -> GenerationParams:
        return params_of(request, self.generations.target_info.max_context)

    @staticmethod
    def call(method: str, request, context) -> Call:
        call = Call.of_grpc(method, context)
        call.request_id = request.request_id
        call.on_trace_id = lambda trace_id: context.send_initial_metadata(((TRACE_ID_KEY, trace_id),))
        return call

    @rpc_method
    def Generate(self, request, context):
        params, result, texts = self.generations.run(self.params_of(request), self.call("Generate", request, context))
        return result.to_pb(params.include_rounds, texts)

    @rpc_method
    def GenerateStream(self, request, context):
        # A client that takes no message for stall_timeout_s is cut off (the call cancelled): gRPC's
        # own flow control would otherwise hold the generation, and its slot, at a send forever.
        stall = Stall(self.generations.settings.stall_timeout_s, context.cancel)
        pieces = self.generations.stream(self.params_of(request), self.call("GenerateStream", request, context))
        with contextlib.closing(pieces):
            params, call = next(pieces)
            for piece in pieces:
                if piece.result is None:
                    with stall:
                        yield generation_pb2.GenerateStreamResponse(
                            token_ids=piece.token_ids,
                            text=piece.text,
                            round=piece.record.to_pb() if params.include_rounds else None,
                            logprobs=[t.to_pb() for t in piece.logprobs],
                            request_id=call.request_id,
                        )
                else:
                    result = piece.result
                    # The last message: any text held back, and the totals.
                    yield generation_pb2.GenerateStreamResponse(
                        text=piece.text, finish_reason=finish_reason_pb(result.finish_reason), stats=result.stats.to_pb(),
                        request_id=call.request_id, **stop_reason_pb(result.stop_reason),
                    )

    @rpc_method
    def GetInfo(self, request, context):
        generations = self.generations
        info = common_pb2.ModelInfo()
        info.CopyFrom(generations.target_info)
        info.service = "orchestrator"
        # The orchestrator's sessions are its generations: running or waiting for a slot.
        info.active_sessions = generations.queue.active + generations.queue.queued
        info.cached_tokens = 0
        return info


def build_generations(settings: config.OrchestratorSettings, startup_timeout_s: float = 600.0, metrics=None) -> Generations:
    from transformers import AutoTokenizer

    from specdec.model_store import resolve_model, tokenizer_fingerprint

    replicas = [a.strip() for a in settings.verify_address.split(",") if a.strip()]
    if not replicas:
        raise NotReady("no verify service address given (--verify-address / SPECDEC_VERIFY_ADDRESS)")
    verify_client = ReplicatedVerifier([GrpcVerifyClient(a, settings.max_message_mb) for a in replicas])
    draft_clients = [
        GrpcDraftClient(address, name=f"draft-{i}", max_message_mb=settings.max_message_mb)
        for i, address in enumerate(settings.draft_addresses)
    ]
    target_info = verify_client.info(timeout_s=startup_timeout_s)
    for replica in verify_client.replicas[1:]:
        info = replica.info(timeout_s=startup_timeout_s)
        # Compared by name, not path: replicas on other hosts may keep the weights elsewhere.
        same = (Path(info.model).name, info.tokenizer_fingerprint, info.vocab_size)
        if same != (Path(target_info.model).name, target_info.tokenizer_fingerprint, target_info.vocab_size):
            raise NotReady(
                f"verify replica {replica.address} serves {info.model} but {verify_client.replicas[0].address} "
                f"serves {target_info.model}: replicas must hold the same target model"
            )
    draft_infos = {f"{c.name} at {c.address}": c.info(timeout_s=startup_timeout_s) for c in draft_clients}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(settings.target_model))
    check_fingerprints(target_info, draft_infos, own=tokenizer_fingerprint(tokenizer))
    for client, info in zip(draft_clients, draft_infos.values()):
        client.model = info.model  # a field of its own (DraftStats.model), never part of the name
    # What each service measured its forwards to cost: the cost model prices every round with them.
    costs = RoundCosts(cost_curve(target_info), {c.name: cost_curve(i) for c, i in zip(draft_clients, draft_infos.values())},
                       shared_device=shares_device(target_info.host, target_info.device,
                                                   [(i.host, i.device) for i in draft_infos.values()]))
    if costs.shared_device:
        log.info("a draft shares the verify service's host and device: work side by side there is priced "
                 "%.1fx slower until measured", SHARED_SLOWDOWN)
    log.info("forward costs, ms by rows: verify %s; %s", costs.verify.points,
             "; ".join(f"{name} {curve.points}" for name, curve in costs.drafts.items()))
    return Generations(settings, tokenizer, verify_client, draft_clients, target_info, metrics, costs)


def open_door(settings: config.OrchestratorSettings) -> str | None:
    """Why these settings would let anyone who can reach the address generate (None: they do not):
    an address beyond loopback with neither a bearer token nor TLS, unless ``allow_open`` says so."""
    if settings.allow_open or settings.auth_token or settings.auth_token_file or settings.tls_cert:
        return None
    host = settings.host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback:
        return None
    return (f"listening on {settings.host} with neither a bearer token (--auth-token-file) nor TLS (--tls-cert) would let "
            f"anyone who reaches it generate; set one, listen on 127.0.0.1, or set --allow-open true when a proxy "
            f"checks callers or the port is published on loopback only")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="specdec serve orchestrator", description="Run the orchestrator (public API).")
    settings = config.parse_or_exit(parser, config.OrchestratorSettings, argv, "orchestrator")  # a refused setting: one line, exit 2
    setup_logging()
    if (refusal := open_door(settings)) is not None:
        print(f"specdec orchestrator: cannot start: {refusal}", file=sys.stderr, flush=True)
        sys.exit(1)
    exit_if_ports_in_use("orchestrator", settings)  # before waiting for the other services and loading the tokenizer
    # Before the clients are built: their channels carry trace context only when tracing is on.
    _, metrics = start_telemetry("orchestrator", settings, attributes={"specdec.model": settings.target_model})
    if metrics is None and settings.http_port:
        from specdec.rpc.metrics import OrchestratorMetrics

        metrics = OrchestratorMetrics()  # the HTTP port serves /metrics too
    try:
        use_client_tls(settings)  # the draft and verify clients built next open their channels with it
        interceptors = auth_interceptors(settings)
    except SecurityConfigError as exc:
        print(f"specdec orchestrator: cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    try:
        generations = build_generations(settings, metrics=metrics)
        servicer = GenerationServicer(generations)
        http = None
        if settings.http_port:
            from specdec.orchestrator.http_server import start_http

            http = start_http(generations, settings, load_token(settings), metrics.registry)  # its port bound now
    except (NotReady, SecurityConfigError, OSError) as exc:
        # A refused configuration is the operator's to fix: say why plainly, no traceback.
        print(f"specdec orchestrator: cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    server, port, health = start_server(
        lambda s: generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, s),
        [SERVICE_NAME],
        settings.host,
        settings.port,
        settings.max_message_mb,
        # A thread for every running and queued generation, and a few for health and info calls:
        # the generation queue, not gRPC's executor, is where requests wait.
        workers=settings.max_active_generations + settings.max_queued_generations + 4,
        interceptors=interceptors,
        tls=settings,
    )
    log.info("public port: %s; bearer token %s", describe_server_tls(settings), "required" if interceptors else "not asked")
    if http is not None:
        # Beside the gRPC port: the same generations, admission, token and TLS; closed by the same shutdown.
        http.start(health.admission)
        log.info("OpenAI-compatible HTTP API on %s/v1", http.url)
    announce("orchestrator", settings.host, port)
    serve_until_signalled(server, health, settings.shutdown_grace_s)
    if http is not None:
        http.stop()


if __name__ == "__main__":
    main()
