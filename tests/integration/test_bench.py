"""``specdec bench`` and its shipped quick set (``benchmarks/quick.yaml``): the default sweep, found by
name from any directory as an installed package would find it; shipped sweeps by name or by path; and
the quick set run end to end on the tiny models (real cluster processes, two of its prompts, a few
tokens), its logs, ``benchmark_summary.csv`` and the lossless check agreeing with each other."""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from specdec.tools import bench, cli, sweep
from specdec.tools.prompts import PromptFileError, bundled_dir, sweep_file
from tiny_models import reference_greedy

ROOT = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 10
QUICK_LABELS = [
    "target-only", "assisted", "specdec-autoregressive", "specdec-sequential k=2", "specdec-sequential k=3",
    "specdec-tree w=2 d=2 nodes<=64", "specdec-tree w=2 d=4 nodes<=64",
]


def test_the_quick_set():
    cfg = sweep.load_sweep_config(sweep_file("quick"))
    plan = sweep.sweep_plan(cfg)
    assert list(dict.fromkeys(s.method.label for s in plan)) == QUICK_LABELS
    assert [p.cls for p in cfg.prompts] == ["code"] * 4 + ["prose"] * 2
    assert cfg.max_new_tokens == [64] and cfg.dtype == "float32" and cfg.baselines == ["target-only", "assisted"]
    assert len(plan) == 7 * 6
    assert cfg.output_dir == Path("bench_results/quick")


def test_default_is_the_quick_set_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nowhere near the repository: the files come from the package
    assert cli.main(["bench", "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "42 of 42 runs to do" in err
    assert len(out.splitlines()) == 42 and "coder-0.5b--tree-w2-d4-n64--n64--prose-city-cars--r0" in out
    assert sweep_file("quick") == bundled_dir() / "quick.yaml"


def test_shipped_sweeps_by_name_and_by_path(monkeypatch):
    for name in ("quick", "bench", "bench-gpu", "bench.yaml"):
        assert sweep_file(name).parent == bundled_dir()
    monkeypatch.chdir(ROOT)
    assert sweep_file("benchmarks/bench.yaml") == Path("benchmarks/bench.yaml")  # as the README and Makefile write it
    with pytest.raises(PromptFileError, match="bench, bench-gpu, quantized, quick, speed"):
        sweep_file("nope")
    with pytest.raises(PromptFileError, match="no sweep file"):
        sweep_file("benchmarks/nope.yaml")


def test_bench_is_a_subcommand(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(bench, "sweep", lambda cfg, limit=None, dry_run=False: seen.append((cfg, limit, dry_run)) or 0)
    assert cli.main(["bench", "--config", "bench", "--limit", "3"]) == 0
    (cfg, limit, dry_run), = seen
    assert cfg.name == "embedded-cpu" and limit == 3 and not dry_run
    assert cli.main(["bench", "--config", "nope"]) == 1
    assert "shipped sweeps: bench, bench-gpu, quantized, quick, speed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--draft-length", "2"])  # the flags of the old quick pipeline are gone


@pytest.mark.timeout(300)
def test_quick_set_end_to_end_on_tiny_models(tiny_dirs, tiny_target, tmp_path):
    quick = sweep.load_sweep_config(sweep_file("quick"))
    prompts = [next(p for p in quick.prompts if p.cls == cls) for cls in ("code", "prose")]
    cfg = dataclasses.replace(
        quick, target_model=str(tiny_dirs["target"]), model_sets=[sweep.ModelSet("tiny", (str(tiny_dirs["draft"]),))],
        max_new_tokens=[MAX_NEW_TOKENS], prompts=prompts, output_dir=tmp_path / "out", warmup_tokens=2, startup_timeout_s=120,
    )
    assert bench.sweep(cfg) == 0
    logs = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "runs").glob("*.json"))]
    assert sorted((log["bench"]["label"], log["bench"]["prompt_id"]) for log in logs) == sorted(
        (label, p.id) for label in QUICK_LABELS for p in prompts)

    # target-only is transformers' greedy output; every other method must equal it token for token.
    meta = json.loads((tmp_path / "out" / "sweep.json").read_text())
    prompt_ids = {p["id"]: p["prompt_token_ids"] for p in meta["prompts"]}
    for log in logs:
        b = log["bench"]
        assert log["token_ids"] == reference_greedy(tiny_target, prompt_ids[b["prompt_id"]], MAX_NEW_TOKENS)
        assert b["matches_target"] and b["first_mismatch"] is None
        assert b["tokens"] == len(log["token_ids"]) == log["stats"]["tokens_generated"] > 0
        assert b["tokens_per_s"] == pytest.approx(b["tokens"] / b["seconds"])
        assert log["stats"]["mode"] == b["mode"] and log["stats"]["prompt_tokens"] == len(prompt_ids[b["prompt_id"]])
        assert log["prompt_token_ids"] == prompt_ids[b["prompt_id"]] and len(log["token_texts"]) == b["tokens"]

    with open(tmp_path / "out" / "benchmark_summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {(t["class"], t["label"]) for t in table} == {(c, label) for c in ("code", "prose", "all") for label in QUICK_LABELS}
    target_tps = {t["class"]: float(t["tokens_per_s"]) for t in table if t["mode"] == "target-only"}
    for t in table:
        mine = [log["bench"] for log in logs if log["bench"]["label"] == t["label"] and t["class"] in (log["bench"]["class"], "all")]
        assert int(t["runs"]) == len(mine)
        assert float(t["tokens_per_s"]) == pytest.approx(statistics.median(b["tokens_per_s"] for b in mine))
        assert float(t["speedup"]) == pytest.approx(float(t["tokens_per_s"]) / target_tps[t["class"]])
        assert t["lossless"] == "True"
    assert (tmp_path / "out" / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
