"""Token trees: the trie that merges draft proposals, and the tree attention mask that lets the
target check a whole tree in one forward pass.

Vocabulary (as in SpecInfer, arXiv:2305.09781, and vLLM's spec-decode docs):
- a *token tree* is a set of draft paths sharing prefixes, stored as parallel arrays in
  topological order: ``tokens[i]`` and ``parents[i]`` where ``parents[i] < i``, and ``-1`` means
  "child of the last context token" (the root is the context itself);
- a node's *depth* is its distance from the root (children of the root have depth 0), so the node
  sits at sequence position ``context_len + depth``;
- a node attends to the whole context, to its ancestors and to itself, never to siblings or cousins.
  With that mask and those positions, one forward pass over all nodes gives every node exactly the
  logits a sequential run along its own path would give.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdec.errors import InvalidRequest


class TreeError(InvalidRequest):
    """A token tree that breaks the topological-order contract."""


def validate_parents(parents: list[int]) -> None:
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise TreeError(f"tree_parents[{i}] = {parent}: a parent index must be -1 or smaller than its own index {i}")


def node_depths(parents: list[int]) -> list[int]:
    """Depth of each node; children of the root have depth 0."""
    depths: list[int] = []
    for parent in parents:
        depths.append(0 if parent < 0 else depths[parent] + 1)
    return depths


def ancestor_matrix(parents: list[int]) -> torch.Tensor:
    """``[n, n]`` bool: ``m[i, j]`` is True when node j is node i or one of its ancestors."""
    n = len(parents)
    m = torch.zeros((n, n), dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            m[i] = m[parent]
        m[i, i] = True
    return m


def tree_attention_mask(prefix_len: int, n_pending: int, tail_parents: list[int], n_new: int) -> torch.Tensor:
    """The 4D boolean mask ``[1, 1, q, kv]`` for one forward over a cache laid out as
    ``[prefix | pending | tail]``.

    - ``prefix_len`` tokens are already cached, in sequence;
    - ``n_pending`` sequential tokens are fed now and extend the prefix (causal among themselves);
    - ``tail_parents`` are the parents of all tree nodes after the prefix (the last ``n_new`` of them
      are fed now, the others are already cached); ``-1`` is a child of the last prefix token.

    ``q = n_pending + n_new`` and ``kv = prefix_len + n_pending + len(tail_parents)``.
    """
    full_prefix = prefix_len + n_pending
    n_tail = len(tail_parents)
    q, kv = n_pending + n_new, full_prefix + n_tail
    mask = torch.zeros((q, kv), dtype=torch.bool)
    if n_pending:
        mask[:n_pending, :full_prefix] = torch.ones(n_pending, full_prefix, dtype=torch.bool).tril(prefix_len)
    if n_new:
        mask[n_pending:, :full_prefix] = True
        mask[n_pending:, full_prefix:] = ancestor_matrix(tail_parents)[n_tail - n_new :]
    return mask[None, None]


def tree_positions(full_prefix_len: int, n_pending: int, tail_parents: list[int], n_new: int) -> torch.Tensor:
    """Position ids ``[1, q]`` matching :func:`tree_attention_mask`; ``full_prefix_len`` counts the pending tokens."""
    pending = list(range(full_prefix_len - n_pending, full_prefix_len))
    depths = node_depths(tail_parents)[len(tail_parents) - n_new :]
    return torch.tensor([pending + [full_prefix_len + d for d in depths]], dtype=torch.long)


@dataclass
class TokenTree:
    """A token tree as parallel arrays (see the module docstring)."""

    tokens: list[int] = field(default_factory=list)  # [n]
    parents: list[int] = field(default_factory=list)  # [n], parents[i] < i
    sources: list[set[int]] = field(default_factory=list)  # [n], which drafts proposed the node

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> dict[int, int]:
        """Map token -> child index for the children of ``node`` (-1 for the root)."""
        return {t: i for i, (t, p) in enumerate(zip(self.tokens, self.parents)) if p == node}

    def holds(self, tokens: list[int]) -> bool:
        """Whether ``tokens`` are a path from the root (the first a child of the root, and so on)."""
        children, node = _children_index(self), -1
        for token in tokens:
            if (node := children.get((node, token))) is None:
                return False
        return True

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root down to ``node``."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def max_depth(self) -> int:
        return max(node_depths(self.parents), default=-1) + 1

    def answer_positions(self, context_len: int) -> list[int]:
        """Where each of the target's ``n + 1`` answers stands in the sequence: the token after the
        context sits at ``context_len``, the token after node ``i`` one past that node's own place."""
        return [context_len] + [context_len + depth + 1 for depth in node_depths(self.parents)]

    def branching_factor(self) -> float:
        """Mean number of children over nodes (the root included) that have any."""
        counts: dict[int, int] = {}
        for parent in self.parents:
            counts[parent] = counts.get(parent, 0) + 1
        return sum(counts.values()) / len(counts) if counts else 0.0


class TokenTrie:
    """Merges draft paths into one de-duplicated :class:`TokenTree`, capped at ``max_nodes``.

    Paths are inserted in the order given (best first), so the cap drops the least preferred
    suffixes; a path is cut where the cap is reached, which keeps the tree prefix-closed.
    """

    def __init__(self, max_nodes: int | None = None) -> None:
        self.max_nodes = max_nodes
        self.tree = TokenTree()
        self._index: dict[tuple[int, int], int] = {}  # (parent, token) -> node

    def insert(self, path: list[int], source: int) -> int:
        """Insert one path; returns how many of its tokens made it into the tree."""
        node = -1
        for depth, token in enumerate(path):
            child = self._index.get((node, token))
            if child is None:
                if self.max_nodes is not None and len(self.tree) >= self.max_nodes:
                    return depth
                child = len(self.tree)
                self.tree.tokens.append(token)
                self.tree.parents.append(node)
                self.tree.sources.append(set())
                self._index[(node, token)] = child
            self.tree.sources[child].add(source)
            node = child
        return len(path)

    def child(self, parent: int, token: int) -> int | None:
        """The node for ``token`` under ``parent`` (-1 = root), if inserted."""
        return self._index.get((parent, token))


def greedy_accept(tree: TokenTree, target_tokens: list[int]) -> tuple[list[int], int]:
    """Walk the tree along the target's greedy predictions.

    ``target_tokens[0]`` is the target's token after the context, ``target_tokens[i + 1]`` its token
    after node i. Returns the accepted node indices (root to leaf) and the *bonus token*: the target's
    own token after the last accepted node, which is always correct and so always kept. With an
    empty tree this is one step of plain greedy decoding.
    """
    accepted: list[int] = []
    node, prediction = -1, target_tokens[0]
    children = _children_index(tree)
    while (child := children.get((node, prediction))) is not None:
        accepted.append(child)
        node, prediction = child, target_tokens[child + 1]
    return accepted, prediction


def _children_index(tree: TokenTree) -> dict[tuple[int, int], int]:
    return {(p, t): i for i, (t, p) in enumerate(zip(tree.tokens, tree.parents))}
