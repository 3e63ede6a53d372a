"""Traces and metrics of real generations: the tiny cluster's processes export their spans over
OTLP/gRPC to a receiver running in this test (the collector protocol's TraceService, from
opentelemetry-proto) and to a shared JSON-lines trace file, and serve Prometheus metrics.

The checks follow one generation through every process: one trace, one ``specdec.round`` span per
round the response reports, each draft/verify server span under its round's client span, and
attributes equal to what the response says happened; then ``specdec traces analyze`` on the trace
file, and the metric counters against the response statistics.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from specdec.tools import traces
from specdec.tools.cluster import LocalCluster, free_port
from specdec import config
from specdec.v1 import generation_pb2, generation_pb2_grpc

SPAN_WAIT_S = 20.0
KIND_SERVER, KIND_CLIENT = 2, 3
PROMPT = "def telemetry(x):"


# --------------------------------------------------------------------------- an OTLP/gRPC receiver


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it, flattened to plain dicts."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[dict]:
        with self.lock:
            requests = list(self.requests)
        out = []
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = {a.key: any_value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for s in scope_spans.spans:
                        out.append({
                            "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                            "parent_id": s.parent_span_id.hex() or None, "name": s.name, "kind": s.kind,
                            "service": resource.get("service.name"), "resource": resource,
                            "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                            "attributes": {a.key: any_value(a.value) for a in s.attributes},
                            "events": [(e.name, {a.key: any_value(a.value) for a in e.attributes}) for e in s.events],
                        })
        return out


def any_value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def port_block(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports."""
    for _ in range(50):
        first = free_port()
        sockets = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no block of {n} free ports")


@pytest.fixture(scope="module")
def receiver():
    servicer = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.endpoint = f"http://127.0.0.1:{port}"
    yield servicer
    server.stop(0)


@pytest.fixture(scope="module")
def traced_cluster(tiny_dirs, receiver, tmp_path_factory):
    """verify + two drafts + orchestrator exporting over OTLP/gRPC and to one trace file, with metrics."""
    root = tmp_path_factory.mktemp("telemetry")
    from conftest import TINY_CHAT_TEMPLATE

    chat_template = root / "template.jinja"
    chat_template.write_text(TINY_CHAT_TEMPLATE)
    settings = config.from_env(
        config.ClusterSettings,
        target_model=str(tiny_dirs["target"]),
        draft_models=[str(tiny_dirs["draft"]), str(tiny_dirs["other"])],
        port=0,
        log_dir="",
        startup_timeout_s=120,
        trace_file=str(root / "spans.jsonl"),
        metrics_port=port_block(4),
        adaptive=False,  # tiny drafts cost what the tiny target does: the cost model would stop drafting
        prompt_lookup=False,  # every proposal a call with its spans (the lookup runs in-process, unseen)
        http_port=free_port(),
        chat_template=str(chat_template),
    )
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s rather than the default 5 s
        "OTEL_SERVICE_NAME": "",  # each service's own default name
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    with LocalCluster(settings, env=env) as cluster:
        yield cluster


def generate(cluster, max_new_tokens: int, mode=generation_pb2.DECODING_MODE_TREE, **speculation):
    with grpc.insecure_channel(cluster.orchestrator_address) as channel:
        return generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            generation_pb2.GenerateRequest(
                prompt=PROMPT, max_new_tokens=max_new_tokens, mode=mode, include_rounds=True,
                speculation=generation_pb2.SpeculationParams(**speculation),
            ),
            timeout=60,
        )


def generation_trace(receiver, max_tokens: int, rounds: int) -> tuple[dict, list[dict]]:
    """The root span of the generation asked for ``max_tokens`` and every span of its trace, once
    all of its round, client and server spans have arrived."""
    deadline = time.monotonic() + SPAN_WAIT_S
    while True:
        spans = receiver.spans()
        roots = [s for s in spans if s["name"].startswith("text_completion")
                 and s["attributes"].get("gen_ai.request.max_tokens") == max_tokens]
        if len(roots) == 1:
            trace = [s for s in spans if s["trace_id"] == roots[0]["trace_id"]]
            if complete(trace, rounds):
                return roots[0], trace
        if time.monotonic() > deadline:
            pytest.fail(f"spans of the generation did not all arrive within {SPAN_WAIT_S} s: "
                        f"{len(roots)} roots, {len(spans)} spans in all")
        time.sleep(0.1)


def complete(trace: list[dict], rounds: int) -> bool:
    by_parent = defaultdict(list)
    for s in trace:
        by_parent[s["parent_id"]].append(s)
    round_spans = [s for s in trace if s["name"] == "specdec.round"]
    clients = [s for s in trace if s["kind"] == KIND_CLIENT]
    return (len(round_spans) == rounds and bool(clients)
            and all(any(c["kind"] == KIND_SERVER for c in by_parent[client["span_id"]]) for client in clients))


# --------------------------------------------------------------------------- one trace per generation


def test_one_connected_trace_per_generation(traced_cluster, receiver):
    max_tokens = 23  # unique in this module: finds this generation's root span
    reply = generate(traced_cluster, max_tokens, beam_width=2, beam_depth=4)
    stats = reply.stats
    root, trace = generation_trace(receiver, max_tokens, stats.rounds)
    by_id = {s["span_id"]: s for s in trace}
    by_parent = defaultdict(list)
    for s in trace:
        by_parent[s["parent_id"]].append(s)

    # One trace: every DraftBeams/VerifyTree span any service sent while this generation ran is in it.
    during = [s for s in receiver.spans() if root["start"] <= s["start"] <= root["end"]
              and s["attributes"].get("rpc.method") in ("DraftBeams", "VerifyTree")]
    assert during and {s["trace_id"] for s in during} == {root["trace_id"]}
    assert all(s["parent_id"] is None or s["parent_id"] in by_id for s in trace if s is not root)

    # The services, told apart by service.name; each draft's name is the one its records give it.
    drafts = [f"draft-{i}" for i in range(len(traced_cluster.settings.draft_models))]
    assert {s["service"] for s in trace} == {"specdec-orchestrator", "specdec-verify", *(f"specdec-{d}" for d in drafts)}
    assert {s["resource"].get("specdec.model") for s in trace if s["service"].startswith("specdec-draft")} == set(
        traced_cluster.settings.draft_models)

    # The root: GenAI semantic conventions, and the counts the response reports.
    model = traced_cluster.settings.target_model
    assert root["parent_id"] is None and root["kind"] == KIND_SERVER
    assert root["name"] == f"text_completion {model}"
    a = root["attributes"]
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.provider.name"] == "specdec"
    assert a["gen_ai.request.model"] == model
    assert a["gen_ai.request.max_tokens"] == max_tokens
    assert a["gen_ai.request.temperature"] == 0.0
    finish = {generation_pb2.FINISH_REASON_LENGTH: "length", generation_pb2.FINISH_REASON_EOS: "eos"}[reply.finish_reason]
    assert a["specdec.finish_reason"] == finish
    assert a["gen_ai.response.finish_reasons"] == [{"eos": "stop"}.get(finish, finish)]
    assert a["gen_ai.usage.input_tokens"] == stats.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == stats.tokens_generated == len(reply.token_ids)
    assert a["specdec.mode"] == "tree"

    # Exactly one round span per round of the response, children of the root, with its numbers.
    round_spans = sorted((s for s in trace if s["name"] == "specdec.round"), key=lambda s: s["attributes"]["specdec.round.index"])
    assert len(round_spans) == stats.rounds == len(reply.rounds)
    context_len = stats.prompt_tokens
    for span, r in zip(round_spans, reply.rounds):
        ra = span["attributes"]
        assert span["parent_id"] == root["span_id"]
        assert ra["specdec.round.index"] == r.index
        assert ra["specdec.mode"] == "tree"
        assert ra["specdec.drafted"] == sum(len(b.token_ids) for p in r.proposals for b in p.beams)
        assert ra["specdec.accepted"] == len(r.accepted_token_ids)
        assert ra["specdec.bonus"] == int(r.bonus_token_id >= 0)
        assert ra["specdec.tree.nodes"] == r.tree_nodes
        assert ra["specdec.winning_draft"] == r.winning_draft and r.winning_draft in ("", *drafts)
        assert ra["specdec.fallback"] == r.fallback
        assert ra["specdec.draft_failed"] is False and "specdec.draft_failures" not in ra  # every draft answered in time
        assert "specdec.tree.branching_factor" in ra

        calls = by_parent[span["span_id"]]
        assert all(c["kind"] == KIND_CLIENT for c in calls)
        draft_calls = [c for c in calls if c["attributes"]["rpc.method"] == "DraftBeams"]
        verify_calls = [c for c in calls if c["attributes"]["rpc.method"] == "VerifyTree"]
        assert len(draft_calls) == len(r.proposals) and len(verify_calls) == 1
        for call in calls:
            # Each server span sits under its client span, in the service the call went to.
            (server,) = [s for s in by_parent[call["span_id"]]]
            assert server["kind"] == KIND_SERVER
            assert server["name"] == call["name"]
            assert server["attributes"]["rpc.method"] == call["attributes"]["rpc.method"]
            assert server["service"] == (f"specdec-{call['attributes']['specdec.draft']}" if call in draft_calls else "specdec-verify")
            assert server["start"] >= call["start"] and server["end"] <= call["end"]
            assert call["attributes"]["rpc.grpc.status_code"] == server["attributes"]["rpc.grpc.status_code"] == 0

        # Inside the verify service: cache sync (with compaction after a round that accepted
        # tokens), then one forward over the missing context and the tree.
        (verify_server,) = by_parent[verify_calls[0]["span_id"]]
        inner = {s["name"]: s for s in by_parent[verify_server["span_id"]]}
        assert set(inner) == {"specdec.cache.sync", "specdec.forward"}
        sync = inner["specdec.cache.sync"]["attributes"]
        assert sync["specdec.context_tokens"] == context_len
        reused = sync["specdec.reused_tokens"]
        assert 0 <= reused < context_len
        forward = inner["specdec.forward"]["attributes"]
        assert forward["specdec.tree.nodes"] == r.tree_nodes
        assert forward["specdec.fed_tokens"] == context_len - reused + r.tree_nodes
        compactions = [s for s in by_parent[inner["specdec.cache.sync"]["span_id"]] if s["name"] == "specdec.cache.compact"]
        previous = reply.rounds[r.index - 1] if r.index else None
        assert len(compactions) == int(bool(previous and previous.accepted_token_ids))
        masks = [s for s in by_parent[inner["specdec.forward"]["span_id"]] if s["name"] == "specdec.tree_mask"]
        assert len(masks) == int(r.tree_nodes > 0)
        for call in draft_calls:
            (server,) = by_parent[call["span_id"]]
            names = [s["name"] for s in by_parent[server["span_id"]]]
            assert names.count("specdec.cache.sync") == 1 and "specdec.forward" in names
        context_len += len(r.accepted_token_ids) + (r.bonus_token_id >= 0)

    # No text: the prompt appears in no attribute.
    assert not any(PROMPT in json.dumps(s["attributes"]) for s in trace)


def test_trace_file_analysis_adds_up(traced_cluster, receiver, tmp_path):
    max_tokens = 19
    reply = generate(traced_cluster, max_tokens, beam_width=3, beam_depth=3)
    root, _ = generation_trace(receiver, max_tokens, reply.stats.rounds)
    path = Path(traced_cluster.settings.trace_file)
    deadline = time.monotonic() + SPAN_WAIT_S
    while True:
        # The trace file has its own batch processors: wait until it holds this whole generation too.
        requests = [r for r in traces.analyze(traces.load_spans(path)) if r.trace_id == root["trace_id"]]
        if requests and len(requests[0].rounds) == reply.stats.rounds and not any(r.notes for r in requests[0].rounds):
            break
        assert time.monotonic() < deadline, "the trace file did not get the whole generation"
        time.sleep(0.1)
    (request,) = requests
    assert request.output_tokens == reply.stats.tokens_generated
    assert request.tokens_per_round == pytest.approx(reply.stats.mean_accepted_per_round, rel=1e-5)
    assert request.accepted_per_round == pytest.approx(reply.stats.draft_tokens_accepted / reply.stats.rounds)
    for split, r in zip(request.rounds, reply.rounds):
        parts = [split.draft_ms, split.verify_ms, split.queue_ms, split.transport_ms, split.overhead_ms]
        assert sum(parts) == pytest.approx(split.duration_ms, abs=1e-3)
        assert all(p >= 0 for p in parts), split
        assert split.verify_ms > 0 and split.transport_ms > 0
        assert (split.draft_ms > 0) == bool(r.proposals)
        assert split.accepted == len(r.accepted_token_ids)
        # The round spans the draft and verify calls the response timed, and little else.
        assert split.duration_ms >= r.draft_ms + r.verify_ms - 0.5
    positions = traces.acceptance_by_position(request.rounds)
    assert positions[1][0] == sum(1 for r in reply.rounds if r.proposals)
    assert positions[1][1] == sum(1 for r in reply.rounds if r.accepted_token_ids)

    # The same spans as the collector would write them (OTLP/JSON, hex ids) give the same analysis.
    with receiver.lock:
        exported = [MessageToDict(req) for req in receiver.requests]
    otlp_file = tmp_path / "otlp.jsonl"
    otlp_file.write_text("\n".join(json.dumps(hex_ids(doc)) for doc in exported) + "\n")
    (from_otlp,) = [r for r in traces.analyze(traces.load_spans(otlp_file, otlp_json=True)) if r.trace_id == root["trace_id"]]
    def numbers(rounds):
        return [x for s in rounds for x in (s.index, s.duration_ms, s.draft_ms, s.verify_ms, s.transport_ms, s.accepted)]

    assert numbers(from_otlp.rounds) == pytest.approx(numbers(request.rounds))

    # And the command a user runs: the table, the JSON and the plot.
    plot = tmp_path / "rounds.png"
    run = subprocess.run([sys.executable, "-m", "specdec.tools.cli", "traces", "analyze", str(path), "--plot", str(plot)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert root["trace_id"] in run.stdout and "slowest rounds" in run.stdout and "dominated by" in run.stdout
    assert plot.stat().st_size > 1000
    run = subprocess.run([sys.executable, "-m", "specdec.tools.cli", "traces", "analyze", str(otlp_file), "--otlp-json", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    analysed = {r["trace_id"]: r for r in json.loads(run.stdout)["requests"]}
    assert len(analysed[root["trace_id"]]["rounds"]) == reply.stats.rounds


def hex_ids(doc: dict) -> dict:
    """protobuf's JSON mapping writes bytes as base64; OTLP/JSON (what collectors write) uses hex."""
    for resource_spans in doc.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if span.get(key):
                        span[key] = base64.b64decode(span[key]).hex()
    return doc


# --------------------------------------------------------------------------- metrics


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == v2 for k, v2 in labels.items()))


def test_metrics_move_by_what_the_response_reports(traced_cluster):
    processes = {p.name: p for p in traced_cluster.processes}
    assert all(p.metrics_address for p in processes.values())
    before = {name: scrape(p.metrics_address) for name, p in processes.items()}
    reply = generate(traced_cluster, 21, mode=generation_pb2.DECODING_MODE_SEQUENTIAL, draft_length=4)
    after = {name: scrape(p.metrics_address) for name, p in processes.items()}
    s = reply.stats

    def moved(process: str, name: str, **labels) -> float:
        return total(after[process], name, **labels) - total(before[process], name, **labels)

    o = "orchestrator"
    assert moved(o, "specdec_requests_total", method="Generate", code="OK") == 1
    assert moved(o, "specdec_request_duration_seconds_count", method="Generate") == 1
    assert moved(o, "specdec_round_duration_seconds_count", mode="sequential") == s.rounds
    assert moved(o, "specdec_tokens_generated_total", mode="sequential") == s.tokens_generated
    # The first token: at least what the response timed from the controller's start (the call's
    # wait for a slot comes on top), within the call.
    assert moved(o, "specdec_time_to_first_token_seconds_count", mode="sequential") == 1
    first_token_s = moved(o, "specdec_time_to_first_token_seconds_sum", mode="sequential")
    assert s.time_to_first_token_ms / 1e3 - 1e-6 <= first_token_s <= moved(o, "specdec_request_duration_seconds_sum", method="Generate")
    # One latency for each token, each round's time shared among its tokens: together, the rounds' time.
    assert moved(o, "specdec_inter_token_latency_seconds_count", mode="sequential") == s.tokens_generated
    assert moved(o, "specdec_inter_token_latency_seconds_sum", mode="sequential") == pytest.approx(
        moved(o, "specdec_round_duration_seconds_sum", mode="sequential"))
    assert moved(o, "specdec_accepted_tokens_total", mode="sequential") == s.draft_tokens_accepted
    assert moved(o, "specdec_bonus_tokens_total", mode="sequential") == s.bonus_tokens
    assert moved(o, "specdec_tree_nodes_total", mode="sequential") == s.tree_nodes_total
    # The last round may have no room to draft: the response counts it as a fallback too.
    assert moved(o, "specdec_fallback_rounds_total") == sum(r.fallback for r in reply.rounds)
    assert moved(o, "specdec_draft_tokens_proposed_total") == s.draft_tokens_proposed
    for d in s.drafts:
        assert moved(o, "specdec_draft_tokens_proposed_total", draft=d.draft) == d.proposed_tokens
        assert moved(o, "specdec_draft_tokens_accepted_total", draft=d.draft) == d.accepted_tokens
    # By position: what was drafted at position p is what the rounds' chains reached.
    for position in range(1, 5):
        drafted = sum(1 for r in reply.rounds for p in r.proposals for b in p.beams if len(b.token_ids) >= position)
        assert moved(o, "specdec_draft_tokens_proposed_total", position=str(position)) == drafted
    assert total(after[o], "specdec_requests_in_flight") == 0

    assert moved("verify", "specdec_requests_total", method="VerifyTree", code="OK") == s.rounds
    assert moved("verify", "specdec_request_duration_seconds_count", method="VerifyTree") == s.rounds
    assert moved("verify", "specdec_forward_tokens_total", method="VerifyTree") >= s.tree_nodes_total + s.prompt_tokens
    for i, d in enumerate(s.drafts):
        calls = sum(1 for r in reply.rounds if any(p.draft == d.draft for p in r.proposals))
        assert moved(f"draft-{i}", "specdec_requests_total", method="DraftBeams", code="OK") == calls
    for name in processes:
        if name != o:
            assert ("specdec_kv_cache_tokens", ()) in after[name] and ("specdec_active_sessions", ()) in after[name]

    # The sessions are released when the generation ends: the caches empty out.
    deadline = time.monotonic() + 10
    while any(total(scrape(p.metrics_address), "specdec_active_sessions") for n, p in processes.items() if n != o):
        assert time.monotonic() < deadline, "sessions were not released"
        time.sleep(0.1)
    assert all(total(scrape(p.metrics_address), "specdec_kv_cache_tokens") == 0 for n, p in processes.items() if n != o)


def test_health_checks_are_not_traced(traced_cluster, receiver):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(traced_cluster.verify_address) as channel:
        for _ in range(3):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    time.sleep(0.5)
    names = {s["name"] for s in receiver.spans()}
    assert not any("Health" in n or "GetInfo" in n or "ReleaseSession" in n for n in names), names


# --------------------------------------------------------------------------- the trace id, back to the caller


def wait_for_root(receiver, trace_id: str) -> dict:
    deadline = time.monotonic() + SPAN_WAIT_S
    while time.monotonic() < deadline:
        roots = [sp for sp in receiver.spans() if sp["trace_id"] == trace_id and sp["kind"] == KIND_SERVER
                 and sp["attributes"].get("gen_ai.operation.name")]
        if roots:
            return roots[0]
        time.sleep(0.1)
    pytest.fail(f"no generation span in trace {trace_id}")


def test_a_chat_over_http_joins_the_callers_trace_and_says_which(traced_cluster, receiver):
    """A caller's W3C traceparent is honoured over HTTP: the generation is in the caller's trace,
    whose id comes back as X-Trace-Id; the root carries the latencies, the HTTP status, and the
    analysis finds the chat."""
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "mode": "tree"}).encode()
    request = urllib.request.Request(traced_cluster.http_url + "/v1/chat/completions", data=body, method="POST", headers={
        "Content-Type": "application/json", "traceparent": f"00-{caller_trace}-{caller_span}-01"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200
        assert reply.headers["X-Trace-Id"] == caller_trace
    root = wait_for_root(receiver, caller_trace)
    a = root["attributes"]
    assert root["parent_id"] == caller_span and a["gen_ai.operation.name"] == "chat"
    assert a["http.response.status_code"] == 200 and "rpc.grpc.status_code" not in a
    assert 0 <= a["gen_ai.latency.time_in_queue"] < a["gen_ai.latency.time_to_first_token"] <= a["gen_ai.latency.e2e"]
    assert a["gen_ai.response.id"].startswith("chatcmpl-")
    deadline = time.monotonic() + SPAN_WAIT_S
    while True:
        found = [r for r in traces.analyze(traces.load_spans(traced_cluster.settings.trace_file)) if r.trace_id == caller_trace]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert found and found[0].name.startswith("chat ") and found[0].rounds


def test_a_refused_http_request_leaves_an_error_span_with_its_status(traced_cluster, receiver):
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    body = json.dumps({"prompt": "x", "max_tokens": 10**6}).encode()  # past max_new_tokens_limit: 400
    request = urllib.request.Request(traced_cluster.http_url + "/v1/completions", data=body, method="POST", headers={
        "Content-Type": "application/json", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    try:
        urllib.request.urlopen(request, timeout=60)
        pytest.fail("accepted")
    except urllib.error.HTTPError as error:
        assert error.code == 400 and error.headers["X-Trace-Id"] == trace_id
    a = wait_for_root(receiver, trace_id)["attributes"]
    assert a["http.response.status_code"] == 400 and a["error.type"] == "INVALID_ARGUMENT"


def test_grpc_callers_get_the_trace_id_in_the_metadata(traced_cluster, receiver):
    with grpc.insecure_channel(traced_cluster.orchestrator_address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = generation_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=5)
        _, call = stub.Generate.with_call(request, timeout=60)
        trace_id = dict(call.initial_metadata())["x-trace-id"]
        assert len(trace_id) == 32 and wait_for_root(receiver, trace_id)["attributes"]["rpc.grpc.status_code"] == 0
        stream = stub.GenerateStream(generation_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=6, include_rounds=True), timeout=60)
        rounds = [m.round for m in stream if m.HasField("round")]
        root = wait_for_root(receiver, dict(stream.initial_metadata())["x-trace-id"])
        # A streamed generation: one event per round passed on, with the client's wait for it.
        events = [attrs for name, attrs in root["events"] if name == "specdec.stream.piece"]
        assert [e["specdec.round.index"] for e in events] == [r.index for r in rounds]
        assert all(e["specdec.client_wait_ms"] >= 0 for e in events)


def test_a_request_refused_before_its_generation_leaves_a_span(traced_cluster, receiver):
    trace_id = "6bf92f3577b34da6a3ce929d0e0e4738"
    request = urllib.request.Request(traced_cluster.http_url + "/v1/completions", data=b"{not json", method="POST", headers={
        "Content-Type": "application/json", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 400 and refused.value.headers["X-Trace-Id"] == trace_id
    deadline = time.monotonic() + SPAN_WAIT_S
    while not (found := [sp for sp in receiver.spans() if sp["trace_id"] == trace_id]) and time.monotonic() < deadline:
        time.sleep(0.1)
    (span,) = found
    a = span["attributes"]
    assert span["name"] == "POST /v1/completions" and span["kind"] == KIND_SERVER and "gen_ai.operation.name" not in a
    assert a["http.response.status_code"] == 400 and a["error.type"]


def test_genai_metrics_carry_trace_ids_as_exemplars(traced_cluster, receiver):
    """gen_ai.server.* histograms beside the specdec_* ones; over OpenMetrics each observation's
    exemplar names its generation's trace, which the traces hold."""
    with grpc.insecure_channel(traced_cluster.orchestrator_address) as channel:
        _, call = generation_pb2_grpc.GenerationServiceStub(channel).Generate.with_call(
            generation_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=7), timeout=60)
    trace_id = dict(call.initial_metadata())["x-trace-id"]
    orchestrator = next(p for p in traced_cluster.processes if p.name == "orchestrator")
    request = urllib.request.Request(f"http://{orchestrator.metrics_address}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    for name in ("gen_ai_server_request_duration_seconds", "gen_ai_server_time_to_first_token_seconds",
                 "gen_ai_server_time_per_output_token_seconds"):
        assert f'{name}_bucket{{gen_ai_operation_name="text_completion"' in text, name
    assert f'trace_id="{trace_id}"' in text
    assert wait_for_root(receiver, trace_id)


def test_under_load_every_generation_is_found_and_the_queue_grows(traced_cluster, receiver):
    """Generations alone, then six at once over both doors: the analysis of the trace file finds
    every one (chat and completions, unary and streamed), and the rounds' queue (calls waiting for a
    batched pass the other sessions share) grows with the load."""
    def grpc_generation(stream: bool) -> str:
        with grpc.insecure_channel(traced_cluster.orchestrator_address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            request = generation_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=12)
            if stream:
                replies = stub.GenerateStream(request, timeout=60)
                list(replies)
                return dict(replies.initial_metadata())["x-trace-id"]
            return dict(stub.Generate.with_call(request, timeout=60)[1].initial_metadata())["x-trace-id"]

    def http_generation(chat: bool) -> str:
        """Under the caller's own trace (a traceparent of its own), which the answer names."""
        body = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": PROMPT}
        caller = os.urandom(16).hex()
        request = urllib.request.Request(traced_cluster.http_url + ("/v1/chat/completions" if chat else "/v1/completions"),
                                         data=json.dumps({**body, "max_tokens": 12}).encode(), method="POST",
                                         headers={"Content-Type": "application/json", "traceparent": f"00-{caller}-00f067aa0ba902b7-01"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert reply.headers["X-Trace-Id"] == caller
            return caller

    kinds = [lambda: grpc_generation(False), lambda: grpc_generation(True), lambda: http_generation(False),
             lambda: http_generation(True)]
    alone = [kind() for kind in kinds]
    with futures.ThreadPoolExecutor(6) as pool:
        loaded = list(pool.map(lambda i: kinds[i % 4](), range(6)))
    wanted = set(alone + loaded)
    deadline = time.monotonic() + SPAN_WAIT_S
    while True:
        found = {r.trace_id: r for r in traces.analyze(traces.load_spans(traced_cluster.settings.trace_file))}
        if wanted <= set(found) and all(found[t].rounds for t in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert wanted <= set(found), f"{len(wanted - set(found))} generations not found"
    assert {found[t].name.split()[0] for t in wanted} == {"text_completion", "chat"}

    def queue_per_round(trace_ids):
        rounds = [r for t in trace_ids for r in found[t].rounds]
        return sum(r.queue_ms for r in rounds) / len(rounds)

    assert queue_per_round(loaded) > queue_per_round(alone), (queue_per_round(loaded), queue_per_round(alone))
