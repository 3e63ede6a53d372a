"""``specdec enginebench``: the int4 engine measured on a tiny GGUF-converted model (a row-invariant
curve), and the comparison that names the first pass whose rows changed."""

import numpy as np
import pytest

from specdec.tools.enginebench import EngineResult, _first_variant, int4_engine, report
from tiny_models import save_tiny_gguf, tiny_qwen2


def test_the_first_variant_pass_is_the_smallest_that_changed_any_row():
    steps = [np.arange(4.0) + i for i in range(4)]
    same = {n: [s.copy() for s in steps[:n]] for n in (1, 2, 4)}
    assert _first_variant(same, steps) is None
    changed = {n: [s.copy() for s in steps[:n]] for n in (1, 2, 4)}
    changed[4][3][0] = np.nextafter(changed[4][3][0], np.inf)  # one bit of one row of the widest pass
    changed[2][1][2] += 1.0
    assert _first_variant(changed, steps) == 2


def test_the_int4_engine_is_measured_row_invariant_on_its_gguf(tmp_path):
    directory = save_tiny_gguf(tmp_path / "target", tiny_qwen2(seed=0, layers=2, hidden=256))
    result = int4_engine(str(directory), [1, 2, 4], reps=1, context_len=16)
    assert result.engine == "int4" and "int4" in result.setting  # the int4 product ran, not the floats
    assert set(result.ms_by_rows) == {1, 2, 4} and all(ms > 0 for ms in result.ms_by_rows.values())
    assert result.first_variant_rows is None


def test_the_report_names_what_is_exact_and_what_was_skipped():
    text = report([EngineResult("int4", "torch", {1: 70.0, 2: 80.0}),
                   EngineResult("llama.cpp", "repacked", {1: 30.0, 2: 55.0}, first_variant_rows=2),
                   EngineResult("llama.cpp", "", note="skipped: llama-cpp-python is not installed")], [1, 2])
    lines = text.splitlines()
    assert lines[1].endswith("yes") and "70.0" in lines[1]
    assert lines[2].endswith("no: rows differ at 2 rows")
    assert "skipped" in lines[3]


@pytest.mark.slow
def test_llama_cpp_is_measured_on_the_real_gguf():
    """llama.cpp (where `make llama-cpp` installed it) on the 0.5B draft's Q4_K_M file: its one-row
    pass equals its one-token step (the comparison is sound), and a cost is measured for each pass."""
    pytest.importorskip("llama_cpp")
    from specdec.gguf_weights import model_gguf
    from specdec.model_store import fetch
    from specdec.tools.enginebench import llama_engine

    gguf = model_gguf(fetch("qwen2.5-coder-0.5b-instruct"))
    result = llama_engine(str(gguf), threads=2, repack=True, flash_attention=False, rows=[1, 2, 4], reps=1, context_len=16)
    assert set(result.ms_by_rows) == {1, 2, 4} and all(ms > 0 for ms in result.ms_by_rows.values())
    assert result.first_variant_rows != 1
