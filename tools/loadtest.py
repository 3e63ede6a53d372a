"""``specdec loadtest``: N concurrent clients send a fixed number of Generate calls to one
orchestrator, and the run is judged on what a service owner asks of it under load.

- **Throughput and latency**: requests/s, generated tokens/s, latency p50/p95/p99 (and time to the
  first token with ``--stream``).
- **Errors by status code**: RESOURCE_EXHAUSTED is the services' deliberate rejection when their
  queues are full, counted apart and not as an error; any other non-OK status is an error.
- **Same output as alone**: each distinct prompt is first generated once by a single client; every
  completed output under load must equal it token for token (greedy decoding is deterministic,
  so concurrency must not change a result).
- **Memory** (local processes only, from ``/proc``): each service's resident set before and after
  the load, and its peak during the load (the kernel's high-water mark, reset just before the load
  where permitted, and a 50 ms sample of VmRSS).
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


def default_prompts() -> list[str]:
    """The quick benchmark's prompts (code and prose; ``benchmarks/prompts/quick.jsonl``)."""
    return text_prompts(bundled_dir() / QUICK_PROMPTS)


@dataclass
class LoadSpec:
    clients: int = 8
    requests: int = 32
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
    )


def call_once(stub, request, spec: LoadSpec, metadata, index: int, prompt: int) -> Outcome:
    import grpc

    start = time.perf_counter()
    first = None
    try:
        if spec.stream:
            tokens = []
            for chunk in stub.GenerateStream(request, timeout=spec.timeout_s, metadata=metadata):
                if chunk.token_ids and first is None:
                    first = time.perf_counter() - start
                tokens += chunk.token_ids
        else:
            tokens = list(stub.Generate(request, timeout=spec.timeout_s, metadata=metadata).token_ids)
    except grpc.RpcError as error:
        return Outcome(index, prompt, error.code().name, time.perf_counter() - start, details=error.details() or "")
    return Outcome(index, prompt, "OK", time.perf_counter() - start, tokens, first)


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
    """Run the load against the orchestrator at ``address``; returns the report (a dict).

    ``processes``: the cluster's local processes (``specdec.tools.cluster.Process``), for memory.
    ``internal``: {name: (address, service)} of the draft and verify services, to count their sessions after.
    """
    pids = {p.name: p.popen.pid for p in processes}
    memory = {name: {"start": proc_status(pid).get("VmRSS")} for name, pid in pids.items()}
    requests = [build_request(spec, prompt) for prompt in spec.prompts]

    progress(f"single-client pass over {len(spec.prompts)} prompts ...")
    alone = single_client_pass(address, requests, spec, tls, metadata)

    for name, pid in pids.items():
        memory[name]["before"] = proc_status(pid).get("VmRSS")
        memory[name]["peak_reset"] = reset_peak(pid)
    progress(f"{spec.requests} requests from {spec.clients} concurrent clients ...")
    with MemorySampler(pids) as sampler:
        outcomes, wall_s = concurrent_load(address, requests, spec, tls, metadata)
    for name, pid in pids.items():
        settle_memory(memory[name], proc_status(pid), sampler.peak.get(name, 0))

    memory_rows = [{"process": name, "pid": pids[name], **m} for name, m in memory.items()]
    return load_report(address, spec, outcomes, alone, wall_s, memory_rows, sessions_left(address, internal or {}, tls, metadata))


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
        "outputs": {"checked": len(done), "identical": len(done) - len(mismatched), "mismatched": mismatched},
        "memory": memory,
        "sessions_after": sessions_after,
        "ok": not errors and not mismatched,
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
    for detail in r["error_details"]:
        lines.append(f"  error: {detail}")
    lines += ["", "  result: " + ("OK" if r["ok"] else "FAILED (errors or outputs that differ from a single client's)")]
    return "\n".join(lines)


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


def add_parser(commands) -> None:
    load = commands.add_parser("loadtest", help="drive concurrent clients against an orchestrator; throughput, latency, errors, memory",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    load.add_argument("--clients", type=int, default=8, help="concurrent clients [default: 8]")
    load.add_argument("--requests", type=int, default=32, help="requests in all [default: 32]")
    load.add_argument("--max-tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=32,
                      help="max_new_tokens of every request [default: 32]")
    config.add_arguments(load, config.SpeculationDefaults, skip=("max_new_tokens", "max_new_tokens_limit"))
    load.add_argument("--prompts", metavar="FILE", help="prompts: a bench prompt file (.jsonl), a JSON list, or one per line "
                      f"[default: the code and prose prompts of benchmarks/{QUICK_PROMPTS}]")
    load.add_argument("--stream", action="store_true", help="call GenerateStream and measure the time to the first token")
    load.add_argument("--timeout", type=float, default=600.0, help="deadline of each request, seconds [default: 600]")
    load.add_argument("--json", action="store_true", help="print the report as one JSON object")
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

    if args.clients < 1 or args.requests < 1 or args.max_new_tokens < 1:
        print("specdec loadtest: --clients, --requests and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        prompts = read_prompts(args.prompts) if args.prompts else default_prompts()
        metadata = security.token_metadata(security.load_token(args))
    except (OSError, ValueError) as exc:
        print(f"specdec loadtest: {exc}", file=sys.stderr)
        return 2
    spec = LoadSpec(
        clients=args.clients, requests=args.requests, max_new_tokens=args.max_new_tokens, mode=args.mode,
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
            report = run_local(cluster, spec, metadata=metadata, progress=progress)
        else:
            report = run_load(args.orchestrator, spec, tls=args, metadata=metadata, progress=progress)
    except RuntimeError as exc:
        print(f"specdec loadtest: {exc}", file=sys.stderr)
        return 1
    finally:
        if cluster:
            cluster.stop()
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def run_local(cluster, spec: LoadSpec, metadata=(), progress=lambda message: None) -> dict:
    """The load against a :class:`~specdec.tools.cluster.LocalCluster`: memory of every process, and
    the sessions its draft and verify services hold afterwards."""
    verifiers = cluster.verify_addresses or [cluster.verify_address]
    internal = {(f"verify-{i}" if len(verifiers) > 1 else "verify"): (a, VERIFY_SERVICE) for i, a in enumerate(verifiers)}
    internal |= {f"draft-{i}": (a, DRAFT_SERVICE) for i, a in enumerate(cluster.draft_addresses)}
    return run_load(cluster.orchestrator_address, spec, processes=list(cluster.processes), tls=cluster.settings,
                    metadata=metadata, internal=internal, progress=progress)
