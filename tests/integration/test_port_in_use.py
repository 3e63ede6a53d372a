"""One port, one server: a service asked for a port something already listens on refuses it at
once, naming it, before it loads a model or waits for another service; ``cluster up`` checks its
fixed ports before it starts a child; and two gRPC servers never share a port (no SO_REUSEPORT)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec import config
from specdec.rpc.server import PortInUse, check_port_free, start_server
from specdec.tools import cli
from specdec.tools.cluster import LocalCluster

HOST = "127.0.0.1"
REFUSED_WITHIN_S = 60  # a Python start-up importing torch, on a busy machine; loading would add more


@pytest.fixture
def taken():
    """A port with a plain socket listening on it."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        yield s.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def test_check_names_the_port_in_use(taken):
    with pytest.raises(PortInUse, match=f"port {HOST}:{taken} is in use"):
        check_port_free(HOST, taken)
    # The wildcard address covers loopback too.
    with pytest.raises(PortInUse, match=f"0.0.0.0:{taken}"):
        check_port_free("0.0.0.0", taken)


def test_check_passes_a_free_port_and_port_zero():
    check_port_free(HOST, free_port())
    check_port_free(HOST, 0)


def test_a_second_grpc_server_cannot_share_a_port():
    first, port, _ = start_server(lambda s: None, [], HOST, 0)
    try:
        with grpc.insecure_channel(f"{HOST}:{port}") as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        # gRPC's default (SO_REUSEPORT) would let this bind and take half of the new connections.
        with pytest.raises(RuntimeError):
            start_server(lambda s: None, [], HOST, port)
        with pytest.raises(PortInUse):
            check_port_free(HOST, port)
    finally:
        first.stop(0).wait()
    # Once the first has stopped, the port is free again at once (a restart on the same address),
    # its closed connection notwithstanding.
    check_port_free(HOST, port)
    again, bound, _ = start_server(lambda s: None, [], HOST, port)
    again.stop(0).wait()
    assert bound == port


@pytest.mark.parametrize("service", ["verify-port", "verify-metrics-port", "orchestrator"])
def test_service_refuses_a_port_in_use_before_loading(taken, tiny_dirs, service):
    if service == "orchestrator":
        # Nothing answers at the verify address: without the check it would wait there for minutes.
        command = ["specdec.orchestrator", "--port", str(taken), "--verify-address", f"{HOST}:{free_port()}"]
    else:
        ports = ["--port", str(taken)] if service == "verify-port" else ["--port", "0", "--metrics-port", str(taken)]
        command = ["specdec.verify_service", "--target-model", str(tiny_dirs["target"]), *ports]
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", *command, "--host", HOST], capture_output=True, text=True,
                         timeout=REFUSED_WITHIN_S)
    assert run.returncode == 1, run.stderr
    assert f"port {HOST}:{taken} is in use" in run.stderr, run.stderr
    assert "cannot start" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "loading" not in run.stderr, run.stderr  # refused before the model
    assert time.monotonic() - start < REFUSED_WITHIN_S


def test_cluster_checks_its_ports_before_starting_a_child(taken, tiny_dirs):
    for ports in ({"port": taken}, {"port": 0, "metrics_port": taken}):
        settings = config.from_env(config.ClusterSettings, target_model=str(tiny_dirs["target"]),
                                   draft_models=[str(tiny_dirs["draft"])], **ports)
        cluster = LocalCluster(settings)
        with pytest.raises(PortInUse, match=f"{HOST}:{taken}"):
            cluster.start()
        assert not cluster.processes


def test_cluster_up_on_a_port_in_use_exits_at_once(taken, tiny_dirs, capsys):
    start = time.monotonic()
    code = cli.main(["cluster", "up", "--port", str(taken), "--target-model", str(tiny_dirs["target"])])
    assert code == 1
    assert f"port {HOST}:{taken} is in use" in capsys.readouterr().err
    assert time.monotonic() - start < 5
