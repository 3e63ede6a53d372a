"""``specdec loadtest`` on the tiny cluster: concurrent clients get exactly their single-client
outputs, nothing fails, and the report carries throughput, latency, errors, memory and sessions."""

from __future__ import annotations

import json

import pytest

from specdec.tools import cli
from specdec.tools import loadtest
from specdec.tools.loadtest import (LoadSpec, format_report, format_sweep, plot_sweep, proc_status, read_prompts,
                                    requests_per_point, run_local, run_local_sweep)
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


def test_mean_batch_size_and_memory_total(report):
    # Every round counts itself; with 4 clients some rounds had company.
    assert report["rounds"] > 0 and 1 <= report["mean_batch_size"] <= 4
    total = report["memory_total"]
    assert total["before"] == sum(m["before"] for m in report["memory"])
    assert total["growth"] == total["after"] - total["before"]


def test_table(report):
    table = format_report(report)
    for words in ["12 requests, 4 concurrent clients", "rejected (queue full)", "errors", "requests/s", "tokens/s",
                  "p50", "p95", "p99", "batch size (mean)", "outputs as alone", "memory (RSS, MiB)", "verify", "draft-0",
                  "all processes", "result: OK"]:
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


# --------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def sweep(tiny_cluster):
    # Counts the single-client passes: one for the whole sweep, not one per point.
    passes = []
    single_client_pass = loadtest.single_client_pass

    def counted(*args, **kwargs):
        passes.append(1)
        return single_client_pass(*args, **kwargs)

    spec = LoadSpec(requests=4, max_new_tokens=12, mode="tree", prompts=PROMPTS, timeout_s=120)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loadtest, "single_client_pass", counted)
        report = run_local_sweep(tiny_cluster, spec, [2, 1])
    return report, len(passes)


def test_sweep_has_a_point_per_client_count(sweep):
    report, passes = sweep
    assert passes == 1
    assert report["clients"] == [1, 2] and [p["clients"] for p in report["points"]] == [1, 2]
    assert report["ok"] and report["requests"] == [4, 4]
    for p in report["points"]:
        assert p["requests"] == 4 and p["errors"] == {} and p["completed"] + p["rejected"] == 4
        assert p["tokens_per_s"] > 0 and p["requests_per_s"] > 0
        assert 0 < p["latency_s"]["p50"] <= p["latency_s"]["p95"]
        assert p["time_to_first_token_s"] is None  # unary calls
        assert p["outputs"]["mismatched"] == [] and p["outputs"]["identical"] == p["completed"]
        assert p["rounds"] > 0 and 1 <= p["mean_batch_size"] <= p["clients"]
        assert p["memory_total"]["growth"] == p["memory_total"]["after"] - p["memory_total"]["before"]
        assert all(n == 0 for n in p["sessions_after"].values()), p["sessions_after"]
    one, two = report["points"]
    assert one["mean_batch_size"] == 1  # alone, no round has company
    assert one["ratios"] == {"relative_to_clients": 1, "tokens_per_s": 1.0, "latency_p50": 1.0}
    assert two["ratios"]["tokens_per_s"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
    assert two["ratios"]["latency_p50"] == pytest.approx(two["latency_s"]["p50"] / one["latency_s"]["p50"])
    assert [m["after"] for m in report["memory"]] == [[p["memory"][i]["after"] for p in report["points"]]
                                                       for i in range(len(report["memory"]))]
    assert report["memory_growth"] == two["memory_total"]["after"] - one["memory_total"]["before"]


def test_sweep_table_and_plot(sweep, tmp_path):
    report, _ = sweep
    table = format_sweep(report)
    for words in ["2 load points (clients 1, 2)", "single-client pass: 4 prompts", "tokens/s", "x1", "p50 ms", "p95 ms",
                  "TTFT p50 ms", "batch", "mismatched", "RSS growth MiB", "memory (RSS, MiB)", "after 1", "after 2",
                  "result: OK"]:
        assert words in table, (words, table)
    path = plot_sweep(report, tmp_path / "load.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_requests_per_point():
    assert requests_per_point(LoadSpec(), 1) == 32 and requests_per_point(LoadSpec(), 16) == 32
    assert requests_per_point(LoadSpec(), 64) == 128
    assert requests_per_point(LoadSpec(requests=5), 64) == 5  # as given


def test_command_line_sweep_with_plot(tiny_cluster, tmp_path, capsys):
    plot = tmp_path / "plots" / "load.png"
    code = cli.main(["loadtest", "--orchestrator", tiny_cluster.orchestrator_address, "--clients", "1,2", "--requests", "2",
                     "--max-tokens", "6", "--mode", "sequential", "--stream", "--json", "--timeout", "120", "--plot", str(plot)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["ok"] and out["clients"] == [1, 2] and len(out["points"]) == 2
    assert all(p["time_to_first_token_s"]["p50"] > 0 and p["mean_batch_size"] >= 1 for p in out["points"])
    assert out["memory"] == [] and out["memory_growth"] is None and out["points"][0]["memory_total"] is None
    assert out["plot"] == str(plot) and plot.stat().st_size > 1000


def test_command_line_rejects_bad_client_counts(capsys):
    assert cli.main(["loadtest", "--orchestrator", "127.0.0.1:1", "--clients", "1,0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["loadtest", "--clients", "1,x"])
