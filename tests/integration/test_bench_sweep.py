"""``specdec bench --config FILE``: a tiny sweep end to end on the tiny models (real cluster processes),
its per-run JSON logs and benchmark_summary.csv checked against the runs' own responses and the
target alone; resuming an interrupted sweep; ``specdec analyze``; and the shipped sweep files."""

from __future__ import annotations

import csv
import json
import sys
import statistics
from pathlib import Path

import pytest

from specdec.tools import analyze, bench, cli, sweep
from tiny_models import reference_greedy

ROOT = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 8


def write_config(tmp_path: Path, tiny_dirs, out: Path) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [
        {"id": "code-add", "class": "code", "prompt": "def add(a, b):\n    return"},
        {"id": "prose-mill", "class": "prose", "prompt": "The river ran past the old mill and"},
    ]) + "\n")
    config = tmp_path / "sweep.yaml"
    config.write_text(f"""
name: tiny
target_model: {tiny_dirs['target']}
draft_model_sets:
  - name: one
    models: [{tiny_dirs['draft']}]
  - [{tiny_dirs['draft']}, {tiny_dirs['other']}]
max_new_tokens: [{MAX_NEW_TOKENS}]
modes: [sequential, tree]
sequential: {{draft_lengths: [2]}}
tree: {{beam_widths: [2], beam_depths: [3], max_tree_nodes: 32}}
prompt_files: [prompts.jsonl]
prompts:
  - {{id: chat-hello, class: chat, messages: [{{role: user, content: "Say hello."}}]}}
repetitions: 1
warmup_tokens: 2
startup_timeout_s: 120
# The settings as named: tiny drafts cost as much as the tiny target, so the cost model would stop drafting.
adaptive: false
output_dir: {out}
""")
    return config


@pytest.fixture(scope="module")
def sweep_run(tiny_dirs, tmp_path_factory):
    """The sweep run twice: stopped after 7 runs (--limit, as an interruption), then resumed.
    Returns (output dir, logs after the first part, every GenerateStream response the bench saw)."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_dirs, out)
    responses = {}
    original = bench.stream_generate

    def spy(stub, cluster, spec, prompt_ids, max_new_tokens, target_model=""):
        result = original(stub, cluster, spec, prompt_ids, max_new_tokens, target_model)
        if max_new_tokens == spec.max_new_tokens:  # not a warm-up
            responses[spec.run_id] = result
        return result

    bench.stream_generate = spy
    try:
        assert cli.main(["bench", "--config", str(config), "--limit", "7"]) == 0
        first = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
        assert cli.main(["bench", "--config", str(config)]) == 0
    finally:
        bench.stream_generate = original
    return out, first, responses


def load_logs(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


def test_plan_covers_every_combination(tiny_dirs, tmp_path):
    cfg = sweep.load_sweep_config(write_config(tmp_path, tiny_dirs, tmp_path / "out"))
    plan = sweep.sweep_plan(cfg)
    # target-only and assisted (one distinct first draft), then per model set: sequential k=2 and tree 2x3.
    assert len(plan) == 3 * (1 + 1 + 2 + 2)
    assert [s.method.mode for s in plan[:6]] == ["target-only"] * 3 + ["assisted"] * 3
    assert len({s.run_id for s in plan}) == len(plan)
    assert {s.prompt.cls for s in plan} == {"code", "prose", "chat"}
    assert plan[-1].run_id == "draft+other--tree-w2-d3-n32--n8--chat-hello--r0"


def test_sweep_logs_match_responses_and_the_target(sweep_run, tiny_target):
    out, _, responses = sweep_run
    logs = load_logs(out)
    assert len(logs) == 18
    meta = json.loads((out / "sweep.json").read_text())
    prompt_ids = {p["id"]: p["prompt_token_ids"] for p in meta["prompts"]}
    assert len(meta["sessions"]) == 2 and meta["runs_planned"] == 18
    reference = {p: reference_greedy(tiny_target, ids, MAX_NEW_TOKENS) for p, ids in prompt_ids.items()}
    target_tps = {log["bench"]["prompt_id"]: log["bench"]["tokens_per_s"] for log in logs.values() if log["bench"]["mode"] == "target-only"}

    for run_id, log in logs.items():
        b, m, stats = log["bench"], log["metrics"], log["stats"]
        assert b["run_id"] == run_id
        # Lossless: every method's tokens are the target alone's.
        assert log["token_ids"] == reference[b["prompt_id"]] and b["matches_target"] is True
        assert b["tokens"] == len(log["token_ids"]) == stats["tokens_generated"] == m["tokens_generated"]
        assert len(log["token_texts"]) == len(log["token_ids"]) and log["prompt"]
        assert b["tokens_per_s"] == pytest.approx(b["tokens"] / b["seconds"])
        assert b["speedup"] == pytest.approx(b["tokens_per_s"] / target_tps[b["prompt_id"]])
        assert 0 < b["ttft_ms"] <= b["seconds"] * 1e3
        if b["mode"] in ("target-only", "assisted"):
            assert log["rounds"] == []
            if b["mode"] == "target-only":
                assert b["model_set"] == "-" and b["draft_models"] == []
            else:  # assisted generation with the first draft of a set; named by that draft
                assert b["draft_models"] == [b["model_set"]]
            continue
        # A speculative run's log is what its GenerateStream responses said.
        tokens, seconds, ttft_ms, streamed = responses[run_id]
        assert tokens == log["token_ids"] and seconds == b["seconds"] and ttft_ms == b["ttft_ms"]
        for key in ("mode", "tokens_generated", "rounds", "draft_tokens_proposed", "draft_tokens_accepted", "bonus_tokens",
                    "tree_nodes_total", "prompt_tokens"):
            assert getattr(streamed.result.stats, key) == stats[key], key
        assert streamed.result.text == log["text"] and streamed.result.finish_reason == log["finish_reason"]
        assert [r.accepted for r in streamed.result.rounds] == [r["accepted"] for r in log["rounds"]]
        assert [r.proposals for r in streamed.result.rounds] == [r["proposals"] for r in log["rounds"]]
        assert stats["mode"] == b["mode"] and stats["prompt_tokens"] == len(prompt_ids[b["prompt_id"]])
        # The fields earlier benchmark logs had, from the rounds.
        rounds = log["rounds"]
        assert m["tree_accepted_tokens"] == stats["draft_tokens_accepted"] == sum(len(r["accepted"]) for r in rounds)
        assert m["tree_bonus_tokens"] == stats["bonus_tokens"] == sum(r["bonus_token"] is not None for r in rounds)
        assert m["tree_nodes_total"] == sum(r["tree_nodes"] for r in rounds)
        assert m["tree_avg_branching_factor"] == stats["tree_avg_branching_factor"]
        assert m["tree_verification_calls"] == len(rounds) == stats["rounds"]
        assert m["accepted_sequences"] == [r["accepted"] for r in rounds]
        assert m["drafted_tokens"] == stats["draft_tokens_proposed"]
        assert m["corrections"] == sum(r["bonus_is_correction"] for r in rounds)
        assert m["savings_vs_greedy"] == pytest.approx((b["tokens"] - len(rounds)) / b["tokens"])
        assert set(m["per_draft_acceptance"]) == set(stats["drafts"])
        for name, rate in m["per_draft_acceptance"].items():
            assert rate == pytest.approx(stats["drafts"][name]["acceptance_rate"], abs=1e-6)
        assert len(stats["drafts"]) == len(b["draft_models"]) == (1 if b["model_set"] == "one" else 2)
        # Drafts go by their service names; each one's model is a field of its own.
        assert list(stats["drafts"]) == [f"draft-{i}" for i in range(len(b["draft_models"]))]
        assert [Path(d["model"]).name for d in stats["drafts"].values()] == [Path(m).name for m in b["draft_models"]]
        positions = m["acceptance_by_position"]["all"]
        assert positions["1"]["drafted"] == sum(any(r["proposals"].values()) for r in rounds)  # the last round may draft nothing
        assert sum(v["accepted"] for v in positions.values()) == m["accepted_tokens"]
        assert m["draft_ms"] + m["verify_ms"] + m["other_ms"] == pytest.approx(m["total_ms"], rel=1e-3)


def test_summary_csv_matches_the_logs(sweep_run, tiny_dirs):
    out, _, _ = sweep_run
    logs = list(load_logs(out).values())
    with open(out / "benchmark_summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {(t["mode"], t["model_set"]) for t in table} == {
        ("target-only", "-"), ("assisted", str(tiny_dirs["draft"])),
        ("sequential", "one"), ("tree", "one"), ("sequential", "draft+other"), ("tree", "draft+other")}
    assert {t["class"] for t in table} == {"code", "prose", "chat", "all"}
    assert len(table) == 6 * 4
    target = {t["class"]: float(t["tokens_per_s"]) for t in table if t["mode"] == "target-only"}
    for t in table:
        mine = [log for log in logs if log["bench"]["label"] == t["label"] and log["bench"]["model_set"] == t["model_set"]
                and t["class"] in (log["bench"]["class"], "all")]
        assert int(t["runs"]) == len(mine) == (3 if t["class"] == "all" else 1)
        assert int(t["new_tokens"]) == sum(log["bench"]["tokens"] for log in mine)
        assert float(t["tokens_per_s"]) == pytest.approx(statistics.median(log["bench"]["tokens_per_s"] for log in mine))
        assert float(t["speedup"]) == pytest.approx(float(t["tokens_per_s"]) / target[t["class"]])
        assert float(t["ttft_ms"]) == pytest.approx(statistics.median(log["bench"]["ttft_ms"] for log in mine))
        assert t["lossless"] == "True"
        if t["mode"] in ("sequential", "tree"):
            rounds = sum(len(log["rounds"]) for log in mine)
            accepted = sum(len(r["accepted"]) for log in mine for r in log["rounds"])
            assert float(t["accepted_per_round"]) == pytest.approx(accepted / rounds)
            assert float(t["tokens_per_round"]) == pytest.approx(int(t["new_tokens"]) / rounds)
            assert float(t["tree_nodes_per_round"]) == pytest.approx(sum(r["tree_nodes"] for log in mine for r in log["rounds"]) / rounds)
            drafted = sum(log["metrics"]["drafted_positions"] for log in mine)
            assert float(t["acceptance_rate"]) == pytest.approx(accepted / drafted)
            shares = float(t["draft_share"]) + float(t["verify_share"]) + float(t["other_share"])
            assert shares == pytest.approx(1.0, rel=1e-3)
            assert float(t["expected_speedup"]) > 0
        else:
            assert t["tree_nodes_per_round"] == "" and t["expected_speedup"] == ""


def test_resume_runs_only_what_is_missing(sweep_run, tiny_dirs, tmp_path, capsys):
    out, first, responses = sweep_run
    assert len(first) == 7  # the interrupted part: the six baseline runs and one speculative run
    now = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    assert all(now[name] == text for name, text in first.items())  # resumed, not redone
    assert len(responses) == 18 - 6  # every speculative run exactly once
    assert not list((out / "runs").glob(".*.tmp"))
    config = write_config(tmp_path, tiny_dirs, out)
    capsys.readouterr()
    assert cli.main(["bench", "--config", str(config), "--dry-run"]) == 0
    assert "0 of 18 runs to do" in capsys.readouterr().err


def test_analyze_prints_the_tables(sweep_run, capsys):
    from specdec.tools import cli

    out, _, _ = sweep_run
    assert cli.main(["analyze", str(out)]) == 0
    text = capsys.readouterr().out
    for heading in ("best configurations per prompt class", "model sets", "expected (Leviathan et al.) vs measured speedup",
                    "every configuration", "acceptance by draft position", "round shapes chosen"):
        assert f"== {heading}" in text
    # Fixed settings (adaptive: false): every round of tree w=2 d=3 took that shape, but where the budget cut it.
    assert any(line.startswith("specdec-tree w=2 d=3") and "2x3 " in line for line in text.splitlines()), text
    for cls in ("code", "prose", "chat", "all"):
        assert f"class {cls}, max_new_tokens {MAX_NEW_TOKENS}" in text
    assert "best sequential: k=2" in text and "best tree: w=2 d=3 nodes<=32" in text
    assert "MISMATCH" not in text
    records = analyze.load_runs(out)
    assert len(records) == 18 and {r["source"] for r in records} == {"bench"}
    assert cli.main(["analyze", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == json.loads(json.dumps(analyze.summarise(records)))


def test_expected_speedup_formula():
    row = {"mode": "sequential", "gamma": 4.0, "alpha": 0.8, "rounds": 10, "draft_ms_per_round": 40.0,
           "verify_ms_per_round": 120.0, "tokens_per_round": 3.0, "speedup": 1.5}
    got = analyze.expected_speedup(row, {"tokens_per_s": 10.0})  # a target step: 100 ms
    e = (1 - 0.8 ** 5) / (1 - 0.8)
    assert got["expected_tokens_per_round"] == pytest.approx(e)
    assert got["draft_cost_ratio"] == pytest.approx(0.1)
    assert got["expected_speedup"] == pytest.approx(e / (4 * 0.1 + 1))
    assert got["speedup_vs_expected"] == pytest.approx(1.5 / got["expected_speedup"])
    tree = analyze.expected_speedup({**row, "mode": "tree"}, {"tokens_per_s": 10.0})
    assert tree["expected_tokens_per_round"] == 3.0  # trees: the measured tokens per round


@pytest.mark.parametrize("name", ["bench.yaml", "bench-gpu.yaml", "speed.yaml", "quantized.yaml"])
def test_shipped_sweep_files_are_valid(name):
    cfg = sweep.load_sweep_config(ROOT / "benchmarks" / name)
    plan = sweep.sweep_plan(cfg)
    assert {p.cls for p in cfg.prompts} >= {"code", "prose", "chat"}
    assert cfg.modes
    if name == "quantized.yaml":
        assert cfg.baselines == ["target-only", "llama-cpp"] and cfg.llama_cpp_draft_lengths
        assert [(s.target_quantize, s.draft_quantize) for s in cfg.model_sets] == [("", ""), ("none", ""), ("w8a8", "w8a8")]
        return
    assert cfg.baselines == ["target-only", "assisted"]
    assert len({s.run_id for s in plan}) == len(plan)
    if name == "bench.yaml":
        assert cfg.target_model == "qwen2.5-coder-1.5b-instruct" and cfg.dtype == "float32"
        assert len(plan) <= 80  # about 20-30 minutes on 2 CPU cores
    elif name == "speed.yaml":
        assert cfg.dtype == "auto" and cfg.default and "edit" in {p.cls for p in cfg.prompts}
    else:
        assert cfg.target_model == "Qwen/Qwen2.5-3B"
        assert {m for s in cfg.model_sets for m in s.models} == {"Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B"}


def test_sweep_file_errors_are_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("target_model: x\nmax_new_token: [8]\nprompts: [{id: a, class: code, prompt: hi}]\n")
    with pytest.raises(sweep.BenchError, match="unknown key.*max_new_token"):
        sweep.load_sweep_config(config)
    config.write_text("prompts: [{id: a, class: poem, prompt: hi}]\n")
    with pytest.raises(sweep.BenchError, match="class"):
        sweep.load_sweep_config(config)
    config.write_text("modes: [beam]\nprompts: [{id: a, class: code, prompt: hi}]\n")
    with pytest.raises(sweep.BenchError, match="unknown mode"):
        sweep.load_sweep_config(config)


def test_model_sets_name_their_quantization(tmp_path):
    config = tmp_path / "q.yaml"
    prompts = "prompts: [{id: a, class: code, prompt: hi}]\n"
    config.write_text("draft_model_sets: [{name: q, models: [d], target_quantize: w8a8, draft_quantize: int8}, [d]]\n" + prompts)
    cfg = sweep.load_sweep_config(config)
    assert [(s.name, s.target_quantize, s.draft_quantize) for s in cfg.model_sets] == [("q", "w8a8", "int8"), ("d", "", "")]
    config.write_text("draft_model_sets: [{models: [d], target_quantize: int2}]\n" + prompts)
    with pytest.raises(sweep.BenchError, match="target_quantize.*int2.*none, int8, int4, w8a8"):
        sweep.load_sweep_config(config)


def test_baselines_in_more_dtypes_and_llama_cpp(tiny_dirs, tmp_path, monkeypatch):
    """target-only and assisted run once per baseline dtype; llama.cpp's baseline is planned, and
    skipped with a message where llama-cpp-python is not installed."""
    import types

    path = write_config(tmp_path, tiny_dirs, tmp_path / "out")
    path.write_text(path.read_text() + "baseline_dtypes: [bfloat16]\nbaselines: [target-only, assisted, llama-cpp]\n"
                    "llama_cpp_draft_lengths: [3, 5]\n")
    cfg = sweep.load_sweep_config(path)
    plan = sweep.sweep_plan(cfg)
    ids = {s.run_id for s in plan}
    assert cfg.baseline_dtypes == ["float32", "bfloat16"] and cfg.baselines == ["target-only", "assisted", "llama-cpp"]
    assert {f"baseline--{m}--n{MAX_NEW_TOKENS}--code-add--r0" for m in
            ("target-only", "target-only-bfloat16", "assisted-draft", "assisted-draft-bfloat16", "llama-cpp",
             "llama-cpp-k3-draft", "llama-cpp-k5-draft")} <= ids
    # llama.cpp's own speculation: each set's first draft, at each draft length, named as such.
    speculative = [s for s in plan if s.method.mode == "llama-cpp" and s.method.settings]
    assert {s.method.label for s in speculative} == {"llama-cpp speculative k=3", "llama-cpp speculative k=5"}
    draft = cfg.model_sets[0].drafts[0]
    assert {s.set_name for s in speculative} == {draft} and all(s.draft_models == [draft] for s in speculative)
    assert len(ids) == len(plan)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    written = []
    runner = types.SimpleNamespace(cfg=cfg, bar=types.SimpleNamespace(write=written.append, set_description=print),
                                   stopped=lambda: False)
    bench.llama_baseline(runner, [s for s in plan if s.method.mode == "llama-cpp"], None, {})
    assert len(written) == 1 and "not installed (make llama-cpp)" in written[0]


def test_dtype_auto_checks_against_the_services_one_token_decoding(tiny_dirs, tmp_path):
    """With dtype auto the verify service picks its dtype, so stock generate runs in each dtype as a
    speed figure and the reference is specdec-autoregressive, planned first on each cluster; a
    default run (the orchestrator's own settings, cost model on) sits beside fixed shapes."""
    path = write_config(tmp_path, tiny_dirs, tmp_path / "out")
    path.write_text(path.read_text() + "dtype: auto\ndefault: true\n")
    cfg = sweep.load_sweep_config(path)
    plan = sweep.sweep_plan(cfg)
    assert cfg.reference_mode == "autoregressive" and cfg.baseline_dtypes == ["float32", "bfloat16"]
    assert all("dtype" in s.method.settings for s in plan if s.model_set is None)  # no unnamed stock reference
    first_set = [s for s in plan if s.model_set == cfg.model_sets[0]]
    assert [s.method.label for s in first_set[::3]] == [
        "specdec-autoregressive", "specdec-sequential k=2 fixed", "specdec-tree w=2 d=3 nodes<=32 fixed",
        "specdec-default (cost model)"]
    assert first_set[-1].run_id.startswith("one--default--")
    assert len({s.run_id for s in plan}) == len(plan)
