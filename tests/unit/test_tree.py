"""Token trie, tree attention mask and greedy acceptance, on hand-built trees."""

import pytest
import torch

from specdec.errors import InvalidRequest
from specdec.tree import (
    TokenTree,
    TokenTrie,
    ancestor_matrix,
    greedy_accept,
    node_depths,
    tree_attention_mask,
    tree_positions,
    validate_parents,
)


def test_depths_and_ancestors():
    parents = [-1, 0, 0, -1, 1]
    assert node_depths(parents) == [0, 1, 1, 0, 2]
    m = ancestor_matrix(parents)
    assert m[4].tolist() == [True, True, False, False, True]
    assert m[3].tolist() == [False, False, False, True, False]


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, -2], [-1, 0, 5]])
def test_invalid_parents_name_the_field(parents):
    with pytest.raises(InvalidRequest, match="tree_parents"):
        validate_parents(parents)


def test_mask_pending_then_tree():
    # 3 cached, 2 pending, tree: a(-1) b(0) c(-1)
    mask = tree_attention_mask(3, 2, [-1, 0, -1], 3)[0, 0]
    assert mask.shape == (5, 8)
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 0, 0, 0, 0],  # pending 0 sees cache + itself
            [1, 1, 1, 1, 1, 0, 0, 0],  # pending 1
            [1, 1, 1, 1, 1, 1, 0, 0],  # a: context + itself
            [1, 1, 1, 1, 1, 1, 1, 0],  # b: context + a + itself
            [1, 1, 1, 1, 1, 0, 0, 1],  # c: context + itself, not its cousin a
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert tree_positions(5, 2, [-1, 0, -1], 3).tolist() == [[3, 4, 5, 6, 5]]


def test_mask_extends_cached_tail():
    # 4 prefix tokens, tail of 2 cached nodes (x -1, y 0); feed z (parent y) and w (parent x).
    mask = tree_attention_mask(4, 0, [-1, 0, 1, 0], 2)[0, 0]
    assert mask.shape == (2, 8)
    assert mask[0].tolist() == [True] * 4 + [True, True, True, False]
    assert mask[1].tolist() == [True] * 4 + [True, False, False, True]
    assert tree_positions(4, 0, [-1, 0, 1, 0], 2).tolist() == [[6, 5]]


def test_trie_deduplicates_and_records_sources():
    trie = TokenTrie()
    trie.insert([5, 6, 7], source=0)
    trie.insert([5, 6, 8], source=1)
    trie.insert([9], source=1)
    tree = trie.tree
    assert tree.tokens == [5, 6, 7, 8, 9]
    assert tree.parents == [-1, 0, 1, 1, -1]
    assert tree.sources[1] == {0, 1} and tree.sources[2] == {0}
    assert tree.max_depth() == 3
    assert tree.branching_factor() == pytest.approx((2 + 1 + 2) / 3)


def test_trie_cap_keeps_tree_prefix_closed():
    trie = TokenTrie(max_nodes=4)
    assert trie.insert([1, 2, 3], 0) == 3
    assert trie.insert([1, 4, 5], 0) == 2  # 1 is shared, 4 fits, 5 does not
    assert trie.tree.parents == [-1, 0, 1, 0]
    validate_parents(trie.tree.parents)


@pytest.mark.parametrize(
    "targets, accepted, bonus",
    [
        ([5, 6, 7, 0, 1, 2], [0, 1, 2], 0),  # whole first branch accepted, bonus after it
        ([5, 6, 8, 0, 1, 2], [0, 1, 3], 1),  # second child of node 1
        ([5, 4, 7, 0, 1, 2], [0], 4),  # correction after the first node
        ([9, 6, 7, 0, 1, 2], [4], 2),  # the other root child
        ([3, 6, 7, 0, 1, 2], [], 3),  # nothing accepted: the target's token
    ],
)
def test_greedy_accept(targets, accepted, bonus):
    tree = TokenTree(tokens=[5, 6, 7, 8, 9], parents=[-1, 0, 1, 1, -1])
    assert greedy_accept(tree, targets) == (accepted, bonus)


def test_greedy_accept_empty_tree_is_plain_decoding():
    assert greedy_accept(TokenTree(), [42]) == ([], 42)
