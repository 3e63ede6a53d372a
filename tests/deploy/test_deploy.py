"""Deployment: the docker compose cluster, the container image and the Kubernetes manifests.

The compose file is checked as a real compose implementation renders it: `docker compose config`
(Compose v2) or Debian's `docker-compose config` (v1.29). Both work offline with no Docker engine,
and resolve anchors, merge keys, `.env` interpolation and profiles exactly as `make up` does.
`make test` installs Debian's docker-compose where neither is present; with neither, those tests
skip and say so.

The Kubernetes manifests are rendered by `kubectl kustomize` and also by the small resolver in
this file (resources, generated ConfigMaps, images, labels and the patches the gpu overlay uses),
so the same checks run where kubectl is missing; where both exist they must agree. Every rendered
object is also validated against the Kubernetes API's own schemas by a maintained validator
(kubernetes-validate, strict: an unknown field is an error).

The last test runs `make test-containers`' script (tests/containers/check.py) when a Docker engine
answers: the image built, the cpu profile up and generating the target's own output, faults,
hardening, TLS and the Swarm stack (on a one-node swarm of its own; skipped by the script where
the engine is in a swarm already); with no engine it skips.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_type_hints
from urllib.parse import urlparse

import pytest
import yaml

from specdec import config, model_store

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / "env.example"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
K8S = COMPOSE_DIR / "k8s"

GPU_MODEL_SERVICES = ("verify", "draft-0", "draft-1")
METRICS_PORT = 9464
MODEL_MOUNT = "/models"
SETTINGS_OF_ROLE = {
    "verify": config.VerifySettings,
    "draft": config.DraftSettings,
    "orchestrator": config.OrchestratorSettings,
}
# Read by specdec/model_store.py rather than parsed as a flag.
EXTRA_SETTINGS = {"SPECDEC_MODEL_DIR"}
# Per-service compose wiring with no launcher equivalent (see compose/env.example).
WIRING_RE = re.compile(r"^(VERIFY|DRAFT_\d+)_(GPU|MODEL)$")
HOST_SETTINGS = {"PUBLISH_ADDRESS"}  # compose's own: where on the host the public ports are published


# --------------------------------------------------------------------------- helpers


def settings_names(cls: type) -> set[str]:
    return {config.env_name(f.name) for f in dataclasses.fields(cls)}


def known_settings() -> set[str]:
    """Every SPECDEC_* variable some specdec process reads."""
    classes = [c for c in vars(config).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    return set().union(*(settings_names(c) for c in classes)) | EXTRA_SETTINGS


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path.name}: not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


def duration_s(text: str) -> float:
    """Go-style durations as compose renders them: 30m, 30m0s, 1h0m0s, 15s, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def compose_env() -> dict[str, str]:
    """This process's environment less anything that would override the env file under test."""
    documented = set(read_env_file(ENV_EXAMPLE))
    return {k: v for k, v in os.environ.items()
            if k not in documented and not k.startswith(("SPECDEC_", "OTEL_", "COMPOSE_"))}


def render_compose(env_file: Path, *overlays: Path, base: Path = COMPOSE_FILE, profiles=("gpu", "cpu"),
                   env: dict[str, str] | None = None) -> dict:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no compose implementation found (neither `docker compose` nor `docker-compose`); "
                    "`make test` installs Debian's docker-compose when run as root")
    files = [arg for f in (base, *overlays) for arg in ("-f", str(f))]
    cmd = [*cli, *files, "--env-file", str(env_file), *(a for p in profiles for a in ("--profile", p)), "config"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**compose_env(), **(env or {})}, timeout=120)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr}"
    return yaml.safe_load(res.stdout)


def role(service: dict) -> str | None:
    """verify, draft or orchestrator for a `specdec serve ...` container, else None."""
    command = service.get("command") or []
    return command[1] if command[:1] == ["serve"] and len(command) > 1 else None


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def gpu_devices(service: dict) -> list[dict]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def dns_names(name: str, service: dict) -> set[str]:
    """The names a service answers to on the compose network: its own and its aliases."""
    names = {name}
    for net in (service.get("networks") or {}).values():
        names |= set((net or {}).get("aliases") or [])
    return names


def mounts(service: dict) -> set[tuple[str, str]]:
    found = set()
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source"), volume["target"]
        found.add((source, target))
    return found


def published_ports(service: dict) -> set[tuple[int, int]]:
    found = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            found.add((int(port["published"]), int(port["target"])))
            assert port.get("host_ip") == "127.0.0.1", f"published on loopback only by default: {port}"
        else:
            published, target = str(port).rsplit(":", 2)[-2:]
            found.add((int(published), int(target.split("/")[0])))
    return found


def port_bindings(service: dict) -> set[tuple[str, int, int]]:
    """(host address, published port, container port) of each port, whichever form compose renders."""
    found = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            found.add((port.get("host_ip", "0.0.0.0"), int(port["published"]), int(port["target"])))
        else:
            host, published, target = ("0.0.0.0:" + str(port) if str(port).count(":") == 1 else str(port)).rsplit(":", 2)
            found.add((host, int(published), int(target.split("/")[0])))
    return found


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as rendered with the documented settings (compose/env.example)."""
    return render_compose(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def in_profile(services: dict, profile: str) -> dict[str, dict]:
    return {n: s for n, s in services.items() if profile in (s.get("profiles") or [])}


# --------------------------------------------------------------------------- docker compose


def test_compose_defaults_are_the_documented_settings(compose, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    assert render_compose(empty) == compose, (
        "the ${VAR:-default} defaults in compose/docker-compose.yml differ from compose/env.example")


def test_env_example_names_only_settings_the_services_read(services):
    documented = read_env_file(ENV_EXAMPLE)
    referenced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    assert set(documented) == referenced, "compose/env.example must document exactly the variables the compose file reads"
    known = known_settings()
    fields = {}  # the services' settings, to check each documented value parses as its setting would
    for cls in SETTINGS_OF_ROLE.values():
        fields.update({config.env_name(f.name): (cls, f) for f in dataclasses.fields(cls)})
    for name, value in documented.items():
        if name.startswith("SPECDEC_"):
            assert name in known, f"{name} is not a setting in specdec/config.py"
            assert name in fields, f"{name} is a launcher setting that no service reads"
            cls, f = fields[name]
            if get_type_hints(cls)[f.name] is int:
                int(value)
            if f.metadata.get("choices"):
                assert value in f.metadata["choices"], f"{name}={value}: one of {f.metadata['choices']}"
        elif name.startswith(("OTEL_", "HF_", "OMP_", "PIP_")) or name in HOST_SETTINGS:  # libraries' (and pip's) own settings
            continue
        else:
            match = WIRING_RE.match(name)
            service = match and match.group(1).lower().replace("_", "-")
            assert service in services, f"{name}: not a SPECDEC_/OTEL_/HF_/OMP_ name nor a per-service setting (VERIFY_GPU, DRAFT_0_MODEL, ...)"


def test_each_model_service_reserves_its_own_gpu(services):
    ids = {}
    for name in GPU_MODEL_SERVICES:
        devices = gpu_devices(services[name])
        assert len(devices) == 1, f"{name}: one device reservation"
        device = devices[0]
        assert device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", [])
        assert len(device.get("device_ids", [])) == 1, f"{name}: exactly one GPU id"
        ids[name] = str(device["device_ids"][0])
        assert environment(services[name])["SPECDEC_DEVICE"] == "cuda"
        assert services[name].get("profiles") == ["gpu"]
    assert len(set(ids.values())) == len(ids), f"GPU ids must be distinct: {ids}"
    documented = read_env_file(ENV_EXAMPLE)
    assert ids == {"verify": documented["VERIFY_GPU"], "draft-0": documented["DRAFT_0_GPU"],
                   "draft-1": documented["DRAFT_1_GPU"]}
    others = [n for n, s in services.items() if gpu_devices(s) and n not in GPU_MODEL_SERVICES]
    assert not others, f"only the model services take GPUs, not {others}"


def test_every_serving_service_has_a_grpc_health_check(services):
    serving = {n: s for n, s in services.items() if role(s)}
    assert {role(s) for s in serving.values()} == set(SETTINGS_OF_ROLE)
    for name, service in serving.items():
        check = service.get("healthcheck") or {}
        assert not check.get("disable"), name
        assert check.get("test") == ["CMD", "specdec", "health"], f"{name}: grpc.health.v1 via the image's specdec"
        assert "SPECDEC_PORT" in environment(service), f"{name}: the health check reads SPECDEC_PORT"
        # Model loading (and on GPUs the first download) must fit in the start period.
        assert duration_s(check["start_period"]) >= 600, f"{name}: start_period {check['start_period']}"
        assert duration_s(check["timeout"]) < duration_s(check["interval"])


def health_probe(port: int, **env: str) -> int:
    """The containers' health check command, run as they run it (SPECDEC_PORT set)."""
    command = [str(Path(sys.executable).with_name("specdec")), "health"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPECDEC_")}
    return subprocess.run(command, env={**clean, "SPECDEC_PORT": str(port), **env}, capture_output=True, timeout=60).returncode


def test_health_check_command_answers_like_grpc_health(services):
    from grpc_health.v1 import health_pb2

    from specdec.rpc.server import start_server

    assert services["verify"]["healthcheck"]["test"][1:] == ["specdec", "health"]
    server, port, health = start_server(lambda s: None, [], "127.0.0.1", 0)
    try:
        assert health_probe(port) == 0
        health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert health_probe(port) != 0
    finally:
        server.stop(0).wait()
    assert health_probe(port) != 0  # nothing listening


def test_health_check_speaks_mutual_tls(tmp_path):
    """With the TLS overlay's variables the health check passes a mutual-TLS port; without them
    it is refused like any plaintext client."""
    from types import SimpleNamespace

    from specdec.tools.certs import make_dev_certs
    from specdec.rpc.server import start_server

    make_dev_certs(str(tmp_path), (), 1)
    tls = SimpleNamespace(tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server.key"),
                          tls_client_ca=str(tmp_path / "ca.pem"))
    server, port, _ = start_server(lambda s: None, [], "127.0.0.1", 0, tls=tls)
    client = {"SPECDEC_TLS_CA": str(tmp_path / "ca.pem"), "SPECDEC_TLS_CLIENT_CERT": str(tmp_path / "client.pem"),
              "SPECDEC_TLS_CLIENT_KEY": str(tmp_path / "client.key")}
    try:
        assert health_probe(port, **client) == 0
        assert health_probe(port) != 0  # plaintext
        assert health_probe(port, SPECDEC_TLS_CA=client["SPECDEC_TLS_CA"]) != 0  # TLS without a client certificate
    finally:
        server.stop(0).wait()


def test_tls_overlay_secures_every_hop(tmp_path):
    """compose/docker-compose.tls.yml: every serving container gets the certificates `make certs`
    writes; draft and verify ask for client certificates; the orchestrator for the token."""
    from specdec.tools.certs import make_dev_certs

    rendered = render_compose(ENV_EXAMPLE, COMPOSE_DIR / "docker-compose.tls.yml")["services"]
    make_dev_certs(str(tmp_path), (), 1)
    written = {p.name for p in tmp_path.iterdir()}
    serving = {n: s for n, s in rendered.items() if role(s)}
    assert len(serving) == 7
    for name, service in serving.items():
        env = environment(service)
        mounts = [v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in service.get("volumes") or []]
        assert any(m.split(":")[1] == "/certs" for m in mounts), f"{name}: no /certs mount"
        files = {k: v for k, v in env.items() if k.startswith(("SPECDEC_TLS_", "SPECDEC_AUTH_"))}
        assert all(v.startswith("/certs/") and v.removeprefix("/certs/") in written for v in files.values()), files
        assert {"SPECDEC_TLS_CERT", "SPECDEC_TLS_KEY", "SPECDEC_TLS_CA", "SPECDEC_TLS_CLIENT_CERT"} <= set(files), name
        if role(service) == "orchestrator":
            assert "SPECDEC_AUTH_TOKEN_FILE" in files and "SPECDEC_TLS_CLIENT_CA" not in files, name
        else:
            assert "SPECDEC_TLS_CLIENT_CA" in files and "SPECDEC_AUTH_TOKEN_FILE" not in files, name
        assert "SPECDEC_PORT" in env and env.get("SPECDEC_DEVICE", "x"), name  # the base settings survive the merge


def test_edge_topology_keeps_the_target_far_and_every_hop_secured(tmp_path):
    """compose/edge.yml: the datacenter profile runs the verify service alone, published and open
    only to callers with a client certificate; the edge profile runs the drafts and the
    orchestrator, which reaches the far verify service named by SPECDEC_FAR_VERIFY over mutual TLS
    and sends rounds ahead when the link makes it pay."""
    edge_file, empty = COMPOSE_DIR / "edge.yml", tmp_path / "empty.env"
    empty.write_text("")
    far = {"SPECDEC_FAR_VERIFY": "verify.example.com:50052"}
    datacenter = in_profile(render_compose(empty, base=edge_file, profiles=("datacenter",), env=far)["services"], "datacenter")
    edge = in_profile(render_compose(empty, base=edge_file, profiles=("edge",), env=far)["services"], "edge")
    assert set(datacenter) == {"verify"} and {role(s) for s in edge.values()} == {"draft", "orchestrator"}
    verify = datacenter["verify"]
    assert ("0.0.0.0", 50052, 50052) in port_bindings(verify) and gpu_devices(verify)
    for name, service in {**datacenter, **edge}.items():
        env = environment(service)
        # (the client certificate also serves each container's own health check, `specdec health`)
        allowed = settings_names(SETTINGS_OF_ROLE[role(service)]) | settings_names(config.TlsClientSettings) | EXTRA_SETTINGS
        assert not {k for k in env if k.startswith("SPECDEC_")} - allowed, name
        assert {"SPECDEC_TLS_CERT", "SPECDEC_TLS_CA", "SPECDEC_TLS_CLIENT_CERT", "SPECDEC_TLS_CLIENT_KEY"} <= set(env), name
        if role(service) == "orchestrator":
            assert env["SPECDEC_AUTH_TOKEN_FILE"] == "/certs/token" and "SPECDEC_TLS_CLIENT_CA" not in env
            assert env["SPECDEC_VERIFY_ADDRESS"] == far["SPECDEC_FAR_VERIFY"]
            assert env["SPECDEC_SEND_AHEAD"] == "auto"
            assert addressed_service(env["SPECDEC_DRAFT_ADDRESSES"], edge)[0] == "draft-0"
            assert {host for host, _, _ in port_bindings(service)} == {"127.0.0.1"}, "the edge's doors stay local"
        else:  # a model service answers only callers with a certificate from the CA
            assert env["SPECDEC_TLS_CLIENT_CA"] == "/certs/ca.pem", name
    cli = compose_cli()
    res = subprocess.run([*cli, "-f", str(edge_file), "--env-file", str(empty), "--profile", "edge", "config"],
                         capture_output=True, text=True, cwd=ROOT, env=compose_env(), timeout=120)
    assert res.returncode != 0 and "SPECDEC_FAR_VERIFY" in res.stderr, "the edge refuses to start without its far verify service"


STACK_FILE = COMPOSE_DIR / "stack.yml"
STACK_GPU_FILE = COMPOSE_DIR / "stack.gpu.yml"
DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")
#: compose's settings the stack leaves out: its doors are always behind TLS and the token (no open
#: door, no Host allow-list for a tokenless HTTP door), and traces go nowhere until a collector is named.
COMPOSE_ONLY = {"SPECDEC_ALLOW_OPEN", "SPECDEC_HTTP_ALLOWED_HOSTS", "OTEL_TRACES_EXPORTER"}


def render_stack(*files: Path) -> dict:
    """A Swarm stack file as `docker stack deploy` reads it with no variables set: YAML anchors and
    merge keys resolved, ``${VAR:-default}`` replaced by its default; later files merged over earlier
    ones (services' mappings key by key, as the Docker CLI merges them). `docker stack config`
    renders the same where the Docker CLI is installed (checked below)."""
    merged: dict = {}
    for path in files:
        loaded = yaml.safe_load(DEFAULTED.sub(lambda m: m.group(2), path.read_text()))
        _merge(merged, {k: v for k, v in loaded.items() if not k.startswith("x-")})
    return merged


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def test_swarm_stack_runs_the_compose_services_secured_and_replaceable(services, tmp_path):
    """compose/stack.yml: the cpu profile's services as a Swarm stack, with the compose file's
    settings (TLS and token as in the TLS overlay, from swarm secrets), placed by node labels,
    drafts replicated, every service reachable by DNS round robin, health-gated rolling updates
    that roll back, killed tasks replaced. `make test-containers` deploys it on a one-node swarm."""
    from specdec.tools.certs import make_dev_certs

    stack = render_stack(STACK_FILE)
    tls = render_compose(ENV_EXAMPLE, COMPOSE_DIR / "docker-compose.tls.yml")["services"]
    make_dev_certs(str(tmp_path), (), 1)
    assert {Path(s["file"]).name for s in stack["secrets"].values()} <= {p.name for p in tmp_path.iterdir()}
    of_compose = {"verify": "verify-cpu", "draft-0": "draft-cpu", "orchestrator": "orchestrator-cpu"}
    serving = {n: s for n, s in stack["services"].items() if role(s)}
    assert set(serving) == set(of_compose)
    for name, service in serving.items():
        counterpart = services[of_compose[name]]
        expected = {k: v.replace("/certs/", "/run/secrets/") for k, v in environment(tls[of_compose[name]]).items()}
        env = environment(service)
        for key in COMPOSE_ONLY:
            expected.pop(key, None), env.pop(key, None)
        assert env == expected, f"{name}: the stack's settings drifted from the compose file's"
        assert service["image"] == counterpart["image"] and service["command"] == counterpart["command"], name
        assert service["healthcheck"]["test"] == counterpart["healthcheck"]["test"], name
        assert service["read_only"] is True and ("models", MODEL_MOUNT) in mounts(service), name
        secrets = {s["source"]: s for s in service["secrets"]}
        for key, path in env.items():
            if path.startswith("/run/secrets/"):
                secret = secrets[path.removeprefix("/run/secrets/")]  # every file it reads is mounted
                assert secret["uid"] == "10001", (name, secret)
                assert secret["mode"] == (0o400 if path.endswith((".key", "token")) else 0o444), (name, secret)
        deploy = service["deploy"]
        assert deploy["endpoint_mode"] == "dnsrr", f"{name}: DNS round robin, each connection sticks to a task"
        assert deploy["restart_policy"]["condition"] == "any", f"{name}: a killed task is replaced"
        assert deploy["update_config"]["failure_action"] == "rollback" and deploy["update_config"]["parallelism"] == 1
        assert "SPECDEC_ALLOW_OPEN" not in environment(service)
    assert serving["verify"]["deploy"]["placement"]["constraints"] == ["node.labels.specdec.verify == true"]
    assert serving["draft-0"]["deploy"]["placement"]["constraints"] == ["node.labels.specdec.draft == true"]
    assert serving["verify"]["deploy"]["update_config"]["order"] == "stop-first", "one target per GPU"
    assert int(serving["draft-0"]["deploy"]["replicas"]) >= 2
    orchestrator = environment(serving["orchestrator"])
    assert addressed_service(orchestrator["SPECDEC_VERIFY_ADDRESS"], serving)[0] == "verify"
    assert addressed_service(orchestrator["SPECDEC_DRAFT_ADDRESSES"], serving)[0] == "draft-0"
    assert {(p["published"], p["target"], p["mode"]) for p in serving["orchestrator"]["ports"]} == \
        {("50051", 50051, "host"), ("8000", 8000, "host")}
    models = stack["services"]["models"]
    assert models["command"] == ["models", "fetch"] and models["deploy"]["mode"] == "global-job"

    gpu = render_stack(STACK_FILE, STACK_GPU_FILE)["services"]
    for name in ("verify", "draft-0"):
        reserved = gpu[name]["deploy"]["resources"]["reservations"]["generic_resources"]
        assert reserved == [{"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": 1}}], name
        assert environment(gpu[name])["SPECDEC_DEVICE"] == "cuda" and gpu[name]["image"] == "specdec:cuda", name
        assert gpu[name]["deploy"]["placement"] == serving[name]["deploy"]["placement"], "the overlay keeps the placement"

    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "stack", "config", "--help"], capture_output=True).returncode == 0:
        res = subprocess.run([docker, "stack", "config", "-c", str(STACK_FILE), "-c", str(STACK_GPU_FILE)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, env={**compose_env(), "SPECDEC_CERTS_DIR": str(tmp_path)})
        assert res.returncode == 0, f"docker stack config refused the stack files:\n{res.stderr}"
        rendered = yaml.safe_load(res.stdout)["services"]
        assert environment(rendered["orchestrator"]) == environment(gpu["orchestrator"])
        assert rendered["verify"]["deploy"]["resources"] == gpu["verify"]["deploy"]["resources"]


def addressed_service(address: str, candidates: dict[str, dict]) -> tuple[str, dict]:
    """The one service that host:port reaches, by name or alias and its SPECDEC_PORT."""
    host, port = host_port(address)
    found = [(n, s) for n, s in candidates.items() if host in dns_names(n, s)]
    assert len(found) == 1, f"{address} names no single service of {sorted(candidates)}"
    assert int(environment(found[0][1])["SPECDEC_PORT"]) == port, f"{address}: wrong port"
    return found[0]


def test_orchestrators_wait_for_healthy_drafts_and_verifier(services):
    orchestrators = {n: s for n, s in services.items() if role(s) == "orchestrator"}
    assert set(orchestrators) == {"orchestrator", "orchestrator-cpu"}
    for name, orch in orchestrators.items():
        (profile,) = orch["profiles"]
        models = {n: s for n, s in in_profile(services, profile).items() if role(s) in ("verify", "draft")}
        deps = depends_on(orch)
        for model in models:
            assert deps.get(model) == "service_healthy", f"{name} must wait for {model} to be healthy"
        env = environment(orch)
        verifier = addressed_service(env["SPECDEC_VERIFY_ADDRESS"], models)
        assert role(verifier[1]) == "verify"
        drafts = [addressed_service(a, models) for a in env["SPECDEC_DRAFT_ADDRESSES"].split(",")]
        assert all(role(s) == "draft" for _, s in drafts)
        assert {n for n, _ in drafts} == {n for n, s in models.items() if role(s) == "draft"}, f"{name}: every draft"
        assert env["SPECDEC_TARGET_MODEL"] == environment(verifier[1])["SPECDEC_TARGET_MODEL"]
        # The prompt lookup runs inside the orchestrator, on by default.
        assert env.get("SPECDEC_PROMPT_LOOKUP", "true") == "true", f"{name}: prompt lookup on"
        port = int(env["SPECDEC_PORT"])
        assert (port, port) in published_ports(orch), f"{name}: the public port is published"


def test_every_service_sends_traces_through_the_collector(services):
    jaeger, collector = services["jaeger"], services["otel-collector"]
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", jaeger["image"]), jaeger["image"]
    assert re.fullmatch(r"otel/opentelemetry-collector-contrib:0\.\d+\.\d+", collector["image"]), collector["image"]
    assert (16686, 16686) in published_ports(jaeger) and (4317, 4317) in published_ports(collector)
    config_file = COMPOSE_DIR / "otel-collector.yaml"
    collector_config = yaml.safe_load(config_file.read_text())
    # Tail sampling keeps every error, failed-draft and slow trace; span metrics see every span; kept
    # traces go to Jaeger and to a file `specdec traces analyze --otlp-json` reads.
    policies = {p["type"] for p in collector_config["processors"]["tail_sampling"]["policies"]}
    assert {"status_code", "boolean_attribute", "latency", "probabilistic"} <= policies
    # A round a draft failed, not every round without drafts (the cost model's choice is no fault).
    assert {p["boolean_attribute"]["key"] for p in collector_config["processors"]["tail_sampling"]["policies"]
            if p["type"] == "boolean_attribute"} == {"specdec.draft_failed"}
    pipelines = collector_config["service"]["pipelines"]
    assert pipelines["traces/in"]["exporters"] == ["spanmetrics"] and "tail_sampling" not in pipelines["traces/in"].get("processors", [])
    assert set(pipelines["traces/kept"]["exporters"]) == {"otlp/jaeger", "file"}
    assert collector_config["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    # Jaeger keeps what it is sent on a volume (Badger), and its Monitor tab reads the collector's
    # span metrics from Prometheus, under the names it expects.
    assert ("./jaeger.yaml" in {s for s, _ in mounts(jaeger)} or any(
        t == "/etc/jaeger/config.yaml" and s.endswith("compose/jaeger.yaml") for s, t in mounts(jaeger)))
    assert "--config=/etc/jaeger/config.yaml" in jaeger["command"]
    jaeger_config = yaml.safe_load((COMPOSE_DIR / "jaeger.yaml").read_text())
    storage = jaeger_config["extensions"]["jaeger_storage"]
    query = jaeger_config["extensions"]["jaeger_query"]["storage"]
    badger = storage["backends"][query["traces"]]["badger"]
    assert badger["ephemeral"] is False
    (volume,) = [t for s, t in mounts(jaeger) if s == "jaeger-data"]
    assert all(Path(d).is_relative_to(volume) for d in badger["directories"].values())
    prometheus = urlparse(storage["metric_backends"][query["metrics"]]["prometheus"]["endpoint"])
    assert prometheus.hostname in services and (9090, prometheus.port) in published_ports(services[prometheus.hostname])
    assert collector_config["connectors"]["spanmetrics"]["namespace"] == "traces.span.metrics"
    assert jaeger_config["exporters"]["jaeger_storage_exporter"]["trace_storage"] == query["traces"]
    for profile in ("gpu", "cpu"):
        names = []
        for name, service in in_profile(services, profile).items():
            if not role(service):
                continue
            env = environment(service)
            endpoint = urlparse(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
            assert (endpoint.hostname, endpoint.port) == ("otel-collector", 4317), f"{name}: OTLP to the collector"
            assert env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") == "grpc"
            assert env.get("OTEL_TRACES_EXPORTER") == "otlp"
            assert env.get("OTEL_TRACES_SAMPLER")
            names.append(env["OTEL_SERVICE_NAME"])
        assert len(names) == len(set(names)), f"{profile}: one OTEL_SERVICE_NAME per service: {names}"


def test_cpu_profile_runs_the_embedded_pair_without_gpus(services):
    cpu, gpu = in_profile(services, "cpu"), in_profile(services, "gpu")
    assert not set(cpu) & set(gpu), "no service is in both profiles"
    assert not any(gpu_devices(s) for s in cpu.values())
    assert all(s["build"]["args"]["VARIANT"] == "cpu" and s["image"].endswith(":cpu") for s in cpu.values())
    assert all(s["build"]["args"]["VARIANT"] == "cuda" and s["image"].endswith(":cuda") for s in gpu.values())
    fetchers = [n for n, s in cpu.items() if s.get("command") == ["models", "fetch"]]
    assert fetchers == ["models"]
    assert cpu["models"].get("restart", "no") in ("no", "on-failure")
    serving = {n: s for n, s in cpu.items() if role(s)}
    for name, service in serving.items():
        env = environment(service)
        assert env.get("SPECDEC_DEVICE", "cpu") == "cpu" or role(service) == "orchestrator"
        # The default: the verify service measures its exact paths and keeps the fastest (specdec.precision).
        assert env.get("SPECDEC_DTYPE", "auto") == "auto"
        models = {env.get("SPECDEC_TARGET_MODEL"), env.get("SPECDEC_DRAFT_MODEL")} - {None}
        assert models <= {config.EMBEDDED_TARGET, config.EMBEDDED_DRAFT}, f"{name}: the embedded pair"
        if role(service) != "orchestrator":
            assert depends_on(service).get("models") == "service_completed_successfully", name
    # The cpu services answer to the gpu names, so addresses and Prometheus targets are shared.
    cpu_names = set().union(*(dns_names(n, s) for n, s in serving.items()))
    assert {"verify", "draft-0", "orchestrator"} <= cpu_names


def test_models_persist_in_a_named_volume(compose, services):
    assert "models" in (compose.get("volumes") or {})
    for name, service in services.items():
        if service.get("image", "").startswith("specdec:"):
            assert ("models", MODEL_MOUNT) in mounts(service), f"{name}: the model volume at {MODEL_MOUNT}"
    dockerfile = DOCKERFILE.read_text()
    for variable in ("HF_HOME", "SPECDEC_MODEL_DIR"):
        value = re.search(rf"\b{variable}=(\S+)", dockerfile)
        assert value and value.group(1).startswith(MODEL_MOUNT + "/"), f"the image puts {variable} under {MODEL_MOUNT}"
    assert "SPECDEC_MODEL_DIR" in inspect.getsource(model_store)


def test_services_set_only_their_own_settings(services):
    for name, service in services.items():
        if not role(service):
            continue
        allowed = settings_names(SETTINGS_OF_ROLE[role(service)]) | EXTRA_SETTINGS
        unknown = {k for k in environment(service) if k.startswith("SPECDEC_")} - allowed
        assert not unknown, f"{name} ({role(service)}) does not read {sorted(unknown)}"
        assert environment(service)["SPECDEC_METRICS_PORT"] == str(METRICS_PORT)


def test_prometheus_scrapes_every_service(services):
    prometheus = services["prometheus"]
    assert any(target == "/etc/prometheus/prometheus.yml" and source.endswith("compose/prometheus.yml")
               for source, target in mounts(prometheus))
    scraped = set()
    for job in yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            scraped |= {(name, int(sd["port"])) for name in sd["names"]}
        for static in job.get("static_configs", []):
            scraped |= {host_port(t) for t in static["targets"]}
    promtool = shutil.which("promtool")  # Prometheus' own checker, where installed
    if promtool:
        res = subprocess.run([promtool, "check", "config", str(COMPOSE_DIR / "prometheus.yml")], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    all_names = set().union(*(dns_names(n, s) for n, s in services.items()))
    assert {name for name, _ in scraped} <= all_names, "every scrape target is a compose service"
    for name, service in services.items():
        if role(service):
            port = int(environment(service)["SPECDEC_METRICS_PORT"])
            assert {(n, port) for n in dns_names(name, service)} & scraped, f"Prometheus does not scrape {name}"


# --------------------------------------------------------------------------- image and make targets


def test_dockerfile_builds_a_cuda_and_a_cpu_variant_without_weights():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    assert len(stages) >= 4, "multi-stage: bases, build, runtime"
    named = {alias: image for image, alias in stages if alias}
    assert named["base-cpu"] == "${CPU_BASE}", "the cpu base is a build argument (a local image where none can be pulled)"
    assert re.search(r"^ARG CPU_BASE=python:3\.11-slim", text, re.MULTILINE)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+", text, re.MULTILINE)
    assert named["build"] == named["runtime"] == "base-${VARIANT}"
    assert re.search(r"^ARG VARIANT=cuda$", text, re.MULTILINE)
    torch_version = re.search(r"TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch_version)}$", text, re.MULTILINE), "the same torch as `make setup`"
    assert "https://download.pytorch.org/whl/cpu" in text and "https://download.pytorch.org/whl/cu" in text
    # Offline-capable: torch from a wheel dir (`wheels` context), the CA only as a build secret.
    assert "--mount=type=bind,from=wheels" in text and "--mount=type=secret,id=ca" in text
    assert 'wheel="torch-$TORCH_VERSION+cpu-"' in text, "the cpu variant installs exactly the +cpu wheel"
    assert "grpc_tools.protoc" in text, "stubs are generated in the build"
    runtime = text.split("AS runtime", 1)[1]
    user = re.findall(r"^USER\s+(\S+)", runtime, re.MULTILINE)
    assert user and user[-1] not in ("0", "root"), "runs as a non-root user"
    assert re.search(r'^ENTRYPOINT \["specdec"\]$', runtime, re.MULTILINE)
    assert not re.search(r"^COPY\s+\.\s", text, re.MULTILINE), "only sources are copied, never the whole context"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", "logs", "bench_results", ".pytest_cache", "specdec/v1/*_pb2*.py"):
        assert path in ignored, f".dockerignore: {path}"


def test_make_up_and_down_wrap_the_compose_file():
    if not shutil.which("make"):
        pytest.skip("make is not installed")

    def dry_run(*args: str) -> str:
        return subprocess.run(["make", "-n", "--no-print-directory", *args, "COMPOSE_CLI=docker compose"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout

    up = dry_run("up")
    assert re.search(r"docker compose -p specdec -f compose/docker-compose.yml \S* ?--profile gpu up -d --no-build", up)
    assert "compose/build-image.sh cuda" in up, "the image is built first, with BuildKit"
    cpu = dry_run("up", "PROFILE=cpu")
    assert "--profile cpu up" in cpu and "compose/build-image.sh cpu" in cpu
    assert re.search(r"-f compose/docker-compose.yml -f compose/docker-compose.tls.yml \S* ?--profile gpu up",
                     dry_run("up", "TLS=1"))
    down = dry_run("down")
    assert "--profile gpu --profile cpu down" in down and " -v" not in down
    assert dry_run("down", "VOLUMES=1").rstrip().endswith("-v"), "make down VOLUMES=1 deletes the models volume"


# --------------------------------------------------------------------------- Kubernetes

HASH_SUFFIX = re.compile(r"-[a-z0-9]{10}$")


def kubectl_render(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the Python renderer covers these checks")
    res = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def python_render(path: Path) -> list[dict]:
    """Resolve a kustomization the way kustomize does, for the features these manifests use."""
    spec = yaml.safe_load((path / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for resource in spec.get("resources", []):
        target = path / resource
        docs += python_render(target) if target.is_dir() else [d for d in yaml.safe_load_all(target.read_text()) if d]
    for generator in spec.get("configMapGenerator", []):
        data = {}
        for env_file in generator.get("envs", []):
            data.update(read_env_file(path / env_file))
        data.update(dict(item.split("=", 1) for item in generator.get("literals", [])))
        if generator.get("behavior") == "merge":
            (existing,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == generator["name"]]
            existing["data"].update(data)
        else:
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    for patch in spec.get("patches", []):
        body = yaml.safe_load((path / patch["path"]).read_text())
        body.pop("metadata", None)
        for doc in docs:
            if doc["kind"] == patch["target"]["kind"] and selects(patch["target"].get("labelSelector", ""), doc):
                strategic_merge(doc, {k: v for k, v in body.items() if k not in ("apiVersion", "kind")})
    for doc in docs:
        if spec.get("namespace") and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = spec["namespace"]
        for label in spec.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
        for image in spec.get("images", []):
            for container in pod_containers(doc):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def selects(selector: str, doc: dict) -> bool:
    labels = doc["metadata"].get("labels", {})
    for term in filter(None, (t.strip() for t in re.split(r",(?![^()]*\))", selector))):
        if match := re.fullmatch(r"(\S+)\s+in\s+\((.*)\)", term):
            if labels.get(match.group(1)) not in {v.strip() for v in match.group(2).split(",")}:
                return False
        else:
            key, _, value = term.partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def strategic_merge(target: dict, patch: dict) -> None:
    """Maps merge; lists of named objects merge by name ($patch: delete removes one; new ones go
    first); null removes a key; others replace."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            strategic_merge(target[key], value)
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            current, added = target.setdefault(key, []), []
            for item in value:
                existing = next((c for c in current if c.get("name") == item["name"]), None)
                if item.get("$patch") == "delete":
                    if existing is not None:
                        current.remove(existing)
                elif existing is not None:
                    strategic_merge(existing, item)
                else:
                    added.append(item)
            target[key] = added + current  # as kustomize does: a patch's new items come first
        else:
            target[key] = value


def pod_containers(doc: dict, init: bool = True) -> list[dict]:
    if doc["kind"] != "Deployment":
        return []
    pod = doc["spec"]["template"]["spec"]
    return pod["containers"] + (pod.get("initContainers") or [] if init else [])


def container_env(container: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    """A container's environment with ConfigMap references resolved (each must exist)."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = configmaps[ref["name"]]["data"][ref["key"]]
    return env


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) substitution in container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def check_manifests(docs: list[dict], gpu: bool, tls: bool = False) -> None:
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    assert list(by_kind["Namespace"]) == ["specdec"]
    # Only the orchestrator reaches the model services (their metrics port stays open to the namespace).
    (policy,) = by_kind["NetworkPolicy"].values()
    assert set(policy["spec"]["podSelector"]["matchExpressions"][0]["values"]) == {"verify", "draft"}
    assert policy["spec"]["ingress"][0] == {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "orchestrator"}}}]}
    assert policy["spec"]["ingress"][1]["ports"] == [{"port": METRICS_PORT}]
    assert all(d["metadata"].get("namespace") == "specdec" for d in docs if d["kind"] != "Namespace")
    configmaps, services = by_kind["ConfigMap"], by_kind["Service"]
    deployments = {n: d for n, d in by_kind["Deployment"].items()
                   if d["spec"]["template"]["spec"]["containers"][0]["image"].startswith("specdec")}

    def service_for(deployment: dict, port: int) -> str:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        found = [n for n, s in services.items()
                 if s["spec"]["selector"].items() <= labels.items() and any(p["port"] == port for p in s["spec"]["ports"])]
        assert len(found) == 1, f"{deployment['metadata']['name']}: one Service on port {port}, found {found}"
        return found[0]

    envs, roles, addresses = {}, {}, {}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        roles[name] = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        assert container["args"] == ["serve", roles[name]]
        assert container["image"] == f"specdec:{'cuda' if gpu else 'cpu'}"
        env = envs[name] = container_env(container, configmaps)
        port = int(env["SPECDEC_PORT"])
        assert any(p["containerPort"] == port and p["name"] == "grpc" for p in container["ports"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if tls:  # native gRPC probes cannot present a client certificate: `specdec health`, with the TLS settings
                assert "grpc" not in container[probe] and container[probe]["exec"]["command"] == ["specdec", "health"], name
            else:
                assert container[probe]["grpc"]["port"] == port, f"{name}: native gRPC {probe} on {port}"
        if tls:
            assert {"name": "certs", "mountPath": "/certs", "readOnly": True} in container["volumeMounts"]
            (certs,) = [v for v in pod["volumes"] if v["name"] == "certs"]
            assert certs["secret"]["secretName"] == "specdec-certs"
            assert env["SPECDEC_TLS_CERT"] == "/certs/server.pem" and env["SPECDEC_TLS_CA"] == "/certs/ca.pem"
            assert env["SPECDEC_TLS_CLIENT_CERT"] == "/certs/client.pem"  # its health check, and the orchestrator's calls
            if roles[name] == "orchestrator":
                assert env["SPECDEC_AUTH_TOKEN_FILE"] == "/certs/token" and "SPECDEC_TLS_CLIENT_CA" not in env
            else:
                assert env["SPECDEC_TLS_CLIENT_CA"] == "/certs/ca.pem", f"{name}: mutual TLS"
        assert int(env["SPECDEC_METRICS_PORT"]) == METRICS_PORT
        assert {k for k in env if k.startswith("SPECDEC_")} <= known_settings(), name
        endpoint = urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname in services and any(p["port"] == endpoint.port for p in services[endpoint.hostname]["spec"]["ports"])
        assert {"name": "models", "mountPath": MODEL_MOUNT} in container["volumeMounts"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        hardened = container["securityContext"]
        assert hardened["readOnlyRootFilesystem"] is True and hardened["allowPrivilegeEscalation"] is False
        assert hardened["capabilities"]["drop"] == ["ALL"]
        scratch = {v["name"]: v for v in pod["volumes"] if "emptyDir" in v and v["name"] != "models"}
        assert {m["mountPath"] for m in container["volumeMounts"] if m["name"] in scratch} == {"/tmp", "/app"}
        assert all(v["emptyDir"].get("sizeLimit") for v in scratch.values()), f"{name}: bounded scratch space"
        limits = container.get("resources", {}).get("limits", {})
        requests = container.get("resources", {}).get("requests", {})
        if gpu and roles[name] in ("verify", "draft"):
            assert int(limits.get("nvidia.com/gpu", 0)) == 1, f"{name}: one GPU"
        else:
            assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests, f"{name}: no GPU"
        addresses[name] = f"{service_for(deployment, port)}:{port}"
        model = env.get("SPECDEC_DRAFT_MODEL") or env["SPECDEC_TARGET_MODEL"]
        fetchers = pod.get("initContainers") or []
        if gpu:
            assert model.startswith("Qwen/") and not fetchers, f"{name}: hub models, nothing to fetch"
        else:
            assert model in (config.EMBEDDED_TARGET, config.EMBEDDED_DRAFT)
            (fetch,) = fetchers
            assert expand(fetch["args"], container_env(fetch, configmaps)) == ["models", "fetch", model], (
                f"{name} fetches its own model first")

    assert sorted(roles.values()) == sorted(["verify", "orchestrator"] + ["draft"] * (2 if gpu else 1))
    assert {n for n, r in roles.items() if r == "draft"} == ({"draft-0", "draft-1"} if gpu else {"draft-0"})
    orchestrator = envs["orchestrator"]
    assert orchestrator["SPECDEC_VERIFY_ADDRESS"] == addresses["verify"]
    assert sorted(orchestrator["SPECDEC_DRAFT_ADDRESSES"].split(",")) == sorted(
        addresses[n] for n, r in roles.items() if r == "draft")
    assert orchestrator["SPECDEC_TARGET_MODEL"] == envs["verify"]["SPECDEC_TARGET_MODEL"]
    names = [e["OTEL_SERVICE_NAME"] for e in envs.values()]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("renderer", [kubectl_render, python_render], ids=["kubectl", "python"])
@pytest.mark.parametrize("overlay, gpu, tls", [("base", False, False), ("overlays/gpu", True, False), ("overlays/tls", False, True)])
def test_kubernetes_manifests(renderer, overlay, gpu, tls):
    check_manifests(renderer(K8S / overlay), gpu, tls)


KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to run on


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu", "overlays/tls"])
def test_kubernetes_manifests_follow_the_api_schemas(overlay):
    """Every rendered object against the Kubernetes API's own OpenAPI schemas, strictly (a field the
    API does not know is an error), with a maintained validator (kubernetes-validate); a misspelt
    field and a wrong type are caught, so the check can fail."""
    import copy

    import kubernetes_validate

    docs = python_render(K8S / overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    for spoil in (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Never"),
                  lambda d: d["spec"].update(replicas="two")):
        spoilt = copy.deepcopy(deployment)
        spoil(spoilt)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(spoilt, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu", "overlays/tls"])
def test_python_renderer_agrees_with_kubectl(overlay):
    def normalized(docs):
        # kustomize names generated ConfigMaps name-<hash> and rewrites the references.
        text = json.dumps(sorted(docs, key=lambda d: (d["kind"], d["metadata"]["name"])), sort_keys=True)
        return json.loads(re.sub(r'"(specdec-[a-z]+)-[a-z0-9]{10}"', r'"\1"', text))

    assert normalized(python_render(K8S / overlay)) == normalized(kubectl_render(K8S / overlay))


# --------------------------------------------------------------------------- the real thing


def _docker_client():
    docker = pytest.importorskip("docker", reason="the docker SDK is not installed")
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception:  # noqa: BLE001 - any failure here means there is no engine to use
        pytest.skip("no Docker engine reachable")
    return client


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
def test_cpu_profile_in_docker():
    """`make test-containers`' path (tests/containers/check.py) against the reachable engine: the
    image built, `make up PROFILE=cpu` healthy, output equal to the target's, faults, hardening, TLS,
    the Swarm stack with a draft and a verify task killed."""
    _docker_client()
    if compose_cli() is None:
        pytest.skip("no compose implementation found")
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "containers" / "check.py"), "--skip-local"],
                         cwd=ROOT, capture_output=True, text=True, timeout=3 * 3600 - 60)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
