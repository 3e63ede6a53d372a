"""Hostile and careless clients against a real cluster on the tiny models, over real sockets: a
stream that is never read, a generation past the server's own deadline, a queue wait past its bound,
a request head sent a byte at a time, a body that never ends, more connections than allowed, and
huge or endless chat requests. Each time the door keeps serving: an honest request is answered in
its normal time and no slot or session is left behind.

The cluster here is this module's own, with one generation slot and short limits, so that one
misbehaving client is enough to take the door down if a limit does not hold.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from specdec import config
from specdec.v1 import common_pb2, generation_pb2, generation_pb2_grpc

STALL_S = 3.0  # stall_timeout_s
GENERATION_S = 60.0  # generation_timeout_s (the deadline is tested on a cluster of its own)
QUEUE_WAIT_S = 1.0  # max_queue_wait_s
HEAD_S = 1.5  # http_read_timeout_s
MAX_CONNECTIONS = 8
MAX_MESSAGES = 16
HONEST_S = 20  # what an honest short request may take here, queueing behind a freed slot included


def start_cluster(tiny_dirs, **limits):
    from specdec.tools.cluster import LocalCluster

    settings = config.from_env(config.ClusterSettings, target_model=str(tiny_dirs["target"]), draft_models=[str(tiny_dirs["draft"])],
                               port=0, log_dir="", startup_timeout_s=120, **limits)
    return LocalCluster(settings)


@pytest.fixture(scope="module")
def cluster(tiny_dirs, tmp_path_factory):
    from conftest import TINY_CHAT_TEMPLATE
    from specdec.tools.cluster import free_port

    template = tmp_path_factory.mktemp("chat") / "template.jinja"
    template.write_text(TINY_CHAT_TEMPLATE)
    limits = dict(
        http_port=free_port(),
        chat_template=str(template),
        max_active_generations=1,
        max_queued_generations=2,
        stall_timeout_s=STALL_S,
        generation_timeout_s=GENERATION_S,
        max_queue_wait_s=QUEUE_WAIT_S,
        http_read_timeout_s=HEAD_S,
        max_connections=MAX_CONNECTIONS,
        max_chat_messages=MAX_MESSAGES,
    )
    with start_cluster(tiny_dirs, **limits) as running:
        channel = grpc.insecure_channel(running.orchestrator_address)
        running.stub = generation_pb2_grpc.GenerationServiceStub(channel)
        honest(running)  # warm: the baseline is a serving orchestrator's
        running.baseline = orchestrator_usage(running)
        yield running
        channel.close()


def orchestrator_usage(cluster) -> tuple[int, int]:
    """(threads, resident MiB) of the orchestrator's process."""
    (process,) = [p for p in cluster.processes if p.name == "orchestrator"]
    status = dict(line.split(":", 1) for line in open(f"/proc/{process.popen.pid}/status").read().splitlines() if ":" in line)
    return int(status["Threads"]), int(status["VmRSS"].split()[0]) >> 10


def host_port(cluster) -> tuple[str, int]:
    host, port = cluster.http_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def post(cluster, path: str, body: dict, timeout: float = HONEST_S, headers: dict | None = None):
    """(status, headers, JSON body) of one request."""
    request = urllib.request.Request(cluster.http_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        json_body = error.headers.get("content-type", "").startswith("application/json")
        return error.code, dict(error.headers), json.loads(text) if json_body else text.decode()


def honest(cluster) -> float:
    """Seconds an honest short completion takes, as an honest client makes it: on 429 it waits as
    Retry-After says and tries again. It must succeed."""
    start = time.monotonic()
    while True:
        status, headers, body = post(cluster, "/v1/completions", {"prompt": "def f(x):", "max_tokens": 8, "mode": "autoregressive"})
        if status != 429 or time.monotonic() - start > HONEST_S:
            break
        time.sleep(float({k.lower(): v for k, v in headers.items()}["retry-after"]))
    assert status == 200, body
    assert body["usage"]["completion_tokens"] >= 1
    return time.monotonic() - start


def generations_in_flight(cluster) -> int:
    info = cluster.stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10)
    return info.active_sessions


def wait_idle(cluster, timeout_s: float = 15.0) -> None:
    """Until no generation runs or waits, and the model services hold no session."""
    deadline = time.monotonic() + timeout_s
    addresses = [cluster.verify_address, *cluster.draft_addresses]
    while True:
        counts = [generations_in_flight(cluster)]
        for address in addresses:
            with grpc.insecure_channel(address) as channel:
                from specdec.v1 import verify_pb2_grpc

                stub = verify_pb2_grpc.VerifyServiceStub(channel) if address == cluster.verify_address else None
                if stub is None:
                    from specdec.v1 import draft_pb2_grpc

                    stub = draft_pb2_grpc.DraftServiceStub(channel)
                counts.append(stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10).active_sessions)
        if not any(counts):
            return
        assert time.monotonic() < deadline, f"still busy: generations and sessions {counts}"
        time.sleep(0.1)


def open_stream(cluster, body: dict, receive_buffer: int = 4096) -> socket.socket:
    """A raw HTTP/1.1 streaming request whose response the caller then never reads."""
    host, port = host_port(cluster)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connect: a small window
    sock.connect((host, port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port, len(data), data))
    return sock


def drain(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything left to read until the server closes the connection (or stops sending)."""
    sock.settimeout(timeout_s)
    chunks = []
    try:
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


# Big events (20 alternatives a token) and a long generation: about a megabyte, more than every
# buffer on the way holds.
LONG_STREAM = {"messages": [{"role": "user", "content": "def f(x):"}], "max_tokens": 400, "stream": True,
               "ignore_eos": True, "logprobs": True, "top_logprobs": 20, "mode": "autoregressive"}


def test_a_stream_never_read_frees_its_slot(cluster):
    """A streaming client that reads nothing: once its output fills the socket, the generation
    stops within the stall timeout (well before the generation deadline would stop it) and the one
    slot serves an honest request; the stream was cut, not finished."""
    wait_idle(cluster)
    sock = open_stream(cluster, LONG_STREAM)
    try:
        time.sleep(0.5)
        assert generations_in_flight(cluster) == 1
        start = time.monotonic()
        honest(cluster)  # waits for the slot, which the stall frees
        assert time.monotonic() - start < HONEST_S
        wait_idle(cluster)
        assert b"[DONE]" not in drain(sock)
    finally:
        sock.close()


def test_a_grpc_stream_never_read_frees_its_slot(cluster):
    wait_idle(cluster)
    long = generation_pb2.GenerateRequest(prompt="def f(x):", max_new_tokens=480, ignore_eos=True, logprobs=True,
                                          top_logprobs=20, mode=generation_pb2.DECODING_MODE_AUTOREGRESSIVE)
    with grpc.insecure_channel(cluster.orchestrator_address, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]) as channel:
        stream = generation_pb2_grpc.GenerationServiceStub(channel).GenerateStream(long)
        next(stream)  # started; then nothing more is read
        time.sleep(0.5)
        start = time.monotonic()
        honest(cluster)
        assert time.monotonic() - start < HONEST_S
        wait_idle(cluster)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        assert caught.value.code() == grpc.StatusCode.CANCELLED, caught.value


def test_a_wait_for_a_slot_past_its_bound_is_refused_with_retry_after(cluster):
    """The one slot held (by a stream never read, until the stall timeout frees it): a request
    waits max_queue_wait_s for it, then gets 429 with Retry-After."""
    wait_idle(cluster)
    sock = open_stream(cluster, LONG_STREAM)
    try:
        time.sleep(0.3)
        assert generations_in_flight(cluster) == 1
        start = time.monotonic()
        status, headers, body = post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 4})
        waited = time.monotonic() - start
        assert status == 429, body
        assert QUEUE_WAIT_S - 0.2 < waited < STALL_S
        assert "slot" in body["error"]["message"] and body["error"]["type"] == "rate_limit_error"
        assert float({k.lower(): v for k, v in headers.items()}["retry-after"]) >= 1
        # The same over gRPC: RESOURCE_EXHAUSTED with gRPC's retry pushback.
        with pytest.raises(grpc.RpcError) as caught:
            cluster.stub.Generate(generation_pb2.GenerateRequest(prompt="x", max_new_tokens=4), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(caught.value.trailing_metadata())["grpc-retry-pushback-ms"] == str(int(QUEUE_WAIT_S * 1000))
    finally:
        sock.close()
    wait_idle(cluster)


def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(cluster):
    host, port = host_port(cluster)
    with socket.create_connection((host, port), timeout=10) as sock:
        start = time.monotonic()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 64
        closed = False
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - start > HEAD_S + 3:
                break
        if not closed:
            sock.settimeout(5)
            try:
                closed = sock.recv(1024) == b""
            except ConnectionResetError:
                closed = True
        assert closed, "the connection outlived the header timeout"
        assert time.monotonic() - start < HEAD_S + 5
    assert honest(cluster) < HONEST_S


def test_a_body_that_never_ends_is_refused(cluster):
    host, port = host_port(cluster)
    with socket.create_connection((host, port), timeout=15) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"prompt\": \"")
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert time.monotonic() - start < HEAD_S + 5


def test_more_connections_than_allowed_are_refused_and_the_rest_served(cluster):
    host, port = host_port(cluster)
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(MAX_CONNECTIONS + 4)]
    try:
        time.sleep(0.2)
        status, _, _ = post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 2}, timeout=10)
        assert status == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert honest(cluster) < HONEST_S


def test_idle_connections_are_closed_at_the_read_timeout(cluster):
    """Connections that never send a request head go at http_read_timeout_s: a flood of them
    holds the connection cap only that long."""
    host, port = host_port(cluster)
    idle = [socket.create_connection((host, port), timeout=HEAD_S + 5) for _ in range(MAX_CONNECTIONS + 4)]
    try:
        start = time.monotonic()
        for sock in idle:
            assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - start < HEAD_S + 3
        assert honest(cluster) < HONEST_S
    finally:
        for sock in idle:
            sock.close()


def test_too_many_chat_messages_are_refused_before_the_template(cluster):
    messages = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)
    start = time.monotonic()
    status, _, body = post(cluster, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert status == 400 and "messages" in body["error"]["message"], body
    assert time.monotonic() - start < 5


def test_a_huge_chat_prompt_is_refused_before_the_template(cluster):
    huge = "x" * 4_000_000
    start = time.monotonic()
    status, _, body = post(cluster, "/v1/chat/completions", {"messages": [{"role": "user", "content": huge}], "max_tokens": 2})
    assert status == 400 and "characters" in body["error"]["message"], body
    assert time.monotonic() - start < 5
    assert honest(cluster) < HONEST_S


def test_a_generation_past_the_servers_deadline_is_stopped(tiny_dirs):
    """A call that sets no deadline of its own gets the server's: a long generation is stopped there
    (DEADLINE_EXCEEDED), and its slot and sessions are freed."""
    with start_cluster(tiny_dirs, generation_timeout_s=0.5) as short:
        with grpc.insecure_channel(short.orchestrator_address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            long = generation_pb2.GenerateRequest(prompt="def f(x):", max_new_tokens=480, ignore_eos=True, logprobs=True,
                                                  top_logprobs=20, mode=generation_pb2.DECODING_MODE_AUTOREGRESSIVE)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(long, timeout=60)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
            assert "deadline" in caught.value.details()
            assert time.monotonic() - start < 10
            short.stub = stub
            wait_idle(short)


def raw_request(cluster, head: bytes, body: bytes = b"") -> bytes:
    """One raw HTTP/1.1 request; the whole reply."""
    host, port = host_port(cluster)
    with socket.create_connection((host, port), timeout=HONEST_S) as sock:
        sock.sendall(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        return drain(sock)


def test_web_pages_cannot_use_the_door_without_a_token(cluster):
    """No token set: a Host the server does not answer to (DNS rebinding), a cross-site Origin, and
    a body not sent as JSON (a cross-site form) are refused before any work; the door's own host passes."""
    body = json.dumps({"prompt": "def f(x):", "max_tokens": 2}).encode()
    rebound = raw_request(cluster, b"POST /v1/completions HTTP/1.1\r\nHost: attacker.example:8000\r\nContent-Type: application/json\r\n", body)
    assert rebound.startswith(b"HTTP/1.1 403") and b"attacker.example" in rebound
    host, port = host_port(cluster)
    here = b"Host: %s:%d\r\n" % (host.encode(), port)
    cross_site = raw_request(cluster, b"POST /v1/completions HTTP/1.1\r\n" + here
                             + b"Origin: https://attacker.example\r\nContent-Type: application/json\r\n", body)
    assert cross_site.startswith(b"HTTP/1.1 403")
    form = raw_request(cluster, b"POST /v1/completions HTTP/1.1\r\n" + here + b"Content-Type: text/plain\r\n", body)
    assert form.startswith(b"HTTP/1.1 415")
    models = raw_request(cluster, b"GET /v1/models HTTP/1.1\r\nHost: attacker.example\r\n")
    assert models.startswith(b"HTTP/1.1 403")
    health = raw_request(cluster, b"GET /health HTTP/1.1\r\nHost: attacker.example\r\n")
    assert health.startswith(b"HTTP/1.1 200")  # probes keep working whatever name they use
    same_site = raw_request(cluster, b"POST /v1/completions HTTP/1.1\r\n" + here
                            + b"Origin: http://localhost:3000\r\nContent-Type: application/json; charset=utf-8\r\n", body)
    assert same_site.startswith(b"HTTP/1.1 200"), same_site[:300]


def test_nothing_is_left_behind(cluster):
    """After every hostile client above (this module's order): no generation or session left, and
    the orchestrator's threads and memory back near where they were before them."""
    wait_idle(cluster)
    deadline = time.monotonic() + 10
    while True:
        threads, rss = orchestrator_usage(cluster)
        base_threads, base_rss = cluster.baseline
        if (threads <= base_threads + 8 and rss <= base_rss + 200) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert threads <= base_threads + 8, (threads, base_threads)  # pools may keep a few idle workers
    assert rss <= base_rss + 200, (rss, base_rss)  # MiB: a few bodies' worth of allocator slack at most
