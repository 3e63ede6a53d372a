"""A local cluster: the verify service, one draft service per draft model and the orchestrator,
each a separate process on loopback, started in order and checked through grpc.health.v1.

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
from dataclasses import dataclass, field
from pathlib import Path

from specdec.config import ClusterSettings
from specdec.rpc.server import wait_until_serving


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

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> str:
        s = self.settings
        self._logs = Path(tempfile.mkdtemp(prefix="specdec-cluster-"))
        if s.auth_token:
            # The token reaches the orchestrator in its environment: a command line is visible to every user.
            self.env = {**self.env, "SPECDEC_AUTH_TOKEN": s.auth_token}
        try:
            for r in range(max(1, s.verify_replicas)):
                verify_port = free_port()
                self.verify_addresses.append(f"127.0.0.1:{verify_port}")
                # Extra replicas take metrics ports after the drafts'.
                self._spawn("verify" if r == 0 else f"verify-{r}", "specdec.verify_service", verify_port,
                            ["--target-model", s.target_model, "--device", s.verify_device, "--dtype", s.dtype],
                            metrics_offset=1 if r == 0 else 1 + len(s.draft_models) + r)
            self.verify_address = self.verify_addresses[0]
            devices = s.draft_devices if len(s.draft_devices) == len(s.draft_models) else s.draft_devices[:1] * len(s.draft_models)
            for i, (model, device) in enumerate(zip(s.draft_models, devices)):
                port = free_port()
                self.draft_addresses.append(f"127.0.0.1:{port}")
                self._spawn(f"draft-{i}", "specdec.draft_service", port,
                            ["--draft-model", model, "--device", device, "--dtype", s.dtype, "--draft-vocab", str(s.draft_vocab)], metrics_offset=2 + i)
            for process in self.processes:
                self._wait(process)
            port = s.port or free_port()
            speculation = [
                "--mode", s.mode, "--draft-length", str(s.draft_length), "--beam-width", str(s.beam_width),
                "--beam-depth", str(s.beam_depth), "--max-tree-nodes", str(s.max_tree_nodes), "--adaptive", str(s.adaptive),
                "--max-new-tokens", str(s.max_new_tokens), "--max-new-tokens-limit", str(s.max_new_tokens_limit),
            ]
            orchestrator = self._spawn("orchestrator", "specdec.orchestrator", port, [
                "--target-model", s.target_model, "--verify-address", ",".join(self.verify_addresses),
                "--draft-addresses", ",".join(self.draft_addresses), "--log-dir", s.log_dir, *speculation,
                # It calls the others as a TLS client and asks its own callers for the bearer token.
                "--tls-ca", s.tls_ca, "--tls-client-cert", s.tls_client_cert, "--tls-client-key", s.tls_client_key,
                "--auth-token-file", s.auth_token_file,
            ], metrics_offset=0)
            self._wait(orchestrator)
        except BaseException:
            self.stop()
            raise
        self.orchestrator_address = orchestrator.address
        return self.orchestrator_address

    def _spawn(self, name: str, module: str, port: int, args: list[str], metrics_offset: int = 0) -> Process:
        s = self.settings
        # Every service appends to the one trace file; metrics ports follow each other from metrics_port.
        metrics_port = s.metrics_port + metrics_offset if s.metrics_port else 0
        args = [*args, "--trace-file", s.trace_file, "--metrics-port", str(metrics_port)]
        # Every service presents the one server certificate; the draft and verify services also ask
        # for a client certificate (the orchestrator's), the public orchestrator for a bearer token.
        client_ca = "" if module == "specdec.orchestrator" else s.tls_client_ca
        args += ["--tls-cert", s.tls_cert, "--tls-key", s.tls_key, "--tls-client-ca", client_ca]
        log_path = self._logs / f"{name}.log" if self.quiet else None
        command = [sys.executable, "-c", _CHILD_BOOT, str(os.getpid()), module, "--host", "127.0.0.1", "--port", str(port), *args]
        popen = self._popen(command, log_path, "w")
        process = Process(name, f"127.0.0.1:{port}", popen, log_path, f"127.0.0.1:{metrics_port}" if metrics_port else "", command)
        self.processes.append(process)
        return process

    def _popen(self, command: list[str], log_path: Path | None, mode: str) -> subprocess.Popen:
        out = open(log_path, mode) if log_path else None
        try:
            return subprocess.Popen(command, stdout=out or sys.stderr, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
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
        process.popen = self._popen(process.command, process.log_path, "a")
        if wait:
            self._wait(process)
        return process

    def _wait(self, process: Process) -> None:
        try:
            wait_until_serving(process.address, self.settings.startup_timeout_s, alive=lambda: process.popen.poll() is None,
                               tls=self.settings)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{process.name} did not start: {exc}\n{process.log_tail()}") from None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the orchestrator first, so that it finishes its generations while the drafts and
        the verifier still answer, then the others; whatever outlives ``grace_s`` is killed."""
        deadline = time.monotonic() + grace_s
        front = [p for p in self.processes if p.name == "orchestrator"]
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

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)
