"""The GPU check (``make gpu-check``) on tiny shapes on the CPU: every step runs and the results it
writes say what a GPU run would be judged on, so the script cannot rot between GPU runs."""

import json

import pytest

from specdec.tools import gpu_check


@pytest.mark.timeout(120)
def test_gpu_check_runs_on_cpu_with_small_shapes(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--small", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["passed"] and results["exact"] and results["lossless_ok"]
    assert results["invariance"]["mismatched_nodes"] == 0
    assert [t["nodes"] for t in results["invariance"]["trees"]] == list(gpu_check.TREE_SIZES)
    for name in ("target", "draft"):
        assert [rows for rows, _ in results["curves"][name]] == list(gpu_check.CALIBRATION_ROWS)
        assert all(ms > 0 for _, ms in results["curves"][name])
    reference = results["lossless"]["reference"]
    assert len(reference) == gpu_check.NEW_TOKENS and len(set(reference)) > 1  # real choices, not one token echoed
    assert all(run["tokens"] == reference for run in results["lossless"]["runs"].values())
    assert results["lossless"]["runs"]["self"]["acceptance"] == 1.0  # the accepted path through the caches ran
    assert set(results["prediction"]) == set(gpu_check.ACCEPTANCE)
    assert "PASS" in capsys.readouterr().out
