"""``python -m specdec.tools.gpu_check`` (``make gpu-check``): what the library does on one NVIDIA GPU
with the real pair's shapes, offline.

The CPU test suite proves exactness on tiny models; a GPU runs other kernels (cuBLAS, its SDPA), and
a cost curve measured on 2 cores says nothing about one. This script builds a target shaped like
Qwen2.5-1.5B and a draft shaped like Qwen2.5-0.5B from their configs with seeded random weights
(nothing is downloaded: random weights are enough to check bits and to time forwards), then:

1. makes the target batch-invariant (:func:`specdec.kernels.make_batch_invariant`);
2. measures both models' cost curves (:func:`specdec.engine.calibrate_forward`, waiting for the GPU
   at the end of every forward so the timer sees the device's time, not the kernel launches);
3. checks, for trees of 1 to 16 nodes, that every node's logits in one tree pass are bit for bit the
   logits of stepping its path one token per forward;
4. checks that greedy speculative decoding (the draft proposes chains, the target verifies each in
   one pass) gives exactly the target's one-token greedy output, with the random draft (almost
   nothing accepted) and with the target drafting for itself (everything accepted, so the accepted
   path through the cache is exercised too);
5. predicts, from the measured curves and the embedded pair's acceptance on code and prose, the
   proposal :func:`specdec.cost.choose` picks and its speed over the target alone.

It prints a summary, writes every result as JSON (``--out``) and exits 0 only when the exactness
and losslessness checks hold. ``--device cpu --small`` runs the same steps on tiny shapes in seconds
(the unit test does).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config

from specdec.cost import AcceptanceStats, CostCurve, RoundCosts, choose
from specdec.engine import calibrate_forward, mismatched_nodes, tree_forward
from specdec.kernels import make_batch_invariant, pack_linears
from specdec.kv_cache import SessionKV, SessionStore
from specdec.tree import TokenTree, greedy_accept

VOCAB = 151936
# Qwen2.5-1.5B and Qwen2.5-0.5B (their config.json), less what only loading weights needs.
TARGET_SHAPE = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2)
DRAFT_SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2)
# --small: the same architecture at a size 2 CPU cores run every step of in seconds. The vocabulary
# shrinks too: a 151936-row head would dominate every forward (and the kernel check) at this size.
# So narrow a model at the default std (0.02) only echoes its input token (the tied embedding outweighs
# what the layers add), and greedy output would be one token repeated; at 0.1 it wanders like the
# full-size shapes do at 0.02.
SMALL_TARGET_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, initializer_range=0.1)
SMALL_DRAFT_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, initializer_range=0.1)
SMALL_VOCAB = 4096

CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 64)
CALIBRATION_CONTEXT = 128
TREE_SIZES = range(1, 17)
CHECK_CONTEXT = 40  # tokens before each checked tree
NEW_TOKENS = 48
DRAFT_LENGTH = 4
DRAFT = "draft-0"
# Per-position conditional acceptance of the embedded pair by prompt class, and the bounds the
# orchestrator's chooser searches.
ACCEPTANCE = {"code": 0.9, "prose": 0.6}
MAX_WIDTH, MAX_DEPTH, MAX_NODES = 4, 8, 64


class Progress:
    """One line per step, with the seconds since the start (a GPU run is silent for long stretches)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed:7.1f}s] {message}", flush=True)


def build_model(shape: dict, vocab: int, seed: int, device: str, dtype: torch.dtype):
    """A Qwen2 causal LM of ``shape`` with seeded random weights (transformers' own initialisation,
    std ``initializer_range``): at the real shapes greedy output wanders through the vocabulary
    rather than repeating one token, so the lossless check compares real choices."""
    config = Qwen2Config(
        vocab_size=vocab, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **shape,
    )
    torch.manual_seed(seed)
    # Built on the device itself: initialising 1.5B parameters on the host is the slow part otherwise.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


@contextlib.contextmanager
def synchronized(model):
    """Wait for the GPU at the end of each of ``model``'s forwards, so that ``calibrate_forward``'s
    wall-clock timer measures the work and not only its launch (a no-op off CUDA)."""
    if model.device.type != "cuda":
        yield
        return
    handle = model.register_forward_hook(lambda *_: torch.cuda.synchronize(model.device))
    try:
        yield
    finally:
        handle.remove()


def calibrate(model, reps: int) -> CostCurve:
    with synchronized(model):
        return calibrate_forward(model, SessionStore(), rows=CALIBRATION_ROWS, reps=reps, context_len=CALIBRATION_CONTEXT)


def curve_table(curves: dict[str, CostCurve]) -> str:
    names = list(curves)
    lines = ["  rows" + "".join(f"  {name + ' ms':>12} {'x 1 row':>8}" for name in names)]
    for i, (rows, _) in enumerate(curves[names[0]].points):
        cells = "".join(f"  {curves[n].points[i][1]:12.2f} {curves[n].points[i][1] / curves[n].points[0][1]:8.2f}"
                        for n in names)
        lines.append(f"  {rows:4d}{cells}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- exactness


TREE_SHAPES = ("chain", "star", "random")


def check_tree(n: int, rng: random.Random, vocab: int, shape: str | None = None) -> TokenTree:
    """A tree of ``n`` nodes: a chain, a star or random parents (``shape``; by default the three in
    turn as ``n`` grows, so every shape is checked)."""
    shape = shape or TREE_SHAPES[n % 3]
    if shape == "chain":
        parents = list(range(-1, n - 1))
    elif shape == "star":
        parents = [-1] * n
    else:
        parents = [rng.randint(-1, i - 1) for i in range(n)]
    return TokenTree(tokens=[rng.randrange(vocab) for _ in range(n)], parents=parents)


def check_invariance(model, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    context = [rng.randrange(vocab) for _ in range(CHECK_CONTEXT)]
    session = SessionKV("steps")
    last = [tree_forward(model, session, [token])[-1] for token in context][-1]
    results = []
    for n in TREE_SIZES:
        tree = check_tree(n, rng, vocab)
        cached = rng.randint(0, len(context) - 1)
        # The stepped context is shared by every tree: each check starts from a copy of it.
        bad = mismatched_nodes(model, tree, context, cached, (copy.deepcopy(session), last))
        results.append({"nodes": n, "parents": tree.parents, "cached": cached, "mismatched": bad})
    return results


# --------------------------------------------------------------------------- losslessness


def greedy_steps(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The target alone: greedy, one token per forward, the prompt included."""
    session, out = SessionKV("steps"), []
    logits = [tree_forward(model, session, [token])[-1] for token in prompt][-1]
    while len(out) < new_tokens:
        out.append(int(logits.argmax()))
        if len(out) < new_tokens:
            logits = tree_forward(model, session, out[-1:])[-1]
    return out


def speculative_greedy(target, draft, prompt: list[int], new_tokens: int, draft_length: int) -> dict:
    """Greedy speculative decoding with the library's pieces: the draft proposes a chain greedily,
    the target scores the chain in one pass, the longest prefix it agrees with is kept with its bonus
    token, and both sessions reuse their caches through :meth:`SessionKV.sync`."""
    verify, drafting = SessionKV("verify"), SessionKV("draft")
    context, out, rounds, drafted, accepted = list(prompt), [], 0, 0, 0
    while len(out) < new_tokens:
        depth = min(draft_length, new_tokens - len(out) - 1)  # the bonus token ends every round
        chain: list[int] = []
        if depth:
            reused = drafting.sync(context)
            logits = tree_forward(draft, drafting, context[reused:])[-1]
            for i in range(depth):
                chain.append(int(logits.argmax()))
                if i + 1 < depth:
                    logits = tree_forward(draft, drafting, chain[-1:])[-1]
        tree = TokenTree(tokens=chain, parents=list(range(-1, len(chain) - 1)))
        reused = verify.sync(context)
        logits = tree_forward(target, verify, context[reused:], tree.tokens, tree.parents, logits_to_keep=len(tree) + 1)
        nodes, bonus = greedy_accept(tree, logits.argmax(-1).tolist())
        new = [tree.tokens[i] for i in nodes] + [bonus]
        out += new
        context += new
        rounds, drafted, accepted = rounds + 1, drafted + len(chain), accepted + len(nodes)
    return {"tokens": out, "rounds": rounds, "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / drafted if drafted else 0.0}


# --------------------------------------------------------------------------- prediction


def acceptance_stats(rate: float, rounds: int = 1000) -> AcceptanceStats:
    """Statistics after ``rounds`` chains of ``MAX_DEPTH`` tokens in which each position was accepted
    with probability ``rate`` given the ones before: the rounds come in the exact geometric
    proportions (no forgetting), so every position's estimate is ``rate`` up to rounding."""
    stats = AcceptanceStats(decay=1.0)
    for accepted in range(MAX_DEPTH + 1):
        share = rate**accepted * ((1 - rate) if accepted < MAX_DEPTH else 1.0)
        for _ in range(round(rounds * share)):
            stats.record(DRAFT, 1, MAX_DEPTH, accepted)
    return stats


def predict(verify: CostCurve, draft: CostCurve) -> dict[str, dict]:
    costs = RoundCosts(verify, {DRAFT: draft})
    alone = 1e3 / verify.ms(1)
    out = {}
    for name, rate in ACCEPTANCE.items():
        choice = choose(costs, acceptance_stats(rate), [DRAFT], MAX_WIDTH, MAX_DEPTH, MAX_NODES)
        out[name] = {"acceptance": rate, "width": choice.width, "depth": choice.depth, "nodes": choice.nodes,
                     "expected_tokens": choice.expected_tokens, "round_ms": choice.cost_ms,
                     "tokens_per_s": choice.tokens_per_s, "target_alone_tokens_per_s": alone,
                     "speedup": choice.tokens_per_s / alone}
    return out


# --------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m specdec.tools.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke test")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per calibrated row count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="where to write the results as JSON")
    return parser.parse_args(argv)


def check(argv: list[str] | None = None) -> dict:
    """Every step; returns the results written to ``--out`` (``passed``: exact and lossless)."""
    args = parse_args(argv)
    say = Progress()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this check needs one NVIDIA GPU (or --device cpu --small)")
    vocab = SMALL_VOCAB if args.small else VOCAB
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": args.dtype, "small": args.small, "torch": torch.__version__, "transformers": transformers.__version__,
    }

    say(f"building the target ({'small' if args.small else 'Qwen2.5-1.5B'} shape) and the draft "
        f"({'small' if args.small else 'Qwen2.5-0.5B'} shape), random weights, {args.dtype} on {device}")
    target = build_model(SMALL_TARGET_SHAPE if args.small else TARGET_SHAPE, vocab, args.seed, device, dtype)
    draft = build_model(SMALL_DRAFT_SHAPE if args.small else DRAFT_SHAPE, vocab, args.seed + 1, device, dtype)
    results["parameters"] = {"target": sum(p.numel() for p in target.parameters()),
                             "draft": sum(p.numel() for p in draft.parameters())}
    results["kernels"] = {"target": make_batch_invariant(target), "draft": pack_linears(draft)}
    say(f"target linear kernel: {results['kernels']['target']} (batch-invariant); draft: {results['kernels']['draft']}")

    say(f"calibrating (rows {CALIBRATION_ROWS}, {args.reps} reps, {CALIBRATION_CONTEXT} cached tokens)")
    curves = {"target": calibrate(target, args.reps), "draft": calibrate(draft, args.reps)}
    results["curves"] = {name: [list(point) for point in curve.points] for name, curve in curves.items()}
    print(curve_table(curves), flush=True)

    say(f"batch invariance: trees of {TREE_SIZES.start}..{TREE_SIZES.stop - 1} nodes after {CHECK_CONTEXT} tokens")
    trees = check_invariance(target, vocab, args.seed)
    mismatched = sum(len(t["mismatched"]) for t in trees)
    results["invariance"] = {"trees": trees, "mismatched_nodes": mismatched,
                             "checked_nodes": sum(t["nodes"] + 1 for t in trees), "exact": mismatched == 0}
    say(f"{mismatched} mismatching nodes of {results['invariance']['checked_nodes']}")

    say(f"lossless: {NEW_TOKENS} greedy tokens, target alone one token per forward vs chains of {DRAFT_LENGTH}")
    rng = random.Random(args.seed + 2)
    prompt = [rng.randrange(vocab) for _ in range(CHECK_CONTEXT)]
    reference = greedy_steps(target, prompt, NEW_TOKENS)
    runs = {"draft": speculative_greedy(target, draft, prompt, NEW_TOKENS, DRAFT_LENGTH),
            "self": speculative_greedy(target, target, prompt, NEW_TOKENS, DRAFT_LENGTH)}
    for name, run in runs.items():
        run["identical"] = run["tokens"] == reference
        say(f"{name} draft: identical={run['identical']}, {run['accepted']}/{run['drafted']} drafted tokens accepted "
            f"in {run['rounds']} rounds")
    results["lossless"] = {"reference": reference, "runs": runs, "identical": all(r["identical"] for r in runs.values())}

    say(f"predicting (width <= {MAX_WIDTH}, depth <= {MAX_DEPTH}, nodes <= {MAX_NODES})")
    results["prediction"] = predict(curves["target"], curves["draft"])
    for name, p in results["prediction"].items():
        print(f"  {name:5s} (acceptance {p['acceptance']}): {p['width']} x {p['depth']}, {p['expected_tokens']:.2f} "
              f"tokens/round, {p['tokens_per_s']:.1f} tokens/s, {p['speedup']:.2f}x the target alone "
              f"({p['target_alone_tokens_per_s']:.1f} tokens/s)", flush=True)

    results["exact"] = results["invariance"]["exact"]
    results["lossless_ok"] = results["lossless"]["identical"]
    results["passed"] = results["exact"] and results["lossless_ok"]
    results["elapsed_s"] = say.elapsed
    print(summary(results), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    say(f"wrote {args.out}")
    return results


def summary(results: dict) -> str:
    inv, pred = results["invariance"], results["prediction"]
    runs = results["lossless"]["runs"]
    lines = [
        "=" * 72,
        f"device       {results['device']}, {results['dtype']}{' (small shapes)' if results['small'] else ''}",
        f"kernels      target {results['kernels']['target']}, draft {results['kernels']['draft']}",
        f"exact        {results['exact']}: {inv['mismatched_nodes']} of {inv['checked_nodes']} tree nodes differ from one-token steps",
        f"lossless     {results['lossless_ok']}: " + ", ".join(
            f"{name} draft {'identical' if r['identical'] else 'DIFFERENT'} (acceptance {r['acceptance']:.2f})"
            for name, r in runs.items()),
        f"target       {results['curves']['target'][0][1]:.2f} ms per token alone, "
        f"{results['curves']['target'][-1][1] / results['curves']['target'][0][1]:.2f}x for {results['curves']['target'][-1][0]} rows",
        *(f"{name:12s} {p['width']} x {p['depth']}: {p['tokens_per_s']:.1f} tokens/s, {p['speedup']:.2f}x predicted"
          for name, p in pred.items()),
        f"result       {'PASS' if results['passed'] else 'FAIL'} in {results['elapsed_s']:.0f} s",
        "=" * 72,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return 0 if check(argv)["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
