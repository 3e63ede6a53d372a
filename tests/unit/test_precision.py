"""``--dtype auto``: every candidate exact path is made batch-invariant, checked end to end, timed,
and the fastest round's kept; a candidate that fails the check is never chosen, however fast."""


import pytest
import torch

from specdec import precision
from specdec.cost import CostCurve
from tiny_models import EOS, tiny_qwen2

ROWS = (1, 2, 4, 8)


def load(dtype: str):
    return tiny_qwen2(seed=3, layers=2, hidden=128, eos_token_id=EOS).to(getattr(torch, dtype))


def curves(by_dtype: dict[str, list[float]]):
    """A stand-in for the timing: ``calibrate_forward`` answering these ms for ``ROWS`` per dtype."""

    def calibrate(model, store, rows, reps, context_len):
        dtype = str(model.dtype).removeprefix("torch.")
        return CostCurve.of(zip(ROWS, by_dtype[dtype]))

    return calibrate


def test_the_fastest_round_is_kept_and_every_candidate_said_why(monkeypatch):
    monkeypatch.setattr(precision, "calibrate_forward", curves({"bfloat16": [10, 40, 80, 160], "float32": [15, 15, 16, 17]}))
    model, choice = precision.choose_precision(load, rows=ROWS)
    assert choice.dtype == "float32" and model.dtype == torch.float32  # flat beats a cheaper single row
    assert all(c.exact for c in choice.candidates)
    summary = choice.summary()
    assert summary.startswith("float32") and "bfloat16" in summary and "tokens/s" in summary
    # The model kept was made batch-invariant: a tree pass matches its one-token steps.
    assert precision.tree_matches_steps(model, model.config.vocab_size, seed=5)


def test_the_timing_is_real_without_a_stand_in():
    model, choice = precision.choose_precision(load, rows=(1, 2, 4), reps=1)
    assert choice.dtype in precision.CANDIDATES
    assert str(model.dtype) == f"torch.{choice.dtype}"
    assert all(ms > 0 for _, ms in choice.chosen.curve.points)


def row_count_dependent(model):
    """Linears whose output depends on how many rows the pass has: not batch-invariant."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            def forward(x, module=module, inner=module.forward):
                return inner(x) * (1 + 1e-2 * x.reshape(-1, x.shape[-1]).shape[0])
            module.forward = forward


def test_a_candidate_that_is_not_exact_is_never_chosen_however_fast(monkeypatch):
    real = precision.make_batch_invariant

    def broken_float32(model):
        kernel = real(model)
        if model.dtype == torch.float32:
            row_count_dependent(model)
        return kernel

    monkeypatch.setattr(precision, "make_batch_invariant", broken_float32)
    monkeypatch.setattr(precision, "calibrate_forward", curves({"bfloat16": [100, 200, 400, 800], "float32": [1, 1, 1, 1]}))
    model, choice = precision.choose_precision(load, rows=ROWS)
    assert choice.dtype == "bfloat16"
    refused = next(c for c in choice.candidates if c.dtype == "float32")
    assert not refused.exact and "refused" in choice.summary()


def test_no_exact_candidate_is_an_error(monkeypatch):
    real = precision.make_batch_invariant
    monkeypatch.setattr(precision, "make_batch_invariant", lambda model: (real(model), row_count_dependent(model))[0])
    with pytest.raises(RuntimeError, match="no exact path"):
        precision.choose_precision(load, rows=ROWS)


def test_a_candidate_that_cannot_load_is_skipped(monkeypatch):
    def load_or_fail(dtype):
        if dtype == "bfloat16":
            raise RuntimeError("no bfloat16 here")
        return load(dtype)

    monkeypatch.setattr(precision, "calibrate_forward", curves({"float32": [15, 15, 16, 17]}))
    _, choice = precision.choose_precision(load_or_fail, rows=ROWS)
    assert choice.dtype == "float32" and "could not load" in choice.summary()


def test_the_check_catches_a_model_that_is_not_batch_invariant():
    model = load("float32")
    precision.make_batch_invariant(model)
    assert precision.tree_matches_steps(model, model.config.vocab_size)
    row_count_dependent(model)
    assert not precision.tree_matches_steps(model, model.config.vocab_size)


def test_a_draft_takes_float32_on_a_cpu_and_bfloat16_elsewhere():
    assert precision.default_dtype("cpu") == "float32"
    assert precision.default_dtype("cuda:0") == "bfloat16"


def test_at_most_two_models_are_held_and_a_re_ranked_winner_is_loaded_again(monkeypatch):
    """Three candidates: b ranks first once a and b are measured, so a is let go; c's cheaper
    one-row pass then prices the draft lower and a ranks first over all three: a is loaded again,
    checked again and returned. Never more than two candidates' models are alive."""
    import gc
    import weakref

    from specdec.cost import fastest_curve

    rows = (1, 2, 4, 8, 16, 32, 64)
    ms = {"a": [174, 176, 180, 187, 201, 229, 284], "b": [138, 152, 180, 235, 345, 566, 1008],
          "c": [116, 175, 291, 524, 989, 1920, 3782]}
    pinned = {name: CostCurve.of(zip(rows, points)) for name, points in ms.items()}
    assert fastest_curve({k: pinned[k] for k in "ab"})[0] == "b" and fastest_curve(pinned)[0] == "a"  # the scenario
    alive, peak, loads = weakref.WeakSet(), [0], []

    def load_named(name):
        gc.collect()
        model = load("float32")
        model.candidate = name
        alive.add(model)
        peak[0] = max(peak[0], len(alive))
        loads.append(name)
        return model

    monkeypatch.setattr(precision, "calibrate_forward", lambda model, *args: pinned[model.candidate])
    model, choice = precision.choose_precision(load_named, dtypes=("a", "b", "c"), rows=rows)
    assert choice.dtype == "a" and model.candidate == "a" and loads == ["a", "b", "c", "a"]
    assert peak[0] <= 2, peak[0]
    assert precision.tree_matches_steps(model, model.config.vocab_size, seed=5)  # made batch-invariant again
