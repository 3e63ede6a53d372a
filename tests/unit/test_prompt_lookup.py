"""The prompt-lookup draft on hand-built token lists: exact proposals, no match, overlapping
matches, the depth cut, width and ranking; its one-hot distributions under sampling; and the
acceptance rule's output distribution with one-hot drafts (chi-square against the target's)."""

from __future__ import annotations

import time

import pytest
import torch

from specdec.lookup import Match, PromptLookup, find_continuations


def test_proposes_what_followed_the_last_ngram():
    #          0  1  2  3  4  5  6  7  8
    context = [5, 6, 7, 8, 9, 1, 5, 6, 7]
    assert find_continuations(context, width=1, depth=2) == [[8, 9]]
    assert find_continuations(context, width=1, depth=4) == [[8, 9, 1, 5]]


def test_no_match_gives_no_proposal():
    assert find_continuations([1, 2, 3, 4, 5], width=3, depth=4) == []
    assert find_continuations([7], width=1, depth=4) == []
    # A suffix shorter than min_ngram is never searched: only [4] recurs here.
    assert find_continuations([4, 1, 2, 4], width=1, depth=2) == []
    assert find_continuations([4, 1, 2, 4], width=1, depth=2, min_ngram=1) == [[1, 2]]


def test_depth_cuts_the_continuation():
    context = [1, 2, 3, 4, 5, 6, 7, 1, 2]
    for depth in range(1, 6):
        assert find_continuations(context, 1, depth) == [[3, 4, 5, 6, 7][:depth]]


def test_overlapping_match_repeats_its_period():
    # The last match of [1, 2] ends right before the suffix: what follows runs into the suffix
    # and on through the proposal itself.
    assert find_continuations([1, 2, 1, 2], width=1, depth=5) == [[1, 2, 1, 2, 1]]
    assert find_continuations([3, 3, 3], width=1, depth=4, min_ngram=1) == [[3, 3, 3, 3]]
    assert find_continuations([9, 1, 2, 3, 1, 2, 3, 1, 2], width=1, depth=4) == [[3, 1, 2, 3]]


def test_longer_suffix_wins_over_a_more_recent_shorter_one():
    # [3, 4] occurs at 2 (after [2]) and at 6 (after [9]); the context ends in [2, 3, 4]:
    # the older match agrees on 3 tokens and is offered first, the recent 2-token one second.
    context = [1, 2, 3, 4, 50, 9, 3, 4, 60, 2, 3, 4]
    assert find_continuations(context, width=2, depth=2, max_ngram=2) == [[50, 9], [60, 2]]
    assert find_continuations(context, width=2, depth=2, max_ngram=4) == [[50, 9], [60, 2]]


def test_most_recent_first_among_equal_matches_and_distinct_paths():
    context = [7, 8, 1, 7, 8, 2, 7, 8, 3, 0, 7, 8]
    assert find_continuations(context, width=1, depth=1) == [[3]]
    assert find_continuations(context, width=3, depth=1) == [[3], [2], [1]]
    assert find_continuations(context, width=8, depth=1) == [[3], [2], [1]]  # no more to offer
    # The same continuation twice is offered once.
    assert find_continuations([7, 8, 1, 7, 8, 1, 7, 8], width=2, depth=1) == [[1]]


def test_width_falls_back_to_shorter_suffixes():
    # [6, 7, 8] recurs once (then 1); [7, 8] also after [0] (then 2); [8] alone after [5] (then 3).
    context = [6, 7, 8, 1, 0, 7, 8, 2, 5, 8, 3, 6, 7, 8]
    assert find_continuations(context, width=3, depth=1, max_ngram=3, min_ngram=1) == [[1], [2], [3]]
    assert find_continuations(context, width=3, depth=1, max_ngram=3, min_ngram=2) == [[1], [2]]


@pytest.mark.parametrize("depth", [1, 3, 8])
@pytest.mark.parametrize("width", [1, 2, 4])
def test_proposals_are_continuations_of_matches(width, depth):
    """Every path proposed follows an earlier occurrence of the context's last n >= 2 tokens."""
    generator = torch.Generator().manual_seed(width * 10 + depth)
    context = torch.randint(0, 6, (300,), generator=generator).tolist()
    paths = find_continuations(context, width, depth)
    assert 1 <= len(paths) <= width and len({tuple(p) for p in paths}) == len(paths)
    sequence = context
    for path in paths:
        assert len(path) == depth
        extended = sequence + path
        assert any(
            extended[i:i + 2] == context[-2:] and extended[i + 2:i + 2 + depth] == path
            for i in range(len(context) - 2)
        )


def test_lookup_proposes_one_chain_and_how_far_its_match_agrees():
    lookup = PromptLookup()
    assert lookup.propose([5, 6, 7, 8, 5, 6], depth=3) == Match([7, 8, 5], 2)
    assert lookup.propose([5, 6, 7, 8, 5, 6], depth=0) is None
    assert lookup.propose([1, 2, 3], 3) is None
    assert lookup.propose([], 3) is None
    assert PromptLookup(min_ngram=1).propose([4, 1, 2, 4], 2) == Match([1, 2], 1)
    copied = list(range(40)) + list(range(30))  # the last 30 tokens repeat the first 30
    match = lookup.propose(copied, 4)
    assert match == Match([30, 31, 32, 33], 30)
    with pytest.raises(ValueError):
        PromptLookup(min_ngram=3, max_ngram=2)


def test_matches_are_counted_by_how_far_they_agree():
    keys = [Match([1], agreed).stats_key for agreed in (1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 64)]
    assert keys == ["prompt-lookup/1", "prompt-lookup/2", "prompt-lookup/2", "prompt-lookup/4", "prompt-lookup/4",
                    "prompt-lookup/8", "prompt-lookup/8", "prompt-lookup/16", "prompt-lookup/16", "prompt-lookup/32",
                    "prompt-lookup/32"]


def test_lookup_on_a_long_context_costs_well_under_a_millisecond():
    generator = torch.Generator().manual_seed(3)
    context = torch.randint(0, 2000, (2048,), generator=generator).tolist()
    context += context[100:110]  # one 10-token repeat to find
    find_continuations(context, 3, 8)
    start = time.perf_counter()
    for _ in range(50):
        paths = find_continuations(context, 3, 8)
    per_call_ms = (time.perf_counter() - start) / 50 * 1e3
    assert paths[0] == context[110:118]
    assert per_call_ms < 20, per_call_ms  # loose: a shared CPU; typically a fraction of a millisecond


def test_a_prediction_is_searched_beside_the_context():
    """Predicted Outputs: where the context's end occurs in the request's prediction, what follows it
    there is the chain (named "prediction"), read only to the prediction's end."""
    from specdec.lookup import PREDICTION

    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    prediction = [50, 51, 52, 53, 54, 55]
    found = lookup.propose([1, 2, 3, 51, 52], 8, reference=prediction)
    assert found.tokens == [53, 54, 55] and found.source == PREDICTION and found.stats_key.startswith(PREDICTION + "/")
    # A longer agreement in the context itself wins, and is the context's own.
    context = [7, 8, 9, 51, 52, 60, 7, 8, 9, 51, 52]
    found = lookup.propose(context, 2, reference=prediction)
    assert found.tokens == [60, 7] and found.source == "prompt-lookup"
    # As long a match in both: the prediction's (a prompt quoting the file being edited holds it too).
    found = lookup.propose([50, 51, 52, 53, 9, 50, 51], 2, reference=prediction)
    assert found.tokens == [52, 53] and found.source == PREDICTION
    # Nothing in either: no chain; the prediction's own end proposes nothing past it.
    assert lookup.propose([1, 2, 3], 4, reference=prediction) is None
    assert lookup.propose([9, 54, 55], 4, reference=prediction) is None
