"""The ``specdec`` command as a user runs it: a subprocess against the tiny cluster, and
``specdec cluster up`` bringing up (and tearing down) its own processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest

from specdec.tools.cli import GREEN, RED, RESET
from specdec.tools.cluster import free_port
from specdec.v1 import generation_pb2, generation_pb2_grpc
from tiny_models import tiny_tokenizer

CLI_TIMEOUT_S = 120
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def specdec_command() -> list[str]:
    script = Path(sys.executable).parent / "specdec"
    return [str(script)] if script.exists() else [sys.executable, "-m", "specdec.tools.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any SPECDEC_* settings of the machine running the tests."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SPECDEC_")} | extra


def specdec(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*specdec_command(), *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env or clean_env()
    )


def grpc_generate(address: str, prompt: str, max_new_tokens: int, **speculation) -> generation_pb2.GenerateResponse:
    with grpc.insecure_channel(address) as channel:
        return generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            generation_pb2.GenerateRequest(
                prompt=prompt, max_new_tokens=max_new_tokens, mode=generation_pb2.DECODING_MODE_TREE,
                speculation=generation_pb2.SpeculationParams(**speculation),
            ),
            timeout=60,
        )


def test_generate_json(tiny_cluster, reference):
    prompt = "def add(a, b):"
    run = specdec("generate", "--json", "--orchestrator", tiny_cluster.orchestrator_address, "--prompt", prompt,
                  "--mode", "tree", "--beam-width", "3", "--beam-depth", "4", "--max-tokens", "20")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1, run.stdout
    out = json.loads(lines[0])
    assert set(out) == {"text", "token_ids", "stats"}
    want = grpc_generate(tiny_cluster.orchestrator_address, prompt, 20, beam_width=3, beam_depth=4)
    assert out["token_ids"] == list(want.token_ids) == reference(tiny_tokenizer()(prompt).input_ids, 20)
    assert out["text"] == want.text
    stats = out["stats"]
    assert stats["mode"] == "tree"
    assert stats["tokens_generated"] == len(out["token_ids"])
    assert stats["rounds"] == stats["verification_calls"] >= 1
    assert stats["prompt_tokens"] == len(prompt)
    assert {d["draft"] for d in stats["drafts"]} == {d.draft for d in want.stats.drafts}


def test_generate_plain_text(tiny_cluster):
    prompt = "x = ["
    run = specdec("generate", "--orchestrator", tiny_cluster.orchestrator_address, "--prompt", prompt,
                  "--mode", "sequential", "--max-tokens", "12")
    assert run.returncode == 0, run.stderr
    assert run.stdout == grpc_generate(tiny_cluster.orchestrator_address, prompt, 12).text + "\n"


def test_generate_verbose_colours(tiny_cluster):
    prompt = "def hello(x):"
    run = specdec("generate", "--verbose", "--orchestrator", tiny_cluster.orchestrator_address, "--prompt", prompt,
                  "--mode", "tree", "--beam-width", "2", "--beam-depth", "4", "--max-tokens", "30")
    assert run.returncode == 0, run.stderr
    assert GREEN in run.stdout and RESET in run.stdout
    first, *rest = run.stdout.splitlines()
    # Colours only decorate: the first line is the prompt and the generated text.
    want = grpc_generate(tiny_cluster.orchestrator_address, prompt, 30, beam_width=2, beam_depth=4)
    assert ANSI.sub("", first) == prompt + want.text
    if want.stats.draft_tokens_accepted:
        assert GREEN in first
    summary = "\n".join(rest)
    assert f"{want.stats.tokens_generated} tokens in" in summary and "mode tree" in summary
    assert RED in summary  # the legend


@pytest.mark.parametrize(
    "args,named",
    [
        (["--max-tokens", "-5"], ["INVALID_ARGUMENT", "max_new_tokens"]),
        (["--max-tokens", "100000"], ["INVALID_ARGUMENT", "max_new_tokens"]),
        (["--beam-width", "1000"], ["INVALID_ARGUMENT", "beam_width"]),
        (["--draft-length", "1000", "--mode", "sequential"], ["INVALID_ARGUMENT", "draft_length"]),
        (["--stop", ""], ["INVALID_ARGUMENT", "stop"]),
    ],
    ids=["negative-max-tokens", "max-tokens-over-limit", "huge-beam-width", "huge-draft-length", "empty-stop"],
)
def test_generate_invalid_input(tiny_cluster, args, named):
    run = specdec("generate", "--orchestrator", tiny_cluster.orchestrator_address, "--prompt", "abc", *args)
    assert run.returncode == 1
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    for word in named:
        assert word in run.stderr, run.stderr


@pytest.mark.parametrize(
    "args,named",
    [
        (["--prompt", "abc", "--mode", "bogus"], ["--mode", "bogus"]),
        (["--prompt", "abc", "--max-tokens", "many"], ["--max-tokens", "many"]),
        (["--mode", "tree"], ["--prompt"]),
        # Refused before any call: a draft length is at least 1 whatever the orchestrator allows.
        (["--prompt", "abc", "--draft-length", "-1", "--mode", "sequential"], ["--draft-length", "-1", "at least 1"]),
    ],
    ids=["unknown-mode", "non-integer-max-tokens", "no-prompt", "negative-draft-length"],
)
def test_generate_bad_flags(args, named):
    run = specdec("generate", "--orchestrator", "127.0.0.1:1", *args)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    for word in named:
        assert word in run.stderr, run.stderr


def test_generate_unreachable_orchestrator():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # held, never listened on: nothing answers there
        address = f"127.0.0.1:{s.getsockname()[1]}"
        run = specdec("generate", "--orchestrator", address, "--prompt", "abc")
    assert run.returncode == 1
    assert "UNAVAILABLE" in run.stderr and "Traceback" not in run.stderr


def test_models_path(tmp_path):
    env = clean_env(SPECDEC_MODEL_DIR=str(tmp_path))
    run = specdec("models", "path", "qwen2.5-coder-0.5b-instruct", env=env)
    assert run.returncode == 0, run.stderr
    path = Path(run.stdout.strip())
    assert path == tmp_path / "qwen2.5-coder-0.5b-instruct"
    assert path.is_relative_to(tmp_path)


def test_models_path_unknown(tmp_path):
    run = specdec("models", "path", "no-such-model", env=clean_env(SPECDEC_MODEL_DIR=str(tmp_path)))
    assert run.returncode == 2
    assert "no-such-model" in run.stderr and "qwen2.5-coder-0.5b-instruct" in run.stderr


def read_line_matching(stream, pattern: re.Pattern, timeout_s: float, lines: list[str]) -> re.Match | None:
    """Read ``stream`` in a thread until a line matches; every line read goes into ``lines``."""
    found: list[re.Match] = []

    def read():
        for line in stream:
            lines.append(line)
            match = pattern.search(line)
            if match:
                found.append(match)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    return found[0] if found else None


def test_cluster_up_serves_and_stops_on_sigint(tiny_dirs, tmp_path, reference):
    port, http_port = free_port(), free_port()
    stderr_path = tmp_path / "cluster.stderr"
    with open(stderr_path, "w") as stderr:
        cli = subprocess.Popen(
            [*specdec_command(), "cluster", "up", "--target-model", str(tiny_dirs["target"]),
             "--draft-models", str(tiny_dirs["draft"]), "--port", str(port), "--log-dir", str(tmp_path / "logs"),
             "--startup-timeout-s", "120", "--http-port", str(http_port)],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=clean_env(), start_new_session=True,
        )
    children: list[psutil.Process] = []
    try:
        lines: list[str] = []
        match = read_line_matching(cli.stdout, re.compile(r"orchestrator at (\S+)"), CLI_TIMEOUT_S, lines)
        assert match, f"no address printed; stdout {lines}, stderr:\n{stderr_path.read_text()[-3000:]}"
        address = match.group(1)
        assert address == f"127.0.0.1:{port}"
        match = read_line_matching(cli.stdout, re.compile(r"HTTP API at (\S+)/v1"), CLI_TIMEOUT_S, lines)
        assert match and match.group(1) == f"http://127.0.0.1:{http_port}", lines
        with urllib.request.urlopen(match.group(1) + "/health", timeout=30) as health:
            assert json.loads(health.read()) == {"status": "SERVING"}
        children = psutil.Process(cli.pid).children(recursive=True)
        assert len(children) == 3, children  # verify, one draft, orchestrator

        prompt = "if x > 0:"
        reply = grpc_generate(address, prompt, 16)
        assert list(reply.token_ids) == reference(tiny_tokenizer()(prompt).input_ids, 16)

        cli.send_signal(signal.SIGINT)
        assert cli.wait(60) == 0, stderr_path.read_text()[-3000:]
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    deadline = time.monotonic() + 10
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(children)
    for child in left:
        child.kill()
    assert not left, f"child processes left behind: {left}"


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    running = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


def test_generate_verbose_with_stop_string(tiny_cluster):
    prompt = "def hello(x):"
    address = tiny_cluster.orchestrator_address
    full = grpc_generate(address, prompt, 30).text
    stop = full[10:13]
    run = specdec("generate", "--verbose", "--orchestrator", address, "--prompt", prompt, "--mode", "tree",
                  "--max-tokens", "30", "--stop", stop)
    assert run.returncode == 0, run.stderr
    assert ANSI.sub("", run.stdout.splitlines()[0]) == prompt + full[: full.find(stop)]


ALONE = re.compile(r"target alone through the services \(one token per verify pass, float32 exact\): ([\d.]+) tokens/s")
COMPARISON = re.compile(r"speculative \((\w+)\) ([\d.]+) tokens/s: ([\d.]+)x the target alone \(same (\d+) tokens as the target alone\)")


def test_generate_compare_prints_both_speeds_and_the_ratio(tiny_cluster):
    prompt = "def add(a, b):"
    run = specdec("generate", "--compare", "--verbose", "--orchestrator", tiny_cluster.orchestrator_address,
                  "--prompt", prompt, "--mode", "tree", "--max-tokens", "20")
    assert run.returncode == 0, run.stderr
    assert "warm-up" in run.stderr and "target alone" in run.stderr
    *_, alone_line, last = ANSI.sub("", run.stdout.strip()).splitlines()
    match, alone_match = COMPARISON.fullmatch(last), ALONE.fullmatch(alone_line)
    assert match and alone_match, run.stdout
    mode, speculative, ratio, same = match.groups()
    alone = alone_match.group(1)
    assert mode == "tree" and int(same) == 20
    assert float(alone) > 0 and float(speculative) > 0
    assert float(ratio) == pytest.approx(float(speculative) / float(alone), abs=0.011 + 0.01 * float(ratio))
    # The statistics name what each number counts.
    assert re.search(r"drafted \d+ tokens in \d+ rounds \(longest path per round: \d+ positions\); "
                     r"accepted \d+ of those \d+ positions \(\d+%\)", ANSI.sub("", run.stdout)), run.stdout


def test_generate_compare_json(tiny_cluster, reference):
    prompt = "x = ["
    run = specdec("generate", "--compare", "--json", "--orchestrator", tiny_cluster.orchestrator_address,
                  "--prompt", prompt, "--mode", "sequential", "--max-tokens", "12")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert set(out) == {"text", "token_ids", "stats", "target_alone", "speedup", "verify_dtype", "precision"}
    assert out["verify_dtype"] == "float32" and out["precision"] == ""  # set, not chosen: the tests pin float32
    alone = out["target_alone"]
    assert alone["stats"]["mode"] == "autoregressive" and out["stats"]["mode"] == "sequential"
    assert alone["token_ids"] == out["token_ids"] == reference(tiny_tokenizer()(prompt).input_ids, 12)
    assert out["speedup"] == pytest.approx(out["stats"]["tokens_per_second"] / alone["stats"]["tokens_per_second"], rel=1e-5)


def test_stock_generate_is_timed_in_each_dtype_and_the_comparison_names_the_faster(tiny_dirs, reference):
    """The demo's baseline: transformers' own generate on the target alone, in float32 and bfloat16."""
    from types import SimpleNamespace

    from specdec.tools.bench import stock_runs
    from specdec.tools.cli import comparison

    prompt_ids = tiny_tokenizer()("def add(a, b):").input_ids
    runs = stock_runs(str(tiny_dirs["target"]), prompt_ids, 10)
    assert [run.dtype for run in runs] == ["float32", "bfloat16"]
    assert runs[0].tokens == reference(prompt_ids, 10)  # the same stock float32 decoding the lossless tests compare against
    assert all(run.tokens_per_second > 0 and len(run.tokens) == 10 for run in runs)

    def reply(mode, tokens_per_second, tokens):
        return SimpleNamespace(stats=SimpleNamespace(mode=mode, tokens_per_second=tokens_per_second), token_ids=tokens)

    runs[0].seconds, runs[1].seconds = 10 / 2.0, 10 / 4.0  # 2 and 4 tokens/s
    info = SimpleNamespace(dtype="bfloat16", precision="bfloat16, the fastest exact round measured here (...)")
    text = comparison(reply("autoregressive", 3.5, [1, 2]), reply("tree", 8.0, [1, 2]), runs, info).splitlines()
    assert text == [
        "verify dtype: bfloat16, the fastest exact round measured here (...)",
        "stock transformers generate: float32 2.00, bfloat16 4.00 tokens/s (the faster: bfloat16)",
        "target alone through the services (one token per verify pass, bfloat16 exact): 3.50 tokens/s",
        "speculative (tree) 8.00 tokens/s: 2.00x the faster stock generate (bfloat16) (same 2 tokens as the target alone)",
    ]
    # llama.cpp on the same GGUF, where installed: shown apart, never the "stock generate" baseline.
    from specdec.tools.bench import StockRun

    llama = StockRun("llama.cpp Q4_K_M (2 threads)", [1] * 10, 10 / 16.0)
    text = comparison(reply("autoregressive", 3.5, [1, 2]), reply("tree", 8.0, [1, 2]), [*runs, llama], info).splitlines()
    assert text[1] == "stock transformers generate: float32 2.00, bfloat16 4.00 tokens/s (the faster: bfloat16)"
    assert text[3].startswith("speculative (tree) 8.00 tokens/s: 2.00x the faster stock generate (bfloat16)")
    assert text[4] == "llama.cpp Q4_K_M (2 threads) on the same GGUF: 16.00 tokens/s; speculative 0.50x it"
