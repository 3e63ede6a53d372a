"""``specdec dashboard``: the generation view's HTML, reading the orchestrator's own logs, the app run by
Streamlit's test harness, and the app in a real headless Chromium: the generation view with green
accepted tokens and red corrections, and a log written while the page is open showing up without a
reload."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from specdec.records import GenerationLog, GenerationResult, GenerationStats, RoundRecord
from specdec.tools import analyze, dashboard

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
GREEN, RED = "rgba(198, 239, 206, 1)", "rgba(255, 199, 206, 1)"  # dashboard.STYLE's backgrounds


def fake_log(token_ids=(1, 2, 3, 4, 5, 6)) -> GenerationLog:
    rounds = [
        RoundRecord(index=0, proposals={"draft-0": [[1, 2, 9], [1, 8]]}, accepted=[1, 2], bonus_token=3, bonus_is_correction=True,
                    winning_draft="draft-0", tree_nodes=4, draft_ms=1.0, verify_ms=2.0, fallback=False),
        RoundRecord(index=1, proposals={"draft-0": [[4, 5]]}, accepted=[4, 5], bonus_token=6, bonus_is_correction=False,
                    winning_draft="draft-0", tree_nodes=2, draft_ms=1.0, verify_ms=2.0, fallback=False),
    ]
    stats = GenerationStats(mode="tree", prompt_tokens=3, tokens_generated=len(token_ids), rounds=2)
    return GenerationLog(GenerationResult(list(token_ids), "", "length", stats, rounds), prompt="def f():")


def test_generation_view_marks_accepted_tokens_and_corrections():
    log = fake_log()
    assert [kind for _, kind, _ in dashboard.token_kinds(log)] == [
        dashboard.ACCEPTED, dashboard.ACCEPTED, dashboard.CORRECTION, dashboard.ACCEPTED, dashboard.ACCEPTED, dashboard.BONUS]
    texts = ["a", "b", "<c>", "d", "\n", "f"]
    page = dashboard.generation_html(log, texts, lambda ids: "".join(texts[i - 1] if i <= 6 else "?" for i in ids))
    assert page.count(f'sd-tok {dashboard.ACCEPTED}"') == 4
    assert page.count(f'sd-tok {dashboard.CORRECTION}"') == 1
    assert "&lt;c&gt;" in page and "<c>" not in page  # token text is escaped
    # Each token's tooltip lists its round's proposals (decoded) and what the target kept.
    assert "draft-0 beam 0: &#x27;ab?&#x27;" in page and "2 accepted, then a correction" in page
    assert page.index("def f():") < page.index('data-round="0"')

    # Tokens the rounds do not account for (a stop cut, or a baseline) are plain, never mislabelled.
    assert {k for _, k, _ in dashboard.token_kinds(fake_log([1, 2, 7]))} == {dashboard.PLAIN}
    assert [k for _, k, _ in dashboard.token_kinds(fake_log([1, 2, 3, 4]))][-1] == dashboard.ACCEPTED


@pytest.fixture(scope="module")
def cluster_logs(tiny_cluster, grpc_stubs, tmp_path_factory):
    """The orchestrator's own logs of a few generations on the tiny cluster, copied out, newest last;
    the newest has both accepted draft tokens and corrections."""
    from specdec.v1 import generation_pb2 as pb

    source = Path(tiny_cluster.settings.log_dir)
    before = set(source.glob("*.json"))
    requests = [
        pb.GenerateRequest(prompt="The river ran past the old mill and", max_new_tokens=24, mode=pb.DECODING_MODE_SEQUENTIAL,
                           speculation=pb.SpeculationParams(draft_length=3)),
        pb.GenerateRequest(prompt="def add(a, b):\n    return", max_new_tokens=24, mode=pb.DECODING_MODE_TREE,
                           speculation=pb.SpeculationParams(beam_width=2, beam_depth=3)),
        pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=24, mode=pb.DECODING_MODE_TREE,
                           speculation=pb.SpeculationParams(beam_width=3, beam_depth=4)),
    ]
    for request in requests:
        grpc_stubs["generation"].Generate(request, timeout=120)
    new = sorted(set(source.glob("*.json")) - before, key=lambda p: p.stat().st_mtime)
    assert len(new) == len(requests)
    logs = [json.loads(p.read_text()) for p in new]

    def mixed(log):
        return any(r["accepted"] for r in log["rounds"]) and any(r["bonus_is_correction"] for r in log["rounds"])

    assert any(mixed(log) for log in logs), "the tiny models should both agree and disagree somewhere"
    order = sorted(range(len(new)), key=lambda i: mixed(logs[i]))  # a mixed one last
    out = tmp_path_factory.mktemp("dashboard-logs")
    for n, i in enumerate(order):
        target = out / new[i].name
        shutil.copy(new[i], target)
        os.utime(target, (time.time() - 10 + n, time.time() - 10 + n))
    return out


def test_orchestrator_logs_are_read_as_runs(cluster_logs):
    records = analyze.load_runs(cluster_logs)
    assert len(records) == 3 and {r["source"] for r in records} == {"orchestrator"}
    for r in records:
        log = r["log"]
        assert r["label"].startswith("specdec-") and r["model_set"] != "-"
        # Drafts by service name in the rounds; the model set names their models, read from the stats.
        assert {name for round_ in log.result.rounds for name in round_.proposals} <= {d.draft for d in log.result.stats.drafts}
        assert r["draft_models"] == [d.model for d in log.result.stats.drafts] and all(r["draft_models"])
        assert log.prompt and "".join(log.token_texts).startswith(log.result.text[:1])
        assert len(log.token_texts) == len(log.result.token_ids) == r["metrics"]["tokens_generated"]
        assert r["metrics"]["accepted_tokens"] == log.result.stats.draft_tokens_accepted
    rows = analyze.summarise(records)
    assert {row["class"] for row in rows} == {analyze.NO_CLASS, analyze.ALL_CLASSES}
    assert all(row["speedup"] is None for row in rows)  # no target-only run in a cluster's log dir
    assert "expected (Leviathan et al.) vs measured" in analyze.report(records, rows)


def test_the_app_renders_the_logs_without_a_browser(cluster_logs, monkeypatch):
    """Streamlit's own test harness runs the app's script: every tab, no exception, the newest log shown."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr("sys.argv", ["dashboard_app.py", "--log-dir", str(cluster_logs), "--refresh-s", "0"])
    app = AppTest.from_file(str(dashboard.APP), default_timeout=120)
    app.run()
    assert not app.exception
    pages = [e.value for e in app.get("html")]
    assert any('data-count="3"' in page for page in pages)
    view = next(page for page in pages if 'class="sd-generation"' in page)
    newest = max(analyze.load_runs(cluster_logs), key=lambda r: r["mtime"])["log"]
    assert view.count('class="sd-tok ') == len(newest.result.token_ids)
    assert view.count(f'sd-tok {dashboard.ACCEPTED}"') == sum(len(r.accepted) for r in newest.result.rounds)


def trace_lines(trace_id: str, rounds: int = 3) -> str:
    """A trace file (the services' JSON lines) holding one generation of ``rounds`` rounds, each with
    a draft and a verify call, the way the services write them."""
    def line(name, span_id, parent, start_ms, end_ms, kind, service="specdec-orchestrator", **attributes):
        return json.dumps({"trace_id": trace_id, "span_id": span_id, "parent_span_id": parent, "name": name, "kind": kind,
                           "service": service, "start_time_unix_nano": int(start_ms * 1e6), "end_time_unix_nano": int(end_ms * 1e6),
                           "attributes": attributes, "resource": {}})

    lines = [line("text_completion tiny", "root", None, 0, 10 + 100 * rounds, "SERVER", **{
        "gen_ai.operation.name": "text_completion", "specdec.mode": "tree", "gen_ai.latency.time_in_queue": 0.005})]
    for i in range(rounds):
        t = 10 + 100 * i
        lines += [
            line("specdec.round", f"r{i}", "root", t, t + 95, "INTERNAL", **{"specdec.round.index": i, "specdec.accepted": i,
                                                                           "specdec.draft.depth": 3, "specdec.new_tokens": i + 1}),
            line("specdec.v1.DraftService/DraftBeams", f"d{i}", f"r{i}", t + 1, t + 30, "CLIENT", **{"rpc.method": "DraftBeams",
                                                                                                    "specdec.draft": "draft-0"}),
            line("specdec.v1.DraftService/DraftBeams", f"ds{i}", f"d{i}", t + 2, t + 29, "SERVER", "specdec-draft-0",
                 **{"rpc.method": "DraftBeams"}),
            line("specdec.v1.VerifyService/VerifyTree", f"v{i}", f"r{i}", t + 31, t + 90, "CLIENT", **{"rpc.method": "VerifyTree"}),
            line("specdec.v1.VerifyService/VerifyTree", f"vs{i}", f"v{i}", t + 32, t + 89, "SERVER", "specdec-verify",
                 **{"rpc.method": "VerifyTree", "specdec.queue_ms": 4.0}),
        ]
    return "\n".join(lines) + "\n"


def test_the_app_links_each_generation_to_its_trace(cluster_logs, tmp_path, monkeypatch):
    """With --traces and --jaeger-url: the generation shows its trace id as a link into Jaeger and its
    own timeline; the Traces tab draws every generation and prints the analysis."""
    from streamlit.testing.v1 import AppTest

    logs = tmp_path / "logs"
    shutil.copytree(cluster_logs, logs)
    newest = max(logs.glob("*.json"), key=lambda p: p.stat().st_mtime)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    entry = json.loads(newest.read_text())
    entry["request"]["trace_id"] = trace_id
    stamp = newest.stat().st_mtime
    newest.write_text(json.dumps(entry))
    os.utime(newest, (stamp, stamp))
    spans = tmp_path / "spans.jsonl"
    spans.write_text(trace_lines(trace_id))
    monkeypatch.setattr("sys.argv", ["dashboard_app.py", "--log-dir", str(logs), "--refresh-s", "0", "--traces", str(spans),
                                     "--jaeger-url", "http://jaeger.example:16686/"])
    app = AppTest.from_file(str(dashboard.APP), default_timeout=120)
    app.run()
    assert not app.exception
    assert f"trace [{trace_id}](http://jaeger.example:16686/trace/{trace_id})" in [m.value for m in app.markdown]
    assert len(app.get("image")) == 2  # the generation's timeline, and the Traces tab's
    (report,) = [c.value for c in app.code]
    assert report.startswith(f"trace {trace_id}") and "all: 1 generation, 3 rounds" in report


def test_a_missing_trace_file_is_one_line():
    assert dashboard.cmd_dashboard(dashboard_args(traces=Path("/nonexistent/spans.jsonl"))) == 2


def dashboard_args(**values):
    import argparse

    parser = argparse.ArgumentParser()
    dashboard.add_parser(parser.add_subparsers())
    args = parser.parse_args(["dashboard", "."])
    return argparse.Namespace(**{**vars(args), **values})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"no Chromium here ({CHROMIUM}, {CHROMEDRIVER}): `make test` installs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1600", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def dashboard_server(cluster_logs, tmp_path):
    log_dir = tmp_path / "logs"
    shutil.copytree(cluster_logs, log_dir)
    port = free_port()
    log = open(tmp_path / "streamlit.log", "w")
    process = subprocess.Popen(dashboard.streamlit_command(log_dir, port, refresh_s=1.0), stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url + "_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("streamlit did not start:\n" + (tmp_path / "streamlit.log").read_text()[-3000:])
        time.sleep(0.5)
    yield url, log_dir
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()


@pytest.mark.timeout(300)
def test_dashboard_in_a_real_browser(dashboard_server, browser, cluster_logs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from selenium.common.exceptions import StaleElementReferenceException

    url, log_dir = dashboard_server
    browser.get(url)
    # The page re-renders when logs change: an element found a moment before may be gone; look again.
    wait = WebDriverWait(browser, 120, poll_frequency=0.5, ignored_exceptions=(StaleElementReferenceException,))
    view = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".sd-generation .sd-tok"))
    assert view
    accepted = browser.find_elements(By.CSS_SELECTOR, f".sd-generation .{dashboard.ACCEPTED}")
    corrections = browser.find_elements(By.CSS_SELECTOR, f".sd-generation .{dashboard.CORRECTION}")
    assert accepted and corrections
    assert {e.value_of_css_property("background-color") for e in accepted} == {GREEN}
    assert {e.value_of_css_property("background-color") for e in corrections} == {RED}
    assert "beam 0:" in corrections[0].get_attribute("title")  # the round's proposals, as a tooltip
    # The newest log is shown: its tokens are the page's tokens.
    newest = max(analyze.load_runs(log_dir), key=lambda r: r["mtime"])
    assert len(browser.find_elements(By.CSS_SELECTOR, ".sd-generation .sd-tok")) == len(newest["log"].result.token_ids)
    assert sum(len(r.accepted) for r in newest["log"].result.rounds) == len(accepted)
    shot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A log written while the page is open shows up without a reload (the page checks every second).
    count = lambda d: d.find_element(By.CSS_SELECTOR, ".sd-count").get_attribute("data-count")  # noqa: E731
    assert wait.until(count) == "3"
    extra = sorted(cluster_logs.glob("*.json"))[0]
    shutil.copy(extra, log_dir / ("20990101T000000-live.json"))
    wait.until(lambda d: count(d) == "4")
