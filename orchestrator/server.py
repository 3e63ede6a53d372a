"""GenerationService, the public gRPC API: converts messages at the edge and runs the controller.

Requests become a :class:`~specdec.orchestrator.controller.GenerationRequest`; results go back through
the records' own ``to_pb`` (``specdec.records``) and, with ``--log-dir``, into one
:class:`~specdec.records.GenerationLog` file per generation. At start-up it asks the verify service
and every draft service for their model info and refuses a draft (or its own tokenizer) whose
tokenizer fingerprint differs from the target's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import ipaddress
import json
import logging
import sys
import threading
import time
import uuid
from typing import Callable, Iterator
from pathlib import Path

from specdec.orchestrator.calls import Call, Stall, StreamPiece
from specdec.orchestrator.clients import GrpcDraftClient, GrpcVerifyClient, check_fingerprints, cost_curve
from specdec.orchestrator.instrumentation import GenerationInstrumentation
from specdec.orchestrator.resilience import GenerationQueue, ReplicatedVerifier
from specdec.orchestrator.controller import MAX_STOP_TOKEN_IDS, GenerationRequest, Limits, SpeculativeController
from specdec import config
from specdec.cost import RoundCosts
from specdec.detokenize import TextStream, token_texts
from specdec.errors import InvalidRequest, NotReady, check_range
from specdec.lookup import PromptLookup
from specdec.records import DecodingMode, GenerationLog, GenerationResult, finish_reason_pb, stop_reason_pb
from specdec.rpc.convert import sampling_params
from specdec.rpc.security import SecurityConfigError, auth_interceptors, describe_server_tls, load_token, use_client_tls
from specdec.rpc.server import announce, exit_if_ports_in_use, serve_until_signalled, setup_logging, start_server, start_telemetry
from specdec.rpc.status import rpc_method
from specdec.v1 import common_pb2, generation_pb2, generation_pb2_grpc

log = logging.getLogger("specdec.orchestrator")
TOKENIZERS_AT_ONCE = 4  # texts tokenized at once, over both doors
PIECE_CHARS_PER_TOKEN = 4  # past this many characters a context token, a text is counted in pieces first
PIECE_CHARS = 1 << 16
TRACE_ID_KEY = "x-trace-id"  # gRPC metadata and HTTP header: the generation's trace id
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024


MAX_REQUEST_ID_CHARS = 128


def request_id(given: str) -> str:
    """The client's request id, checked (it goes into logs and traces), or a new one."""
    if not given:
        return f"req-{uuid.uuid4().hex}"
    if len(given) > MAX_REQUEST_ID_CHARS or not (given.isascii() and given.isprintable()):
        raise InvalidRequest(f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters")
    return given


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, settings: config.OrchestratorSettings, tokenizer, verify_client, draft_clients, target_info,
                 metrics=None, costs: RoundCosts | None = None) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.target_info = target_info
        self.log_dir = Path(settings.log_dir) if settings.log_dir else None
        limits = Limits(
            vocab_size=target_info.vocab_size,
            max_context=target_info.max_context,
            max_new_tokens_limit=settings.max_new_tokens_limit,
            eos_token_ids=frozenset(target_info.eos_token_ids),
            speculation=settings,
        )
        # The generation's trace and the metrics (specdec.rpc.metrics.OrchestratorMetrics, or None when off).
        self.instrumentation = GenerationInstrumentation(target_info.model, metrics)
        self._tokenizing = threading.BoundedSemaphore(TOKENIZERS_AT_ONCE)
        self.queue = GenerationQueue(settings.max_active_generations, settings.max_queued_generations,
                                     max_wait_s=settings.max_queue_wait_s)
        self.controller = SpeculativeController(
            verify_client,
            draft_clients,
            limits,
            detokenizer=functools.partial(TextStream, tokenizer),
            draft_timeout_s=settings.draft_timeout_ms / 1e3,
            verify_timeout_s=settings.verify_timeout_ms / 1e3,
            instrumentation=self.instrumentation,
            costs=costs,
            lookup=PromptLookup(settings.lookup_max_ngram, settings.lookup_min_ngram) if settings.prompt_lookup else None,
            lookup_depth=settings.lookup_depth,
        )

    def to_request(self, request) -> GenerationRequest:
        s, spec = self.settings, request.speculation
        if request.prompt and request.prompt_token_ids:
            raise InvalidRequest("set one of prompt and prompt_token_ids, not both")
        if request.prompt:
            # Refused before tokenising: a text far past the context takes long to tokenise.
            if self.target_info.max_context and len(request.prompt) > self.target_info.max_context * self.longest_token_chars:
                raise InvalidRequest(
                    f"prompt has {len(request.prompt)} characters; the model's context of {self.target_info.max_context} tokens holds at most "
                    f"{self.target_info.max_context * self.longest_token_chars}"
                )
            prompt_ids = self.tokenize(request.prompt, "prompt")
        elif request.prompt_token_ids:
            # Counted before copied (the repeated field knows its length): a message may carry
            # millions of ids, the context holds far fewer.
            count, context = len(request.prompt_token_ids), self.target_info.max_context
            if context and count >= context:
                raise InvalidRequest(f"prompt has {count} tokens; the model's context is {context}")
            prompt_ids = list(request.prompt_token_ids)
        else:
            raise InvalidRequest("prompt is empty: set prompt or prompt_token_ids")
        mode = DecodingMode.from_pb(request.mode) or DecodingMode.parse(s.mode)
        try:
            sampling = sampling_params(request.sampling, seed=request.sampling.seed)
        except InvalidRequest as exc:
            raise InvalidRequest(f"sampling.{exc}") from None
        # Bounded because every round searches the output for each stop string and its prefixes.
        if len(request.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop has {len(request.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        for i, stop in enumerate(request.stop):
            if not stop:
                raise InvalidRequest(f"stop[{i}] is empty")
            if len(stop) > MAX_STOP_CHARS:
                raise InvalidRequest(f"stop[{i}] has {len(stop)} characters; at most {MAX_STOP_CHARS} are allowed")
        check_range("stop_token_ids count", len(request.stop_token_ids), 0, MAX_STOP_TOKEN_IDS)
        return GenerationRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=request.max_new_tokens or self.default_max_new_tokens(len(prompt_ids)),
            mode=mode,
            draft_length=spec.draft_length or s.draft_length,
            beam_width=spec.beam_width or s.beam_width,
            beam_depth=spec.beam_depth or s.beam_depth,
            max_tree_nodes=spec.max_tree_nodes or s.max_tree_nodes,
            adaptive=spec.adaptive if spec.HasField("adaptive") else s.adaptive,
            stop=list(request.stop),
            include_rounds=request.include_rounds,
            sampling=sampling,
            request_id=request_id(request.request_id),
            stop_token_ids=list(request.stop_token_ids),  # counted above, before copied; the controller checks each
            ignore_eos=request.ignore_eos,
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
        )

    def tokenize(self, text: str, what: str, add_special_tokens: bool = True) -> list[int]:
        """``text``'s token ids, tokenized a few texts at a time (``TOKENIZERS_AT_ONCE``: a long
        text takes a worker thread for a while, and the doors' threads must not all wait on it).
        A text longer than ``PIECE_CHARS_PER_TOKEN`` characters a token of the context is counted
        in pieces first, and refused as soon as they hold more tokens than the context (less one a
        piece, for the tokens a cut can split): a many-megabyte prompt costs a context's worth of
        tokenizing, not its whole length."""
        context = self.target_info.max_context
        with self._tokenizing:
            if context and len(text) > context * PIECE_CHARS_PER_TOKEN:
                counted, pieces = 0, 0
                for start in range(0, len(text), PIECE_CHARS):
                    counted += len(self.tokenizer(text[start:start + PIECE_CHARS], add_special_tokens=False).input_ids)
                    pieces += 1
                    if counted - pieces >= context:
                        raise InvalidRequest(f"{what} has more than {context} tokens (counted in its first {start + PIECE_CHARS} "
                                             f"characters); the model's context is {context}")
            return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """Characters in the tokenizer's longest token: a prompt has at least len(text) / this many tokens."""
        return max(map(len, self.tokenizer.get_vocab()), default=1)

    def default_max_new_tokens(self, prompt_len: int) -> int:
        """The server default, shortened to fit the model's context (an explicit value is never cut)."""
        room = self.target_info.max_context - prompt_len if self.target_info.max_context else self.settings.max_new_tokens
        return max(1, min(self.settings.max_new_tokens, room))

    @contextlib.contextmanager
    def admitted(self, request, observed, deadline: float | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Iterator[GenerationRequest]:
        """The checked request, bound to the client's ``deadline`` (``time.monotonic()``; None: none)
        and liveness (``cancelled()`` true once the client has gone; the controller stops between
        rounds when either ends), holding a generation slot while the block runs."""
        req = self.to_request(request)
        self.controller.check(req)
        # The server's own deadline bounds every generation; a client's may only shorten it.
        if self.settings.generation_timeout_s:
            own = time.monotonic() + self.settings.generation_timeout_s
            deadline = own if deadline is None else min(deadline, own)
        req.deadline = deadline
        req.cancelled = cancelled
        self.queue.acquire(req.deadline, req.cancelled)
        try:
            observed.set_request(req, request.sampling.temperature)
            yield req
        finally:
            self.queue.release()

    # The front doors (gRPC here, HTTP in specdec.orchestrator.http_api) run every generation
    # through the two methods below: the same checks, admission, instrumentation and run log.

    def run_generation(self, request, call: Call) -> tuple[GenerationRequest, GenerationResult, list[str]]:
        """One whole generation of a ``GenerateRequest``: the checked request, its result, and the
        text each generated token adds."""
        with self.instrumentation.generation(call.method, call.grpc_context, call.http_headers, call.operation) as observed:
            self.announce_trace(call, observed)
            with self.admitted(request, observed, call.deadline, call.cancelled) as req:
                result = self.controller.generate(req, observed.trace_parent)
            observed.finish(result)
        texts = token_texts(self.tokenizer, result.token_ids)
        self.write_log(req, result, texts, call.trace_id)
        return req, result, texts

    def stream_generation(self, request, call: Call) -> Iterator[GenerationRequest | StreamPiece]:
        """A generation as it goes: first the checked request once it holds a generation slot (a
        refusal raises before it), then a :class:`StreamPiece` per round, then the last piece, with
        the text held back until the end and the result. Closing the iterator early (the client
        went away) stops the generation and releases its sessions in every service."""
        # The generation span is not made current here: this generator yields inside it.
        with self.instrumentation.generation(call.method, call.grpc_context, call.http_headers, call.operation) as observed:
            self.announce_trace(call, observed)
            with self.admitted(request, observed, call.deadline, call.cancelled) as req:
                yield req
                stream = self.controller.stream(req, observed.trace_parent)
                sent = 0  # characters of text handed out so far
                try:
                    while True:
                        record = next(stream)
                        sent += len(record.text)
                        handed = time.perf_counter()
                        yield StreamPiece(record.new_tokens, record.text, record.logprobs, record=record)
                        # How long the door took to pass it on: a slow reader shows here, not as compute.
                        observed.streamed(record, time.perf_counter() - handed)
                except StopIteration as done:
                    result = done.value
                finally:
                    # Also when the client goes away (GeneratorExit here): the controller's own
                    # clean-up releases the sessions in every service.
                    stream.close()
            observed.finish(result)
        self.write_log(req, result, trace_id=call.trace_id)
        # Any text held back (it might have begun a stop string), and the totals.
        yield StreamPiece([], result.text[sent:], [], result=result)

    @staticmethod
    def announce_trace(call: Call, observed) -> None:
        """The generation's trace id, for the caller to find its trace by: on ``call`` (the HTTP
        door answers it as X-Trace-Id) and, over gRPC, in the response's initial metadata."""
        call.trace_id = observed.trace_id
        if call.trace_id and call.grpc_context is not None:
            call.grpc_context.send_initial_metadata(((TRACE_ID_KEY, call.trace_id),))

    @rpc_method
    def Generate(self, request, context):
        req, result, texts = self.run_generation(request, Call.of_grpc("Generate", context))
        return result.to_pb(req.include_rounds, texts)

    @rpc_method
    def GenerateStream(self, request, context):
        # A client that takes no message for stall_timeout_s is cut off (the call cancelled): gRPC's
        # own flow control would otherwise hold the generation, and its slot, at a send forever.
        stall = Stall(self.settings.stall_timeout_s, context.cancel)
        with contextlib.closing(self.stream_generation(request, Call.of_grpc("GenerateStream", context))) as pieces:
            req = next(pieces)
            for piece in pieces:
                if piece.result is None:
                    with stall:
                        yield generation_pb2.GenerateStreamResponse(
                            token_ids=piece.token_ids,
                            text=piece.text,
                            round=piece.record.to_pb() if req.include_rounds else None,
                            logprobs=[t.to_pb() for t in piece.logprobs],
                            request_id=req.request_id,
                        )
                else:
                    result = piece.result
                    # The last message: any text held back, and the totals.
                    yield generation_pb2.GenerateStreamResponse(
                        text=piece.text, finish_reason=finish_reason_pb(result.finish_reason), stats=result.stats.to_pb(),
                        request_id=req.request_id, **stop_reason_pb(result.stop_reason),
                    )

    @rpc_method
    def GetInfo(self, request, context):
        info = common_pb2.ModelInfo()
        info.CopyFrom(self.target_info)
        info.service = "orchestrator"
        # The orchestrator's sessions are its generations: running or waiting for a slot.
        info.active_sessions = self.queue.active + self.queue.queued
        info.cached_tokens = 0
        return info

    def write_log(self, req: GenerationRequest, result: GenerationResult, texts: list[str] | None = None, trace_id: str = "") -> None:
        if self.log_dir is None:
            return
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
            with_text = self.settings.log_text
            entry = GenerationLog(
                result=result,
                target_model=self.target_info.model,
                # Field by field: the left-out ones (a callable, the prompt) are never copied.
                request={f.name: copy.deepcopy(getattr(req, f.name)) for f in dataclasses.fields(req)
                         if f.name not in ("prompt_ids", "deadline", "cancelled")}
                | {"prompt_tokens": len(req.prompt_ids), "sampling": dataclasses.asdict(req.sampling)}
                | ({"trace_id": trace_id} if trace_id else {}),
                # Only with --log-text (GenerationLog.counts_json leaves every text and token id out
                # otherwise): the prompt and each token's text, so that the log alone can be shown.
                prompt=self.tokenizer.decode(req.prompt_ids, skip_special_tokens=True) if with_text else "",
                prompt_token_ids=list(req.prompt_ids) if with_text else [],
                token_texts=(texts if texts is not None else token_texts(self.tokenizer, result.token_ids)) if with_text else [],
                with_text=with_text,
            )
            path.write_text(json.dumps(entry.to_json(), indent=1))
            prune(self.log_dir, self.settings.log_max_mb << 20)
        except OSError as exc:
            log.warning("could not write the run log: %s", exc)


def prune(directory: Path, max_bytes: int) -> int:
    """Delete the oldest ``*.json`` files of ``directory`` until the rest take at most ``max_bytes``;
    how many went. (Every write checks: a listing of a few thousand files costs about a millisecond.)"""
    files = sorted(directory.glob("*.json"), key=lambda p: p.name)  # names begin with the time written
    sizes = [p.stat().st_size for p in files]
    total, gone = sum(sizes), 0
    for path, size in zip(files, sizes):
        if total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        total, gone = total - size, gone + 1
    return gone


def build_servicer(settings: config.OrchestratorSettings, startup_timeout_s: float = 600.0, metrics=None) -> GenerationServicer:
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
    costs = RoundCosts(cost_curve(target_info), {c.name: cost_curve(i) for c, i in zip(draft_clients, draft_infos.values())})
    log.info("forward costs, ms by rows: verify %s; %s", costs.verify.points,
             "; ".join(f"{name} {curve.points}" for name, curve in costs.drafts.items()))
    return GenerationServicer(settings, tokenizer, verify_client, draft_clients, target_info, metrics, costs)


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
        servicer = build_servicer(settings, metrics=metrics)
        http = None
        if settings.http_port:
            from specdec.orchestrator.http_server import start_http

            http = start_http(servicer, settings, load_token(settings), metrics.registry)  # its port bound now
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
