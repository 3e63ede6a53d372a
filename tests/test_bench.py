"""``specdec bench`` end to end on the tiny models (real cluster processes, two prompts, a few tokens),
checking that results.json, summary.csv and the lossless check agree with each other; plus its flags."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from specdec.tools import bench
from tiny_models import reference_greedy

MAX_NEW_TOKENS = 10


def test_quick_sweeps_small_settings_and_flags_override_it():
    quick = bench.parse_args(["--quick"])
    assert quick.draft_length == list(bench.QUICK_DRAFT_LENGTHS)
    assert quick.tree_shapes == list(bench.QUICK_TREE_SHAPES)
    assert quick.modes == list(bench.ALL_MODES)

    args = bench.parse_args(["--quick", "--draft-length", "3", "--beam-width", "2,3", "--beam-depth", "4", "--modes", "tree"])
    assert args.draft_length == [3]
    assert args.tree_shapes == [(2, 4), (3, 4)]
    assert args.modes == ["target-only", "tree"]  # the reference always runs

    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "beam"])


def test_cli_forwards_bench_flags(monkeypatch):
    from specdec.tools import cli

    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "--quick", "--modes", "tree", "--repeats", "2"]) == 0
    assert seen == [["--quick", "--modes", "tree", "--repeats", "2"]]


@pytest.mark.timeout(120)
def test_bench_end_to_end_on_tiny_models(tiny_dirs, tiny_target, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "c1", "class": "code", "prompt": "def add(a, b):\n    return"}) + "\n"
        + json.dumps({"id": "p1", "class": "prose", "prompt": "The river ran past the old mill and"}) + "\n"
    )
    argv = [
        "--target-model", str(tiny_dirs["target"]), "--draft-model", str(tiny_dirs["draft"]),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
        "--draft-length", "2,3", "--beam-width", "2", "--beam-depth", "3",
    ]
    assert bench.main(argv) == 0
    (run_dir,) = (tmp_path / "out").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["lossless"] == {"passed": True, "mismatches": []}

    labels = [m["label"] for m in results["meta"]["methods"]]
    assert labels == [
        "target-only", "assisted", "specdec-autoregressive", "specdec-sequential k=2", "specdec-sequential k=3",
        "specdec-tree w=2 d=3 nodes<=64",
    ]
    runs = results["runs"]
    assert sorted((r["label"], r["prompt_id"]) for r in runs) == sorted((label, p) for label in labels for p in ("c1", "p1"))

    # target-only is transformers' greedy output; every other method must equal it token for token.
    prompt_ids = {p["id"]: p["prompt_token_ids"] for p in results["meta"]["prompts"]}
    reference = {r["prompt_id"]: r["token_ids"] for r in runs if r["method"] == "target-only"}
    for prompt_id, tokens in reference.items():
        assert tokens == reference_greedy(tiny_target, prompt_ids[prompt_id], MAX_NEW_TOKENS)
    for r in runs:
        assert r["matches_target"] and r["first_mismatch"] is None
        assert r["token_ids"] == reference[r["prompt_id"]]
        assert r["tokens"] == len(r["token_ids"]) > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["load_average_1m"] >= 0
        if r["method"].startswith("specdec-"):
            assert r["stats"]["mode"] == r["mode"]
            assert r["stats"]["tokens_generated"] == r["tokens"]
            assert r["stats"]["prompt_tokens"] == len(prompt_ids[r["prompt_id"]])

    rows = results["summary"]
    assert {(row["class"], row["label"]) for row in rows} == {(c, label) for c in ("code", "prose", "all") for label in labels}
    target_tps = {row["class"]: row["tokens_per_s"] for row in rows if row["method"] == "target-only"}
    for row in rows:
        mine = [r for r in runs if r["label"] == row["label"] and row["class"] in (r["class"], "all")]
        assert row["runs"] == len(mine)
        assert row["new_tokens"] == sum(r["tokens"] for r in mine)
        assert row["tokens_per_s"] == pytest.approx(statistics.median(r["tokens_per_s"] for r in mine))
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / target_tps[row["class"]])
        assert row["max_load_average_1m"] == max(r["load_average_1m"] for r in mine)
        assert row["lossless"] is True
        if row["method"].startswith("specdec-"):
            rounds = sum(r["stats"]["rounds"] for r in mine)
            assert row["mean_accepted_per_round"] == pytest.approx(row["new_tokens"] / rounds)
        else:
            assert row["mean_accepted_per_round"] is None

    with open(run_dir / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(t["class"], t["label"]) for t in table] == [(row["class"], row["label"]) for row in rows]
    for t, row in zip(table, rows):
        assert float(t["tokens_per_s"]) == pytest.approx(row["tokens_per_s"])
        assert float(t["speedup"]) == pytest.approx(row["speedup"])
        assert t["lossless"] == "True"
    assert (run_dir / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
