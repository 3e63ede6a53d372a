"""The accept/fallback loop of speculative decoding, in one place.

Each *round*:
1. every draft proposes paths after the current context, all drafts concurrently (tree mode: beam
   search, ``beam_width`` beams of ``beam_depth`` tokens; sequential mode: one greedy chain of
   ``draft_length`` tokens; autoregressive mode: no drafts);
2. the paths are merged into one de-duplicated token trie (``specdec.tree.TokenTrie``);
3. the target verifies the whole trie in one forward pass and returns its own token at the context
   end and after every node;
4. the *accepted* tokens are the longest path the target agrees with; the *bonus token* is the
   target's own token after them: a *correction* when a draft proposed something else there, a free
   extra token when the drafts had nothing to offer. So every round yields at least one token and
   greedy output is exactly the target's own.

A draft that fails or misses its deadline is skipped for the round and left out for a backoff
period (``specdec.orchestrator.resilience.DraftHealth``), then asked again; with none left the round is
plain decoding (*fallback*). The request's deadline bounds every internal call, and a cancelled
request stops between rounds; either way its sessions are released in every service at once. Clients are anything with ``draft``/``verify`` methods: gRPC stubs in
the service, in-process engines in tests, the same loop either way.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from specdec.orchestrator.instrumentation import GenerationInstrumentation
import torch

from specdec.orchestrator.resilience import DraftHealth
from specdec.errors import Cancelled, DeadlineExceeded, InvalidRequest, Unavailable, check_range
from specdec.sampling import Candidate, SamplingParams, accept_sampled_tree
from specdec.tree import TokenTree, TokenTrie, greedy_accept

log = logging.getLogger("specdec.orchestrator")

AUTOREGRESSIVE, SEQUENTIAL, TREE = "autoregressive", "sequential", "tree"


class DraftClient(Protocol):
    name: str

    def draft(self, session_id: str, context: list[int], beam_width: int, depth: int, timeout_s: float) -> list[list[int]]:
        """Beams (best first) of up to ``depth`` tokens after ``context``."""

    def release(self, session_id: str) -> None: ...


class SamplingDraftClient(DraftClient, Protocol):
    def draft_sampled(self, session_id, context, chains, depth, timeout_s, sampling, seed, vocab_size):
        """``(chains, dists)``: independent sampled chains, and for each chain token the exact
        distribution (``[vocab]`` tensor) the draft drew it from."""


class VerifyClient(Protocol):
    def verify(self, session_id: str, context: list[int], tree: TokenTree, timeout_s: float) -> list[int]:
        """The target's token at the context end and after each node: ``len(tree) + 1`` entries."""

    def verify_sampled(self, session_id, context, tree, timeout_s, sampling, vocab_size) -> torch.Tensor:
        """The target's warped distributions at the context end and after each node: ``[n + 1, vocab]``."""

    def release(self, session_id: str) -> None: ...


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    mode: str
    draft_length: int
    beam_width: int
    beam_depth: int
    max_tree_nodes: int
    stop: list[str] = field(default_factory=list)
    include_rounds: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)  # temperature 0: greedy
    deadline: float | None = None  # time.monotonic() by which the whole generation must end
    adaptive: bool = False  # draft length/depth follows acceptance, up to the requested value
    cancelled: Callable[[], bool] | None = None  # true once the client has gone away


@dataclass
class RoundRecord:
    index: int
    proposals: dict[str, list[list[int]]]  # draft name -> beams
    accepted: list[int]  # draft tokens the target agreed with
    bonus_token: int | None  # the target's own token (None when the round ended on a stop first)
    bonus_is_correction: bool
    winning_draft: str
    tree_nodes: int
    branching_factor: float
    draft_ms: float
    verify_ms: float
    fallback: bool
    fallback_reason: str
    new_tokens: list[int]  # what this round added to the output (after stop/length truncation)
    accepted_by_draft: dict[str, int] = field(default_factory=dict)


@dataclass
class DraftTally:
    proposed_tokens: int = 0  # every token of every beam, before de-duplication
    proposed_positions: int = 0  # longest beam per round: the most it could have had accepted
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_positions if self.proposed_positions else 0.0


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "length" or "stop"
    prompt_tokens: int
    rounds: list[RoundRecord]
    drafts: dict[str, DraftTally]
    mode: str
    draft_ms: float
    verify_ms: float
    total_ms: float
    time_to_first_token_ms: float

    @property
    def stats(self) -> dict:
        n_rounds = len(self.rounds)
        tree_rounds = [r for r in self.rounds if r.tree_nodes]
        accepted = sum(len(r.accepted) for r in self.rounds)
        return {
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "tokens_generated": len(self.token_ids),
            "rounds": n_rounds,
            "verification_calls": n_rounds,
            "draft_tokens_proposed": sum(t.proposed_tokens for t in self.drafts.values()),
            "draft_tokens_accepted": accepted,
            "bonus_tokens": sum(r.bonus_token is not None for r in self.rounds),
            "tree_nodes_total": sum(r.tree_nodes for r in self.rounds),
            "tree_avg_branching_factor": (
                sum(r.branching_factor for r in tree_rounds) / len(tree_rounds) if tree_rounds else 0.0
            ),
            "mean_accepted_per_round": len(self.token_ids) / n_rounds if n_rounds else 0.0,
            "drafts": {
                name: {
                    "proposed_tokens": t.proposed_tokens,
                    "accepted_tokens": t.accepted_tokens,
                    "acceptance_rate": t.acceptance_rate,
                }
                for name, t in self.drafts.items()
            },
            "draft_ms": self.draft_ms,
            "verify_ms": self.verify_ms,
            "other_ms": max(0.0, self.total_ms - self.draft_ms - self.verify_ms),
            "total_ms": self.total_ms,
            "tokens_per_second": len(self.token_ids) / (self.total_ms / 1e3) if self.total_ms else 0.0,
            "time_to_first_token_ms": self.time_to_first_token_ms,
        }


@dataclass
class Limits:
    vocab_size: int
    max_context: int
    max_new_tokens_limit: int
    eos_token_ids: frozenset[int]
    max_draft_length: int = 16
    max_beam_width: int = 8
    max_tree_nodes: int = 1024


class SpeculativeController:
    def __init__(
        self,
        verifier: VerifyClient,
        drafts: list[DraftClient],
        limits: Limits,
        decode: Callable[[list[int]], str],
        draft_timeout_s: float = 10.0,
        verify_timeout_s: float = 60.0,
        instrumentation: GenerationInstrumentation | None = None,
    ) -> None:
        self.verifier = verifier
        self.drafts = drafts
        self.limits = limits
        self.decode = decode
        self.draft_timeout_s = draft_timeout_s
        self.verify_timeout_s = verify_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="draft-call")
        self.draft_health = DraftHealth()
        self.instrumentation = instrumentation or GenerationInstrumentation()  # round spans and metrics

    def check(self, req: GenerationRequest) -> None:
        """Raise InvalidRequest naming the field for anything the loop cannot serve."""
        lim = self.limits
        if not req.prompt_ids:
            raise InvalidRequest("prompt is empty")
        for i, token in enumerate(req.prompt_ids):
            if not 0 <= token < lim.vocab_size:
                raise InvalidRequest(f"prompt_token_ids[{i}] = {token} is outside the vocabulary [0, {lim.vocab_size})")
        check_range("max_new_tokens", req.max_new_tokens, 1, lim.max_new_tokens_limit)
        if lim.max_context and len(req.prompt_ids) >= lim.max_context:
            raise InvalidRequest(f"prompt has {len(req.prompt_ids)} tokens; the model's context is {lim.max_context}")
        if lim.max_context and len(req.prompt_ids) + req.max_new_tokens > lim.max_context:
            # Refused up front: the verify service would reject the context mid-generation.
            raise InvalidRequest(
                f"max_new_tokens = {req.max_new_tokens} plus the prompt's {len(req.prompt_ids)} tokens exceeds the model's context of {lim.max_context}"
            )
        if req.mode not in (AUTOREGRESSIVE, SEQUENTIAL, TREE):
            raise InvalidRequest(f"mode {req.mode!r} is not one of autoregressive, sequential, tree")
        check_range("speculation.draft_length", req.draft_length, 1, lim.max_draft_length)
        check_range("speculation.beam_width", req.beam_width, 1, lim.max_beam_width)
        check_range("speculation.beam_depth", req.beam_depth, 1, lim.max_draft_length)
        check_range("speculation.max_tree_nodes", req.max_tree_nodes, 1, lim.max_tree_nodes)

    def generate(self, req: GenerationRequest, trace_parent=None) -> GenerationResult:
        stream = self.stream(req, trace_parent)
        while True:
            try:
                next(stream)
            except StopIteration as done:
                return done.value

    def stream(self, req: GenerationRequest, trace_parent=None) -> Iterator[RoundRecord]:
        """Yield each round as it completes; the generator's return value is the result.

        ``trace_parent``: the OpenTelemetry context of the generation's span, parent of the round spans.
        """
        self.check(req)
        session_id = f"gen-{uuid.uuid4()}"
        start = time.perf_counter()
        output: list[int] = []
        rounds: list[RoundRecord] = []
        tallies = {d.name: DraftTally() for d in self.drafts} if req.mode != AUTOREGRESSIVE else {}
        finish, first_token_ms, draft_ms, verify_ms = "length", 0.0, 0.0, 0.0
        sampling = req.sampling if not req.sampling.greedy else None
        # One generator per request drives every random choice (draft seeds, accept coins, bonus
        # draws): a fixed seed replays the same output on the same cluster configuration.
        generator = torch.Generator().manual_seed(req.sampling.seed or int.from_bytes(uuid.uuid4().bytes[:7], "big"))
        max_depth = req.draft_length if req.mode == SEQUENTIAL else req.beam_depth
        planned = max_depth  # this round's draft length; adapted when req.adaptive
        try:
            while len(output) < req.max_new_tokens:
                context = req.prompt_ids + output
                remaining = req.max_new_tokens - len(output)
                # Drafting past the budget is wasted work: a round adds accepted + 1 tokens.
                depth = min(planned, remaining - 1)
                if self.limits.max_context:
                    depth = min(depth, self.limits.max_context - len(context) - 1)
                width = req.beam_width if req.mode == TREE else 1
                draft_timeout, verify_timeout = self._budget(req, len(rounds))

                # The round's trace span (current while it runs) and metrics; nothing when both are off.
                with self.instrumentation.round(trace_parent, len(rounds), req.mode) as observed:
                    t0 = time.perf_counter()
                    proposals, fallback_reason, dists = self._propose(
                        req.mode, session_id, context, width, depth, sampling, generator, draft_timeout
                    )
                    t1 = time.perf_counter()
                    if sampling is None:
                        tree = self._merge(proposals, req.max_tree_nodes)
                        target = self.verifier.verify(session_id, context, tree, verify_timeout)
                    else:
                        tree, candidates = self._merge_sampled(proposals, dists, req.max_tree_nodes)
                        target = self.verifier.verify_sampled(
                            session_id, context, tree, verify_timeout, sampling, self.limits.vocab_size
                        )
                    t2 = time.perf_counter()
                    if len(target) != len(tree) + 1:
                        raise Unavailable(f"verify service returned {len(target)} predictions for a tree of {len(tree)}")

                    if sampling is None:
                        accepted_nodes, bonus = greedy_accept(tree, target)
                    else:
                        accepted_nodes, bonus = accept_sampled_tree(tree.tokens, target, candidates, generator)
                    accepted = [tree.tokens[i] for i in accepted_nodes]
                    new_tokens, stopped = self._truncate(accepted + [bonus], output, remaining, req.stop)
                    # A stop inside the accepted path cuts it: the round accepted only what reached the output.
                    accepted_nodes, accepted = accepted_nodes[: len(new_tokens)], accepted[: len(new_tokens)]
                    output.extend(new_tokens)
                    if not first_token_ms and output:
                        first_token_ms = (time.perf_counter() - start) * 1e3
                    draft_ms += (t1 - t0) * 1e3
                    verify_ms += (t2 - t1) * 1e3

                    winner, by_draft = self._credit(tree, accepted_nodes, proposals, tallies)
                    if req.adaptive and proposals:
                        # Verifying rows the target then rejects costs time (on a CPU a verify pass
                        # grows with its rows), so draft less after a rejection, more after a
                        # full acceptance (as transformers' assisted generation does).
                        longest = max(len(b) for beams in proposals.values() for b in beams)
                        planned = min(max_depth, planned + 1) if len(accepted) >= longest else max(1, planned - 1)
                    # A correction: some draft proposed a token at the bonus position and the target disagreed.
                    at_bonus = accepted_nodes[-1] if accepted_nodes else -1
                    correction = len(new_tokens) > len(accepted) and any(p == at_bonus for p in tree.parents)
                    record = RoundRecord(
                        index=len(rounds),
                        proposals=proposals,
                        accepted=accepted,
                        bonus_token=bonus if len(new_tokens) > len(accepted) else None,
                        bonus_is_correction=correction,
                        winning_draft=winner,
                        tree_nodes=len(tree),
                        branching_factor=tree.branching_factor(),
                        draft_ms=(t1 - t0) * 1e3,
                        verify_ms=(t2 - t1) * 1e3,
                        fallback=req.mode != AUTOREGRESSIVE and not proposals,
                        fallback_reason=fallback_reason,
                        new_tokens=new_tokens,
                        accepted_by_draft=by_draft,
                    )
                    rounds.append(record)
                    observed.record = record
                yield record
                if stopped:
                    finish = "stop"
                    break
        finally:
            self._release(session_id)
        return GenerationResult(
            token_ids=output,
            text=self.render_text(output, req.stop),
            finish_reason=finish,
            prompt_tokens=len(req.prompt_ids),
            rounds=rounds,
            drafts=tallies,
            mode=req.mode,
            draft_ms=draft_ms,
            verify_ms=verify_ms,
            total_ms=(time.perf_counter() - start) * 1e3,
            time_to_first_token_ms=first_token_ms,
        )

    def _budget(self, req: GenerationRequest, round_index: int) -> tuple[float, float]:
        """(draft timeout, verify timeout) for this round, within the request's deadline; raises
        when the client has gone or the deadline has passed."""
        if req.cancelled is not None and req.cancelled():
            raise Cancelled(f"the client cancelled the request after {round_index} rounds")
        if req.deadline is None:
            return self.draft_timeout_s, self.verify_timeout_s
        left = req.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"the request's deadline passed after {round_index} rounds")
        return min(self.draft_timeout_s, left), min(self.verify_timeout_s, left)

    def _propose(self, mode: str, session_id: str, context: list[int], width: int, depth: int, sampling, generator,
                 timeout_s: float | None = None):
        """Ask every usable draft at once; returns ({draft: beams}, fallback reason or "", {draft:
        per-beam per-token distributions} under sampling)."""
        if mode == AUTOREGRESSIVE:
            return {}, "", {}
        if not self.drafts:
            return {}, "no draft services configured", {}
        if depth <= 0:
            return {}, "token budget leaves no room to draft", {}
        timeout_s = self.draft_timeout_s if timeout_s is None else timeout_s
        # Seeds are drawn for every draft, usable or not, so a fixed seed gives every draft the same
        # stream whichever others are down.
        seeds = torch.randint(1 << 62, (len(self.drafts),), generator=generator).tolist() if sampling is not None else []
        drafts = [(i, d) for i, d in enumerate(self.drafts) if self.draft_health.usable(d.name)]
        if not drafts:
            return {}, "every draft is backing off after failures: " + ", ".join(self.draft_health.down()), {}
        # Each call runs in a copy of this thread's context, so its trace span is the round's child.
        if sampling is None:
            calls = {
                self._pool.submit(contextvars.copy_context().run, d.draft, session_id, context, width, depth, timeout_s): d
                for _, d in drafts
            }
        else:
            calls = {
                self._pool.submit(
                    contextvars.copy_context().run, d.draft_sampled, session_id, context, width, depth,
                    timeout_s, sampling, seeds[i], self.limits.vocab_size,
                ): d
                for i, d in drafts
            }
        done, late = wait(calls, timeout=timeout_s)
        proposals, failures, dists = {}, [], {}
        for future in calls:
            draft = calls[future]
            if future in late:
                failures.append(f"{draft.name}: missed the {timeout_s * 1e3:.0f} ms deadline")
                self.draft_health.failed(draft.name, failures[-1])
                continue
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - a failing draft costs speed, never the generation
                failures.append(f"{draft.name}: {_describe(exc)}")
                self.draft_health.failed(draft.name, failures[-1])
                continue
            self.draft_health.succeeded(draft.name)
            beams, beam_dists = result if sampling is not None else (result, None)
            keep = [i for i, b in enumerate(beams) if b]
            if keep:
                proposals[draft.name] = [beams[i][:depth] for i in keep]
                if beam_dists is not None:
                    dists[draft.name] = [beam_dists[i][:depth] for i in keep]
        return proposals, "; ".join(failures) if not proposals else "", dists

    def _merge(self, proposals: dict[str, list[list[int]]], max_nodes: int) -> TokenTree:
        """One trie of every draft's beams; each draft's best beam goes in first, so a node cap trims
        the least likely branches, never a draft's best guess before others' runner-ups."""
        trie = TokenTrie(max_nodes)
        names = list(proposals)
        vocab = self.limits.vocab_size
        for rank in range(max((len(b) for b in proposals.values()), default=0)):
            for source, name in enumerate(names):
                beams = proposals[name]
                if rank < len(beams):
                    path = beams[rank]
                    # A draft with a larger vocabulary than the target's may propose tokens the
                    # target cannot take; cut the path there.
                    valid = next((i for i, t in enumerate(path) if not 0 <= t < vocab), len(path))
                    trie.insert(path[:valid], source)
        return trie.tree

    def _merge_sampled(self, proposals, dists, max_nodes: int) -> tuple[TokenTree, dict[int, list[Candidate]]]:
        """The trie of sampled chains, and each node's candidates for the acceptance rule.

        Every chain token is a candidate at its parent node, duplicates included (they are separate
        draws). The size cap counts chain tokens in a fixed order, never looking at their values:
        cutting a draw because of its own value would bias what is accepted.
        """
        trie, candidates = TokenTrie(), {}
        names = list(proposals)
        budget = max_nodes
        for rank in range(max((len(b) for b in proposals.values()), default=0)):
            for source, name in enumerate(names):
                if rank >= len(proposals[name]):
                    continue
                path, path_dists = proposals[name][rank][:budget], dists[name][rank]
                budget -= len(path)
                node = -1
                for depth, token in enumerate(path):
                    if not 0 <= token < self.limits.vocab_size:
                        break
                    trie.insert(path[: depth + 1], source)
                    child = trie.child(node, token)
                    candidates.setdefault(node, []).append(Candidate(child, path_dists[depth]))
                    node = child
        return trie.tree, candidates

    def _credit(self, tree: TokenTree, accepted_nodes: list[int], proposals, tallies):
        """Update per-draft tallies; returns (winning draft name, accepted count per draft)."""
        names = list(proposals)
        by_draft = {}
        for source, name in enumerate(names):
            beams = proposals[name]
            got = sum(1 for node in accepted_nodes if source in tree.sources[node])
            tally = tallies.setdefault(name, DraftTally())
            tally.proposed_tokens += sum(len(b) for b in beams)
            tally.proposed_positions += max(len(b) for b in beams)
            tally.accepted_tokens += got
            by_draft[name] = got
        winner = ""
        if accepted_nodes:
            sources = tree.sources[accepted_nodes[-1]]
            winner = names[min(sources)] if sources else ""
        return winner, by_draft

    def _truncate(self, tokens: list[int], output: list[int], remaining: int, stop: list[str]):
        """Cut a round's tokens at the budget, an end-of-sequence token or a stop string;
        returns (tokens kept, whether generation stops here)."""
        kept = []
        for token in tokens[:remaining]:
            kept.append(token)
            if token in self.limits.eos_token_ids:
                return kept, True
        if stop and any(s and s in self.decode(output + kept) for s in stop):
            for n in range(1, len(kept) + 1):
                if any(s and s in self.decode(output + kept[:n]) for s in stop):
                    return kept[:n], True
        return kept, False

    def render_text(self, tokens: list[int], stop: list[str]) -> str:
        """The output text, cut before the first stop string."""
        text = self.decode(tokens)
        cuts = [text.find(s) for s in stop if s and s in text]
        return text[: min(cuts)] if cuts else text

    def _release(self, session_id: str) -> None:
        """Free the session's caches everywhere now, without holding up the reply."""
        for client in [self.verifier, *self.drafts]:
            self._pool.submit(_quietly, client.release, session_id)


def _describe(exc: BaseException) -> str:
    if hasattr(exc, "code") and hasattr(exc, "details"):  # a grpc.RpcError
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - a cache left behind only ages out by LRU
        log.debug("release failed: %s", exc)
