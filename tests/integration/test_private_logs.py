"""Private by default: the orchestrator's run log of a generation keeps statistics and token counts
only; the prompt's and output's text and token ids (and each round's) go in only with --log-text.
A second orchestrator with the default settings runs beside the session cluster's (which logs text)
over the same verify and draft services, so that both log the same generations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specdec.records import REQUEST_TEXT_FIELDS, RESULT_TEXT_FIELDS, ROUND_TEXT_FIELDS, GenerationLog
from specdec.rpc.server import wait_until_serving
from specdec.tools import analyze, dashboard
from specdec.tools.cluster import free_port
from specdec.v1 import generation_pb2 as pb

PROMPT = "The quiet password of the mill is"
STOP = "zebra-never-seen"


@pytest.fixture(scope="module")
def private_orchestrator(tiny_cluster, tiny_dirs, tmp_path_factory):
    """An orchestrator with the default log settings (and the session cluster's adaptive=false, no lookup):
    (its address, its log directory)."""
    log_dir = tmp_path_factory.mktemp("private-logs")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECDEC_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "specdec.orchestrator", "--host", "127.0.0.1", "--port", str(port),
         "--target-model", str(tiny_dirs["target"]), "--verify-address", tiny_cluster.verify_address,
         "--draft-addresses", ",".join(tiny_cluster.draft_addresses), "--log-dir", str(log_dir), "--adaptive", "false",
         "--prompt-lookup", "false"],  # as the session cluster: the same rounds
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        wait_until_serving(f"127.0.0.1:{port}", 120, alive=lambda: process.poll() is None)
        yield f"127.0.0.1:{port}", log_dir
    finally:
        process.terminate()
        process.wait(30)


def request(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=PROMPT, max_new_tokens=16, mode=pb.DECODING_MODE_TREE, stop=[STOP],
                              speculation=pb.SpeculationParams(beam_width=2, beam_depth=3), logprobs=True,
                              request_id="private-1", **fields)


def logged(log_dir: Path, call) -> tuple[object, dict, str]:
    """Run ``call()``; return its reply, the one log it wrote under log_dir (parsed) and the file's text."""
    before = set(log_dir.glob("*.json"))
    reply = call()
    new = set(log_dir.glob("*.json")) - before
    assert len(new) == 1, sorted(new)
    raw = new.pop().read_text()
    return reply, json.loads(raw), raw


@pytest.fixture(scope="module")
def both_logs(private_orchestrator, tiny_cluster):
    """The same greedy generation logged by the private orchestrator and by the session cluster's
    (--log-text): (reply, private log, its file's text, text log)."""
    import grpc

    from specdec.v1 import generation_pb2_grpc

    address, log_dir = private_orchestrator
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        reply, private, raw = logged(log_dir, lambda: stub.Generate(request(), timeout=120))
    with grpc.insecure_channel(tiny_cluster.orchestrator_address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        text_reply, with_text, _ = logged(Path(tiny_cluster.settings.log_dir), lambda: stub.Generate(request(), timeout=120))
    assert list(text_reply.token_ids) == list(reply.token_ids)
    return reply, private, raw, with_text


def test_a_log_holds_no_text_by_default(both_logs):
    reply, private, raw, _ = both_logs
    assert private["with_text"] is False
    for key in (*RESULT_TEXT_FIELDS, "prompt", "prompt_token_ids", "token_texts"):
        assert key not in private, key
    assert not set(REQUEST_TEXT_FIELDS) & set(private["request"])
    assert private["request"]["stop_count"] == 1 and private["request"]["prompt_tokens"] == reply.stats.prompt_tokens
    assert len(private["rounds"]) == reply.stats.rounds >= 1
    for r in private["rounds"]:
        assert not set(ROUND_TEXT_FIELDS) & set(r), r
        assert set(r["token_counts"]) == {"accepted", "new_tokens", "bonus", "beams"}
    assert sum(r["token_counts"]["new_tokens"] for r in private["rounds"]) == len(reply.token_ids)
    for key in ("tokens_generated", "rounds", "draft_tokens_proposed", "draft_tokens_accepted", "bonus_tokens", "tree_nodes_total"):
        assert private["stats"][key] == getattr(reply.stats, key), key
    # Neither the prompt, nor the stop string, nor the output is anywhere in the file.
    for text in (PROMPT, "password", STOP, *(reply.text[i:i + 6] for i in range(0, max(0, len(reply.text) - 5), 6))):
        assert text not in raw, text
    assert json.dumps(list(reply.token_ids)) not in raw


def test_log_text_writes_the_text(both_logs):
    reply, _, _, with_text = both_logs
    assert "with_text" not in with_text
    assert with_text["text"] == reply.text and with_text["token_ids"] == list(reply.token_ids)
    assert "password" in with_text["prompt"] and len(with_text["prompt_token_ids"]) == reply.stats.prompt_tokens
    assert with_text["request"]["stop"] == [STOP] and "".join(with_text["token_texts"]) == reply.text
    assert all("accepted" in r and "proposals" in r for r in with_text["rounds"])


def test_the_analysis_of_a_private_log_is_the_same(both_logs):
    """Token counts are all the analysis needs: the same figures as from the log with the tokens."""
    _, private, _, with_text = both_logs
    assert GenerationLog.looks_like(private)
    mine, theirs = (analyze.run_metrics(GenerationLog.from_json(log)) for log in (private, with_text))
    for key in ("tokens_generated", "rounds", "accepted_tokens", "drafted_positions", "acceptance_rate", "alpha", "gamma",
                "corrections", "fallback_rounds", "by_draft", "acceptance_by_position", "tree_accepted_tokens"):
        assert mine[key] == theirs[key], key
    # Written again (a tool that rewrites a log), it stays without text.
    assert GenerationLog.from_json(private).to_json() == private


def test_streamed_generations_are_private_too(private_orchestrator):
    import grpc

    from specdec.v1 import generation_pb2_grpc

    address, log_dir = private_orchestrator
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        chunks, log, raw = logged(log_dir, lambda: list(stub.GenerateStream(request(), timeout=120)))
    assert log["with_text"] is False and "token_ids" not in log and PROMPT not in raw
    assert log["stats"]["tokens_generated"] == sum(len(c.token_ids) for c in chunks)


def test_analyze_and_dashboard_read_private_logs(both_logs, private_orchestrator, monkeypatch):
    from streamlit.testing.v1 import AppTest

    _, log_dir = private_orchestrator
    records = analyze.load_runs(log_dir)
    assert records and all(r["source"] == "orchestrator" and r["prompt_id"].startswith("prompt of ") for r in records)
    assert "expected (Leviathan et al.) vs measured" in analyze.report(records, analyze.summarise(records))
    monkeypatch.setattr("sys.argv", ["dashboard_app.py", "--log-dir", str(log_dir), "--refresh-s", "0"])
    app = AppTest.from_file(str(dashboard.APP), default_timeout=120)
    app.run()
    assert not app.exception
    assert any("--log-text" in c.value for c in app.caption)
