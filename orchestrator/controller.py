"""The accept/fallback loop of speculative decoding, in one place.

Each *round* (:meth:`SpeculativeController.stream`; the words are defined in ``specdec.speculation``):
1. *propose*: every draft proposes paths after the current context, all drafts concurrently (tree
   mode: beam search, up to ``beam_width`` beams of up to ``beam_depth`` tokens; sequential mode: one
   chain of up to ``draft_length`` tokens; autoregressive mode: no drafts; under sampling, the beams
   rank under the target's noise), beside the prompt lookup's chain (``specdec.lookup``,
   run here first: it costs microseconds, so its proposal is in hand when the shape is chosen). The round's shape is the
   :class:`~specdec.speculation.SpeculationPolicy`'s: with ``adaptive``, the one with the most
   expected tokens per second from the services' measured costs and the acceptance seen so far
   (none at all when speculation does not pay), else the request's settings as given;
2. *merge*: the paths become one de-duplicated token tree;
3. *verify*: the target checks the whole tree in one forward pass and returns its own token at the
   context end and after every node (greedy: its argmax; sampled: its draw under noise keyed by the
   generation's seed and the token's position, :mod:`specdec.sampling`);
4. *accept*: the accepted tokens and the bonus token, so every round yields at least one token and
   the output is exactly what the target alone would produce, greedy or sampled with that seed,
   whatever the mode, the shapes or the other traffic;
5. *truncate*: the round's tokens end at the token budget, an end-of-sequence token (unless
   ``ignore_eos``), one of ``stop_token_ids`` or the token that completes a stop string
   (``specdec.detokenize.TextStream`` finds it); with ``logprobs`` each token kept gets the
   target's log-probability from the verify pass that decided it;
6. *record*: a :class:`specdec.records.RoundRecord`, yielded as the round completes; the policy
   learns from the verdict what the drafts' proposals are worth.

A draft that fails or misses its deadline is skipped for the round and left out for a backoff
period (``specdec.orchestrator.resilience.DraftHealth``), then asked again; with none left the round
is plain decoding (*fallback*). The request's deadline bounds every internal call, and a cancelled
request stops between rounds; either way its sessions are released in every service at once.
Clients are anything with ``draft``/``verify`` methods: gRPC stubs in the service, in-process
engines in tests, the same loop either way.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from specdec.config import SpeculationLimits
from specdec import telemetry
from specdec.cost import (SHARED_SLOWDOWN, AcceptanceStats, Choice, Contention, EarlyStop, RoundCosts, Traffic, ahead_pays,
                          side_by_side_prior)
from specdec.detokenize import TextStream
from specdec.errors import InvalidRequest, Unavailable, check_range, check_token_ids
from specdec.generation import CallContext, GenerationParams, GenerationState
from specdec.grammar import Grammars, GrammarState
from specdec.lookup import NAME as LOOKUP
from specdec.lookup import GRAMMAR, PREDICTION, Match, PromptLookup
from specdec.orchestrator.instrumentation import GenerationInstrumentation
from specdec.orchestrator.resilience import DraftHealth
from specdec.records import DecodingMode, DraftStats, GenerationResult, GenerationStats, RoundRecord, TokenLogprob
from specdec.processors import Processing
from specdec.sampling import SamplingParams
from specdec.speculation import DraftTree, Proposal, SpeculationPolicy, Verdict, accept, merge
from specdec.tree import TokenTree

log = logging.getLogger("specdec.orchestrator")
# A generation starts from the acceptance every earlier one saw, weighed as this many rounds: its
# own rounds outweigh them after a few (acceptance follows the text: code is not prose).
GENERATION_PRIOR_ROUNDS = 4
PREDICTION_LOOKUP = PromptLookup()  # a request's prediction is searched with the default n-grams when lookup is off


class DraftClient(Protocol):
    name: str  # how records name the draft: draft-0, draft-1, ...
    model: str  # the model it serves

    def draft(self, session_id: str, context: list[int], paths: int, depth: int, timeout_s: float,
              sampling: SamplingParams, stop: EarlyStop = EarlyStop(), processing: Processing | None = None,
              prompt_len: int = 0) -> Proposal:
        """Up to ``paths`` paths of up to ``depth`` tokens after ``context``: beam search, best first
        (sampled: ranked under the noise of ``sampling.seed``; with ``processing``, over the processed
        logits, the output beginning after ``prompt_len`` tokens), grown less deep where ``stop``
        says, each token with the draft's probability of it where the draft has one."""

    def release(self, session_id: str) -> None: ...


class VerifyClient(Protocol):
    def verify(self, session_id: str, context: list[int], tree: TokenTree, timeout_s: float,
               sampling: SamplingParams = SamplingParams(), top: int = 0, processing: Processing | None = None,
               prompt_len: int = 0) -> tuple[list[int], list | None]:
        """The target's token at the context end and after each node (``len(tree) + 1`` entries;
        greedy, or sampled with ``sampling``'s seed) and, with ``top`` > 0, at the same places its
        ``top`` most likely tokens and their log-probabilities ``[(token ids, log-probabilities)]``,
        best first (else None); with ``processing``, each place's logits processed first with its
        own history (:mod:`specdec.processors`)."""

    def release(self, session_id: str) -> None: ...


@dataclass
class Limits:
    """What the target and the operator allow a generation."""

    vocab_size: int
    max_context: int  # 0 = unknown
    max_new_tokens_limit: int
    eos_token_ids: frozenset[int]
    speculation: SpeculationLimits = field(default_factory=SpeculationLimits)  # the orchestrator's settings


class SpeculativeController:
    """``detokenizer(stop)`` makes one generation's :class:`~specdec.detokenize.TextStream`: it finds
    stop strings and renders the output text (``functools.partial(TextStream, tokenizer)``)."""

    def __init__(
        self,
        verifier: VerifyClient,
        drafts: list[DraftClient],
        limits: Limits,
        detokenizer: Callable[[list[str]], TextStream],
        draft_timeout_s: float = 10.0,
        verify_timeout_s: float = 60.0,
        instrumentation: GenerationInstrumentation | None = None,
        costs: RoundCosts | None = None,
        lookup: PromptLookup | None = None,
        lookup_depth: int = 16,
        grammars: Grammars | None = None,
        send_ahead: str = "auto",
    ) -> None:
        self.verifier = verifier
        self.drafts = drafts
        self.limits = limits
        self.detokenizer = detokenizer
        self.draft_timeout_s = draft_timeout_s
        self.verify_timeout_s = verify_timeout_s
        # Draft calls, verify calls (up to two a generation: rounds sent ahead), releases; threads start as needed.
        self._pool = ThreadPoolExecutor(max_workers=128, thread_name_prefix="model-call")
        self.draft_health = DraftHealth()
        self.instrumentation = instrumentation or GenerationInstrumentation()  # round spans and metrics
        self.costs = costs or RoundCosts()  # the services' measured forward costs (GetInfo)
        # The model-free draft, run here before each round (microseconds: no service, no call), its
        # chain at most ``lookup_depth`` tokens when the shape is adaptive.
        self.lookup, self.lookup_depth = lookup, lookup_depth
        # Structured output: what a request's grammar forces after the output so far, proposed as a
        # free draft chain (None: no tokenizer here, so no such chain; the services still mask).
        self.grammars = grammars
        # Rounds sent ahead of the verdict on the round before (config: send_ahead): auto, on, off;
        # and how much slower drafting runs beside a pass than alone, measured on the rounds drafted
        # ahead and on those drafted right after a round sent ahead was dropped.
        # Until measured, each is priced from where the services run (RoundCosts.shared_device,
        # specdec.cost.side_by_side_prior).
        self.send_ahead, self.drafting_ahead, self.contention = send_ahead, Contention(), Contention()
        self.verifying_beside = Contention()  # a verify pass while the next round is drafted beside it
        # The verify client's measured link (GrpcVerifyClient.link) prices every round (RoundCosts.link).
        if getattr(verifier, "link", None) is not None:
            self.costs.link = verifier.link
        # Acceptance per draft and depth, shared by every generation: a new one starts from what
        # the last ones saw, and old rounds fade as new ones come.
        self.acceptance = AcceptanceStats()
        # Every generation in flight: the company each round shares passes with, once the services
        # batch them (specdec.batching); a round's shape is priced for the batch it joins.
        self.traffic = Traffic()

    def check(self, params: GenerationParams) -> None:
        """Raise InvalidRequest naming the field for anything the model or the operator's limits do
        not allow (``params``, resolved, have checked themselves: :mod:`specdec.generation`)."""
        lim, spec = self.limits, self.limits.speculation
        prompt = params.prompt_ids
        if not prompt:
            raise InvalidRequest("prompt is empty")
        # The size first: the token checks after it then read at most a context's worth.
        if lim.max_context and len(prompt) >= lim.max_context:
            raise InvalidRequest(f"prompt has {len(prompt)} tokens; the model's context is {lim.max_context}")
        check_token_ids("prompt_token_ids", prompt, lim.vocab_size)
        check_range("max_new_tokens", params.max_new_tokens, 1, lim.max_new_tokens_limit)
        if lim.max_context and len(prompt) + params.max_new_tokens > lim.max_context:
            # Refused up front: the verify service would reject the context mid-generation.
            raise InvalidRequest(
                f"max_new_tokens = {params.max_new_tokens} plus the prompt's {len(prompt)} tokens exceeds the model's context of {lim.max_context}"
            )
        if params.mode is None:
            raise InvalidRequest("mode is not set")
        check_range("speculation.draft_length", params.speculation.draft_length, 1, spec.max_beam_depth)
        check_range("speculation.beam_width", params.speculation.beam_width, 1, spec.max_beam_width)
        check_range("speculation.beam_depth", params.speculation.beam_depth, 1, spec.max_beam_depth)
        check_range("speculation.max_tree_nodes", params.speculation.max_tree_nodes, 1, spec.max_tree_nodes_limit)
        check_token_ids("stop_token_ids", params.stop_token_ids, lim.vocab_size, allow_empty=True)
        params.processing.check_vocabulary(lim.vocab_size)
        check_token_ids("prediction_token_ids", params.prediction_ids, lim.vocab_size, allow_empty=True,
                        max_len=lim.max_context or 0)

    def generate(self, params: GenerationParams, call: CallContext | None = None) -> GenerationResult:
        stream = self.stream(params, call)
        while True:
            try:
                next(stream)
            except StopIteration as done:
                return done.value

    def stream(self, params: GenerationParams, call: CallContext | None = None) -> Iterator[RoundRecord]:
        """Yield each round as it completes; the generator's return value is the GenerationResult.
        ``params``: resolved (:meth:`GenerationParams.resolved`); ``call``: its deadline, liveness,
        request id and trace."""
        self.check(params)
        call = call or CallContext()
        state, prompt, spec = GenerationState(), list(params.prompt_ids), params.speculation
        text = self.detokenizer(list(params.stop))
        policy = SpeculationPolicy([d.name for d in self.drafts] if params.mode != DecodingMode.AUTOREGRESSIVE else [],
                                   params.paths, params.max_depth, spec.max_tree_nodes, spec.adaptive, self.costs,
                                   self.acceptance.seeded(GENERATION_PRIOR_ROUNDS), shared=self.acceptance)
        grammar = (self.grammars.state(params.processing.grammar)
                   if self.grammars is not None and params.processing.grammar is not None else None)
        g = _Generation(params, policy, self._calls(params), grammar, state.session_id)
        ahead: _Flight | None = None  # the next round, sent before the verdict on the one before it
        discarded = 0  # rounds sent ahead on a path the verdict before them rejected, since the last round
        self.traffic.join(g.session_id)
        try:
            while len(state.output) < params.max_new_tokens and state.stop is None:
                context = prompt + state.output
                rounds = state.rounds
                draft_timeout_s, verify_timeout_s = self._budget(call, len(rounds))
                # The round's trace span (current while it runs) and metrics; nothing when both are off.
                with self.instrumentation.round(call.trace_parent, len(rounds), params.mode) as observed:
                    dropped = None
                    if ahead is not None and not ahead.adds_to(context):  # built on a path the target did not take
                        dropped, ahead, discarded = ahead.verdict, None, discarded + 1
                    flight, ahead = ahead or self._send(g, context, not rounds, draft_timeout_s, verify_timeout_s,
                                                        beside=dropped), None
                    if rounds and self._ahead_pays(g, flight):
                        with telemetry.span("specdec.round.ahead") as span:
                            span.set_attribute("specdec.ahead.assumed_tokens", len(flight.assumed))
                            ahead = self._send(g, flight.context + flight.assumed, False, draft_timeout_s, verify_timeout_s,
                                               sent_ahead=True)
                    observed.record = record = self._settle(g, flight, context, state, text,
                                                            overlapped=ahead is not None or dropped is not None,
                                                            drafted_beside=ahead is not None and dropped is None)
                    record.discarded_ahead, discarded = discarded, 0
                yield record
        finally:
            self.traffic.leave(g.session_id)
            self._release(g.session_id, after=g.warming, verifying=[ahead.verdict] if ahead is not None else [])
        text.finish()
        result = self._result(params, call, state, text.text)
        result.logprobs = state.logprobs if params.logprobs else None
        return result

    def _send(self, g: _Generation, context: list[int], first: bool, draft_timeout_s: float, verify_timeout_s: float,
              sent_ahead: bool = False, beside: Future | None = None) -> _Flight:
        """Plan a round after ``context`` (its shape, the drafts' and the lookup's proposals, merged)
        and send its tree to the verify service; the verdict is the flight's future. ``beside``: the
        verify call of a round sent ahead and just dropped, which may still be running."""
        params, policy = g.params, g.policy
        t0 = time.perf_counter()
        output = context[len(params.prompt_ids):]
        room = self._room(params, context, len(output))
        match = self._forced(params, g.grammar, output, room) or self._look_up(params, context, room)
        known = ((match.stats_key, len(match.tokens)),) if match else ()
        company = self.traffic.company(g.session_id)
        reading = False
        if not first or params.mode == DecodingMode.AUTOREGRESSIVE:
            choice = policy.next(room, company, known)
        else:
            prior = SHARED_SLOWDOWN if self.costs.shared_device else 1.0  # reading the prompt side by side overlaps whole
            choice, reading = policy.first(room, len(context), company, known,
                                           beside=max(self.contention.or_prior(prior), self.verifying_beside.or_prior(prior)))
            if reading:  # the drafts read the prompt while the target does
                g.warming = self._read_prompt(g.session_id, context, draft_timeout_s)
        if not first and g.warming:  # the drafts have read the prompt before the session's next call
            wait(g.warming, timeout=draft_timeout_s)
            g.warming = []
        proposals, fallback_reason, failures = self._propose(params, g.session_id, context, choice, policy, g.calls,
                                                             draft_timeout_s)
        if match and (taken := match.tokens[:choice.taken(match.stats_key)]):
            proposals.append(Proposal(match.source, [taken], stats_key=match.stats_key))
            fallback_reason = ""
        elif reading:
            fallback_reason = "first round: the drafts read the prompt while the target does"
        t1 = time.perf_counter()
        if choice.width and self.costs.verify:  # drafted beside a pass of this generation: how much slower than alone
            if sent_ahead:
                self.drafting_ahead.observe((t1 - t0) * 1e3, self._draft_ms(choice, proposals))
            elif beside is not None and not beside.done():  # a dropped round's pass may still run
                self.contention.observe((t1 - t0) * 1e3, self._draft_ms(choice, proposals))
        merged = merge(proposals, choice.nodes or params.speculation.max_tree_nodes, self.limits.vocab_size)
        # Each call runs in a copy of this thread's context, so its trace span is the round's child.
        verdict = self._pool.submit(contextvars.copy_context().run, self._verify, g.session_id, context, merged, params,
                                    g.calls, verify_timeout_s)
        assumed, hit = policy.assumed(proposals) if params.mode != DecodingMode.AUTOREGRESSIVE else ([], 0.0)
        return _Flight(context, choice, proposals, fallback_reason, failures, merged, verdict, t0, t1, sent_ahead, assumed, hit)

    def _ahead_pays(self, g: _Generation, flight: _Flight) -> bool:
        """Whether to send the next round now, on the path ``flight`` most likely accepts whole
        (``send_ahead``; auto: :func:`specdec.cost.ahead_pays` at the verify link's measured delay)."""
        if self.send_ahead == "off" or not flight.assumed:
            return False
        if len(flight.context) + len(flight.assumed) + 1 - len(g.params.prompt_ids) >= g.params.max_new_tokens:
            return False  # the round sent ahead would begin past the token budget
        if self.send_ahead == "on":
            return True
        if not self.costs.verify:
            return False  # no measured curve: nothing to weigh the link against
        draft_ms, verify_ms = self._draft_ms(flight.choice, flight.proposals), self.costs.verify_ms(1 + len(flight.merged.tree))
        beside, verifying = side_by_side_prior(self.costs.shared_device, draft_ms, verify_ms, self.costs.link.ms)
        return ahead_pays(flight.hit, flight.choice.expected_tokens, draft_ms, self.costs.link.ms, verify_ms,
                          self.contention.or_prior(beside), self.drafting_ahead.or_prior(beside),
                          self.verifying_beside.or_prior(verifying))

    def _draft_ms(self, choice: Choice, proposals: list[Proposal]) -> float:
        """What the round's model drafts cost alone, as priced (the slowest; 0 with none)."""
        return max((self.costs.draft_ms(p.draft, choice.width, max(1, p.depth)) for p in proposals
                    if not choice.taken(p.stats_key or p.draft) and p.draft in self.costs.drafts), default=0.0)

    def _settle(self, g: _Generation, flight: _Flight, context: list[int], state: GenerationState, text: TextStream,
                overlapped: bool, drafted_beside: bool = False) -> RoundRecord:
        """Wait for the flight's verdict and take what it adds after ``context`` (a round sent ahead
        was verified after a prefix of it: the tokens the round before already gave are skipped,
        and must agree); returns the round's record, added to ``state``. ``overlapped``: other work
        of this generation ran during the round; ``drafted_beside``: that work was the next round's
        drafting alone."""
        params = g.params
        target, tops = flight.verdict.result()
        t2 = time.perf_counter()
        if drafted_beside and not flight.sent_ahead and not flight.choice.company.sessions and self.costs.verify:
            # Its pass ran while the next round was drafted (and waited on no pass before it, nor
            # shared one with other generations): how much slower than its curve says a pass alone takes.
            rows = 1 + len(flight.merged.tree)
            self.verifying_beside.observe((t2 - flight.t1) * 1e3 - self.costs.link.ms, self.costs.verify_ms(rows))
        verdict = accept(flight.merged, target)
        skip = len(context) - len(flight.context)
        known = context[len(flight.context):]
        if verdict.tokens[:skip] != known[: len(verdict.tokens)]:
            # Cannot happen while the verify pass is exact (the same row gives the same bits):
            # the earlier verdict stands, this one is dropped as if built on a rejected path.
            log.error("a round sent ahead disagrees with the verdict before it at the same places; dropped")
            verdict, tops = Verdict(flight.merged, [], None), None
        tokens = verdict.tokens[skip:]
        new_tokens, new_text, state.stop = self._truncate(params, tokens, params.max_new_tokens - len(state.output), text)
        verdict = verdict.cut(skip + len(new_tokens))
        new_logprobs = _logprobs(verdict, tops, params.top_logprobs)[skip:] if params.logprobs and tops is not None else []
        # A round's times price the cost curves only when nothing of this generation overlapped it.
        g.policy.update(flight.choice, flight.proposals, verdict, (flight.t1 - flight.t0) * 1e3,
                        0.0 if overlapped or flight.sent_ahead else (t2 - flight.t1) * 1e3, first=not state.rounds)
        record = _round_record(len(state.rounds), params.mode, flight.proposals, flight.fallback_reason, verdict.after(skip),
                               new_tokens, new_text, flight.t1 - flight.t0, t2 - flight.t1, flight.choice)
        record.draft_failures = flight.failures
        record.logprobs = new_logprobs
        record.sent_ahead = flight.sent_ahead
        state.add(record, new_tokens, new_logprobs)
        return record

    def _calls(self, params: GenerationParams) -> _Calls:
        """What the generation's calls to the services carry beside the context."""
        # Sampled: every token is a function of (seed, position, the target's distribution there),
        # so a given seed replays the same output in any mode, shape or company; none given, one drawn.
        sampling = params.sampling if params.sampling.greedy or params.sampling.seed else \
            dataclasses.replace(params.sampling, seed=int.from_bytes(uuid.uuid4().bytes[:7], "big"))
        # Penalties, logit_bias, min_p, min_tokens, bad words: applied by the services at every place,
        # with the model's end-of-sequence tokens for min_tokens, and the prompt's length (the output follows it).
        processing = dataclasses.replace(params.processing, eos_token_ids=tuple(sorted(self.limits.eos_token_ids))) \
            if params.processing.active else None
        return _Calls(sampling, processing, len(params.prompt_ids))

    def _budget(self, call: CallContext, round_index: int) -> tuple[float, float]:
        """(draft timeout, verify timeout) for this round, within the call's deadline; raises when
        the client has gone or the deadline has passed."""
        left = call.left(round_index)
        if left is None:
            return self.draft_timeout_s, self.verify_timeout_s
        return min(self.draft_timeout_s, left), min(self.verify_timeout_s, left)

    def _room(self, req: GenerationParams, context: list[int], generated: int) -> int:
        """The most tokens this round may draft: drafting past the token budget or the model's
        context is wasted work, since a round adds the accepted tokens and one bonus token."""
        room = req.max_new_tokens - generated
        if self.limits.max_context:
            room = min(room, self.limits.max_context - len(context))
        return room - 1

    def _forced(self, req: GenerationParams, grammar: GrammarState | None, output: list[int], room: int) -> Match | None:
        """The tokens the request's grammar forces after ``output`` (JSON keys and punctuation a
        schema fixes), as a chain for the target to check like any draft's: forced bytes can be cut
        into tokens more than one way, and the target's own choice among them is the output, so they
        are verified, not taken (they are accepted as often as the target spells them that way)."""
        if grammar is None or req.mode == DecodingMode.AUTOREGRESSIVE or room <= 0:
            return None
        forced = grammar.forced(output)[: min(room, self.lookup_depth if req.speculation.adaptive else req.max_depth)]
        return Match(forced, agreed=len(forced), source=GRAMMAR) if forced else None

    def _look_up(self, req: GenerationParams, context: list[int], room: int) -> Match | None:
        """The prompt lookup's chain after ``context``, found there or in the request's prediction
        (None: none, or no lookup here): at most ``lookup_depth`` tokens, or with fixed shapes the
        request's own depth. A prediction is looked up even where the operator turned prompt lookup off."""
        lookup = self.lookup or (PREDICTION_LOOKUP if req.prediction_ids else None)
        if lookup is None or req.mode == DecodingMode.AUTOREGRESSIVE or room <= 0:
            return None
        return lookup.propose(context, min(room, self.lookup_depth if req.speculation.adaptive else req.max_depth),
                              req.prediction_ids)

    def _read_prompt(self, session_id: str, context: list[int], timeout_s: float) -> list:
        """Each usable draft reads the prompt into its session's cache (a one-token proposal, not
        waited for: the first round's verify pass runs meanwhile); the calls' futures."""
        return [self._pool.submit(contextvars.copy_context().run, _quietly, d.draft, session_id, context, 1, 1, timeout_s,
                                  SamplingParams(), EarlyStop())
                for d in self.drafts if self.draft_health.usable(d.name)]

    def _propose(self, req: GenerationParams, session_id: str, context: list[int], choice: Choice, policy: SpeculationPolicy,
                 calls: _Calls, timeout_s: float) -> tuple[list[Proposal], str, list[str]]:
        """Ask every usable model draft at once; returns the proposals (in draft order), when there
        are none why ("" in autoregressive mode), and the drafts that failed the round (missed its
        deadline, answered an error, or are backing off after failures), with what happened."""
        if req.mode == DecodingMode.AUTOREGRESSIVE:
            return [], "", []
        if not self.drafts and not choice.known:
            return [], "no draft services configured", []
        if choice.depth <= 0:
            if self._room(req, context, len(context) - len(req.prompt_ids)) <= 0:
                return [], "token budget leaves no room to draft", []
            return [], "speculation does not pay at the measured costs and acceptance", []
        depth = choice.depth
        usable = [d for d in self.drafts if self.draft_health.usable(d.name)]
        backing_off = [f"{name}: backing off after failures" for name in self.draft_health.down()]
        if not usable:
            return [], "every draft is backing off after failures: " + ", ".join(self.draft_health.down()), backing_off
        # Each call runs in a copy of this thread's context, so its trace span is the round's child.
        futures = {
            self._pool.submit(
                contextvars.copy_context().run, d.draft, session_id, context, choice.width, depth, timeout_s,
                calls.sampling, policy.early_stop(d.name, choice), **calls.options,
            ): d
            for d in usable
        }
        _, late = wait(futures, timeout=timeout_s)
        proposals, failures = [], list(backing_off)
        for future, draft in futures.items():
            if future in late:
                failures.append(f"{draft.name}: missed the {timeout_s * 1e3:.0f} ms deadline")
                self.draft_health.failed(draft.name, failures[-1])
                continue
            try:
                proposal = future.result()
            except Exception as exc:  # noqa: BLE001 - a failing draft costs speed, never the generation
                failures.append(f"{draft.name}: {_describe(exc)}")
                self.draft_health.failed(draft.name, failures[-1])
                continue
            self.draft_health.succeeded(draft.name)
            if (proposal := proposal.cut(depth)) is not None:
                proposals.append(proposal)
        return proposals, "; ".join(failures) if not proposals else "", failures

    def _verify(self, session_id: str, context: list[int], merged: DraftTree, req: GenerationParams,
                calls: _Calls, timeout_s: float):
        """The target's tokens on the tree (``[nodes + 1]``) and, with logprobs, its most likely
        tokens at the same places (else None)."""
        # With logprobs at least the top one: a greedy token's own log-probability (a sampled token's
        # comes after the top ones when it is not among them).
        top = max(1, req.top_logprobs) if req.logprobs else 0
        target, tops = self.verifier.verify(session_id, context, merged.tree, timeout_s, sampling=calls.sampling, top=top,
                                            **calls.options)
        if len(target) != len(merged.tree) + 1 or (tops is not None and len(tops) != len(target)):
            raise Unavailable(f"verify service returned {len(target)} predictions for a tree of {len(merged.tree)}")
        return target, tops

    def _truncate(self, req: GenerationParams, tokens: list[int], remaining: int,
                  text: TextStream) -> tuple[list[int], str, tuple[str, str | int | None] | None]:
        """Cut a round's tokens at the budget, an end-of-sequence token, a stop token or the token
        that completes a stop string; returns (tokens kept, the text they released, and what stopped
        the generation: (finish reason, stop string or token) or None)."""
        kept, released = [], []
        for token in tokens[:remaining]:
            kept.append(token)
            released.append(text.push([token]))
            if token in req.stop_token_ids:
                return kept, "".join(released), ("stop_token", token)
            if token in self.limits.eos_token_ids and not req.ignore_eos:
                return kept, "".join(released), ("eos", None)
            if text.stopped:
                return kept, "".join(released), ("stop_string", text.stopped_by)
        return kept, "".join(released), None

    def _result(self, params: GenerationParams, call: CallContext, state: GenerationState, text: str) -> GenerationResult:
        names = [(d.name, d.model) for d in self.drafts] + ([(LOOKUP, LOOKUP)] if self.lookup is not None else []) \
            + ([(PREDICTION, PREDICTION)] if params.prediction_ids else []) \
            + ([(GRAMMAR, GRAMMAR)] if self.grammars is not None and params.processing.grammar is not None else [])
        rounds = state.rounds
        drafts = [DraftStats.of(name, model, rounds) for name, model in names] if params.mode != DecodingMode.AUTOREGRESSIVE else []
        stats = GenerationStats.of(str(params.mode), len(params.prompt_ids), len(state.output), rounds, drafts,
                                   (time.perf_counter() - state.start) * 1e3, state.first_token_ms)
        result = GenerationResult(token_ids=state.output, text=text, finish_reason=state.stop[0] if state.stop else "length",
                                  stats=stats, rounds=rounds, request_id=call.request_id)
        result.stop_reason = state.stop[1] if state.stop else None
        return result

    def _release(self, session_id: str, after: list | None = None, verifying: list | None = None) -> None:
        """Free the session's caches everywhere now, without holding up the reply; the drafts' once
        the calls ``after`` are done (a draft still reading the prompt would make its session again),
        the verify service's once the calls ``verifying`` are (a round sent ahead and not needed)."""
        self._pool.submit(_after, verifying or [], self.verify_timeout_s, self.verifier.release, session_id)
        for client in self.drafts:
            self._pool.submit(_after, after or [], self.draft_timeout_s, client.release, session_id)


@dataclass
class _Generation:
    """What every round of one generation plans with."""

    params: GenerationParams
    policy: SpeculationPolicy
    calls: _Calls
    grammar: GrammarState | None
    session_id: str
    warming: list = field(default_factory=list)  # the drafts' calls reading the prompt during the first round, if any


@dataclass
class _Flight:
    """A round whose tree is with the verify service: what was planned, and the verdict to come."""

    context: list[int]  # what the tree was drafted after (a round sent ahead: the round before's context and assumed path)
    choice: Choice
    proposals: list[Proposal]
    fallback_reason: str
    failures: list[str]
    merged: DraftTree
    verdict: Future  # the verify call's (target tokens, top log-probabilities)
    t0: float  # planning began
    t1: float  # the drafts had answered
    sent_ahead: bool = False  # sent before the verdict on the round before it
    assumed: list[int] = field(default_factory=list)  # the path it most likely accepts whole (SpeculationPolicy.assumed)
    hit: float = 0.0  # the chance it does

    def adds_to(self, context: list[int]) -> bool:
        """Whether its verdict can add a token after ``context``, the output so far: its own context
        begins ``context`` (the verdicts before it took its assumed path), and what ``context`` holds
        past its own is a path of its tree (else its verdict ends within what is known already)."""
        n = len(self.context)
        return context[:n] == self.context and self.merged.tree.holds(context[n:])


@dataclass(frozen=True)
class _Calls:
    """What every call of one generation to the model services carries beside its context: the
    sampling (with the generation's seed) and, when any, the logits processors and the prompt's
    length (passed only then: a client that knows no processors is called as before)."""

    sampling: SamplingParams
    processing: Processing | None = None
    prompt_len: int = 0

    @property
    def options(self) -> dict:
        """The processors' keyword arguments of a draft or verify call (none when there are none)."""
        return {"processing": self.processing, "prompt_len": self.prompt_len} if self.processing is not None else {}


def _round_record(index: int, mode: str, proposals: list[Proposal], fallback_reason: str, verdict: Verdict,
                  new_tokens: list[int], new_text: str, draft_s: float, verify_s: float, choice: Choice) -> RoundRecord:
    tree = verdict.merged.tree
    return RoundRecord(
        index=index,
        proposals={p.draft: p.paths for p in proposals},
        accepted=verdict.accepted,
        bonus_token=verdict.bonus_token,
        bonus_is_correction=verdict.correction,
        winning_draft=verdict.winning_draft,
        tree_nodes=len(tree),
        branching_factor=tree.branching_factor(),
        draft_ms=draft_s * 1e3,
        verify_ms=verify_s * 1e3,
        fallback=mode != DecodingMode.AUTOREGRESSIVE and not proposals,
        fallback_reason=fallback_reason,
        new_tokens=new_tokens,
        text=new_text,
        accepted_by_draft=verdict.accepted_by_draft,
        chosen_width=choice.width if proposals else 0,
        chosen_depth=choice.depth if proposals else 0,
        expected_tokens=choice.expected_tokens if proposals else 1.0,
        predicted_ms=choice.cost_ms,
        company_sessions=choice.company.sessions,
    )


def _logprobs(verdict: Verdict, tops, k: int) -> list[TokenLogprob]:
    """Each of the round's output tokens with its log-probability under the target (sampled: under
    the warped distribution it was drawn from), from the verify pass's most likely tokens."""
    entries = []
    for token, place in zip(verdict.tokens, verdict.places):
        ids, values = tops[place]
        top = list(zip(ids, values))
        logprob = dict(top).get(token, values[0])  # a greedy token is the first; a tie may order it second
        entries.append(TokenLogprob(token, logprob, top[:k]))
    return entries


def _describe(exc: BaseException) -> str:
    if hasattr(exc, "code") and hasattr(exc, "details"):  # a grpc.RpcError
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def _after(futures: list, timeout_s: float, fn, *args) -> None:
    wait(futures, timeout=timeout_s)
    _quietly(fn, *args)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - a call whose answer nobody waits for (a release, the drafts reading a prompt)
        log.debug("%s failed: %s", getattr(fn, "__name__", fn), exc)
