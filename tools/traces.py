"""``specdec traces analyze``: where each round's time went, from the spans of real generations.

Reads the JSON-lines span file the services write (``--trace-file`` / ``SPECDEC_TRACE_FILE``), or
with ``--otlp-json`` an OTLP/JSON export (what an OpenTelemetry collector's or Jaeger v2's file
exporter writes: ``resourceSpans`` / ``scopeSpans`` / ``spans``, one document or one per line).

For every generation (a server span with ``gen_ai.operation.name``: completions and chat, streamed
or not, over gRPC and HTTP) and in aggregate it reports the rounds, the mean tokens accepted per
round, the acceptance at each draft position, the wait for a generation slot
(``gen_ai.latency.time_in_queue``), and each round's *critical path* split five ways:

- **draft compute**: the server span of the draft call the round waited for longest (the drafts run
  concurrently, so only the slowest one is on the critical path), less its wait for a pass;
- **verify compute**: the VerifyTree server span, less its wait for a pass;
- **queue**: what those calls waited in the model services for a batched pass to take them
  (``specdec.queue_ms`` on their spans: under load, the other sessions' work, not this one's);
- **transport**: client span minus server span, for that draft call and the verify call: network,
  (de)serialization, gRPC queues;
- **orchestrator overhead**: the round's duration minus all of the above (merging the trie,
  accepting, stop strings, thread hand-offs).

The five add up to the round span's duration. Only durations are compared across processes, never
timestamps, so clocks on different hosts need not agree.
"""

from __future__ import annotations

import base64
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from specdec.tools.analyze import acceptance_by_position as acceptance_of_pairs

COMPONENTS = ("draft_ms", "verify_ms", "queue_ms", "transport_ms", "overhead_ms")
LABELS = {"draft_ms": "draft compute", "verify_ms": "verify compute", "queue_ms": "queue (batched passes)",
          "transport_ms": "transport", "overhead_ms": "orchestrator"}
COLOURS = {"draft_ms": "#4c9be8", "verify_ms": "#e8804c", "queue_ms": "#c04cc0", "transport_ms": "#9b9b9b",
           "overhead_ms": "#6cc06c"}
SLOT_LABEL, SLOT_COLOUR = "waiting for a generation slot", "#e8d44c"
DRAFT_METHOD, VERIFY_METHOD = "DraftBeams", "VerifyTree"
PLOT_REQUESTS = 8  # panels in one image
OTLP_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: str  # INTERNAL, SERVER, CLIENT, ...
    service: str
    start_ns: int
    end_ns: int
    attributes: dict = field(default_factory=dict)
    resource: dict = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def rpc_method(self) -> str:
        return self.attributes.get("rpc.method") or self.name.rpartition("/")[2]


# --------------------------------------------------------------------------- reading


def load_spans(path: str | Path, otlp_json: bool = False) -> list[Span]:
    text = Path(path).read_text()
    return parse_otlp_json(text) if otlp_json else parse_jsonl(text)


def parse_jsonl(text: str) -> list[Span]:
    """The services' own trace file: one flat JSON object per span (``specdec.telemetry.span_record``)."""
    spans = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            spans.append(Span(
                trace_id=r["trace_id"], span_id=r["span_id"], parent_id=r.get("parent_span_id") or None,
                name=r["name"], kind=r.get("kind", "INTERNAL"), service=r.get("service", ""),
                start_ns=int(r["start_time_unix_nano"]), end_ns=int(r["end_time_unix_nano"]),
                attributes=r.get("attributes") or {}, resource=r.get("resource") or {},
            ))
        except (ValueError, KeyError, TypeError) as exc:
            # A line cut short (a process killed mid-write) loses that span, not the analysis.
            print(f"specdec traces: skipping line {number}: {exc}", file=sys.stderr)
    return spans


def parse_otlp_json(text: str) -> list[Span]:
    """OTLP/JSON: one document, or one per line (the collector's file exporter)."""
    try:
        documents = [json.loads(text)]
    except ValueError:
        documents = [json.loads(line) for line in text.splitlines() if line.strip()]
    spans = []
    for doc in documents:
        for item in doc if isinstance(doc, list) else [doc]:
            item = item.get("result", item)  # Jaeger v2's query API wraps the export in "result"
            for resource_spans in item.get("resourceSpans", []):
                resource = _otlp_attributes(resource_spans.get("resource", {}).get("attributes", []))
                service = str(resource.get("service.name", ""))
                for scope_spans in resource_spans.get("scopeSpans", []) + resource_spans.get("instrumentationLibrarySpans", []):
                    for s in scope_spans.get("spans", []):
                        spans.append(Span(
                            trace_id=_otlp_id(s["traceId"]), span_id=_otlp_id(s["spanId"]),
                            parent_id=_otlp_id(s.get("parentSpanId", "")) or None, name=s["name"],
                            kind=_otlp_kind(s.get("kind", 1)), service=service,
                            start_ns=int(s["startTimeUnixNano"]), end_ns=int(s["endTimeUnixNano"]),
                            attributes=_otlp_attributes(s.get("attributes", [])), resource=resource,
                        ))
    return spans


def _otlp_id(value: str) -> str:
    """OTLP/JSON ids are hex; protobuf's generic JSON mapping writes them base64: accept both."""
    if not value:
        return ""
    try:
        int(value, 16)
        if len(value) in (16, 32):
            return value.lower()
    except ValueError:
        pass
    return base64.b64decode(value).hex()


def _otlp_kind(kind) -> str:
    if isinstance(kind, int):
        return OTLP_KINDS.get(kind, str(kind))
    return str(kind).removeprefix("SPAN_KIND_")


def _otlp_attributes(items: list[dict]) -> dict:
    return {a["key"]: _otlp_value(a.get("value", {})) for a in items}


def _otlp_value(value: dict):
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "stringValue" in value:
        return value["stringValue"]
    if "arrayValue" in value:
        return [_otlp_value(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return _otlp_attributes(value["kvlistValue"].get("values", []))
    return value.get("bytesValue")


# --------------------------------------------------------------------------- analysis


@dataclass
class RoundSplit:
    index: int
    duration_ms: float
    draft_ms: float  # server span of the slowest draft call, less its wait for a pass
    verify_ms: float  # VerifyTree server span, less its wait for a pass
    queue_ms: float  # the model services' waits for a batched pass (specdec.queue_ms on their spans)
    transport_ms: float  # client minus server, both calls
    overhead_ms: float  # the rest of the round
    drafted: int
    accepted: int
    depth: int  # the longest beam drafted: positions 1..depth could be accepted
    new_tokens: int
    fallback: bool
    slowest_draft: str = ""  # the draft service on the critical path
    notes: list[str] = field(default_factory=list)
    start_ms: float = 0.0  # when the round began, from the generation's start (one process's clock)

    @property
    def dominant(self) -> str:
        return max(COMPONENTS, key=lambda c: getattr(self, c))


@dataclass
class RequestAnalysis:
    trace_id: str
    name: str
    mode: str
    finish_reason: str
    duration_ms: float
    input_tokens: int
    output_tokens: int
    rounds: list[RoundSplit]
    outside_rounds_ms: float  # tokenizing, checks, statistics: the generation span minus its rounds and queue
    queue_ms: float = 0.0  # the wait for a generation slot (gen_ai.latency.time_in_queue)

    @property
    def accepted_per_round(self) -> float:
        return sum(r.accepted for r in self.rounds) / len(self.rounds) if self.rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        return sum(r.new_tokens for r in self.rounds) / len(self.rounds) if self.rounds else 0.0


def analyze(spans: list[Span]) -> list[RequestAnalysis]:
    """One analysis per generation span found, in the order they started."""
    children: dict[str, list[Span]] = defaultdict(list)
    for s in spans:
        if s.parent_id:
            children[s.parent_id].append(s)
    # Found by what they are, not by name: completions, chat, streams, gRPC and HTTP alike.
    roots = sorted((s for s in spans if s.kind == "SERVER" and s.attributes.get("gen_ai.operation.name")), key=lambda s: s.start_ns)
    requests = []
    for root in roots:
        a = root.attributes
        round_spans = sorted((s for s in children[root.span_id] if s.name == "specdec.round"),
                             key=lambda s: (s.attributes.get("specdec.round.index", 0), s.start_ns))
        rounds = [split_round(r, children, root.start_ns) for r in round_spans]
        finish = [a["specdec.finish_reason"]] if "specdec.finish_reason" in a else a.get("gen_ai.response.finish_reasons") or [""]
        queue_ms = float(a.get("gen_ai.latency.time_in_queue", 0.0)) * 1e3
        requests.append(RequestAnalysis(
            trace_id=root.trace_id,
            name=root.name,
            mode=str(a.get("specdec.mode", "")),
            finish_reason=str(finish[0] if isinstance(finish, list) else finish),
            duration_ms=root.duration_ms,
            input_tokens=int(a.get("gen_ai.usage.input_tokens", 0)),
            output_tokens=int(a.get("gen_ai.usage.output_tokens", sum(r.new_tokens for r in rounds))),
            rounds=rounds,
            outside_rounds_ms=max(0.0, root.duration_ms - queue_ms - sum(r.duration_ms for r in rounds)),
            queue_ms=queue_ms,
        ))
    return requests


def split_round(round_span: Span, children: dict[str, list[Span]], generation_start_ns: int | None = None) -> RoundSplit:
    a = round_span.attributes
    calls = [s for s in children[round_span.span_id] if s.kind == "CLIENT"]
    drafts = [s for s in calls if s.rpc_method == DRAFT_METHOD]
    verifies = sorted((s for s in calls if s.rpc_method == VERIFY_METHOD), key=lambda s: s.start_ns)
    notes: list[str] = []
    verify_start = verifies[0].start_ns if verifies else round_span.end_ns

    draft_compute = draft_transport = 0.0
    slowest_name = ""
    if drafts:
        slowest = max(drafts, key=lambda s: s.end_ns)
        # The round waits for its drafts until their deadline at most: a draft still running when
        # verification started is on the critical path only up to then.
        on_path = (min(slowest.end_ns, verify_start) - slowest.start_ns) / 1e6
        if slowest.end_ns > verify_start:
            notes.append("slowest draft missed the deadline")
        server = _server_span(slowest, children)
        # Durations only (the draft's clock may differ): the call's transport is taken as split
        # evenly either side of the server span, so a late draft's compute starts half of it in.
        request_transport = (slowest.duration_ms - server.duration_ms) / 2 if server else 0.0
        compute = max(0.0, min(server.duration_ms, on_path - request_transport)) if server else 0.0
        if server is None:
            notes.append("no server span for the slowest draft call")
        slowest_name = _draft_name(slowest, server)
        draft_compute, draft_transport = compute, max(0.0, on_path - compute)
        waited = min(_queue_ms(server), draft_compute) if server else 0.0
        draft_compute, queue = draft_compute - waited, waited
    else:
        queue = 0.0

    verify_compute = verify_transport = 0.0
    for call in verifies:
        server = _server_span(call, children)
        if server is None:
            notes.append("no server span for the verify call")
        compute = min(server.duration_ms, call.duration_ms) if server else 0.0
        waited = min(_queue_ms(server), compute) if server else 0.0
        verify_compute += compute - waited
        queue += waited
        verify_transport += call.duration_ms - compute

    duration = round_span.duration_ms
    overhead = duration - draft_compute - draft_transport - verify_compute - queue - verify_transport
    return RoundSplit(
        index=int(a.get("specdec.round.index", 0)),
        duration_ms=duration,
        draft_ms=draft_compute,
        verify_ms=verify_compute,
        queue_ms=queue,
        transport_ms=draft_transport + verify_transport,
        overhead_ms=overhead,
        drafted=int(a.get("specdec.drafted", 0)),
        accepted=int(a.get("specdec.accepted", 0)),
        depth=int(a.get("specdec.draft.depth", 0)),
        new_tokens=int(a.get("specdec.new_tokens", 0)),
        fallback=bool(a.get("specdec.fallback", False)),
        slowest_draft=slowest_name,
        notes=notes,
        start_ms=(round_span.start_ns - generation_start_ns) / 1e6 if generation_start_ns is not None else 0.0,
    )


def _queue_ms(server: Span) -> float:
    """What a model service's call waited for a batched pass to take it (shared with other sessions)."""
    return float(server.attributes.get("specdec.queue_ms", 0.0))


def _server_span(client: Span, children: dict[str, list[Span]]) -> Span | None:
    return next((s for s in children[client.span_id] if s.kind == "SERVER"), None)


def _draft_name(client: Span, server: Span | None) -> str:
    """The draft as the round's records name it (``draft-0``: ``specdec.winning_draft`` too) and its
    model (a directory's last part); from older traces, the model or else the service's address."""
    model = str(server.resource.get("specdec.model", "")).rstrip("/").rpartition("/")[2] if server else ""
    name = str(client.attributes.get("specdec.draft", ""))
    if name:
        return f"{name} ({model})" if model else name
    return model or str(client.attributes.get("server.address", ""))


def acceptance_by_position(rounds: list[RoundSplit]) -> dict[int, tuple[int, int]]:
    """position (1 = first drafted token) -> (rounds that drafted that far, rounds that had it accepted):
    the analysis of logs' computation (:func:`specdec.tools.analyze.acceptance_by_position`), over spans."""
    return acceptance_of_pairs((r.depth, r.accepted) for r in rounds)


def slowest_rounds(requests: list[RequestAnalysis], count: int = 5) -> list[tuple[RequestAnalysis, RoundSplit]]:
    pairs = [(req, r) for req in requests for r in req.rounds]
    return sorted(pairs, key=lambda pair: pair[1].duration_ms, reverse=True)[:count]


def summary(requests: list[RequestAnalysis]) -> dict:
    """Aggregate over every request: totals and shares of each component, acceptance by position."""
    rounds = [r for req in requests for r in req.rounds]
    total = sum(r.duration_ms for r in rounds)
    return {
        "requests": len(requests),
        "rounds": len(rounds),
        "output_tokens": sum(req.output_tokens for req in requests),
        "accepted_per_round": sum(r.accepted for r in rounds) / len(rounds) if rounds else 0.0,
        "tokens_per_round": sum(r.new_tokens for r in rounds) / len(rounds) if rounds else 0.0,
        "round_ms_total": total,
        "round_ms_median": statistics.median(r.duration_ms for r in rounds) if rounds else 0.0,
        "components_ms": {c: sum(getattr(r, c) for r in rounds) for c in COMPONENTS},
        "components_share": {c: (sum(getattr(r, c) for r in rounds) / total if total else 0.0) for c in COMPONENTS},
        "outside_rounds_ms": sum(req.outside_rounds_ms for req in requests),
        "slot_queue_ms": sum(req.queue_ms for req in requests),
        "acceptance_by_position": {str(p): {"drafted": d, "accepted": a, "rate": a / d if d else 0.0}
                                   for p, (d, a) in acceptance_by_position(rounds).items()},
        "fallback_rounds": sum(r.fallback for r in rounds),
    }


# --------------------------------------------------------------------------- reporting


def _positions_text(rounds: list[RoundSplit]) -> str:
    table = acceptance_by_position(rounds)
    if not table:
        return "no draft tokens"
    return "  ".join(f"{p}: {a / d:.2f} ({a}/{d})" for p, (d, a) in table.items())


def _dominance(r: RoundSplit) -> str:
    c = r.dominant
    share = getattr(r, c) / r.duration_ms if r.duration_ms else 0.0
    return f"{LABELS[c]} {share:.0%}"


def format_report(requests: list[RequestAnalysis], rounds_table: bool = True, top: int = 5) -> str:
    out: list[str] = []
    for req in requests:
        out.append(f"trace {req.trace_id}  {req.name}  mode {req.mode or '?'}  finish {req.finish_reason or '?'}")
        out.append(
            f"  {req.output_tokens} tokens in {len(req.rounds)} rounds: {req.tokens_per_round:.2f} tokens/round, "
            f"{req.accepted_per_round:.2f} accepted draft tokens/round; {req.duration_ms:.1f} ms, "
            f"{req.queue_ms:.1f} ms waiting for a generation slot, {req.outside_rounds_ms:.1f} ms outside rounds otherwise"
        )
        out.append(f"  acceptance by draft position: {_positions_text(req.rounds)}")
        if rounds_table and req.rounds:
            out.append(f"  {'round':>5} {'total ms':>9} {'draft':>8} {'verify':>8} {'queue':>8} {'transport':>9} {'orch.':>8} "
                       f"{'drafted':>7} {'accepted':>8}  dominated by")
            for r in req.rounds:
                flag = "  (" + "; ".join(r.notes) + ")" if r.notes else ""
                out.append(f"  {r.index:>5} {r.duration_ms:>9.2f} {r.draft_ms:>8.2f} {r.verify_ms:>8.2f} {r.queue_ms:>8.2f} "
                           f"{r.transport_ms:>9.2f} {r.overhead_ms:>8.2f} {r.drafted:>7} {r.accepted:>8}  {_dominance(r)}{flag}")
        out.append("")
    s = summary(requests)
    out.append(f"all: {s['requests']} generation{'' if s['requests'] == 1 else 's'}, {s['rounds']} rounds, {s['output_tokens']} tokens; "
               f"{s['tokens_per_round']:.2f} tokens/round, {s['accepted_per_round']:.2f} accepted draft tokens/round; "
               f"{s['fallback_rounds']} fallback rounds")
    if s["rounds"]:
        out.append(f"  round time {s['round_ms_total']:.1f} ms (median round {s['round_ms_median']:.2f} ms): " + ", ".join(
            f"{LABELS[c]} {s['components_ms'][c]:.1f} ms ({s['components_share'][c]:.0%})" for c in COMPONENTS))
        out.append(f"  waiting for a generation slot {s['slot_queue_ms']:.1f} ms; outside rounds otherwise {s['outside_rounds_ms']:.1f} ms")
        out.append(f"  acceptance by draft position: {_positions_text([r for req in requests for r in req.rounds])}")
        out.append("  slowest rounds:")
        for req, r in slowest_rounds(requests, top):
            c = r.dominant
            where = f" ({r.slowest_draft})" if c == "draft_ms" and r.slowest_draft else ""
            out.append(f"    trace {req.trace_id[:12]} round {r.index}: {r.duration_ms:.2f} ms, dominated by {LABELS[c]}{where} "
                       f"{getattr(r, c):.2f} ms ({_dominance(r).rpartition(' ')[2]})")
    return "\n".join(out)


def plot(requests: list[RequestAnalysis], path: str | Path, max_requests: int = PLOT_REQUESTS) -> Path:
    """Two panels: each request's timeline (its wait for a generation slot, then every round at the
    time it began, split into draft, verify, queue, transport and orchestrator), and the acceptance
    at each draft position, for every request together and for each one shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [req for req in requests if req.rounds][:max_requests]
    if not shown:
        raise ValueError("no rounds to plot")
    fig, (timeline, acceptance) = plt.subplots(2, 1, figsize=(11, 2.2 + 0.45 * len(shown) + 3.2),
                                               gridspec_kw={"height_ratios": [0.6 + 0.45 * len(shown), 3.0]})
    _draw_timelines(timeline, shown)
    _draw_acceptance(acceptance, requests, shown)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_timelines(ax, shown: list[RequestAnalysis]) -> None:
    """One row per request, ms from its arrival: the slot wait, then each round's components laid
    end to end from the round's start (durations, so clocks of other hosts never enter)."""
    for row, req in enumerate(shown):
        y = len(shown) - 1 - row
        if req.queue_ms > 0:
            ax.broken_barh([(0.0, req.queue_ms)], (y - 0.35, 0.7), color=SLOT_COLOUR, label=SLOT_LABEL if row == 0 else None)
        for r in req.rounds:
            x = r.start_ms  # the slot wait is before it: the generation's span starts when the call arrives
            for c in COMPONENTS:
                width = max(0.0, getattr(r, c))
                ax.broken_barh([(x, width)], (y - 0.35, 0.7), color=COLOURS[c], label=LABELS[c] if row == 0 and r is req.rounds[0] else None)
                x += width
            ax.plot([x, x], [y - 0.35, y + 0.35], color="white", linewidth=0.6)  # where a round ends
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"{req.trace_id[:8]} {req.mode or '?'}\n{req.output_tokens} tok, {req.tokens_per_round:.2f}/round"
                        for req in reversed(shown)], fontsize=7)
    ax.set_xlabel("ms since the request arrived")
    ax.set_title("each request's rounds, and where their time went", fontsize=9, pad=18)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=7, ncol=len(COMPONENTS) + 1, frameon=False)


def _draw_acceptance(ax, requests: list[RequestAnalysis], shown: list[RequestAnalysis]) -> None:
    """Acceptance rate by draft position: bars for every request together, a line for each one shown."""
    table = acceptance_by_position([r for req in requests for r in req.rounds])
    if not table:
        ax.text(0.5, 0.5, "no draft tokens", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    positions = list(table)
    ax.bar(positions, [a / d if d else 0.0 for d, a in table.values()], color="#bbbbbb", label=f"all {len(requests)} requests")
    for req in shown:
        own = acceptance_by_position(req.rounds)
        ax.plot(list(own), [a / d if d else 0.0 for d, a in own.values()], marker="o", markersize=3, linewidth=1,
                label=req.trace_id[:8])
    for p, (d, _) in table.items():
        ax.annotate(f"{d}", (p, 0.0), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6, color="#555555")
    ax.set_xticks(positions)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("draft position (1 = the first drafted token; the number: rounds that drafted that far)")
    ax.set_ylabel("accepted")
    ax.set_title("acceptance by draft position", fontsize=9)
    ax.legend(fontsize=7, ncol=3, frameon=False)


def to_json(requests: list[RequestAnalysis]) -> dict:
    return {
        "requests": [asdict(req) | {"accepted_per_round": req.accepted_per_round, "tokens_per_round": req.tokens_per_round,
                                     "acceptance_by_position": {str(p): v for p, v in acceptance_by_position(req.rounds).items()}}
                     for req in requests],
        "summary": summary(requests),
    }


def add_parser(commands) -> None:
    traces = commands.add_parser("traces", help="analyse the traces of generations").add_subparsers(dest="action", required=True)
    analyze_cmd = traces.add_parser("analyze", help="rounds, acceptance and where each round's time went, from a trace file")
    analyze_cmd.add_argument("file", help="a --trace-file (JSON lines), or with --otlp-json an OTLP/JSON export")
    analyze_cmd.add_argument("--otlp-json", action="store_true", help="FILE is OTLP/JSON (collector or Jaeger v2 file exporter)")
    analyze_cmd.add_argument("--plot", metavar="PNG", help="also draw each request's timeline of rounds (draft, verify, queue, "
                             "transport, orchestrator) and the acceptance by draft position into this image")
    analyze_cmd.add_argument("--json", action="store_true", help="print the analysis as one JSON object")
    analyze_cmd.add_argument("--summary", action="store_true", help="no per-round tables, only each request's summary")
    analyze_cmd.add_argument("--top", type=int, default=5, help="how many of the slowest rounds to list [default: 5]")
    analyze_cmd.set_defaults(func=cmd_analyze_traces)


def cmd_analyze_traces(args) -> int:
    try:
        spans = load_spans(args.file, otlp_json=args.otlp_json)
    except (OSError, ValueError) as exc:
        print(f"specdec traces: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    requests = analyze(spans)
    if not requests:
        print(f"specdec traces: no generations (server spans with gen_ai.operation.name) among the {len(spans)} spans in {args.file}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(requests), indent=1))
    else:
        print(format_report(requests, rounds_table=not args.summary, top=args.top))
    sys.stdout.flush()
    if args.plot:
        with_rounds = sum(1 for req in requests if req.rounds)
        note = f" (the first {PLOT_REQUESTS} of {with_rounds} generations)" if with_rounds > PLOT_REQUESTS else ""
        print(f"plot: {plot(requests, args.plot, PLOT_REQUESTS)}{note}", file=sys.stderr)
    return 0
