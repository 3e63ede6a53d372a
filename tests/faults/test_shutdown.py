"""Graceful shutdown of real service processes: on SIGTERM a service reports NOT_SERVING, refuses new
calls with UNAVAILABLE, lets the calls in flight finish (within ``--shutdown-grace-s``) and exits 0.

The orchestrator is checked with a long streamed generation over the tiny cluster's drafts and
verifier; the draft and verify services share their shutdown path (``start_server`` and
``serve_until_signalled``) with a small slow service run here, which makes "in flight" easy to hold.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.tools.cluster import free_port
from specdec.rpc.server import wait_until_serving
from specdec.v1 import generation_pb2, generation_pb2_grpc
from tiny_models import tiny_tokenizer

PROMPT = "def hello(x):"
LONG = 480  # tokens: the tiny target reaches no end-of-sequence on PROMPT and 13 + 480 fit its 512 positions
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_for_not_serving(address: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while health(address) != NOT_SERVING:
        assert time.monotonic() < deadline, f"{address} still reports SERVING after SIGTERM"
        time.sleep(0.05)


class InFlight(threading.Thread):
    """Runs ``call()`` in the background; ``started`` is set once it has visibly begun."""

    def __init__(self, call) -> None:
        super().__init__(daemon=True)
        self.call, self.started, self.result, self.error = call, threading.Event(), None, None

    def run(self) -> None:
        try:
            self.result = self.call(self.started)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.started.set()


def terminate(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------- the orchestrator


@pytest.fixture
def orchestrator(tiny_cluster, tiny_dirs, tmp_path):
    """An orchestrator process of its own over the session cluster's drafts and verifier."""
    port = free_port()
    log = open(tmp_path / "orchestrator.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "specdec.orchestrator", "--host", "127.0.0.1", "--port", str(port),
         "--target-model", str(tiny_dirs["target"]), "--verify-address", tiny_cluster.verify_address,
         "--draft-addresses", ",".join(tiny_cluster.draft_addresses), "--log-dir", "", "--shutdown-grace-s", "120"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    address = f"127.0.0.1:{port}"
    try:
        wait_until_serving(address, 120, alive=lambda: process.poll() is None)
        yield process, address, tmp_path / "orchestrator.log"
    finally:
        terminate(process)


def test_orchestrator_finishes_a_stream_in_flight_then_exits_0(orchestrator, reference):
    process, address, log = orchestrator
    request = generation_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=LONG, mode=generation_pb2.DECODING_MODE_AUTOREGRESSIVE)

    def stream(started):
        tokens = []
        with grpc.insecure_channel(address) as channel:
            for chunk in generation_pb2_grpc.GenerationServiceStub(channel).GenerateStream(request, timeout=300):
                tokens += chunk.token_ids
                started.set()
        return tokens

    in_flight = InFlight(stream)
    in_flight.start()
    assert in_flight.started.wait(120) and in_flight.error is None, in_flight.error
    process.send_signal(signal.SIGTERM)

    wait_for_not_serving(address)
    assert in_flight.is_alive(), "the generation ended before the check: make it longer"
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                generation_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=4), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in refused.value.details()

    in_flight.join(300)
    assert in_flight.error is None, f"the generation in flight failed: {in_flight.error}\n{log.read_text()}"
    assert in_flight.result == reference(tiny_tokenizer().encode(PROMPT), LONG)
    assert process.wait(60) == 0, log.read_text()


# --------------------------------------------------------------------------- the draft and verify services

SLOW_SERVICE = textwrap.dedent("""
    import sys, time, grpc
    from specdec.rpc.server import announce, serve_until_signalled, setup_logging, start_server

    def sleep(request, context):
        time.sleep(float(request.decode()))
        return b"slept"

    setup_logging()
    handler = grpc.method_handlers_generic_handler("test.Slow", {"Sleep": grpc.unary_unary_rpc_method_handler(sleep)})
    server, port, health = start_server(lambda s: s.add_generic_rpc_handlers((handler,)), ["test.Slow"], "127.0.0.1", int(sys.argv[1]))
    announce("slow", "127.0.0.1", port)
    serve_until_signalled(server, health, float(sys.argv[2]))
""")


@pytest.fixture
def slow_service(tmp_path):
    """``start(grace_s)`` runs a service whose ``Sleep(seconds)`` holds a call in flight."""
    processes = []

    def start(grace_s: float):
        port = free_port()
        log = tmp_path / f"slow-{port}.log"
        with open(log, "w") as out:
            process = subprocess.Popen([sys.executable, "-c", SLOW_SERVICE, str(port), str(grace_s)], stdout=out, stderr=subprocess.STDOUT)
        processes.append(process)
        address = f"127.0.0.1:{port}"
        wait_until_serving(address, 60, alive=lambda: process.poll() is None)
        return process, address, log

    yield start
    for process in processes:
        terminate(process)


def sleep_call(address: str, seconds: float):
    def call(started):
        with grpc.insecure_channel(address) as channel:
            sleep = channel.unary_unary("/test.Slow/Sleep")
            future = sleep.future(str(seconds).encode(), timeout=120)
            started.set()
            return future.result()
    return call


def test_service_finishes_the_call_in_flight_refuses_new_ones_and_exits_0(slow_service):
    process, address, log = slow_service(grace_s=60)
    in_flight = InFlight(sleep_call(address, 3))
    in_flight.start()
    in_flight.started.wait(10)
    time.sleep(0.5)  # the call has reached the server
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)

    wait_for_not_serving(address)
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/test.Slow/Sleep")(b"0", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    in_flight.join(60)
    assert in_flight.error is None and in_flight.result == b"slept", in_flight.error
    assert process.wait(30) == 0, log.read_text()
    assert time.monotonic() - signalled < 30, "it waited out the grace period instead of leaving when idle"


def test_grace_period_bounds_the_wait(slow_service):
    process, address, log = slow_service(grace_s=1)
    in_flight = InFlight(sleep_call(address, 60))
    in_flight.start()
    in_flight.started.wait(10)
    time.sleep(0.5)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, log.read_text()
    assert time.monotonic() - signalled < 15
    in_flight.join(30)
    assert isinstance(in_flight.error, grpc.RpcError), "a call cut off by the grace period ends with an error status"
    assert "still in flight" in log.read_text()


@pytest.mark.parametrize("service", ["draft", "verify"])
def test_model_service_exits_0_on_sigterm(service, tiny_dirs, tmp_path):
    port = free_port()
    model = ["--draft-model", str(tiny_dirs["draft"])] if service == "draft" else ["--target-model", str(tiny_dirs["target"])]
    log = tmp_path / f"{service}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", f"{service}_service", "--host", "127.0.0.1", "--port", str(port), *model],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(f"127.0.0.1:{port}", 120, alive=lambda: process.poll() is None)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()
        assert "shutting down" in log.read_text()
    finally:
        terminate(process)
