"""Several hosts: the verify service, two drafts and the orchestrator each in a network namespace of
its own, joined by veth links to one bridge. One draft's link is cut mid-generation; the output
must still be the target's own.

Needs root and ``ip netns`` (iproute2); skipped with the reason where either is missing. Fixed
ports are fine here: every namespace has a network stack of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

SUBNET = "10.213.{}.{}"
PORT = 50051
PROMPT = [11, 40, 3, 77, 25, 60, 8]
LONG = 400

# Runs inside the orchestrator's namespace: waits for the orchestrator, streams one generation,
# says FIRST after the first message (the test cuts the link then), and prints the result as JSON.
CLIENT = r"""
import json, sys
import grpc
from specdec.rpc.server import wait_until_serving
from specdec.v1 import generation_pb2, generation_pb2_grpc
address, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
wait_until_serving(address, 180)
stub = generation_pb2_grpc.GenerationServiceStub(grpc.insecure_channel(address))
tokens, rounds = [], []
request = generation_pb2.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=n, include_rounds=True,
    mode=generation_pb2.DECODING_MODE_SEQUENTIAL, speculation=generation_pb2.SpeculationParams(draft_length=3))
for i, message in enumerate(stub.GenerateStream(request, timeout=300)):
    tokens.extend(message.token_ids)
    if message.HasField("round"):
        rounds.append(sorted(p.draft.split(" ")[0] for p in message.round.proposals))
    if i == 0:
        print("FIRST", flush=True)
        sys.stdin.readline()  # the test answers once the link is cut
print(json.dumps({"tokens": tokens, "rounds": rounds}), flush=True)
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _netns_usable() -> str:
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"sdprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


class Hosts:
    """Namespaces on one bridge (in a namespace of its own, so the host's network is untouched)."""

    def __init__(self, names: list[str]) -> None:
        tag = str(os.getpid() % 100000)
        self.switch = f"sd{tag}-sw"
        self.ns = {name: f"sd{tag}-{name}" for name in names}
        self.ip = {name: SUBNET.format(0, i + 1) for i, name in enumerate(names)}
        self.port = {name: f"s{tag}{i}" for i, name in enumerate(names)}  # the bridge side of each link
        self.processes: list[subprocess.Popen] = []
        _ip("netns", "add", self.switch)
        self.sw("ip", "link", "add", "br0", "type", "bridge")
        self.sw("ip", "link", "set", "br0", "up")
        for i, name in enumerate(names):
            ns, host_end = self.ns[name], f"h{tag}{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", self.port[name])
            _ip("link", "set", host_end, "netns", ns)
            _ip("link", "set", self.port[name], "netns", self.switch)
            self.sw("ip", "link", "set", self.port[name], "master", "br0")
            self.sw("ip", "link", "set", self.port[name], "up")
            self.run(name, "ip", "link", "set", "lo", "up")
            self.run(name, "ip", "link", "set", host_end, "name", "eth0")
            self.run(name, "ip", "addr", "add", f"{self.ip[name]}/24", "dev", "eth0")
            self.run(name, "ip", "link", "set", "eth0", "up")

    def sw(self, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.switch, *cmd], check=True, capture_output=True)

    def run(self, name: str, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns[name], *cmd], check=True, capture_output=True)

    def spawn(self, name: str, cmd: list[str], log, **kwargs) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[name], *cmd], stdout=log, stderr=subprocess.STDOUT, **kwargs)
        self.processes.append(p)
        return p

    def cut(self, name: str) -> None:
        """The link between ``name`` and the bridge goes down: packets are lost, nothing is refused."""
        self.sw("ip", "link", "set", self.port[name], "down")

    def close(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
            p.wait()
        for ns in [*self.ns.values(), self.switch]:
            _ip("netns", "del", ns, check=False)


@pytest.fixture
def hosts():
    reason = _netns_usable()
    if reason:
        pytest.skip(reason)
    h = Hosts(["orchestrator", "verify", "draft0", "draft1"])
    yield h
    h.close()


def test_cut_draft_link_mid_generation(hosts, tiny_dirs, reference, tmp_path):
    python, log = sys.executable, open(tmp_path / "services.log", "w")
    addr = {name: f"{hosts.ip[name]}:{PORT}" for name in hosts.ns}
    common = ["--host", None, "--port", str(PORT)]

    def serve(name, module, *args):
        flags = list(common)
        flags[1] = hosts.ip[name]
        hosts.spawn(name, [python, "-m", module, *flags, *args], log)

    serve("verify", "specdec.verify_service.server", "--target-model", str(tiny_dirs["target"]))
    serve("draft0", "specdec.draft_service.server", "--draft-model", str(tiny_dirs["draft"]))
    serve("draft1", "specdec.draft_service.server", "--draft-model", str(tiny_dirs["draft"]))
    serve("orchestrator", "specdec.orchestrator.server", "--target-model", str(tiny_dirs["target"]),
          "--verify-address", addr["verify"], "--draft-addresses", f"{addr['draft0']},{addr['draft1']}",
          "--draft-timeout-ms", "2000", "--log-dir", "",
          # A private address in a namespace of its own, with no token: an open door on purpose.
          "--allow-open", "true",
          # Every round drafts, as asked: the tiny drafts cost what the tiny target does, so the
          # cost model could stop drafting and the cut would go unseen.
          "--adaptive", "false")
    client = hosts.spawn("orchestrator", [python, "-c", CLIENT, addr["orchestrator"], json.dumps(PROMPT), str(LONG)],
                         subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    line = client.stdout.readline()
    assert line.strip() == "FIRST", f"client said {line!r}; services: {(tmp_path / 'services.log').read_text()[-3000:]}"
    hosts.cut("draft0")
    client.stdin.write("\n")
    client.stdin.flush()
    out, _ = client.communicate(timeout=max(1, deadline - time.monotonic()))
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens"] == reference(PROMPT, LONG)
    rounds = result["rounds"]
    assert rounds[0] == ["draft-0", "draft-1"]  # both drafts served before the cut
    assert any(r == ["draft-1"] for r in rounds), "no round went on without the cut draft"
    log.close()
