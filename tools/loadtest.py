"""``specdec loadtest``: N concurrent clients send a fixed number of Generate calls to one
orchestrator, and the run is judged on what a service owner asks of it under load.

``--clients 1,4,8,16`` makes a sweep: one load point per client count, in increasing order, on the
same cluster, each judged as below, with how the service scales: tokens/s at N clients over tokens/s
at 1 client, and p50 latency at N over p50 at 1 (over the fewest clients when 1 is not in the list).
``--plot FILE.png`` draws tokens/s, p50 latency and the mean batch size against the clients.
For example ``specdec loadtest --local --clients 1,4,8,16 --max-tokens 64 --stream --plot load.png``
(``--stream`` for the time to the first token).

- **Throughput and latency**: requests/s, generated tokens/s, latency p50/p95/p99 (and time to the
  first token with ``--stream``: from the call to the first streamed tokens; unary calls have none).
- **Batching**: the mean batch size, over every round of the completed requests: the round's own
  generation plus the others in flight when it chose its shape (``Round.company_sessions``).
- **Errors by status code**: RESOURCE_EXHAUSTED is the services' deliberate rejection when their
  queues are full, counted apart and not as an error; any other non-OK status is an error.
- **Same output as alone**: each distinct prompt is first generated once by a single client (once per
  run, before the first load point); every completed output under load must equal it token for
  token (greedy decoding is deterministic, so concurrency must not change a result).
- **Memory** (local processes only, from ``/proc``): each service's resident set before and after
  the load, and its peak during the load (the kernel's high-water mark, reset just before the load
  where permitted, and a 50 ms sample of VmRSS); and the growth of their sum over the load.
- **Sessions left**: active sessions reported by GetInfo once the load is over (0 means every
  generation released its KV caches in every service).

The prompts are the quick benchmark set's code and prose prompts (``benchmarks/prompts/quick.jsonl``)
unless ``--prompts FILE`` gives others. ``--local`` brings up a cluster of its own (the embedded pair unless ``--target-model`` and
``--draft-models`` say otherwise); ``--orchestrator HOST:PORT`` measures a running one, without
memory figures. ``--json`` prints the report as one JSON object. The exit status is 1 when any
error or output mismatch occurred.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from specdec import config
from specdec.records import DecodingMode
from specdec.tools.prompts import QUICK_PROMPTS, bundled_dir, text_prompts

REJECTED = "RESOURCE_EXHAUSTED"  # a deliberate rejection by a bounded queue, not an error
GENERATION_SERVICE, VERIFY_SERVICE, DRAFT_SERVICE = "specdec.v1.GenerationService", "specdec.v1.VerifyService", "specdec.v1.DraftService"
DEFAULT_REQUESTS = 32  # per load point, or 2 per client where that is more


def default_prompts() -> list[str]:
    """The quick benchmark's prompts (code and prose; ``benchmarks/prompts/quick.jsonl``)."""
    return text_prompts(bundled_dir() / QUICK_PROMPTS)


@dataclass
class LoadSpec:
    clients: int = 8
    requests: int | None = None  # per load point; None: requests_per_point
    max_new_tokens: int = 32
    mode: str = "tree"
    speculation: dict = field(default_factory=dict)  # SpeculationParams fields; 0 = server default
    prompts: list[str] = field(default_factory=default_prompts)
    timeout_s: float = 600.0
    stream: bool = False


@dataclass
class Outcome:
    """One request's result."""

    index: int
    prompt: int  # index into the prompt list
    code: str  # "OK" or the status code's name
    latency_s: float
    token_ids: list[int] = field(default_factory=list)
    first_token_s: float | None = None
    details: str = ""
    company: list[int] = field(default_factory=list)  # each round's company_sessions


def requests_per_point(spec: LoadSpec, clients: int) -> int:
    """``spec.requests`` as given, or by default 32, or 2 per client where that is more (every client has work)."""
    return spec.requests or max(DEFAULT_REQUESTS, 2 * clients)


# --------------------------------------------------------------------------- memory (Linux /proc)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in bytes; {} where /proc cannot be read."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return values


def reset_peak(pid: int) -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of ``pid``; False where not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class MemorySampler:
    """Samples VmRSS of the given processes every ``interval_s`` in a thread, keeping each peak."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.05) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.peak = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], proc_status(pid).get("VmRSS", 0))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- requests


def build_request(spec: LoadSpec, prompt: str):
    from specdec.v1 import generation_pb2

    return generation_pb2.GenerateRequest(
        prompt=prompt,
        max_new_tokens=spec.max_new_tokens,
        mode=DecodingMode.parse(spec.mode).to_pb(),
        speculation=generation_pb2.SpeculationParams(**spec.speculation),
        include_rounds=True,  # for the batch size of each round; outputs are compared on token ids only
    )


def call_once(stub, request, spec: LoadSpec, metadata, index: int, prompt: int) -> Outcome:
    import grpc

    start = time.perf_counter()
    first = None
    try:
        if spec.stream:
            tokens, company = [], []
            for chunk in stub.GenerateStream(request, timeout=spec.timeout_s, metadata=metadata):
                if chunk.token_ids and first is None:
                    first = time.perf_counter() - start
                tokens += chunk.token_ids
                if chunk.HasField("round"):
                    company.append(chunk.round.company_sessions)
        else:
            response = stub.Generate(request, timeout=spec.timeout_s, metadata=metadata)
            tokens, company = list(response.token_ids), [r.company_sessions for r in response.rounds]
    except grpc.RpcError as error:
        return Outcome(index, prompt, error.code().name, time.perf_counter() - start, details=error.details() or "")
    return Outcome(index, prompt, "OK", time.perf_counter() - start, tokens, first, company=company)


def percentiles(values: list[float]) -> dict[str, float | None]:
    import numpy as np

    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99]).tolist()
    return {"p50": p50, "p95": p95, "p99": p99, "mean": float(np.mean(values)), "max": max(values)}


def active_sessions(address: str, service: str, tls, metadata=()) -> int | None:
    """Active sessions a service reports through GetInfo; None when it does not answer."""
    import grpc

    from specdec.rpc import security
    from specdec.v1 import common_pb2

    try:
        with security.client_channel(address, tls) as channel:
            # GetInfo has the same messages on every specdec service.
            get_info = channel.unary_unary(f"/{service}/GetInfo", request_serializer=common_pb2.GetInfoRequest.SerializeToString,
                                           response_deserializer=common_pb2.ModelInfo.FromString)
            return get_info(common_pb2.GetInfoRequest(), timeout=10, metadata=metadata).active_sessions
    except grpc.RpcError:
        return None


def sessions_left(address: str, internal: dict[str, tuple[str, str]], tls, metadata, wait_s: float = 5.0) -> dict[str, int | None]:
    """Active sessions per service once they drain (or ``wait_s`` passes): the orchestrator's
    running and queued generations, and with a local cluster each internal service's KV sessions."""
    deadline = time.monotonic() + wait_s
    while True:
        counts = {"orchestrator": active_sessions(address, GENERATION_SERVICE, tls, metadata)}
        counts |= {name: active_sessions(a, service, tls) for name, (a, service) in internal.items()}
        if not any(counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


# --------------------------------------------------------------------------- the run


def run_load(address: str, spec: LoadSpec, processes=(), tls=None, metadata=(), internal: dict[str, tuple[str, str]] | None = None,
             progress=lambda message: None) -> dict:
    """Run the load of ``spec.clients`` clients against the orchestrator at ``address``; returns the
    report (a dict).

    ``processes``: the cluster's local processes (``specdec.tools.cluster.Process``), for memory.
    ``internal``: {name: (address, service)} of the draft and verify services, to count their sessions after.
    """
    return run_sweep(address, spec, [spec.clients], processes, tls, metadata, internal, progress)["points"][0]


def run_sweep(address: str, spec: LoadSpec, clients: list[int], processes=(), tls=None, metadata=(),
              internal: dict[str, tuple[str, str]] | None = None, progress=lambda message: None) -> dict:
    """One load point per client count, in increasing order, after one single-client pass; returns
    the sweep's report: every point's report (as :func:`run_load` gives it) with its ratios to the
    point of fewest clients. ``spec.clients`` is not used; the other arguments are :func:`run_load`'s."""
    pids = {p.name: p.popen.pid for p in processes}
    start = {name: proc_status(pid).get("VmRSS") for name, pid in pids.items()}
    requests = [build_request(spec, prompt) for prompt in spec.prompts]

    progress(f"single-client pass over {len(spec.prompts)} prompts ...")
    alone = single_client_pass(address, requests, spec, tls, metadata)

    points = []
    for n in sorted(set(clients)):
        point = dataclasses.replace(spec, clients=n, requests=requests_per_point(spec, n))
        progress(f"{point.requests} requests from {n} concurrent clients ...")
        points.append(load_point(address, point, requests, alone, pids, start, tls, metadata, internal or {}))
    add_ratios(points)
    return sweep_report(address, spec, alone, points)


def load_point(address: str, spec: LoadSpec, requests: list, alone: list[Outcome], pids: dict[str, int],
               start: dict[str, int | None], tls, metadata, internal: dict[str, tuple[str, str]]) -> dict:
    """One load point: ``spec.requests`` calls from ``spec.clients`` clients, memory around it, and its report."""
    memory = {name: {"start": start[name]} for name in pids}
    for name, pid in pids.items():
        memory[name]["before"] = proc_status(pid).get("VmRSS")
        memory[name]["peak_reset"] = reset_peak(pid)
    with MemorySampler(pids) as sampler:
        outcomes, wall_s = concurrent_load(address, requests, spec, tls, metadata)
    for name, pid in pids.items():
        settle_memory(memory[name], proc_status(pid), sampler.peak.get(name, 0))

    memory_rows = [{"process": name, "pid": pids[name], **m} for name, m in memory.items()]
    return load_report(address, spec, outcomes, alone, wall_s, memory_rows, sessions_left(address, internal, tls, metadata))


def single_client_pass(address: str, requests: list, spec: LoadSpec, tls, metadata) -> list[Outcome]:
    """Each distinct prompt once, alone: the outputs every loaded call must reproduce (and a warm-up)."""
    from specdec.rpc import security
    from specdec.v1 import generation_pb2_grpc

    with security.client_channel(address, tls) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        alone = [call_once(stub, r, spec, metadata, i, i) for i, r in enumerate(requests)]
    for outcome in alone:
        if outcome.code != "OK":
            raise RuntimeError(f"the single-client run of prompt {outcome.prompt} failed: {outcome.code}: {outcome.details}")
    return alone


def concurrent_load(address: str, requests: list, spec: LoadSpec, tls, metadata) -> tuple[list[Outcome], float]:
    """``spec.requests`` calls from ``spec.clients`` concurrent clients, the prompts in turn: the
    outcomes in request order, and the wall time of the whole load."""
    from specdec.rpc import security
    from specdec.v1 import generation_pb2_grpc

    # Each client takes the next request index until all are sent.
    next_index = iter(range(spec.requests))
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def client() -> None:
        with security.client_channel(address, tls) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                prompt = index % len(requests)
                outcome = call_once(stub, requests[prompt], spec, metadata, index, prompt)
                with lock:
                    outcomes.append(outcome)

    start = time.perf_counter()
    with ThreadPoolExecutor(spec.clients, thread_name_prefix="load-client") as pool:
        for f in [pool.submit(client) for _ in range(spec.clients)]:
            f.result()
    wall_s = time.perf_counter() - start
    outcomes.sort(key=lambda o: o.index)
    return outcomes, wall_s


def settle_memory(m: dict, status: dict[str, int], sampled_peak: int) -> None:
    """A process's memory once the load is over: RSS after, the peak (the kernel's high-water mark
    where it could be reset before the load, else the sampled one) and the growth over the load."""
    m["after"] = status.get("VmRSS")
    hwm = status.get("VmHWM", 0) if m.pop("peak_reset") else 0
    m["peak"] = max(hwm, sampled_peak, m["after"] or 0) or None
    m["growth_pct"] = 100.0 * (m["after"] - m["before"]) / m["before"] if m["after"] and m["before"] else None


def load_report(address: str, spec: LoadSpec, outcomes: list[Outcome], alone: list[Outcome], wall_s: float,
                memory: list[dict], sessions_after: dict[str, int | None]) -> dict:
    """The run judged: throughput and latency, errors by status code, outputs against the single client's."""
    done = [o for o in outcomes if o.code == "OK"]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.code not in ("OK", REJECTED):
            errors[o.code] = errors.get(o.code, 0) + 1
    mismatched = [o.index for o in done if o.token_ids != alone[o.prompt].token_ids]
    tokens = sum(len(o.token_ids) for o in done)
    company = [c for o in done for c in o.company]
    return {
        "orchestrator": address,
        "clients": spec.clients,
        "requests": spec.requests,
        "max_new_tokens": spec.max_new_tokens,
        "mode": spec.mode,
        "stream": spec.stream,
        "prompts": len(spec.prompts),
        "wall_s": wall_s,
        "completed": len(done),
        "rejected": sum(o.code == REJECTED for o in outcomes),
        "errors": errors,
        "error_details": sorted({f"{o.code}: {o.details}" for o in outcomes if o.code in errors})[:10],
        "tokens": tokens,
        "requests_per_s": len(done) / wall_s if wall_s else 0.0,
        "tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "latency_s": percentiles([o.latency_s for o in done]),
        "time_to_first_token_s": percentiles([o.first_token_s for o in done if o.first_token_s is not None]) if spec.stream else None,
        "single_client_latency_s": percentiles([o.latency_s for o in alone]),
        "rounds": len(company),
        # The generations each round shared the services with: itself and the others in flight.
        "mean_batch_size": 1 + sum(company) / len(company) if company else None,
        "outputs": {"checked": len(done), "identical": len(done) - len(mismatched), "mismatched": mismatched},
        "memory": memory,
        "memory_total": memory_total(memory),
        "sessions_after": sessions_after,
        "ratios": None,  # set in a sweep: against the point of fewest clients
        "ok": not errors and not mismatched,
    }


def memory_total(rows: list[dict]) -> dict | None:
    """The sum of the processes' resident sets before and after the load, and its growth; None
    without local processes or where one could not be read."""
    if not rows or any(not m["before"] or not m["after"] for m in rows):
        return None
    before, after = sum(m["before"] for m in rows), sum(m["after"] for m in rows)
    return {"before": before, "after": after, "growth": after - before, "growth_pct": 100.0 * (after - before) / before}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def add_ratios(points: list[dict]) -> None:
    """What the service is judged on under load: each point's tokens/s and p50 latency over those of
    the point of fewest clients (1 in the usual sweep)."""
    base = min(points, key=lambda p: p["clients"])
    for p in points:
        p["ratios"] = {"relative_to_clients": base["clients"],
                       "tokens_per_s": _ratio(p["tokens_per_s"], base["tokens_per_s"]),
                       "latency_p50": _ratio(p["latency_s"]["p50"], base["latency_s"]["p50"])}


def sweep_report(address: str, spec: LoadSpec, alone: list[Outcome], points: list[dict]) -> dict:
    """The points of a sweep, and what they share: the single-client pass and each process's memory over the sweep."""
    memory = []
    for i, m in enumerate(points[0]["memory"]):
        rows = [p["memory"][i] for p in points]
        memory.append({"process": m["process"], "pid": m["pid"], "start": m["start"], "after": [r["after"] for r in rows],
                       "peak": max((r["peak"] or 0 for r in rows), default=0) or None})
    first, last = points[0]["memory_total"], points[-1]["memory_total"]
    return {
        "orchestrator": address,
        "clients": [p["clients"] for p in points],
        "requests": [p["requests"] for p in points],
        "max_new_tokens": spec.max_new_tokens,
        "mode": spec.mode,
        "stream": spec.stream,
        "prompts": len(spec.prompts),
        "single_client_latency_s": percentiles([o.latency_s for o in alone]),
        "points": points,
        "memory": memory,
        # From before the first point to after the last.
        "memory_growth": last["after"] - first["before"] if first and last else None,
        "ok": all(p["ok"] for p in points),
    }


# --------------------------------------------------------------------------- the report


def _mb(value: int | None) -> str:
    return f"{value / 2**20:.0f}" if value else "-"


def _ms(value: float | None) -> str:
    return f"{value * 1e3:.0f}" if value is not None else "-"


def format_report(r: dict) -> str:
    lat, alone = r["latency_s"], r["single_client_latency_s"]
    lines = [
        f"specdec loadtest: {r['requests']} requests, {r['clients']} concurrent clients, {r['mode']} mode, "
        f"{r['max_new_tokens']} new tokens each{', streamed' if r['stream'] else ''}, against {r['orchestrator']}",
        "",
        f"  completed               {r['completed']} in {r['wall_s']:.1f} s",
        f"  rejected (queue full)   {r['rejected']}",
        f"  errors                  {sum(r['errors'].values())}" + (
            "  (" + ", ".join(f"{code} {n}" for code, n in sorted(r["errors"].items())) + ")" if r["errors"] else ""),
        f"  throughput              {r['requests_per_s']:.2f} requests/s, {r['tokens_per_s']:.1f} tokens/s ({r['tokens']} tokens)",
        f"  latency ms              p50 {_ms(lat['p50'])}   p95 {_ms(lat['p95'])}   p99 {_ms(lat['p99'])}   max {_ms(lat['max'])}"
        f"   (one client alone: p50 {_ms(alone['p50'])})",
    ]
    if r["time_to_first_token_s"]:
        ttft = r["time_to_first_token_s"]
        lines.append(f"  first token ms          p50 {_ms(ttft['p50'])}   p95 {_ms(ttft['p95'])}   p99 {_ms(ttft['p99'])}")
    lines.append(f"  batch size (mean)       {_batch(r['mean_batch_size'])} generations per round, over {r['rounds']} rounds")
    out = r["outputs"]
    lines.append(f"  outputs as alone        {out['identical']} of {out['checked']}"
                 + (f"  MISMATCHED requests: {out['mismatched']}" if out["mismatched"] else ""))
    lines.append("  sessions after          " + ", ".join(f"{k} {'-' if v is None else v}" for k, v in r["sessions_after"].items()))
    if r["memory"]:
        lines += ["", "  memory (RSS, MiB)   pid       start  before  after   peak   after vs before"]
        for m in r["memory"]:
            growth = f"{m['growth_pct']:+.1f}%" if m["growth_pct"] is not None else "-"
            lines.append(f"  {m['process']:<18}  {m['pid']:<8}  {_mb(m['start']):>5}  {_mb(m['before']):>6}  "
                         f"{_mb(m['after']):>5}  {_mb(m['peak']):>5}   {growth}")
        if total := r["memory_total"]:
            lines.append(f"  {'all processes':<18}  {'':<8}  {'':>5}  {_mb(total['before']):>6}  {_mb(total['after']):>5}  {'':>5}   "
                         f"{total['growth_pct']:+.1f}% ({_growth(total['growth'])} MiB)")
    for detail in r["error_details"]:
        lines.append(f"  error: {detail}")
    if r.get("plot"):
        lines.append(f"  plot written to {r['plot']}")
    lines += ["", "  result: " + ("OK" if r["ok"] else "FAILED (errors or outputs that differ from a single client's)")]
    return "\n".join(lines)


def _batch(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _times(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _growth(value: int | None) -> str:
    return f"{value / 2**20:+.1f}" if value is not None else "-"


def format_sweep(r: dict) -> str:
    """A sweep's report: a row per load point, then the errors, the memory of every process and the verdict."""
    base = r["points"][0]["ratios"]["relative_to_clients"]
    lines = [
        f"specdec loadtest: {len(r['points'])} load points (clients {', '.join(map(str, r['clients']))}), {r['mode']} mode, "
        f"{r['max_new_tokens']} new tokens each{', streamed' if r['stream'] else ''}, against {r['orchestrator']}",
        f"  single-client pass: {r['prompts']} prompts once each, p50 {_ms(r['single_client_latency_s']['p50'])} ms "
        "(the outputs every point must reproduce)",
        "",
        f"  clients  requests  completed  rejected  errors  requests/s  tokens/s  x{base:<4}  p50 ms  x{base:<4}  p95 ms  "
        "TTFT p50 ms  batch  mismatched  sessions left  RSS growth MiB",
    ]
    for p in r["points"]:
        ttft = p["time_to_first_token_s"]["p50"] if p["time_to_first_token_s"] else None
        left = [v for v in p["sessions_after"].values() if v is not None]
        total = p["memory_total"]
        lines.append(
            f"  {p['clients']:>7}  {p['requests']:>8}  {p['completed']:>9}  {p['rejected']:>8}  {sum(p['errors'].values()):>6}  "
            f"{p['requests_per_s']:>10.2f}  {p['tokens_per_s']:>8.1f}  {_times(p['ratios']['tokens_per_s']):>5}  "
            f"{_ms(p['latency_s']['p50']):>6}  {_times(p['ratios']['latency_p50']):>5}  {_ms(p['latency_s']['p95']):>6}  "
            f"{_ms(ttft):>11}  {_batch(p['mean_batch_size']):>5}  {len(p['outputs']['mismatched']):>10}  "
            f"{sum(left) if left else '-':>13}  {_growth(total['growth'] if total else None):>14}")
    lines += [
        "",
        f"  x{base}: tokens/s and p50 latency over those at {base} client{'s' if base > 1 else ''}; "
        "batch: mean generations per round (the round's own and the others in flight);",
        "  TTFT: time to the first token, streamed calls only (--stream); RSS growth: the sum over every local process.",
    ]
    for p in r["points"]:
        if p["errors"]:
            lines.append(f"  errors at {p['clients']} clients: " + ", ".join(f"{code} {n}" for code, n in sorted(p["errors"].items())))
        lines += [f"  error: {detail}" for detail in p["error_details"]]
        if p["outputs"]["mismatched"]:
            lines.append(f"  MISMATCHED requests at {p['clients']} clients: {p['outputs']['mismatched']}")
    if r["memory"]:
        lines += ["", "  memory (RSS, MiB)   pid       start  " + "  ".join(f"after {n:<3}" for n in r["clients"]) + "   peak"]
        for m in r["memory"]:
            lines.append(f"  {m['process']:<18}  {m['pid']:<8}  {_mb(m['start']):>5}  "
                         + "  ".join(f"{_mb(a):>9}" for a in m["after"]) + f"  {_mb(m['peak']):>5}")
        lines.append(f"  all processes grew {_growth(r['memory_growth'])} MiB from the first point to the end of the last")
    if r.get("plot"):
        lines.append(f"  plot written to {r['plot']}")
    lines += ["", "  result: " + ("OK" if r["ok"] else "FAILED (errors or outputs that differ from a single client's)")]
    return "\n".join(lines)


def plot_sweep(r: dict, path: str | Path) -> Path:
    """Tokens/s and p50 latency against the clients, and below the mean batch size (with the most it
    can be: one per client), to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    points = r["points"]
    clients = [p["clients"] for p in points]
    fig, (ax, batch_ax) = plt.subplots(2, 1, figsize=(6.5, 6.0), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax.plot(clients, [p["tokens_per_s"] for p in points], "o-", color="tab:blue", label="tokens/s")
    ax.set_ylabel("tokens/s (all clients)", color="tab:blue")
    ax.set_ylim(bottom=0)
    latency_ax = ax.twinx()
    latency_ax.plot(clients, [(p["latency_s"]["p50"] or 0) * 1e3 for p in points], "s--", color="tab:red", label="p50 latency")
    latency_ax.set_ylabel("p50 latency (ms)", color="tab:red")
    latency_ax.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + latency_ax.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    ax.set_title(f"specdec loadtest: {r['mode']} mode, {r['max_new_tokens']} new tokens per request", fontsize=10)
    batches = [(c, p["mean_batch_size"]) for c, p in zip(clients, points) if p["mean_batch_size"] is not None]
    batch_ax.plot(clients, clients, ":", color="grey", label="one per client")
    if batches:
        batch_ax.plot(*zip(*batches), "o-", color="tab:green", label="mean batch size")
    batch_ax.set_ylabel("generations per round")
    batch_ax.set_xlabel("concurrent clients")
    batch_ax.set_ylim(bottom=0)
    batch_ax.set_xticks(clients)
    batch_ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- command line


def read_prompts(path: str) -> list[str]:
    """A prompt file as ``specdec bench`` reads it (``.jsonl``, text prompts only), a JSON list of
    strings, or a text file with one prompt per line (blank lines skipped)."""
    if path.endswith(".jsonl"):
        return text_prompts(Path(path))
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"{path}: expected a JSON list of non-empty strings")
        return prompts
    return [line for line in text.splitlines() if line.strip()]


def client_counts(text: str) -> int | list[int]:
    """``--clients``: one count (one load), or a comma-separated list (a sweep, even of one)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of clients or a comma-separated list of them, not {text!r}") from None
    if not counts:
        raise argparse.ArgumentTypeError("no client count given")
    return counts if "," in text else counts[0]


def add_parser(commands) -> None:
    load = commands.add_parser("loadtest", help="drive concurrent clients against an orchestrator; throughput, latency, errors, memory",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    load.add_argument("--clients", type=client_counts, default=8, metavar="N[,N...]",
                      help="concurrent clients; a comma-separated list (1,4,8,16) runs a sweep on the same cluster, a load "
                      "point per count, after one single-client pass [default: 8]")
    load.add_argument("--requests", type=int, help=f"requests in all, per load point [default: {DEFAULT_REQUESTS}, or 2 per client "
                      "where that is more, so that every client has work]")
    load.add_argument("--max-tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=32,
                      help="max_new_tokens of every request [default: 32]")
    config.add_arguments(load, config.SpeculationDefaults, skip=("max_new_tokens", "max_new_tokens_limit"))
    load.add_argument("--prompts", metavar="FILE", help="prompts: a bench prompt file (.jsonl), a JSON list, or one per line "
                      f"[default: the code and prose prompts of benchmarks/{QUICK_PROMPTS}]")
    load.add_argument("--stream", action="store_true", help="call GenerateStream and measure the time to the first token "
                      "(TTFT: from the call to the first streamed tokens); without it the calls are unary Generate "
                      "and no TTFT is reported")
    load.add_argument("--timeout", type=float, default=600.0, help="deadline of each request, seconds [default: 600]")
    load.add_argument("--json", action="store_true", help="print the report as one JSON object (a sweep's has every point)")
    load.add_argument("--plot", metavar="FILE.png", help="draw tokens/s, p50 latency and the mean batch size against the "
                      "clients to FILE.png (a PNG)")
    where = load.add_mutually_exclusive_group()
    where.add_argument("--orchestrator", default=os.environ.get("SPECDEC_ORCHESTRATOR", "127.0.0.1:50051"),
                       help="a running orchestrator, HOST:PORT [SPECDEC_ORCHESTRATOR; default: 127.0.0.1:50051]")
    where.add_argument("--local", action="store_true", help="bring up a local cluster for the run (memory figures need it)")
    load.add_argument("--target-model", default=os.environ.get("SPECDEC_TARGET_MODEL", config.EMBEDDED_TARGET), help="with --local")
    load.add_argument("--draft-models", default=os.environ.get("SPECDEC_DRAFT_MODELS", config.EMBEDDED_DRAFT), help="with --local, comma-separated")
    config.add_arguments(load, config.TlsClientSettings)
    config.add_arguments(load, config.AuthSettings)
    load.set_defaults(func=cmd_loadtest)


def cmd_loadtest(args) -> int:
    from specdec.tools.cluster import LocalCluster
    from specdec.rpc import security

    sweep = isinstance(args.clients, list)
    counts = args.clients if sweep else [args.clients]
    if min(counts) < 1 or (args.requests is not None and args.requests < 1) or args.max_new_tokens < 1:
        print("specdec loadtest: --clients, --requests and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        prompts = read_prompts(args.prompts) if args.prompts else default_prompts()
        metadata = security.token_metadata(security.load_token(args))
        if args.plot:
            # Before the load rather than after it: a long sweep is not lost for want of a folder.
            Path(args.plot).resolve().parent.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        print(f"specdec loadtest: {exc}", file=sys.stderr)
        return 2
    spec = LoadSpec(
        clients=counts[0], requests=args.requests, max_new_tokens=args.max_new_tokens, mode=args.mode,
        speculation={"draft_length": args.draft_length, "beam_width": args.beam_width, "beam_depth": args.beam_depth,
                     "max_tree_nodes": args.max_tree_nodes, "adaptive": args.adaptive},
        prompts=prompts, timeout_s=args.timeout, stream=args.stream,
    )
    progress = (lambda message: print(message, file=sys.stderr, flush=True))
    cluster = None
    try:
        if args.local:
            settings = config.from_env(config.ClusterSettings, target_model=args.target_model,
                                       draft_models=[m for m in args.draft_models.split(",") if m], port=0)
            progress("starting a local cluster ...")
            cluster = LocalCluster(settings)
            cluster.start()
            report = run_local_sweep(cluster, spec, counts, metadata=metadata, progress=progress)
        else:
            report = run_sweep(args.orchestrator, spec, counts, tls=args, metadata=metadata, progress=progress)
    except RuntimeError as exc:
        print(f"specdec loadtest: {exc}", file=sys.stderr)
        return 1
    finally:
        if cluster:
            cluster.stop()
    if not sweep:
        report = report["points"][0]
    plotted = True
    if args.plot:
        try:
            report["plot"] = str(plot_sweep(report if sweep else {"points": [report], **report}, args.plot))
        except (OSError, ValueError) as exc:
            print(f"specdec loadtest: the plot was not written: {exc}", file=sys.stderr)
            plotted = False
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_sweep(report) if sweep else format_report(report))
    return 0 if report["ok"] and plotted else 1


def run_local(cluster, spec: LoadSpec, metadata=(), progress=lambda message: None) -> dict:
    """The load against a :class:`~specdec.tools.cluster.LocalCluster`: memory of every process, and
    the sessions its draft and verify services hold afterwards."""
    return run_local_sweep(cluster, spec, [spec.clients], metadata, progress)["points"][0]


def run_local_sweep(cluster, spec: LoadSpec, clients: list[int], metadata=(), progress=lambda message: None) -> dict:
    """:func:`run_sweep` against a :class:`~specdec.tools.cluster.LocalCluster`, as :func:`run_local` measures it."""
    verifiers = cluster.verify_addresses or [cluster.verify_address]
    internal = {(f"verify-{i}" if len(verifiers) > 1 else "verify"): (a, VERIFY_SERVICE) for i, a in enumerate(verifiers)}
    internal |= {f"draft-{i}": (a, DRAFT_SERVICE) for i, a in enumerate(cluster.draft_addresses)}
    return run_sweep(cluster.orchestrator_address, spec, clients, processes=list(cluster.processes), tls=cluster.settings,
                     metadata=metadata, internal=internal, progress=progress)
