"""Tracing set-up and trace analysis without a cluster: which exporters the ``OTEL_*`` variables
select, OTLP over HTTP/protobuf to a receiver in this test, one trace file shared by several
processes, round spans from the in-process loop (drafts on other threads included), sampling,
the cost of tracing off, and the critical-path split on spans with known durations."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from specdec.tools import traces
from specdec.generation import CallContext, GenerationParams
from specdec.orchestrator.instrumentation import GenerationInstrumentation
from specdec import telemetry
from local_clients import LocalDraft, LocalVerify, local_controller, params
from tiny_models import EOS, tiny_qwen2, truncated_copy

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("env, expected", [
    ({}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"}, ["otlp"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://jaeger:4318/v1/traces"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
    ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"]),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"}, []),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"}, []),
])
def test_exporters_from_otel_variables(env, expected):
    assert telemetry.exporter_names(env) == expected


def test_protocol_from_otel_variables():
    assert telemetry.otlp_protocol({}) == "grpc"
    assert telemetry.otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == "http/protobuf"
    assert telemetry.otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}) == "grpc"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the machine's own OTEL_* and SPECDEC_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SPECDEC_"))} | extra


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=120)


def test_otlp_over_http_protobuf():
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            received.append((self.path, request))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run = run_python(
            "from specdec import telemetry\n"
            "assert telemetry.setup_tracing('verify')\n"
            "with telemetry.span('specdec.forward') as s:\n"
            "    s.set_attribute('specdec.fed_tokens', 7)\n"
            "telemetry.shutdown()\n",
            {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
             "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "verify-eu-1"},
        )
    finally:
        server.shutdown()
    assert run.returncode == 0, run.stderr
    (path, request), = received
    assert path == "/v1/traces"
    resource = {a.key: a.value.string_value for a in request.resource_spans[0].resource.attributes}
    assert resource["service.name"] == "verify-eu-1"
    (span,) = request.resource_spans[0].scope_spans[0].spans
    assert span.name == "specdec.forward" and span.attributes[0].value.int_value == 7


def test_one_trace_file_from_several_processes(tmp_path):
    """Processes appending at once each write whole lines: every line parses."""
    path = tmp_path / "spans.jsonl"
    code = (
        "import sys\n"
        "from specdec import telemetry\n"
        f"telemetry.setup_tracing(sys.argv[1], {str(path)!r})\n"
        "for i in range(400):\n"
        "    with telemetry.span(f'{sys.argv[1]}-{i}') as s:\n"
        "        s.set_attribute('padding', 'x' * 300)\n"
        "telemetry.shutdown()\n"
    )
    children = [subprocess.Popen([sys.executable, "-c", code, name], cwd=ROOT, env=clean_env(OTEL_BSP_SCHEDULE_DELAY="1"))
                for name in ("draft", "verify", "orchestrator")]
    assert all(child.wait(timeout=120) == 0 for child in children)
    lines = path.read_text().splitlines()
    assert len(lines) == 1200
    records = [json.loads(line) for line in lines]
    assert {r["service"] for r in records} == {"specdec-draft", "specdec-verify", "specdec-orchestrator"}
    assert len({r["name"] for r in records}) == 1200


# --------------------------------------------------------------------------- the loop in process


@pytest.fixture(scope="module")
def controller():
    target = tiny_qwen2(seed=0, layers=3, eos_token_id=EOS)
    drafts = [LocalDraft("near", truncated_copy(target, 2)), LocalDraft("far", truncated_copy(target, 1))]
    return local_controller(LocalVerify(target), drafts, eos_token_ids=[EOS], max_new_tokens_limit=256,
                            instrumentation=GenerationInstrumentation("tiny"))


def request(**fields) -> GenerationParams:
    return params(**{"prompt_ids": [11, 40, 3, 77, 25], "max_new_tokens": 16, "mode": "tree", "draft_length": 4,
                     "beam_width": 2, "beam_depth": 3, "max_tree_nodes": 32} | fields)


@pytest.fixture
def traced(tmp_path, monkeypatch):
    """Tracing into a file in this process for one test; off again after it."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "spans.jsonl"

    def start(**env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert telemetry.setup_tracing("orchestrator", str(path))
        return path

    yield start
    telemetry.shutdown()


def test_rounds_and_draft_threads_in_one_trace(controller, traced):
    path = traced()
    instrumentation = controller.instrumentation
    with instrumentation.generation("Generate") as observed:
        req = request()
        observed.set_request(req, "req-1")
        stream = controller.stream(req, CallContext("req-1", trace_parent=observed.trace_parent))
        try:
            while True:
                next(stream)
        except StopIteration as done:
            result = done.value
        observed.finish(result)
    telemetry.shutdown()
    spans = traces.parse_jsonl(path.read_text())
    (root,) = [s for s in spans if s.name == "text_completion tiny"]
    assert {s.trace_id for s in spans} == {root.trace_id}
    rounds = [s for s in spans if s.name == "specdec.round"]
    assert len(rounds) == len(result.rounds) and all(r.parent_id == root.span_id for r in rounds)
    # The drafts ran on the controller's thread pool: their cache and forward spans still sit
    # under the round (two drafts and the verifier each sync their cache once a round).
    syncs = [s for s in spans if s.name == "specdec.cache.sync"]
    by_round = {r.span_id: 0 for r in rounds}
    for s in syncs:
        by_round[s.parent_id] += 1
    drafting = [r for r in result.rounds if r.proposals]
    assert sorted(by_round.values()) == sorted([3] * len(drafting) + [1] * (len(result.rounds) - len(drafting)))
    assert root.attributes["gen_ai.usage.output_tokens"] == len(result.token_ids)


@pytest.mark.parametrize("trace_text", [False, True])
def test_text_is_on_spans_only_when_the_operator_asks(trace_text, traced):
    """--trace-text puts the conversation on the generation span, as the GenAI conventions write it
    (a chat's messages, or a completion's prompt as one user message; the output with its finish
    reason); without it no span holds any text."""
    from specdec import config
    from specdec.orchestrator.calls import Call
    from specdec.orchestrator.generations import Generations
    from specdec.v1 import common_pb2
    from tiny_models import VOCAB, tiny_tokenizer

    path = traced()
    target = tiny_qwen2(seed=0, layers=2, eos_token_id=EOS)
    settings = config.from_env(config.OrchestratorSettings, environ={}, log_dir="", target_model="tiny", trace_text=trace_text,
                               prompt_lookup=False)
    info = common_pb2.ModelInfo(model="tiny", vocab_size=VOCAB, max_context=512, eos_token_ids=[EOS])
    generations = Generations(settings, tiny_tokenizer(), LocalVerify(target), [LocalDraft("near", truncated_copy(target, 1))], info)
    prompt = "the river ran past the mill"
    _, completion, _ = generations.run(GenerationParams(prompt=prompt, max_new_tokens=6), Call("Generate"))
    _, chat, _ = generations.run(GenerationParams(prompt="<chat>hi</chat>", max_new_tokens=6),
                                 Call("/v1/chat/completions", operation="chat", messages=[("system", "be brief"), ("user", "hi")]))
    telemetry.shutdown()
    spans = traces.parse_jsonl(path.read_text())
    roots = {s.attributes["gen_ai.operation.name"]: s.attributes for s in spans if s.kind == "SERVER"}
    if not trace_text:
        assert not any(prompt in json.dumps(s.attributes) or "be brief" in json.dumps(s.attributes) for s in spans)
        assert all("gen_ai.input.messages" not in a for a in roots.values())
        return

    def text(role, content):
        return {"role": role, "parts": [{"type": "text", "content": content}]}

    assert json.loads(roots["text_completion"]["gen_ai.input.messages"]) == [text("user", prompt)]
    assert json.loads(roots["chat"]["gen_ai.input.messages"]) == [text("system", "be brief"), text("user", "hi")]
    for root, result in ((roots["text_completion"], completion), (roots["chat"], chat)):
        (output,) = json.loads(root["gen_ai.output.messages"])
        assert output == text("assistant", result.text) | {"finish_reason": root["gen_ai.response.finish_reasons"][0]}


def test_sampled_out_generations_leave_no_spans(controller, traced):
    path = traced(OTEL_TRACES_SAMPLER="always_off")
    with controller.instrumentation.generation("Generate") as observed:
        stream = controller.stream(request(), CallContext(trace_parent=observed.trace_parent))
        for _ in stream:
            pass
    telemetry.shutdown()
    assert path.read_text() == ""


def test_tracing_off_hands_out_one_null_span():
    assert not telemetry.enabled()
    assert telemetry.span("a") is telemetry.span("b")
    with telemetry.span("specdec.forward") as span:
        span.set_attribute("specdec.fed_tokens", 1)
        assert not span.is_recording()
    instrumentation = GenerationInstrumentation("tiny")
    assert instrumentation.round(None, 0, "tree") is instrumentation.round(None, 1, "tree")


# --------------------------------------------------------------------------- the critical-path split


def span(name, span_id, parent, start_ms, end_ms, kind="INTERNAL", service="specdec-orchestrator", **attributes):
    return traces.Span("t" * 32, span_id, parent, name, kind, service, int(start_ms * 1e6), int(end_ms * 1e6), attributes,
                       {"specdec.model": f"/models/{service}"})


def round_spans(draft_ends=(30, 40), verify=(42, 92), deadline_ms=None, operation="text_completion", root_start=0,
                draft_queue_ms=0.0, verify_queue_ms=0.0):
    """A round 0–100 ms: drafts from 1 ms (server 2 ms in, 2 ms before the end), then verify."""
    root_attributes = {"specdec.mode": "tree", "gen_ai.operation.name": operation}
    if root_start:
        root_attributes["gen_ai.latency.time_in_queue"] = -root_start / 1e3
    spans = [
        span(f"{operation} m", "root", None, root_start, 101, "SERVER", **root_attributes),
        span("specdec.round", "r0", "root", 0, 100, **{"specdec.round.index": 0, "specdec.accepted": 2, "specdec.draft.depth": 3,
                                                         "specdec.drafted": 12, "specdec.new_tokens": 3}),
    ]
    for i, end in enumerate(draft_ends):
        spans.append(span("specdec.v1.DraftService/DraftBeams", f"d{i}", "r0", 1, end, "CLIENT",
                          **{"rpc.method": "DraftBeams", "specdec.draft": f"draft-{i}"}))
        spans.append(span("specdec.v1.DraftService/DraftBeams", f"ds{i}", f"d{i}", 3, end - 2, "SERVER", f"draft{i}",
                          **{"rpc.method": "DraftBeams", "specdec.queue_ms": draft_queue_ms}))
    spans.append(span("specdec.v1.VerifyService/VerifyTree", "v", "r0", *verify, "CLIENT", **{"rpc.method": "VerifyTree"}))
    spans.append(span("specdec.v1.VerifyService/VerifyTree", "vs", "v", verify[0] + 1, verify[1] - 1, "SERVER", "verify",
                      **{"rpc.method": "VerifyTree", "specdec.queue_ms": verify_queue_ms}))
    return spans


def test_split_follows_the_slowest_draft():
    (req,) = traces.analyze(round_spans())
    (r,) = req.rounds
    # slowest draft: client 1–40 ms, server 3–38 ms; verify: client 42–92, server 43–91.
    assert r.draft_ms == pytest.approx(35)
    assert r.verify_ms == pytest.approx(48)
    assert r.transport_ms == pytest.approx(4 + 2)
    assert r.overhead_ms == pytest.approx(100 - 39 - 50)
    assert r.draft_ms + r.verify_ms + r.queue_ms + r.transport_ms + r.overhead_ms == pytest.approx(r.duration_ms)
    # Named as the round's records name it (specdec.winning_draft), with its model.
    assert r.slowest_draft == "draft-1 (draft1)" and r.dominant == "verify_ms" and not r.notes
    assert req.outside_rounds_ms == pytest.approx(1)
    assert traces.acceptance_by_position(req.rounds) == {1: (1, 1), 2: (1, 1), 3: (1, 0)}


def test_chat_and_every_generation_is_found_by_its_operation():
    (req,) = traces.analyze(round_spans(operation="chat"))
    assert req.name == "chat m" and len(req.rounds) == 1
    not_a_generation = [s for s in round_spans() if s.span_id != "root"] + [span("text_completion x", "other", None, 0, 1, "CLIENT")]
    assert traces.analyze(not_a_generation) == []


def test_waits_are_queue_not_compute():
    """The wait for a generation slot (before the rounds) and the model services' waits for a batched
    pass (inside their spans) are reported as queue, taken out of compute and of 'outside rounds'."""
    (req,) = traces.analyze(round_spans(root_start=-30, draft_queue_ms=5, verify_queue_ms=8))
    (r,) = req.rounds
    assert req.queue_ms == pytest.approx(30) and req.outside_rounds_ms == pytest.approx(1)
    assert r.draft_ms == pytest.approx(35 - 5) and r.verify_ms == pytest.approx(48 - 8) and r.queue_ms == pytest.approx(13)
    assert r.draft_ms + r.verify_ms + r.queue_ms + r.transport_ms + r.overhead_ms == pytest.approx(r.duration_ms)
    assert "waiting for a generation slot 30.0 ms" in traces.format_report([req])


def test_a_late_draft_counts_until_verification_starts():
    (req,) = traces.analyze(round_spans(draft_ends=(30, 70), verify=(50, 95)))
    (r,) = req.rounds
    assert r.notes == ["slowest draft missed the deadline"]
    # On the critical path: 1–50 ms of the late draft (server from 3 ms), then verify 50–95.
    assert r.draft_ms == pytest.approx(47) and r.transport_ms == pytest.approx(2 + 2)
    assert r.draft_ms + r.verify_ms + r.queue_ms + r.transport_ms + r.overhead_ms == pytest.approx(100)


def test_otlp_json_reads_like_the_trace_file():
    spans = round_spans()
    document = {"resourceSpans": []}
    for s in spans:
        document["resourceSpans"].append({
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": s.service}}]},
            "scopeSpans": [{"scope": {"name": "specdec"}, "spans": [{
                "traceId": "ab" * 16, "spanId": s.span_id.encode().hex().ljust(16, "0")[:16],
                "parentSpanId": s.parent_id.encode().hex().ljust(16, "0")[:16] if s.parent_id else "",
                "name": s.name, "kind": {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3}[s.kind],
                "startTimeUnixNano": str(s.start_ns), "endTimeUnixNano": str(s.end_ns),
                "attributes": [{"key": k, "value": {"intValue": str(v)} if isinstance(v, int) else {"stringValue": v}}
                               for k, v in s.attributes.items()],
            }]}],
        })
    (req,) = traces.analyze(traces.parse_otlp_json(json.dumps(document)))
    (expected,) = traces.analyze(spans)
    got = req.rounds[0]
    assert (got.draft_ms, got.verify_ms, got.transport_ms, got.overhead_ms, got.accepted) == pytest.approx(
        (expected.rounds[0].draft_ms, expected.rounds[0].verify_ms, expected.rounds[0].transport_ms,
         expected.rounds[0].overhead_ms, 2))
    assert req.trace_id == "ab" * 16 and req.mode == "tree"
