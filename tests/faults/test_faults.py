"""Real faults in real processes: drafts and verifiers killed and restarted mid-generation, verify
replicas failing over, cancelled and timed-out requests, a full admission queue. Every completed
generation must equal the target's own greedy output; no session may be left behind."""

from __future__ import annotations

import os

import threading
import time

import grpc
import pytest

from specdec.tools.cluster import Supervisor
from specdec.v1 import common_pb2, draft_pb2_grpc, generation_pb2, generation_pb2_grpc, verify_pb2_grpc

RPC_TIMEOUT_S = 120
LONG = 400  # tokens: long enough that a fault lands mid-generation


def start_cluster(tiny_dirs, tmp_path, drafts=("draft",), replicas=1, env=None):
    from specdec.tools.cluster import LocalCluster
    from specdec import config

    settings = config.from_env(
        config.ClusterSettings,
        environ={**os.environ, **(env or {})},  # the cluster passes the settings it shares with a child, these too
        target_model=str(tiny_dirs["target"]),
        draft_models=[str(tiny_dirs[d]) for d in drafts],
        verify_replicas=replicas,
        port=0,
        log_dir=str(tmp_path / "logs"),
        startup_timeout_s=120,
        adaptive=False,  # every round drafts, as asked: the faults must land on drafting rounds
    )
    cluster = LocalCluster(settings, env=env or {})
    cluster.start()
    return cluster


class Stubs:
    def __init__(self, cluster) -> None:
        self.channels = []
        self.generation = generation_pb2_grpc.GenerationServiceStub(self._channel(cluster.orchestrator_address))
        self.verifies = [verify_pb2_grpc.VerifyServiceStub(self._channel(a)) for a in cluster.verify_addresses]
        self.drafts = [draft_pb2_grpc.DraftServiceStub(self._channel(a)) for a in cluster.draft_addresses]

    def _channel(self, address):
        self.channels.append(grpc.insecure_channel(address))
        return self.channels[-1]

    def sessions(self) -> list[int]:
        """Active sessions in the orchestrator, then every verify replica, then every draft."""
        out = []
        for stub in [self.generation, *self.verifies, *self.drafts]:
            try:
                out.append(stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5).active_sessions)
            except grpc.RpcError:
                out.append(-1)  # a service that is down holds nothing
        return out

    def wait_for_no_sessions(self, timeout_s: float = 10.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            counts = self.sessions()
            if not any(n > 0 for n in counts) or time.monotonic() > deadline:
                return counts
            time.sleep(0.05)

    def close(self):
        for c in self.channels:
            c.close()


def request(prompt_ids, mode, max_new_tokens=LONG, sampling=None, **spec):
    return generation_pb2.GenerateRequest(
        prompt_token_ids=prompt_ids,
        max_new_tokens=max_new_tokens,
        mode=getattr(generation_pb2, f"DECODING_MODE_{mode.upper()}"),
        speculation=generation_pb2.SpeculationParams(**spec),
        include_rounds=True,
        sampling=sampling,
    )


def collect(stream, on_first=None) -> tuple[list[int], list]:
    tokens, rounds = [], []
    for i, message in enumerate(stream):
        tokens.extend(message.token_ids)
        if message.HasField("round"):
            rounds.append(message.round)
        if i == 0 and on_first is not None:
            on_first()
    return tokens, rounds


PROMPT = [11, 40, 3, 77, 25, 60, 8]


@pytest.fixture(scope="module")
def cluster(tiny_dirs, tmp_path_factory):
    """Two verify replicas, two drafts and an orchestrator that runs one generation at a time with
    one more waiting, for the faults this module injects (one cluster: each start costs seconds)."""
    c = start_cluster(tiny_dirs, tmp_path_factory.mktemp("faults"), drafts=("draft", "other"), replicas=2,
                      env={"SPECDEC_MAX_ACTIVE_GENERATIONS": "1", "SPECDEC_MAX_QUEUED_GENERATIONS": "1"})
    stubs = Stubs(c)
    yield c, stubs
    stubs.close()
    c.stop()


NO_SESSIONS = [0] * 5  # orchestrator, two verify replicas, two drafts


def test_draft_killed_mid_generation_then_restarted(cluster, reference):
    c, stubs = cluster
    expected = reference(PROMPT, LONG)
    killed = threading.Event()

    def kill():
        c.kill("draft-0")
        killed.set()

    tokens, rounds = collect(stubs.generation.GenerateStream(request(PROMPT, "sequential", draft_length=3), timeout=RPC_TIMEOUT_S), kill)
    assert tokens == expected
    # The fault landed mid-generation: later rounds went on with the other draft alone.
    assert killed.is_set()
    without = [r for r in rounds if not any(p.draft.startswith("draft-0") for p in r.proposals)]
    assert without, "every round had draft-0's proposals: the kill came too late"
    assert any(r.proposals for r in without), "the surviving draft kept proposing"

    # While it is down, generations are still identical.
    down_tokens, _ = collect(stubs.generation.GenerateStream(request(PROMPT, "tree", max_new_tokens=40, beam_width=2, beam_depth=3), timeout=RPC_TIMEOUT_S))
    assert down_tokens == reference(PROMPT, 40)

    # The launcher's supervisor (what `specdec cluster up` runs) starts it again on the same address,
    # and the orchestrator brings it back within its backoff.
    supervisor = Supervisor(base_s=0.0)
    events = c.supervise(supervisor)
    assert [e for e in events if e.startswith("draft-0 exited") and e.endswith("restarted (restart 1)")], events
    assert c.supervise(supervisor) == []  # running again: nothing more to do
    deadline = time.monotonic() + 30
    while True:
        tokens, rounds = collect(stubs.generation.GenerateStream(request(PROMPT, "sequential", max_new_tokens=40, draft_length=3), timeout=RPC_TIMEOUT_S))
        assert tokens == reference(PROMPT, 40)
        if any(p.draft.startswith("draft-0") for r in rounds for p in r.proposals):
            break
        assert time.monotonic() < deadline, "draft-0 was not brought back after its restart"
        time.sleep(0.5)
    assert stubs.wait_for_no_sessions() == NO_SESSIONS


@pytest.mark.parametrize("mode, seed", [("autoregressive", 0), ("tree", 21)], ids=["greedy", "seeded"])
def test_verifier_restarted_mid_generation(cluster, reference, mode, seed):
    """Every verify replica restarted mid-generation: the output is what the target alone gives
    (greedy), or what autoregressive decoding alone samples with the same seed."""
    c, stubs = cluster
    sampling = generation_pb2.SamplingParams(temperature=1.0, top_k=8, seed=seed) if seed else None
    expected = reference(PROMPT, LONG) if not seed else list(stubs.generation.Generate(
        request(PROMPT, "autoregressive", sampling=sampling), timeout=RPC_TIMEOUT_S).token_ids)
    first, out = threading.Event(), {}

    def consume():
        try:
            out["result"] = collect(stubs.generation.GenerateStream(request(PROMPT, mode, sampling=sampling, beam_width=2, beam_depth=3)
                                                                    if mode == "tree" else request(PROMPT, mode), timeout=RPC_TIMEOUT_S), first.set)
        except grpc.RpcError as exc:
            out["error"] = exc

    reader = threading.Thread(target=consume)
    reader.start()
    assert first.wait(60)
    # Every replica killed outright, then started again on the same port while the generation
    # waits. (From this thread: a child started by a thread that ends gets SIGTERM, see
    # LocalCluster.restart.)
    c.kill("verify")
    c.kill("verify-1")
    c.restart("verify")
    c.restart("verify-1")
    reader.join(RPC_TIMEOUT_S)
    assert "error" not in out, out.get("error")
    tokens, rounds = out["result"]
    assert tokens == expected
    # One round waited for the restart: its verify time covers the new process's start-up.
    assert max(r.verify_ms for r in rounds) > 500
    assert stubs.wait_for_no_sessions() == NO_SESSIONS


def test_cancel_mid_stream_releases_every_session(cluster):
    c, stubs = cluster
    call = stubs.generation.GenerateStream(request(PROMPT, "tree", beam_width=2, beam_depth=3), timeout=RPC_TIMEOUT_S)
    next(call)
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert stubs.wait_for_no_sessions() == NO_SESSIONS


def test_unary_deadline_stops_rounds_and_releases_sessions(cluster):
    c, stubs = cluster
    with pytest.raises(grpc.RpcError) as err:
        stubs.generation.Generate(request(PROMPT, "autoregressive", max_new_tokens=500), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stubs.wait_for_no_sessions() == NO_SESSIONS


def test_verify_replicas_fail_over(cluster, reference):
    c, stubs = cluster
    expected = reference(PROMPT, LONG)
    # Sessions are spread over both replicas; kill whichever serves this one mid-generation.
    victim = []

    def kill_busy():
        counts = stubs.sessions()[1:3]
        victim.append("verify" if counts[0] >= counts[1] else "verify-1")
        c.kill(victim[0])

    tokens, _ = collect(stubs.generation.GenerateStream(request(PROMPT, "sequential", draft_length=3), timeout=RPC_TIMEOUT_S), kill_busy)
    assert tokens == expected
    # With one replica gone, every generation still completes on the other.
    for mode in ("autoregressive", "tree"):
        tokens, _ = collect(stubs.generation.GenerateStream(request(PROMPT, mode, max_new_tokens=30), timeout=RPC_TIMEOUT_S))
        assert tokens == reference(PROMPT, 30)
    c.restart(victim[0])
    assert stubs.wait_for_no_sessions() == NO_SESSIONS


def test_full_queue_is_refused_at_once(cluster, reference):
    c, stubs = cluster
    running = stubs.generation.GenerateStream(request(PROMPT, "autoregressive", max_new_tokens=300), timeout=RPC_TIMEOUT_S)
    next(running)  # one running
    queued = stubs.generation.Generate.future(request(PROMPT, "autoregressive", max_new_tokens=20), timeout=RPC_TIMEOUT_S)
    deadline = time.monotonic() + 10
    while stubs.sessions()[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stubs.generation.Generate(request(PROMPT, "autoregressive", max_new_tokens=20), timeout=RPC_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at capacity" in err.value.details()
    assert time.monotonic() - start < 1.0
    # The running and the queued requests both complete, correctly.
    collect(running)
    assert queued.result().token_ids == reference(PROMPT, 20)
    assert stubs.wait_for_no_sessions() == NO_SESSIONS
