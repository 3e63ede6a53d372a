"""The ``specdec`` command: generate, run a local cluster, fetch models, serve one service, check a
service's health, write development certificates; and the tools, each of which registers its own
subcommand here (``bench``, ``analyze``, ``traces``, ``dashboard``, ``loadtest``). The tools never
import this module back."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading

from specdec import config

GREEN, RED, DIM, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[0m"
DEFAULT_ORCHESTRATOR = os.environ.get("SPECDEC_ORCHESTRATOR", "127.0.0.1:50051")


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except config.SettingError as exc:
        # A setting (flag or SPECDEC_* variable) given a value it does not accept: one line, status 2.
        print(f"specdec: {exc}", file=sys.stderr)
        return 2


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="specdec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_own_commands(commands)
    chosen = argv[0] if argv and not argv[0].startswith("-") else None
    unavailable = add_tool_commands(commands, chosen)
    if chosen in unavailable:
        return needs_extras(f"specdec {chosen}", missing_extras(unavailable[chosen]) or unavailable[chosen])

    args = parser.parse_args(argv)
    label, needed = requirements(args)
    missing = missing_extras(needed)
    if missing:
        return needs_extras(label, missing)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


def add_own_commands(commands) -> None:
    """generate, cluster, models, certs, health and serve: the commands this module runs itself."""
    gen = commands.add_parser("generate", help="generate from one prompt")
    gen.add_argument("--prompt", required=True)
    config.add_arguments(gen, config.SpeculationDefaults, skip=("max_new_tokens", "max_new_tokens_limit"))
    leave_to_orchestrator(gen, SERVER_DEFAULTED)
    gen.add_argument("--max-tokens", "--max-new-tokens", dest="max_new_tokens", type=int,
                     default=config.env_setting(config.SpeculationDefaults, "max_new_tokens", 64), help="tokens to generate [default: 64]")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--verbose", action="store_true", help="colour accepted draft tokens and target corrections; print statistics")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats (with --compare also target_alone and speedup)")
    gen.add_argument("--compare", action="store_true",
                     help="with --local, first time stock transformers generate on the target alone in float32 and bfloat16 "
                          "(the decoding a user already has), and llama.cpp on the target's GGUF where llama-cpp-python is "
                          "installed (make llama-cpp); then, after one short warm-up request, run the same prompt with "
                          "the target alone through the services (mode autoregressive) and then as asked; print every speed and "
                          "the ratio to the faster stock generate (without --local: to the services' target alone)")
    where = gen.add_mutually_exclusive_group()
    where.add_argument("--orchestrator", default=DEFAULT_ORCHESTRATOR, help=f"a running orchestrator [SPECDEC_ORCHESTRATOR; default: {DEFAULT_ORCHESTRATOR}]")
    where.add_argument("--local", action="store_true", help="bring up a local cluster for this call")
    gen.add_argument("--target-model", default=os.environ.get("SPECDEC_TARGET_MODEL", config.EMBEDDED_TARGET), help="with --local")
    gen.add_argument("--draft-models", default=os.environ.get("SPECDEC_DRAFT_MODELS", config.EMBEDDED_DRAFT), help="with --local, comma-separated")
    config.add_arguments(gen, config.TlsClientSettings)  # for an orchestrator that serves TLS
    config.add_arguments(gen, config.AuthSettings)  # the bearer token to send
    gen.set_defaults(func=cmd_generate)

    cluster = commands.add_parser("cluster", help="run a local cluster").add_subparsers(dest="action", required=True)
    up = cluster.add_parser("up", help="start verify, draft and orchestrator processes; stop them on Ctrl-C")
    config.add_arguments(up, config.ClusterSettings)
    serve_http_by_default(up)
    up.set_defaults(func=cmd_cluster_up)

    models = commands.add_parser("models", help="the embedded model pair").add_subparsers(dest="action", required=True)
    fetch = models.add_parser("fetch", help="download, check and convert the embedded models (once)")
    fetch.add_argument("names", nargs="*", help="aliases to fetch (default: both)")
    fetch.set_defaults(func=cmd_models_fetch)
    path = models.add_parser("path", help="print a model's local directory")
    path.add_argument("name")
    path.set_defaults(func=cmd_models_path)

    certs = commands.add_parser("certs", help="write a development CA, server and client certificates and a token")
    certs.add_argument("dir", help="directory to write ca.pem, server.pem/.key, client.pem/.key and token into")
    certs.add_argument("--name", action="append", default=[], help="another host name or IP the server certificate names (repeatable)")
    certs.add_argument("--days", type=int, default=365, help="validity [default: 365]")
    certs.set_defaults(func=cmd_certs)

    health = commands.add_parser("health", help="exit 0 if a service reports SERVING on grpc.health.v1 (container health checks)")
    port = os.environ.get("SPECDEC_PORT")
    health.add_argument("--address", default=f"127.0.0.1:{port}" if port else None, required=not port,
                        help="host:port to ask [default: 127.0.0.1:$SPECDEC_PORT]")
    health.add_argument("--service", default="", help="a service name to ask about ('' = the whole server)")
    health.add_argument("--timeout-s", type=float, default=5.0)
    config.add_arguments(health, config.TlsClientSettings)  # TLS and mutual TLS from the SPECDEC_TLS_* variables
    health.set_defaults(func=cmd_health)

    serve = commands.add_parser("serve", help="run one service in the foreground (what compose runs)")
    serve.add_argument("service", choices=["verify", "draft", "orchestrator"])
    serve.add_argument("args", nargs=argparse.REMAINDER, help="the service's own flags (see: specdec serve SERVICE -- --help)")
    serve.set_defaults(func=cmd_serve)


def add_tool_commands(commands, chosen: str | None) -> dict:
    """The tools' commands; their modules imported only for the command asked for (``chosen``; None:
    all, for --help): bench's imports torch, which `specdec generate` and `specdec health` have no
    use for. Returns the commands whose extra is not installed, and what each needs."""
    unavailable = {}
    for name in TOOL_COMMANDS:
        if chosen is not None and chosen != name:
            commands.add_parser(name, add_help=False)  # a name to parse past; never run
            continue
        try:
            tool = import_tool(name)
        except ModuleNotFoundError as exc:
            if not NEEDS[name] or (exc.name or "").partition(".")[0] == "specdec":
                raise
            # A dependency of an extra that is not installed: the command is still listed, and says what to install.
            unavailable[name] = NEEDS[name]
            commands.add_parser(name, add_help=False, help=f"(needs {install_hint(NEEDS[name])})")
        else:
            tool.add_parser(commands)
    return unavailable


# `pip install specdec` is the client: `generate` (against a running orchestrator), `health`,
# `analyze` and `traces analyze` run with it alone. The rest need an extra of pyproject.toml; one
# that is missing is named in one line (status 2), not found out by a traceback half-way.
SERVER, TOOLS = "server", "tools"
NEEDS = {
    "serve": (SERVER,), "cluster": (SERVER,), "models": (SERVER,), "certs": (SERVER,), "loadtest": (SERVER,),
    "linkbench": (SERVER, TOOLS),  # its plot
    "enginebench": (SERVER, TOOLS),  # its plot
    "bench": (SERVER, TOOLS),  # a sweep ends with its plot
    "dashboard": (TOOLS,),
    "analyze": (), "traces": (),
}
# The subcommands the tools register themselves, each in the module of its name.
TOOL_COMMANDS = ("bench", "analyze", "traces", "dashboard", "loadtest", "linkbench", "enginebench")


def import_tool(name: str):
    if name == "bench":
        from specdec.tools import bench as tool
    elif name == "analyze":
        from specdec.tools import analyze as tool
    elif name == "traces":
        from specdec.tools import traces as tool
    elif name == "dashboard":
        from specdec.tools import dashboard as tool
    elif name == "linkbench":
        from specdec.tools import linkbench as tool
    elif name == "enginebench":
        from specdec.tools import enginebench as tool
    else:
        from specdec.tools import loadtest as tool
    return tool


def requirements(args) -> tuple[str, tuple[str, ...]]:
    """What a parsed command line needs beyond the client: its words (for the message) and the extras."""
    words = [args.command, *([args.action] if getattr(args, "action", None) else [])]
    label, needed = "specdec " + " ".join(words), list(NEEDS.get(args.command, ()))
    if args.command == "generate" and args.local:
        label, needed = label + " --local", needed + [SERVER]
    if getattr(args, "plot", None):  # loadtest --plot, traces analyze --plot
        label, needed = label + " --plot", needed + [TOOLS]
    return label, tuple(dict.fromkeys(needed))


def missing_extras(extras: tuple[str, ...]) -> list[str]:
    """Those of ``extras`` with a requirement that is not installed, as the installed package's own
    metadata lists them (nothing is imported to find out). Without that metadata (a bare checkout
    on sys.path) nothing counts as missing."""
    from importlib import metadata

    try:
        requires = metadata.requires("specdec") or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for extra in extras:
        marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
        for requirement in requires:
            name = re.match(r"[A-Za-z0-9._-]+", requirement)
            if name is None or not marker.search(requirement.partition(";")[2]):
                continue
            try:
                metadata.distribution(name.group(0))
            except metadata.PackageNotFoundError:
                missing.append(extra)
                break
    return missing


def install_hint(extras) -> str:
    return f"pip install 'specdec[{','.join(extras)}]'"


def needs_extras(label: str, extras) -> int:
    extras = list(extras)
    which = f"the {extras[0]} extra" if len(extras) == 1 else f"the {' and '.join(extras)} extras"
    print(f"{label} needs {which}: {install_hint(extras)}", file=sys.stderr)
    return 2


# Speculation settings a generate call sends only when given (flag or SPECDEC_* variable); otherwise
# the orchestrator's own defaults apply, which may be cost-aware.
SERVER_DEFAULTED = ("draft_length", "beam_width", "beam_depth", "max_tree_nodes", "adaptive")
# --compare: a short request first, so that neither timed run pays for the services' first forwards.
WARM_UP_TOKENS = 8


# `specdec cluster up` serves the OpenAI-compatible HTTP API here unless told otherwise (0 = off);
# the launcher embedded in tests, benchmarks and `generate --local` leaves it off.
CLUSTER_HTTP_PORT = 8000


def serve_http_by_default(parser: argparse.ArgumentParser) -> None:
    if config.env_name("http_port") in os.environ:
        return
    for action in parser._actions:
        if action.dest == "http_port":
            action.default = CLUSTER_HTTP_PORT
            action.help = action.help.rpartition("default:")[0] + f"default: {CLUSTER_HTTP_PORT}]"


def leave_to_orchestrator(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    for action in parser._actions:
        if action.dest in names and config.env_name(action.dest) not in os.environ:
            action.default = None
            action.help = action.help.rpartition("default:")[0] + "default: the orchestrator's]"


def cmd_generate(args) -> int:
    import grpc

    from specdec.client import Client
    from specdec.records import DecodingMode
    from specdec.rpc import security

    speculation = {name: getattr(args, name) for name in SERVER_DEFAULTED if getattr(args, name) is not None}

    def request(mode: str, max_new_tokens: int) -> dict:
        return dict(prompt=args.prompt, max_new_tokens=max_new_tokens, mode=DecodingMode.parse(mode).to_pb(),
                    stop=args.stop, include_rounds=args.verbose or args.json, **speculation)

    try:
        token = security.load_token(args)
        security.channel_credentials(args)  # unreadable files are reported before any cluster starts
    except security.SecurityConfigError as exc:
        print(f"specdec: {exc}", file=sys.stderr)
        return 2
    cluster = None
    address = args.orchestrator
    # Before the cluster starts: the stock models are loaded, timed and freed one at a time.
    stock = stock_baseline(args) if args.compare and args.local else []
    if args.local:
        from specdec.tools.cluster import LocalCluster  # the services' code: the server extra

        settings = config.from_env(
            config.ClusterSettings, target_model=args.target_model,
            draft_models=[m for m in args.draft_models.split(",") if m], port=0,
        )
        print("starting a local cluster ...", file=sys.stderr)
        cluster = LocalCluster(settings)
        address = cluster.start()
    try:
        with Client(address, tls=args.tls_ca or False, client_cert=args.tls_client_cert or None,
                    client_key=args.tls_client_key or None, token=token, timeout_s=3600) as client:
            try:
                alone = None
                if args.compare:
                    print(f"warm-up ({WARM_UP_TOKENS} tokens), then the target alone, then {args.mode} ...", file=sys.stderr)
                    client.generate(**request(args.mode, min(WARM_UP_TOKENS, args.max_new_tokens)))
                    alone = client.generate(**request("autoregressive", args.max_new_tokens))
                reply = client.generate(**request(args.mode, args.max_new_tokens))
                info = client.info() if args.compare else None
            except grpc.RpcError as exc:
                print(f"specdec: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
    finally:
        if cluster:
            cluster.stop()
    if args.json:
        out = reply_dict(reply)
        if alone is not None:
            out |= {"target_alone": reply_dict(alone), "speedup": speedup(alone, reply, stock),
                    "verify_dtype": info.dtype, "precision": info.precision}
        if stock:
            out |= {"stock_generate": {run.dtype: {"tokens_per_second": run.tokens_per_second, "token_ids": run.tokens}
                                       for run in transformers_runs(stock)},
                    **{"llama_cpp": {"engine": run.dtype, "tokens_per_second": run.tokens_per_second, "token_ids": run.tokens}
                       for run in stock if is_llama(run)},
                    "speedup_over": f"stock generate {fastest(stock).dtype}"}
        print(json.dumps(out))
        return 0
    if args.verbose:
        print_verbose(args.prompt, reply)
    else:
        print(reply.text)
    if alone is not None:
        print(comparison(alone, reply, stock, info))
    return 0


def stock_baseline(args) -> list:
    """``--compare --local``: stock ``generate`` on the target alone, timed in each dtype (:func:`specdec.tools.bench.stock_runs`)."""
    from transformers import AutoTokenizer

    from specdec.model_store import resolve_model
    from specdec.tools.bench import llama_stock_run, stock_runs

    prompt_ids = AutoTokenizer.from_pretrained(resolve_model(args.target_model))(args.prompt).input_ids
    progress = lambda text: print(text + " ...", file=sys.stderr, flush=True)  # noqa: E731
    runs = stock_runs(args.target_model, prompt_ids, args.max_new_tokens, progress=progress)
    llama = llama_stock_run(args.target_model, prompt_ids, args.max_new_tokens, progress=progress)
    return runs + ([llama] if llama is not None else [])


def fastest(stock):
    """The faster stock ``generate`` (llama.cpp's run, when there is one, is shown apart)."""
    return max(transformers_runs(stock), key=lambda run: run.tokens_per_second)


def transformers_runs(stock) -> list:
    return [run for run in stock if not is_llama(run)]


def is_llama(run) -> bool:
    return run.dtype.startswith("llama.cpp")


def reply_dict(reply) -> dict:
    return {"text": reply.text, "token_ids": list(reply.token_ids), "stats": stats_dict(reply.stats)}


def speedup(alone, reply, stock=()) -> float:
    """Speculation's tokens/s over the faster stock ``generate`` where it was timed, else over the
    services' target alone (as the orchestrator timed it)."""
    a = fastest(stock).tokens_per_second if stock else alone.stats.tokens_per_second
    return reply.stats.tokens_per_second / a if a else 0.0


def first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def comparison(alone, reply, stock=(), info=None) -> str:
    """A few lines: every speed, the ratio to the faster stock ``generate`` (the decoding a user already
    has; without it, to the services' target alone), and whether the tokens are the same. The
    speculative output must equal the services' target alone token for token: both decode in the
    verify service's exact path (README, "Exactness")."""
    lines = []
    if info is not None and info.precision:
        lines.append(f"verify dtype: {info.precision}")
    if stock:
        best = fastest(stock)
        lines.append("stock transformers generate: " + ", ".join(f"{run.dtype} {run.tokens_per_second:.2f}"
                                                                for run in transformers_runs(stock))
                     + f" tokens/s (the faster: {best.dtype})")
    dtype = f", {info.dtype} exact" if info is not None and info.dtype else ""
    lines.append(f"target alone through the services (one token per verify pass{dtype}): {alone.stats.tokens_per_second:.2f} tokens/s")
    baseline = f"the faster stock generate ({fastest(stock).dtype})" if stock else "the target alone"
    line = (f"speculative ({reply.stats.mode}) {reply.stats.tokens_per_second:.2f} tokens/s: "
            f"{speedup(alone, reply, stock):.2f}x {baseline}")
    at = first_difference(list(alone.token_ids), list(reply.token_ids))
    line += f" (same {len(reply.token_ids)} tokens as the target alone)" if at is None else f" (differs from the target alone from token {at} on)"
    lines.append(line)
    for run in (r for r in stock if is_llama(r)):
        lines.append(f"{run.dtype} on the same GGUF: {run.tokens_per_second:.2f} tokens/s; speculative "
                     f"{reply.stats.tokens_per_second / run.tokens_per_second:.2f}x it")
    return "\n".join(lines)


def stats_dict(stats) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def colored_text(reply) -> str:
    """Accepted draft tokens in green, target corrections in red, other target tokens plain."""
    colours = []
    for r in reply.rounds:
        colours += [GREEN] * len(r.accepted_token_ids)
        if r.bonus_token_id >= 0:
            colours.append(RED if r.bonus_is_correction else "")
    # token_texts join to the untruncated text; cut them where reply.text ends (before a stop string).
    pieces, room = [], len(reply.text)
    for piece in reply.token_texts:
        pieces.append(piece[:room])
        room -= len(pieces[-1])
    return "".join(f"{c}{piece}{RESET}" if c and piece else piece for piece, c in zip(pieces, colours))


def print_verbose(prompt: str, reply) -> None:
    print(f"{DIM}{prompt}{RESET}{colored_text(reply)}")
    print(f"\n{GREEN}green{RESET}: accepted draft tokens   {RED}red{RESET}: target corrections   plain: target tokens with no draft")
    s = reply.stats
    print(f"\nmode {s.mode}: {s.tokens_generated} tokens in {s.rounds} rounds "
          f"({s.mean_accepted_per_round:.2f} per round), {s.tokens_per_second:.2f} tokens/s, {s.total_ms / 1e3:.2f} s")
    print(f"{s.draft_tokens_accepted} drafted tokens accepted and {s.bonus_tokens} from the target itself; "
          f"{s.draft_tokens_proposed} tokens drafted over all beams, {s.tree_nodes_total} tree nodes verified "
          f"(avg branching {s.tree_avg_branching_factor:.2f})")
    print(f"time: drafting {s.draft_ms / 1e3:.2f} s, verifying {s.verify_ms / 1e3:.2f} s, other {s.other_ms / 1e3:.2f} s")
    for d in s.drafts:
        print(f"  {d.draft}: {draft_line(d, reply.rounds)}")


def draft_line(d, rounds) -> str:
    """A draft's share in words. Every beam's tokens count as drafted, but one round can accept at
    most its longest beam's length, so that is what acceptance is a share of."""
    proposed = [max(len(b.token_ids) for b in p.beams) for r in rounds for p in r.proposals if p.draft == d.draft and p.beams]
    positions = sum(proposed)
    share = f"{d.accepted_tokens / positions:.0%}" if positions else "-"
    return (f"drafted {d.proposed_tokens} tokens in {len(proposed)} rounds (longest path per round: {positions} positions); "
            f"accepted {d.accepted_tokens} of those {positions} positions ({share})")


def cmd_cluster_up(args) -> int:
    from specdec.rpc.server import PortInUse
    from specdec.tools.cluster import LocalCluster, Supervisor

    settings = config.from_args(config.ClusterSettings, args)
    try:
        # Before any child starts: a second cluster on the same ports would load its models first.
        LocalCluster(settings).check_ports()
        LocalCluster(settings).check_settings()  # a SettingError: one line from main, status 2
    except PortInUse as exc:
        print(f"specdec cluster: cannot start: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting verify ({settings.target_model}) and {len(settings.draft_models)} draft service(s) ...", file=sys.stderr)
    cluster = LocalCluster(settings, quiet=False)
    try:
        cluster.start()
    except RuntimeError as exc:  # a service that did not come up (its own output went to this terminal)
        print(f"specdec cluster: cannot start: {exc}".rstrip(), file=sys.stderr)
        return 1
    try:
        print(f"specdec cluster serving; orchestrator at {cluster.orchestrator_address}", flush=True)
        if cluster.http_url:
            print(f"  OpenAI-compatible HTTP API at {cluster.http_url}/v1 (model {settings.target_model})", flush=True)
        print(f"  verify {cluster.verify_address}; drafts {', '.join(cluster.draft_addresses)}; Ctrl-C stops all", flush=True)
        # A child that dies is started again with backoff while the others keep serving: the
        # orchestrator skips a missing draft and retries a missing verifier within each request's deadline.
        supervisor = Supervisor()
        while not stop.wait(0.5):
            for event in cluster.supervise(supervisor):
                print(f"specdec: {event}", file=sys.stderr, flush=True)
    finally:
        cluster.stop()
    return 0


def cmd_models_fetch(args) -> int:
    from specdec.model_store import EMBEDDED_MODELS, fetch

    for name in args.names or list(EMBEDDED_MODELS):
        if name not in EMBEDDED_MODELS:
            print(f"specdec: unknown model {name!r}; embedded: {', '.join(EMBEDDED_MODELS)}", file=sys.stderr)
            return 2
        print(fetch(name))
    return 0


def cmd_models_path(args) -> int:
    from specdec.model_store import EMBEDDED_MODELS, model_path

    if args.name in EMBEDDED_MODELS:
        print(model_path(args.name))
        return 0
    print(f"specdec: unknown model {args.name!r}; embedded: {', '.join(EMBEDDED_MODELS)}", file=sys.stderr)
    return 2


def cmd_health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from specdec.rpc.security import SecurityConfigError, client_channel

    tls = config.from_args(config.TlsClientSettings, args)
    try:
        with client_channel(args.address, tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s)
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except SecurityConfigError as exc:
        print(f"specdec health: {exc}", file=sys.stderr)
        return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_certs(args) -> int:
    from specdec.tools.certs import make_dev_certs

    certs = make_dev_certs(args.dir, tuple(args.name), args.days)
    print(f"wrote a development CA, certificates and a token to {certs.ca.parent}/ (keys and token readable by you only)")
    print(f"  servers: --tls-cert {certs.server_cert} --tls-key {certs.server_key} [--tls-client-ca {certs.ca}]")
    print(f"  clients: --tls-ca {certs.ca} [--tls-client-cert {certs.client_cert} --tls-client-key {certs.client_key}]")
    print(f"  token:   --auth-token-file {certs.token}")
    return 0


def cmd_serve(args) -> int:
    rest = [a for a in args.args if a != "--"]
    if args.service == "verify":
        from specdec.verify_service.server import main as serve
    elif args.service == "draft":
        from specdec.draft_service.server import main as serve
    else:
        from specdec.orchestrator.server import main as serve
    serve(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
