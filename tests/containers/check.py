"""The docker compose cpu profile for real: `make test-containers` (not part of `make test`).

Steps, each timed and printed, results also written to logs/container_check.json:

1. a Docker engine: the one that answers, else (as root) dockerd started here, after installing
   Debian's docker.io where dockerd is missing; stopped again at the end;
2. the base image specdec-base:bookworm (`make base-image`, debootstrap) unless present or
   --cpu-base names another;
3. the cpu image (compose/build-image.sh with this machine's pip configuration: index, wheel dir,
   CA secret): build time, then again with the cache, and the image size;
4. `make up PROFILE=cpu`: start to all services healthy (the models fetch included);
5. `specdec generate` from the host against the orchestrator in tree and sequential mode, equal
   token for token to the target alone (autoregressive mode, same services) and, where the host
   has the embedded pair (`specdec models fetch`), to `specdec generate --local` in autoregressive
   mode;
6. faults: `docker kill` of the draft container mid-generation (same output, compose restarts
   it) and `docker restart` of the verify container mid-generation (same output);
7. hardening: every container runs as uid 10001 with a read-only root filesystem, and neither the
   image's history nor `docker inspect` carries the CA certificate or a secret;
8. the TLS overlay (compose/docker-compose.tls.yml) with fresh certificates: healthy, a client with
   the client certificate and token generates, one without is refused;
9. `make down` (the models volume stays unless --remove-volumes);
10. the Docker Swarm stack (compose/stack.yml) on a one-node swarm of its own (`docker swarm init`,
    left again at the end): node labels for placement, TLS material and token as
    swarm secrets, two draft replicas; healthy, outputs equal the target's alone; `docker kill` of
    the draft task the orchestrator is connected to and of the verify task, each mid-generation:
    same output, and Swarm replaces each killed task with a new healthy one; `make stack-down`.
    Skipped where the engine is in a swarm already.

    python tests/containers/check.py [--skip-tls] [--skip-faults] [--skip-swarm] [--remove-volumes] ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
TLS_FILE = ROOT / "compose" / "docker-compose.tls.yml"
PROJECT = "specdec"  # the Makefile's project name: `make up` / `make down` are what is checked
SPECDEC = str(Path(sys.executable).with_name("specdec"))
SERVICES = ("verify-cpu", "draft-cpu", "orchestrator-cpu")
UID = "10001"

results: dict = {}


def log(msg: str) -> None:
    print(f"[container-check] {msg}", flush=True)


def run(cmd, check=True, capture=False, timeout=None, env=None, **kw) -> subprocess.CompletedProcess:
    log("+ " + (cmd if isinstance(cmd, str) else " ".join(map(str, cmd))))
    return subprocess.run(cmd, cwd=ROOT, check=check, timeout=timeout, env=env, text=True,
                          capture_output=capture, **kw)


def docker(*args, check=True, timeout=120) -> str:
    return subprocess.run(["docker", *args], check=check, capture_output=True, text=True,
                          timeout=timeout).stdout.strip()


def engine_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0 \
        if shutil.which("docker") else False


# --------------------------------------------------------------------------- engine


def ensure_engine() -> subprocess.Popen | None:
    """The reachable engine, or a dockerd started here (returned, to be stopped at the end)."""
    if engine_answers():
        log("a Docker engine answers")
        return None
    if os.geteuid() != 0:
        sys.exit("no Docker engine answers and this is not root: start dockerd (or run as root)")
    if not shutil.which("dockerd") or not Path("/usr/bin/docker").exists():
        log("installing Debian's docker.io (dockerd, containerd, runc and a BuildKit-capable CLI)")
        run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
            "--no-install-recommends docker.io >/dev/null", shell=True)
    logfile = open(ROOT / "logs" / "dockerd.log", "ab")  # noqa: SIM115 - lives as long as dockerd
    proc = subprocess.Popen([shutil.which("dockerd") or "/usr/sbin/dockerd"], stdout=logfile,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log(f"started dockerd (pid {proc.pid}, log logs/dockerd.log)")
    deadline = time.monotonic() + 90
    while not engine_answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("dockerd did not come up; see logs/dockerd.log")
        time.sleep(1)
    return proc


def stop_engine(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    log(f"stopping the dockerd started here (pid {proc.pid})")
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def compose_cli() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    sys.exit("no compose implementation: `make compose-cli` installs Debian's docker-compose")


# --------------------------------------------------------------------------- cluster


def containers() -> dict[str, dict]:
    ids = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").split()
    if not ids:
        return {}
    info = json.loads(docker("inspect", *ids))
    return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in info}


def health(c: dict) -> str:
    state = c["State"]
    return state.get("Health", {}).get("Status") or state["Status"]


def wait_healthy(timeout: float, services=SERVICES) -> float:
    start = time.monotonic()
    last = ""
    while True:
        cs = containers()
        fetch = cs.get("models")
        if fetch and fetch["State"]["Status"] == "exited" and fetch["State"]["ExitCode"] != 0:
            raise SystemExit("the models fetch failed:\n" + docker("logs", "--tail", "40", fetch["Id"], check=False))
        status = {s: health(cs[s]) if s in cs else "missing" for s in services}
        line = " ".join(f"{s}={v}" for s, v in status.items())
        if line != last:
            log(f"{time.monotonic() - start:6.0f}s {line}")
            last = line
        if all(v == "healthy" for v in status.values()):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise SystemExit(f"not healthy after {timeout:.0f}s: {line}")
        time.sleep(3)


def generate(prompt: str, max_tokens: int, mode: str, extra=(), local=False, check=True) -> dict | subprocess.CompletedProcess:
    cmd = [SPECDEC, "generate", "--prompt", prompt, "--max-tokens", str(max_tokens), "--mode", mode, "--json"]
    cmd += ["--local"] if local else ["--orchestrator", "127.0.0.1:50051"]
    res = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if not check:
        return res
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def generate_with_fault(prompt: str, max_tokens: int, mode: str, fault, delay: float, extra=()) -> dict:
    cmd = [SPECDEC, "generate", "--prompt", prompt, "--max-tokens", str(max_tokens), "--mode", mode,
           "--json", "--orchestrator", "127.0.0.1:50051", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(delay)
    if proc.poll() is not None:  # a fault after the end checks nothing: raise --fault-tokens
        raise SystemExit(f"the generation of {max_tokens} tokens ended before the fault was injected ({delay}s in); "
                         "give it more with --fault-tokens")
    fault()
    out, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"generation under a fault failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def container_id(service: str) -> str:
    return containers()[service]["Id"]


# --------------------------------------------------------------------------- checks


def check_hardening(ca_cert: str | None) -> None:
    cs = containers()
    for name in ("models", *SERVICES):
        c = cs[name]
        assert c["Config"]["User"] == UID, f"{name} runs as {c['Config']['User']!r}"
        assert c["HostConfig"]["ReadonlyRootfs"], f"{name}: root filesystem is writable"
        assert "/tmp" in (c["HostConfig"].get("Tmpfs") or {}), f"{name}: no tmpfs on /tmp"
        env = "\n".join(c["Config"]["Env"])
        assert "BEGIN" not in env and "PRIVATE KEY" not in env, f"{name}: key material in its environment"
    cid = cs["verify-cpu"]["Id"]
    assert docker("exec", cid, "id", "-u") == UID
    wrote = subprocess.run(["docker", "exec", cid, "touch", "/opt/venv/x"], capture_output=True)
    assert wrote.returncode != 0, "verify's root filesystem accepted a write"
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", "specdec:cpu")
    image = json.loads(docker("image", "inspect", "specdec:cpu"))[0]
    blob = history + json.dumps(image)
    assert "BEGIN CERTIFICATE" not in blob and "/run/secrets" not in blob, "the CA secret leaked into the image"
    if ca_cert and Path(ca_cert).is_file():
        first = [ln for ln in Path(ca_cert).read_text().splitlines() if ln and not ln.startswith("-----")][:1]
        assert not first or first[0] not in blob
    leftover = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python3", "specdec:cpu", "-c",
                               "import os; print(os.path.exists('/run/secrets/ca'))"],
                              capture_output=True, text=True)
    assert leftover.stdout.strip() == "False", "a CA secret file is in the image"
    results["hardening"] = "uid 10001, read-only root, tmpfs /tmp and /app; no CA or key in history, inspect or filesystem"
    log("hardening: " + results["hardening"])


def client_flags(certs: Path) -> list[str]:
    """`specdec generate` flags for a client with the certificate and token of ``certs`` (copies this
    user may read: the service files belong to uid 10001)."""
    client = Path(tempfile.mkdtemp(prefix="specdec-client-"))
    for f in ("ca.pem", "client.pem", "client.key", "token"):
        shutil.copy(certs / f, client / f)
    return ["--tls-ca", str(client / "ca.pem"), "--tls-client-cert", str(client / "client.pem"),
            "--tls-client-key", str(client / "client.key"), "--auth-token-file", str(client / "token")]


def tls_check(compose: list[str], env: dict, prompt: str, reference: list[int], max_tokens: int) -> None:
    certs = Path(tempfile.mkdtemp(prefix="specdec-certs-"))
    run([SPECDEC, "certs", str(certs)], capture=True)
    os.chmod(certs, 0o755)
    if os.geteuid() == 0:
        for p in [certs, *certs.iterdir()]:
            os.chown(p, int(UID), int(UID))
    tls_env = {**env, "SPECDEC_CERTS_DIR": str(certs)}
    if not any(c.endswith("/jaeger") or "jaeger" in c for c in docker("ps", "--format", "{{.Image}}").split()):
        tls_env["OTEL_TRACES_EXPORTER"] = "none"  # as `make up` does without the telemetry profile
    tls = [*compose, "-p", PROJECT, "-f", str(COMPOSE_FILE), "-f", str(TLS_FILE), "--profile", "cpu"]
    try:
        t0 = time.monotonic()
        run([*tls, "up", "-d", "--no-build"], env=tls_env, timeout=900)
        wait_healthy(3600)
        results["tls_up_to_healthy_s"] = round(time.monotonic() - t0, 1)
        log(f"TLS overlay healthy after {results['tls_up_to_healthy_s']}s")
        good = client_flags(certs)
        out = generate(prompt, max_tokens, "tree", extra=good)
        assert list(out["token_ids"]) == reference, "TLS: output differs from the target's"
        no_token = generate(prompt, 4, "tree", extra=good[:6], check=False)
        plaintext = generate(prompt, 4, "tree", check=False)
        assert no_token.returncode != 0, "TLS: a client without the token was served"
        assert plaintext.returncode != 0, "TLS: a plaintext client was served"
        results["tls"] = "healthy; client with certificate and token generated the reference output; " \
                         "without token and plaintext refused"
        log("TLS: " + results["tls"])
        shutil.rmtree(Path(good[1]).parent, ignore_errors=True)
    finally:
        run([*tls, "--profile", "telemetry", "down", "--remove-orphans"], env=tls_env, check=False, timeout=600)
        shutil.rmtree(certs, ignore_errors=True)


# --------------------------------------------------------------------------- swarm

STACK = "specdec"  # the Makefile's stack name (`make stack-up` / `make stack-down`)
STACK_REPLICAS = {"verify": 1, "draft-0": 2, "orchestrator": 1}


def stack_tasks(service: str) -> list[dict]:
    """The running containers of one of the stack's services: id, state and health."""
    ids = docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_{service}").split()
    return [json.loads(docker("inspect", "--format", "{{json .}}", c)) for c in ids]


def wait_stack_healthy(timeout: float, replicas: dict = STACK_REPLICAS) -> None:
    """Until each service has its replicas' containers running and healthy."""
    t0 = time.monotonic()
    while True:
        counts = {s: sum(t["State"].get("Health", {}).get("Status") == "healthy" for t in stack_tasks(s)) for s in replicas}
        if all(counts[s] >= n for s, n in replicas.items()):
            return
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"stack not healthy after {timeout:.0f}s: {counts}\n" + docker("service", "ls"))
        time.sleep(5)


def connected_task(service: str, port: int) -> dict:
    """The task of ``service`` that the orchestrator holds an open connection to on ``port`` (its
    /proc/net/tcp: the remote address of an established socket), so the fault hits the replica in use."""
    orchestrator = stack_tasks("orchestrator")[0]["Id"]
    remote = set()
    for line in docker("exec", orchestrator, "cat", "/proc/net/tcp").splitlines()[1:]:
        fields = line.split()
        address, state = fields[2], fields[3]
        ip_hex, port_hex = address.split(":")
        if state == "01" and int(port_hex, 16) == port:  # 01: ESTABLISHED
            remote.add(".".join(str(b) for b in reversed(bytes.fromhex(ip_hex))))
    for task in stack_tasks(service):
        ips = {n["IPAddress"] for n in task["NetworkSettings"]["Networks"].values()}
        if ips & remote:
            return task
    raise SystemExit(f"the orchestrator holds no connection to a {service} task ({sorted(remote)})")


def kill_and_replace(service: str, port: int, prompt: str, max_tokens: int, extra: list[str], reference: list[int]) -> str:
    """`docker kill` the task of ``service`` in use mid-generation: the output must stay the
    reference, and Swarm must start a new task that becomes healthy."""
    victim = connected_task(service, port)["Id"]
    killed_at = []

    def fault() -> None:
        killed_at.append(time.monotonic())
        docker("kill", victim)

    out = generate_with_fault(prompt, max_tokens, "tree", fault, delay=4, extra=extra)
    assert out["token_ids"] == reference, f"{service} task killed: output changed"
    generation_s = time.monotonic() - killed_at[0]
    t0 = killed_at[0]
    while True:
        fresh = [t for t in stack_tasks(service) if t["Id"] != victim
                 and t["State"].get("Health", {}).get("Status") == "healthy"]
        if len(fresh) >= STACK_REPLICAS[service] and victim not in [t["Id"] for t in stack_tasks(service)]:
            break
        assert time.monotonic() - t0 < 1800, f"the killed {service} task was not replaced"
        time.sleep(3)
    return (f"same output (the generation ended {generation_s:.0f}s after the kill); Swarm replaced the task, "
            f"healthy {time.monotonic() - t0:.0f}s after the kill")


def swarm_check(env: dict, prompt: str, fault_tokens: int, skip_faults: bool) -> None:
    """The stack on a one-node swarm (step 10 of this module's steps)."""
    if docker("info", "--format", "{{.Swarm.LocalNodeState}}") != "inactive":
        results["swarm"] = "skipped: this engine is in a swarm already (a test stack is deployed only on a swarm of its own)"
        log(results["swarm"])
        return
    # Heartbeats every 20 s instead of 5: on a small node whose cores the model services saturate
    # while they load, a missed 5 s heartbeat makes the swarm restart every task of the node.
    docker("swarm", "init", "--advertise-addr", "127.0.0.1", "--dispatcher-heartbeat", "20s")
    node = docker("info", "--format", "{{.Swarm.NodeID}}")
    docker("node", "update", "--label-add", "specdec.verify=true", "--label-add", "specdec.draft=true", node)
    certs = Path(tempfile.mkdtemp(prefix="specdec-swarm-certs-"))
    run([SPECDEC, "certs", str(certs)], capture=True)
    client = client_flags(certs)
    try:
        t0 = time.monotonic()
        run(["make", "stack-up", f"CERTS_DIR={certs}"], env=env, timeout=600)
        wait_stack_healthy(3600)
        results["swarm_up_to_healthy_s"] = round(time.monotonic() - t0, 1)
        log(f"stack healthy after {results['swarm_up_to_healthy_s']}s: " + docker("service", "ls", "--format",
                                                                                  "{{.Name}} {{.Replicas}}").replace("\n", ", "))
        reference = generate(prompt, fault_tokens, "autoregressive", extra=client)["token_ids"]
        tree = generate(prompt, fault_tokens, "tree", extra=client)
        assert tree["token_ids"] == reference, "swarm: tree output differs from the target alone"
        assert generate(prompt, 4, "tree", extra=client[:6], check=False).returncode != 0, "swarm: served without the token"
        results["swarm"] = "healthy (1 verify, 2 drafts, orchestrator); tree == autoregressive; no token refused"
        if not skip_faults:
            results["swarm_draft_kill"] = kill_and_replace("draft-0", 50053, prompt, fault_tokens, client, reference)
            log("swarm, draft task killed: " + results["swarm_draft_kill"])
            results["swarm_verify_kill"] = kill_and_replace("verify", 50052, prompt, fault_tokens, client, reference)
            log("swarm, verify task killed: " + results["swarm_verify_kill"])
    finally:
        run(["make", "stack-down"], env=env, check=False, timeout=300)
        t0 = time.monotonic()  # the stack's network goes once its containers have
        while docker("network", "ls", "-q", "--filter", f"name={STACK}_default", check=False) and time.monotonic() - t0 < 120:
            time.sleep(2)
        docker("swarm", "leave", "--force", check=False)
        shutil.rmtree(certs, ignore_errors=True)
        shutil.rmtree(Path(client[1]).parent, ignore_errors=True)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-base", default=os.environ.get("CPU_BASE", ""),
                    help="base image for the cpu variant (default: specdec-base:bookworm, built here when missing)")
    ap.add_argument("--no-host-pip", action="store_true", help="do not pass this machine's pip configuration to the build")
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--fault-tokens", type=int, default=128, help="tokens for the fault runs (long enough to hit mid-way)")
    ap.add_argument("--skip-faults", action="store_true")
    ap.add_argument("--skip-tls", action="store_true")
    ap.add_argument("--skip-swarm", action="store_true", help="no Docker Swarm stack step")
    ap.add_argument("--only-swarm", action="store_true", help="the images and the Swarm stack step alone")
    ap.add_argument("--skip-local", action="store_true", help="no `specdec generate --local` reference on the host")
    ap.add_argument("--remove-volumes", action="store_true", help="`make down VOLUMES=1`: delete the fetched models too")
    ap.add_argument("--healthy-timeout", type=float, default=3600)
    args = ap.parse_args()
    (ROOT / "logs").mkdir(exist_ok=True)

    dockerd = ensure_engine()
    compose = compose_cli()
    results["engine"] = docker("version", "--format", "{{.Server.Version}}")
    results["compose"] = " ".join(compose)
    env = dict(os.environ)
    if not args.no_host_pip:
        env["HOST_PIP"] = "1"
    make_vars = ["COMPOSE_CLI=" + " ".join(compose), "PROFILE=cpu", "TELEMETRY=auto"]
    up = False
    try:
        # ---- base image and build
        base = args.cpu_base
        if not base:
            base = "specdec-base:bookworm"
            if subprocess.run(["docker", "image", "inspect", base], capture_output=True).returncode != 0:
                t0 = time.monotonic()
                run(["make", "base-image", f"BASE_IMAGE={base}"], env=env)
                results["base_image_build_s"] = round(time.monotonic() - t0, 1)
        env["CPU_BASE"] = base
        results["cpu_base"] = base
        for key, label in (("build_s", "build"), ("build_cached_s", "build again (cache)")):
            t0 = time.monotonic()
            run(["compose/build-image.sh", "cpu"], env=env)
            results[key] = round(time.monotonic() - t0, 1)
            log(f"{label}: {results[key]}s")
        size = int(docker("image", "inspect", "-f", "{{.Size}}", "specdec:cpu"))
        results["image_size_mb"] = round(size / 1e6)
        results["base_size_mb"] = round(int(docker("image", "inspect", "-f", "{{.Size}}", base)) / 1e6)
        log(f"specdec:cpu is {results['image_size_mb']} MB (base {results['base_size_mb']} MB)")
        if args.only_swarm:
            swarm_check(env, args.prompt, args.fault_tokens, args.skip_faults)
            return 0

        # ---- a host reference, before the containers take the cores and memory
        local_ref = None
        if not args.skip_local and (Path.home() / ".cache" / "specdec" / "models").is_dir():
            local_ref = generate(args.prompt, args.max_tokens, "autoregressive", local=True)["token_ids"]
            log(f"host `generate --local` (target alone): {len(local_ref)} tokens")

        # ---- up
        t0 = time.monotonic()
        run(["make", "up", *make_vars], env=env, timeout=1800)
        wait_healthy(args.healthy_timeout)
        results["up_to_healthy_s"] = round(time.monotonic() - t0, 1)
        up = True
        log(f"make up -> all healthy: {results['up_to_healthy_s']}s")

        # ---- generation equality
        ref = generate(args.prompt, args.max_tokens, "autoregressive")
        tree = generate(args.prompt, args.max_tokens, "tree")
        seq = generate(args.prompt, args.max_tokens, "sequential")
        results["output"] = tree["text"]
        log("generated (tree):\n" + args.prompt + tree["text"])
        assert tree["token_ids"] == ref["token_ids"], "tree output differs from the target alone"
        assert seq["token_ids"] == ref["token_ids"], "sequential output differs from the target alone"
        if local_ref is not None:
            assert ref["token_ids"] == local_ref, "containers' target output differs from the host's --local run"
        results["equality"] = ("tree == sequential == autoregressive (target alone)"
                               + (" == host --local autoregressive" if local_ref is not None else ""))
        log("equal: " + results["equality"])

        check_hardening(env.get("CA_CERT") or "/etc/ssl/certs/ca-certificates.crt")

        # ---- faults
        if not args.skip_faults:
            long_ref = generate(args.prompt, args.fault_tokens, "autoregressive")["token_ids"]
            # `docker kill`: the orchestrator goes on without the draft, the output stays.
            restarts = containers()["draft-cpu"]["RestartCount"]
            draft = container_id("draft-cpu")
            out = generate_with_fault(args.prompt, args.fault_tokens, "tree",
                                      lambda: docker("kill", draft), delay=4)
            assert out["token_ids"] == long_ref, "draft killed: output changed"
            t0 = time.monotonic()
            while containers()["draft-cpu"]["RestartCount"] <= restarts and time.monotonic() - t0 < 30:
                time.sleep(2)
            if containers()["draft-cpu"]["RestartCount"] > restarts:
                note = "restarted by its restart policy"
            else:
                # Docker Engine records `docker kill` as a deliberate stop, which no restart policy
                # undoes (20.10 here); `make up` starts it again.
                run(["make", "up", *make_vars], env=env, timeout=900)
                note = f"Docker {results['engine']} treats docker kill as a deliberate stop: `make up` started it again"
            wait_healthy(900)
            results["draft_docker_kill"] = f"same output; {note}; healthy after {time.monotonic() - t0:.0f}s"
            log("docker kill draft: " + results["draft_docker_kill"])

            # A crash (its process SIGKILLed, as the kernel's OOM killer does): the restart policy.
            restarts = containers()["draft-cpu"]["RestartCount"]
            pid = containers()["draft-cpu"]["State"]["Pid"]
            out = generate_with_fault(args.prompt, args.fault_tokens, "tree",
                                      lambda: os.kill(pid, signal.SIGKILL), delay=4)
            assert out["token_ids"] == long_ref, "draft crashed: output changed"
            t0 = time.monotonic()
            while containers()["draft-cpu"]["RestartCount"] <= restarts:
                assert time.monotonic() - t0 < 120, "the crashed draft was not restarted"
                time.sleep(2)
            wait_healthy(900)
            results["draft_crash"] = f"same output; restarted (restart: unless-stopped), healthy after {time.monotonic() - t0:.0f}s"
            log("draft crash: " + results["draft_crash"])

            verify = container_id("verify-cpu")
            out = generate_with_fault(args.prompt, args.fault_tokens, "tree",
                                      lambda: docker("restart", "-t", "5", verify, timeout=300), delay=4)
            assert out["token_ids"] == long_ref, "verify restarted: output changed"
            wait_healthy(900)
            results["verify_restart"] = "same output"
            log("docker restart verify: " + results["verify_restart"])

        # ---- TLS overlay
        run(["make", "down", *make_vars], env=env, timeout=600)
        up = False
        if not args.skip_tls:
            tls_check(compose, env, args.prompt, tree["token_ids"], args.max_tokens)
        if not args.skip_swarm:
            swarm_check(env, args.prompt, args.fault_tokens, args.skip_faults)
    finally:
        if up:
            run(["make", "down", *make_vars], env=env, check=False, timeout=600)
        if args.remove_volumes:
            run(["make", "down", *make_vars, "VOLUMES=1"], env=env, check=False, timeout=600)
        (ROOT / "logs" / "container_check.json").write_text(json.dumps(results, indent=2))
        log("results: " + json.dumps(results, indent=2))
        stop_engine(dockerd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
