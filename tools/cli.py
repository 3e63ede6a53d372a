"""The ``specdec`` command: generate, run a local cluster, fetch models, serve one service, check a
service's health, write development certificates; and the tools, each of which registers its own
subcommand here (``bench``, ``analyze``, ``traces``, ``dashboard``, ``loadtest``). The tools never
import this module back."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from specdec import config

GREEN, RED, DIM, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[0m"
DEFAULT_ORCHESTRATOR = os.environ.get("SPECDEC_ORCHESTRATOR", "127.0.0.1:50051")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="specdec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate from one prompt")
    gen.add_argument("--prompt", required=True)
    config.add_arguments(gen, config.SpeculationDefaults, skip=("max_new_tokens", "max_new_tokens_limit"))
    gen.add_argument("--max-tokens", "--max-new-tokens", dest="max_new_tokens", type=int,
                     default=int(os.environ.get("SPECDEC_MAX_NEW_TOKENS", 64)), help="tokens to generate [default: 64]")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--verbose", action="store_true", help="colour accepted draft tokens and target corrections; print statistics")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
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

    from specdec.tools import analyze, bench, dashboard, loadtest, traces

    bench.add_parser(commands)
    analyze.add_parser(commands)
    traces.add_parser(commands)
    dashboard.add_parser(commands)
    loadtest.add_parser(commands)

    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


def cmd_generate(args) -> int:
    import grpc

    from specdec.tools.cluster import LocalCluster
    from specdec.records import DecodingMode
    from specdec.rpc import security
    from specdec.v1 import generation_pb2, generation_pb2_grpc

    request = generation_pb2.GenerateRequest(
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        mode=DecodingMode.parse(args.mode).to_pb(),
        speculation=generation_pb2.SpeculationParams(
            draft_length=args.draft_length, beam_width=args.beam_width, beam_depth=args.beam_depth,
            max_tree_nodes=args.max_tree_nodes, adaptive=args.adaptive,
        ),
        stop=args.stop,
        include_rounds=args.verbose or args.json,
    )
    try:
        metadata = security.token_metadata(security.load_token(args))
        security.channel_credentials(args)  # unreadable files are reported before any cluster starts
    except security.SecurityConfigError as exc:
        print(f"specdec: {exc}", file=sys.stderr)
        return 2
    cluster = None
    address = args.orchestrator
    if args.local:
        settings = config.from_env(
            config.ClusterSettings, target_model=args.target_model,
            draft_models=[m for m in args.draft_models.split(",") if m], port=0,
        )
        print("starting a local cluster ...", file=sys.stderr)
        cluster = LocalCluster(settings)
        address = cluster.start()
    try:
        with security.client_channel(address, args) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            try:
                reply = stub.Generate(request, timeout=3600, metadata=metadata)
            except grpc.RpcError as exc:
                print(f"specdec: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
    finally:
        if cluster:
            cluster.stop()
    if args.json:
        print(json.dumps({"text": reply.text, "token_ids": list(reply.token_ids), "stats": stats_dict(reply.stats)}))
    elif args.verbose:
        print_verbose(args.prompt, reply)
    else:
        print(reply.text)
    return 0


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
    print(f"drafted {s.draft_tokens_proposed}, accepted {s.draft_tokens_accepted}, bonus {s.bonus_tokens}, "
          f"tree nodes {s.tree_nodes_total} (avg branching {s.tree_avg_branching_factor:.2f})")
    print(f"time: drafting {s.draft_ms / 1e3:.2f} s, verifying {s.verify_ms / 1e3:.2f} s, other {s.other_ms / 1e3:.2f} s")
    for d in s.drafts:
        print(f"  {d.draft}: proposed {d.proposed_tokens}, accepted {d.accepted_tokens}, acceptance rate {d.acceptance_rate:.2f}")


def cmd_cluster_up(args) -> int:
    from specdec.tools.cluster import LocalCluster

    settings = config.from_args(config.ClusterSettings, args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting verify ({settings.target_model}) and {len(settings.draft_models)} draft service(s) ...", file=sys.stderr)
    with LocalCluster(settings, quiet=False) as cluster:
        print(f"specdec cluster serving; orchestrator at {cluster.orchestrator_address}", flush=True)
        print(f"  verify {cluster.verify_address}; drafts {', '.join(cluster.draft_addresses)}; Ctrl-C stops all", flush=True)
        while not stop.wait(1.0):
            dead = [p.name for p in cluster.processes if p.popen.poll() is not None]
            if dead:
                print(f"specdec: {', '.join(dead)} exited; stopping the cluster", file=sys.stderr)
                return 1
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
