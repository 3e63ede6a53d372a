"""``specdec loadtest`` on the tiny cluster: concurrent clients get exactly their single-client
outputs, nothing fails, and the report carries throughput, latency, errors, memory and sessions."""

from __future__ import annotations

import json

import pytest

from specdec.tools import cli
from specdec.tools.loadtest import LoadSpec, format_report, proc_status, read_prompts, run_local
from specdec.tools.prompts import PromptFileError, bundled_dir

PROMPTS = ["def hello(x):", "The quick brown fox", "class Stack:", "for i in range(10):"]


@pytest.fixture(scope="module")
def report(tiny_cluster):
    spec = LoadSpec(clients=4, requests=12, max_new_tokens=16, mode="tree", prompts=PROMPTS, timeout_s=120)
    return run_local(tiny_cluster, spec)


def test_no_errors_and_outputs_as_alone(report):
    assert report["errors"] == {}, report["error_details"]
    # RESOURCE_EXHAUSTED would be a deliberate rejection; with 4 clients nothing should be turned away.
    assert report["completed"] + report["rejected"] == 12 and report["completed"] >= 1
    assert report["outputs"] == {"checked": report["completed"], "identical": report["completed"], "mismatched": []}
    assert report["ok"]


def test_throughput_and_latency(report):
    assert report["requests_per_s"] > 0 and report["tokens_per_s"] > 0 and report["tokens"] > 0
    lat = report["latency_s"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert report["single_client_latency_s"]["p50"] > 0
    assert report["time_to_first_token_s"] is None  # unary calls


def test_memory_of_every_process(report, tiny_cluster):
    names = {p.name for p in tiny_cluster.processes}
    assert {m["process"] for m in report["memory"]} == names
    for m in report["memory"]:
        assert m["start"] > 0 and m["before"] > 0 and m["after"] > 0, m
        assert m["peak"] >= m["after"], m
        assert m["growth_pct"] == pytest.approx(100 * (m["after"] - m["before"]) / m["before"])


def test_every_session_released(report, tiny_cluster):
    assert set(report["sessions_after"]) == {"orchestrator", "verify", "draft-0", "draft-1"}
    assert all(n == 0 for n in report["sessions_after"].values()), report["sessions_after"]


def test_table(report):
    table = format_report(report)
    for words in ["12 requests, 4 concurrent clients", "rejected (queue full)", "errors", "requests/s", "tokens/s",
                  "p50", "p95", "p99", "outputs as alone", "memory (RSS, MiB)", "verify", "draft-0", "result: OK"]:
        assert words in table, (words, table)


def test_proc_status_reads_own_process():
    import os

    status = proc_status(os.getpid())
    assert status["VmRSS"] > 0 and status["VmHWM"] >= status["VmRSS"]
    assert proc_status(2**22 + 12345) == {}


def test_prompts_come_from_the_benchmark_prompt_files(tmp_path):
    quick = [json.loads(line)["prompt"] for line in (bundled_dir() / "prompts" / "quick.jsonl").read_text().splitlines()]
    assert LoadSpec().prompts == quick and len(quick) == 6
    assert read_prompts(str(bundled_dir() / "prompts" / "code.jsonl"))[0].startswith("def run_length_encode")
    with pytest.raises(PromptFileError, match="chat template"):
        read_prompts(str(bundled_dir() / "prompts" / "chat.jsonl"))
    lines = tmp_path / "prompts.txt"
    lines.write_text("a\n\nb\n")
    assert read_prompts(str(lines)) == ["a", "b"]


def test_command_line_against_a_running_orchestrator(tiny_cluster, capsys):
    # Streamed this time: the report adds the time to the first token; no memory for a remote cluster.
    code = cli.main(["loadtest", "--orchestrator", tiny_cluster.orchestrator_address, "--clients", "2", "--requests", "4",
                     "--max-tokens", "8", "--mode", "sequential", "--stream", "--json", "--timeout", "120"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["ok"] and out["errors"] == {} and out["completed"] + out["rejected"] == 4
    assert out["memory"] == [] and out["stream"] and out["time_to_first_token_s"]["p50"] > 0
    assert out["sessions_after"] == {"orchestrator": 0}
