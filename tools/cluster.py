"""A local cluster: the verify service, one draft service per draft model and the orchestrator,
each a separate process on loopback, started in order and checked through grpc.health.v1.

Each child's flags come from its own settings object (``config.VerifySettings``, ``DraftSettings``,
``OrchestratorSettings``), built from the cluster's settings and the environment the child will
see, and turned into argv by ``config.to_argv``; the bearer token goes by environment only.

Used by ``specdec cluster up``, ``specdec generate --local``, the benchmarks and the integration
tests, so all of them exercise real processes talking real gRPC.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from specdec import config
from specdec.config import ClusterSettings
from specdec.rpc.server import check_port_free, wait_until_serving

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Children must not outlive a launcher that is killed outright (SIGKILL skips our cleanup), so each
# asks for SIGTERM when its parent dies (PR_SET_PDEATHSIG) before running its service module. The
# child does it itself rather than in a preexec_fn: a preexec_fn forces a plain fork(), and a fork
# while this process has gRPC threads running (health checks, an OTLP receiver in a test) can kill
# the child in gRPC's fork handlers before it ever runs.
_CHILD_BOOT = """
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
except OSError:
    pass
if os.getppid() != int(sys.argv.pop(1)):
    sys.exit(1)  # the launcher died before the request took effect
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


@dataclass
class Process:
    name: str
    address: str
    popen: subprocess.Popen
    log_path: Path | None
    metrics_address: str = ""  # host:port of its Prometheus /metrics, when metrics are on
    command: list[str] = field(default_factory=list)  # to start it again on the same port

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


#: The children's environment unless this one sets it: OpenMP threads that finish their work sleep
#: at once instead of spinning, so that services sharing the cores do not take turns burning them
#: (with spinning teams, 8 concurrent clients made a 2-core cluster 2.6 times slower than serving
#: them one after another).
CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass
class LocalCluster:
    settings: ClusterSettings
    quiet: bool = True  # children's output to log files instead of this terminal
    env: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    orchestrator_address: str = ""
    draft_addresses: list[str] = field(default_factory=list)
    verify_address: str = ""  # the first verify replica
    verify_addresses: list[str] = field(default_factory=list)
    http_url: str = ""  # the orchestrator's OpenAI-compatible HTTP API (http://host:port), when http_port is set
    proxies: list = field(default_factory=list)  # the delaying proxies in front of the verify services (verify_link_rtt_ms)

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> str:
        """Start every child and return the orchestrator's address. A fixed port already taken (the
        orchestrator's, or a metrics port) raises :class:`~specdec.rpc.server.PortInUse` at once,
        before any child loads a model."""
        s = self.settings
        self.check_ports()
        self.check_settings()
        self._logs = Path(tempfile.mkdtemp(prefix="specdec-cluster-"))
        if s.auth_token:
            # The token reaches the orchestrator in its environment: a command line is visible to every user.
            self.env = {**self.env, "SPECDEC_AUTH_TOKEN": s.auth_token}
        try:
            for r in range(max(1, s.verify_replicas)):
                # Metrics ports: the orchestrator's first, then the verify service's, the drafts', extra replicas'.
                verify = self._settings(config.VerifySettings, metrics_offset=1 if r == 0 else 1 + len(s.draft_models) + r,
                                        device=s.verify_device)
                self.verify_addresses.append(self._spawn("verify" if r == 0 else f"verify-{r}", "specdec.verify_service", verify).address)
                self._one_at_a_time()
            self.verify_address = self.verify_addresses[0]
            devices = s.draft_devices if len(s.draft_devices) == len(s.draft_models) else s.draft_devices[:1] * len(s.draft_models)
            for i, (model, device) in enumerate(zip(s.draft_models, devices)):
                draft = self._settings(config.DraftSettings, metrics_offset=2 + i, draft_model=model, device=device)
                self.draft_addresses.append(self._spawn(f"draft-{i}", "specdec.draft_service", draft).address)
                self._one_at_a_time()
            for process in self.processes:
                self._wait(process)
            self.orchestrator_address = self.add_orchestrator(port=s.port or free_port())
        except BaseException:
            self.stop()
            raise
        if s.http_port:
            self.http_url = f"{'https' if s.tls_cert else 'http'}://{HOST}:{s.http_port}"
        return self.orchestrator_address

    def add_orchestrator(self, name: str = "orchestrator", rtt_ms: float | None = None, **values) -> str:
        """Start an orchestrator over the cluster's services and wait until it serves; its address.
        The cluster's own, or another beside it with other settings (``values``: ``send_ahead``,
        ...; ``rtt_ms``: its link to the verify services, else the cluster's ``verify_link_rtt_ms``).
        It calls the others as a TLS client and asks its own callers for the bearer token, not for
        a client certificate."""
        rtt_ms = self.settings.verify_link_rtt_ms if rtt_ms is None else rtt_ms
        orchestrator = self._spawn(name, "specdec.orchestrator", self._settings(
            config.OrchestratorSettings, metrics_offset=0, tls_client_ca="", draft_addresses=self.draft_addresses,
            verify_address=",".join(self._far(self.verify_addresses, rtt_ms)),
            **({"metrics_port": 0, "http_port": 0} if name != "orchestrator" else {}), **values,
        ))
        self._wait(orchestrator)
        return orchestrator.address

    def _far(self, addresses: list[str], rtt_ms: float) -> list[str]:
        """The verify services as an orchestrator reaches them: through a delaying proxy each
        (:mod:`specdec.tools.delay_proxy`) when ``rtt_ms`` is set, else directly."""
        if not rtt_ms:
            return addresses
        from specdec.tools.delay_proxy import DelayProxy

        proxies = [DelayProxy(address, rtt_ms) for address in addresses]
        for proxy in proxies:
            self.proxies.append(proxy)
            proxy.start()
        return [proxy.address for proxy in proxies]

    def check_settings(self) -> None:
        """Raise :class:`~specdec.config.SettingError` when a child would refuse its settings (the
        cluster's, or a ``SPECDEC_*`` variable only the services read, such as SPECDEC_MAX_SESSIONS),
        before any child starts. The ports are placeholders here; :meth:`start` picks the real ones."""
        s = self.settings
        self._settings(config.VerifySettings, 0, device=s.verify_device, port=0)
        for model in s.draft_models:
            self._settings(config.DraftSettings, 0, draft_model=model, device=s.draft_devices[0] if s.draft_devices else "cpu", port=0)
        self._settings(config.OrchestratorSettings, 0, port=0, tls_client_ca="")

    def check_ports(self) -> None:
        """Raise :class:`~specdec.rpc.server.PortInUse` when a port the settings name is taken: the
        orchestrator's, its HTTP API's, or with metrics on, one of the metrics ports from
        ``metrics_port`` on (one for each child, at the offsets :meth:`start` gives them). The other
        ports are free ones."""
        s = self.settings
        children = 1 + max(1, s.verify_replicas) + len(s.draft_models)
        metrics = range(s.metrics_port, s.metrics_port + children) if s.metrics_port else []
        for port in (s.port, s.http_port, *metrics):
            check_port_free(HOST, port)

    def _settings(self, cls: type, metrics_offset: int, **values):
        """A child's settings: on loopback, on a free port unless ``values`` name one; what the
        cluster's settings say for the fields they share (models, dtype, speculation and its limits,
        TLS, the one trace file every service appends to); then ``values``; the rest from the
        environment the child runs in, as it would read them itself."""
        s = self.settings
        # The cluster's own port is the orchestrator's, passed in ``values``.
        shared = {f.name: getattr(s, f.name) for f in fields(cls) if hasattr(s, f.name) and f.name != "port"}
        shared["metrics_port"] = s.metrics_port + metrics_offset if s.metrics_port else 0
        values = {**shared, "host": HOST, **values}
        values.setdefault("port", free_port())
        return config.from_env(cls, environ={**os.environ, **self.env}, **values)

    def _spawn(self, name: str, module: str, settings) -> Process:
        log_path = self._logs / f"{name}.log" if self.quiet else None
        command = [sys.executable, "-c", _CHILD_BOOT, str(os.getpid()), module, *config.to_argv(settings)]
        popen = self._popen(name, command, log_path, "w")
        metrics_address = f"{HOST}:{settings.metrics_port}" if settings.metrics_port else ""
        process = Process(name, f"{HOST}:{settings.port}", popen, log_path, metrics_address, command)
        self.processes.append(process)
        return process

    def _popen(self, name: str, command: list[str], log_path: Path | None, mode: str) -> subprocess.Popen:
        out = open(log_path, mode) if log_path else None
        try:
            # Each child's spans under its own name (specdec-draft-0, specdec-verify-1, ...), the
            # name the orchestrator's records give it, as in the compose file.
            return subprocess.Popen(command, stdout=out or sys.stderr, stderr=subprocess.STDOUT,
                                    env={**CHILD_ENV, **os.environ, **self.env, "OTEL_SERVICE_NAME": f"specdec-{name}"})
        finally:
            if out:
                out.close()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop one service abruptly (a crash, for fault tests); ``restart`` brings it back."""
        process = self.process(name)
        if process.popen.poll() is None:
            process.popen.send_signal(sig)
        process.popen.wait()

    def restart(self, name: str, wait: bool = True) -> Process:
        """Start a stopped (or running: it is killed first) service again on the same address.

        Call it from a thread that outlives the service: every child asks for SIGTERM when the
        thread that started it ends (PR_SET_PDEATHSIG), so a short-lived thread would stop it."""
        process = self.process(name)
        self.kill(name)
        process.popen = self._popen(process.name, process.command, process.log_path, "a")
        if wait:
            self._wait(process)
        return process

    def _one_at_a_time(self) -> None:
        """Where the services share this machine's CPU, let the one just started load and calibrate
        before the next starts: a cost curve measured while a neighbour computes too is the
        neighbour's as much as its own (a 0.5B draft measured 197 ms a step beside a calibrating
        target, against 40 ms alone), and the orchestrator prices every round with it."""
        s = self.settings
        if s.verify_device == "cpu" and "cpu" in s.draft_devices:
            self._wait(self.processes[-1])

    def _wait(self, process: Process) -> None:
        try:
            wait_until_serving(process.address, self.settings.startup_timeout_s, alive=lambda: process.popen.poll() is None,
                               tls=self.settings)
        except (RuntimeError, TimeoutError) as exc:
            tail = process.log_tail()
            code = process.popen.poll()
            # A service that refused its settings or its model says why in one line ("specdec
            # verify: cannot start: ..."): that line is the whole story, the rest of its log is not.
            refusal = next((line for line in reversed(tail.splitlines()) if " cannot start: " in line), None)
            if code is not None and refusal:
                raise RuntimeError(f"{process.name} did not start (exit status {code}): {refusal.strip()}") from None
            status = f" (exit status {code})" if code is not None else ""
            raise RuntimeError(f"{process.name} did not start{status}: {exc}\n{tail}") from None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the orchestrator first, so that it finishes its generations while the drafts and
        the verifier still answer, then the others; whatever outlives ``grace_s`` is killed."""
        deadline = time.monotonic() + grace_s
        front = [p for p in self.processes if p.name.startswith("orchestrator")]
        for group in (front, [p for p in self.processes if p not in front]):
            for process in group:
                if process.popen.poll() is None:
                    process.popen.send_signal(signal.SIGTERM)
            for process in group:
                try:
                    process.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.popen.kill()
                    process.popen.wait()
        self.processes.clear()
        for proxy in self.proxies:
            proxy.stop()
        self.proxies.clear()

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def supervise(self, supervisor: "Supervisor", now: float | None = None) -> list[str]:
        """One look at every child: a child that has exited is started again on its address once
        its backoff has passed (without waiting for it to serve: the orchestrator skips a draft, or
        retries the verifier, until it answers). Returns what happened, one line per event."""
        now = time.monotonic() if now is None else now
        events = []
        for process in self.processes:
            code = process.popen.poll()
            if code is None:
                supervisor.running(process.name, now)
                continue
            due = supervisor.exited(process.name, now)
            if due is None:
                continue
            if now >= due:
                process.popen = self._popen(process.name, process.command, process.log_path, "a")
                supervisor.restarted(process.name, now)
                events.append(f"{process.name} exited with status {code}; restarted "
                              f"(restart {supervisor.restarts[process.name]})")
            elif supervisor.announce(process.name):
                events.append(f"{process.name} exited with status {code}; restarting in {due - now:.0f} s")
        return events


@dataclass
class Supervisor:
    """Restart backoff for a cluster's children, as compose's ``restart`` policy does: a child that
    exits is started again after ``base_s``, doubling with each exit in a row up to ``max_s``; one
    that has stayed up ``stable_s`` starts from ``base_s`` again."""

    base_s: float = 1.0
    max_s: float = 30.0
    stable_s: float = 60.0
    restarts: dict[str, int] = field(default_factory=dict)  # total restarts per child
    _streak: dict[str, int] = field(default_factory=dict)  # exits in a row
    _since: dict[str, float] = field(default_factory=dict)  # when it was last (re)started
    _due: dict[str, float] = field(default_factory=dict)  # when an exited child is started again
    _told: set[str] = field(default_factory=set)

    def running(self, name: str, now: float) -> None:
        self._since.setdefault(name, now)
        if now - self._since[name] >= self.stable_s:
            self._streak[name] = 0

    def exited(self, name: str, now: float) -> float:
        if name not in self._due:
            streak = self._streak.get(name, 0)
            self._due[name] = now + min(self.max_s, self.base_s * 2**streak)
            self._streak[name] = streak + 1
        return self._due[name]

    def announce(self, name: str) -> bool:
        """True once per exit: the first time the wait is reported."""
        if name in self._told:
            return False
        self._told.add(name)
        return True

    def restarted(self, name: str, now: float) -> None:
        self._due.pop(name, None)
        self._told.discard(name)
        self._since[name] = now
        self.restarts[name] = self.restarts.get(name, 0) + 1
