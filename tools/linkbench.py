"""``specdec linkbench``: how much speed a far verify service keeps.

One local cluster (verify and draft services, the embedded pair by default) and an orchestrator for
each configuration: one next to the verify service, and one per round trip asked for (``--rtt-ms
20,200``), each reaching the verify service through a delaying proxy (:mod:`specdec.tools.delay_proxy`)
while its drafts stay beside it: the edge-drafting topology on one machine. With ``--send-ahead
auto,off`` each round trip also runs with rounds sent ahead turned off, to show what they keep. Each
prompt goes through every orchestrator in turn, one request at a time, in the default mode and in
autoregressive mode. Every output must equal the
near orchestrator's (lossless behind any link; a difference is reported as a MISMATCH).

The table gives tokens/s per configuration and prompt class, and what each keeps of the same mode
without the delay; ``--plot FILE.png`` draws tokens/s against the round trip.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from specdec import config
from specdec.tools.prompts import Prompt, bundled_dir, encode_prompt, load_prompts

DEFAULT_PROMPT_FILES = ("prompts/code.jsonl", "prompts/prose.jsonl", "prompts/chat.jsonl")


@dataclass(frozen=True)
class Setup:
    """One orchestrator of the run: its link to the verify service and whether it sends rounds ahead."""

    rtt_ms: float
    send_ahead: str

    @property
    def label(self) -> str:
        return f"rtt {self.rtt_ms:g} ms" + ("" if self.send_ahead == "auto" else f", send-ahead {self.send_ahead}")


@dataclass
class Run:
    setup: Setup
    mode: str
    prompt: Prompt
    tokens: list[int]
    seconds: float
    rounds: int
    sent_ahead: int  # rounds whose answer came from a round sent ahead
    discarded: int  # rounds sent ahead and dropped

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def setups(rtts: list[float], send_ahead: list[str]) -> list[Setup]:
    """The near orchestrator (auto) first, then each round trip with each send-ahead choice."""
    near = [Setup(0.0, "auto")] + [Setup(0.0, s) for s in send_ahead if s != "auto"]
    return near + [Setup(rtt, s) for rtt in rtts if rtt > 0 for s in send_ahead]


def generate(stub, ids: list[int], mode: str, max_new_tokens: int) -> tuple[list[int], float, list]:
    from specdec.v1 import generation_pb2

    start = time.perf_counter()
    reply = stub.Generate(generation_pb2.GenerateRequest(
        prompt_token_ids=ids, max_new_tokens=max_new_tokens, include_rounds=True,
        mode="DECODING_MODE_UNSPECIFIED" if mode == "default" else f"DECODING_MODE_{mode.upper()}",
        ignore_eos=True), timeout=900)
    return list(reply.token_ids), time.perf_counter() - start, list(reply.rounds)


def run(args) -> list[Run]:
    import grpc
    from transformers import AutoTokenizer

    from specdec.model_store import resolve_model
    from specdec.tools.cluster import LocalCluster
    from specdec.v1 import generation_pb2_grpc

    settings = config.from_env(config.ClusterSettings, target_model=args.target_model, draft_models=args.draft_models.split(","),
                               port=0, log_dir="", startup_timeout_s=1800)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.target_model))
    prompts = [p for path in args.prompts for p in load_prompts(Path(path))]
    prompts = [p for cls in dict.fromkeys(p.cls for p in prompts) for p in [q for q in prompts if q.cls == cls][: args.per_class]]
    encoded = {p.id: encode_prompt(tokenizer, p)[1] for p in prompts}
    runs: list[Run] = []
    print(f"starting a local cluster ({args.target_model}, drafts {args.draft_models}) ...", file=sys.stderr)
    with LocalCluster(settings) as cluster:
        stubs, channels = {}, []
        for setup in setups(args.rtt_ms, args.send_ahead):
            address = cluster.add_orchestrator(f"orchestrator-{setup.rtt_ms:g}-{setup.send_ahead}", rtt_ms=setup.rtt_ms,
                                               send_ahead=setup.send_ahead)
            channels.append(channel := grpc.insecure_channel(address))
            stubs[setup] = generation_pb2_grpc.GenerationServiceStub(channel)
            generate(stubs[setup], encoded[prompts[0].id], "default", 8)  # warm-up: connections, the link's first measurements
        # Each prompt through every orchestrator in turn, so that whatever drifts over the run
        # (the machine's other load, the services' caches) weighs on every configuration alike.
        # Autoregressive rounds have no path to send a round ahead on: run once per round trip.
        for mode in args.modes:
            for prompt in prompts:
                for setup, stub in stubs.items():
                    if mode == "autoregressive" and setup.send_ahead != "auto":
                        continue
                    tokens, seconds, rounds = generate(stub, encoded[prompt.id], mode, args.max_new_tokens)
                    runs.append(Run(setup, mode, prompt, tokens, seconds, len(rounds), sum(r.sent_ahead for r in rounds),
                                    sum(r.discarded_ahead for r in rounds)))
                    print(f"[linkbench] {setup.label:<28} {mode:<14} {prompt.id:<22} {runs[-1].tokens_per_s:6.2f} tokens/s "
                          f"({runs[-1].sent_ahead} rounds sent ahead held, {runs[-1].discarded} dropped)", file=sys.stderr, flush=True)
        for channel in channels:
            channel.close()
    return runs


def mismatches(runs: list[Run]) -> list[str]:
    """The runs whose output differs from the near orchestrator's in the same mode."""
    reference = {(r.mode, r.prompt.id): r.tokens for r in runs if r.setup == Setup(0.0, "auto")}
    return [f"{r.setup.label} {r.mode} {r.prompt.id}" for r in runs if r.tokens != reference.get((r.mode, r.prompt.id))]


def report(runs: list[Run]) -> str:
    by = defaultdict(list)
    for r in runs:
        by[(r.setup, r.mode, r.prompt.cls)].append(r)
    classes = list(dict.fromkeys(r.prompt.cls for r in runs))
    near = {(mode, cls): statistics.median(x.tokens_per_s for x in rs) for (s, mode, cls), rs in by.items() if s == Setup(0.0, "auto")}
    lines = [f"{'configuration':<28} {'mode':<14} " + " ".join(f"{c + ' tok/s (kept)':>22}" for c in classes) + "  ahead held/dropped"]
    for setup, mode in dict.fromkeys((s, m) for s, m, _ in by):
        cells, held, dropped = [], 0, 0
        for cls in classes:
            rs = by.get((setup, mode, cls), [])
            if not rs:
                cells.append(f"{'-':>22}")
                continue
            tps = statistics.median(r.tokens_per_s for r in rs)
            cells.append(f"{tps:>12.2f} ({tps / near[(mode, cls)]:4.2f}x)" if near.get((mode, cls)) else f"{tps:>22.2f}")
            held += sum(r.sent_ahead for r in rs)
            dropped += sum(r.discarded for r in rs)
        lines.append(f"{setup.label:<28} {mode:<14} " + " ".join(cells) + f"  {held}/{dropped}")
    wrong = mismatches(runs)
    lines.append("outputs: every run equal to the near orchestrator's" if not wrong else "MISMATCH: " + "; ".join(wrong))
    return "\n".join(lines)


def plot(runs: list[Run], path: str) -> None:
    """Tokens/s against the round trip, a panel per prompt class, a line per mode and send-ahead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(dict.fromkeys(r.prompt.cls for r in runs))
    fig, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 3.6), sharey=True, squeeze=False)
    for ax, cls in zip(axes[0], classes):
        series = defaultdict(lambda: defaultdict(list))
        for r in runs:
            if r.prompt.cls == cls:
                series[(r.mode, r.setup.send_ahead)][r.setup.rtt_ms].append(r.tokens_per_s)
        for (mode, ahead), points in sorted(series.items()):
            rtts = sorted(points)
            ax.plot(rtts, [statistics.median(points[x]) for x in rtts], marker="o",
                    label=mode if mode == "autoregressive" else f"{mode}, send-ahead {ahead}")
        ax.set_title(cls)
        ax.set_xlabel("round trip to the verify service (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("tokens/s (median over prompts)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_parser(commands) -> None:
    bench = commands.add_parser("linkbench", help="tokens/s kept with the verify service behind a far link (delaying proxy)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--rtt-ms", type=_floats, default=[20.0, 200.0], help="round trips to put before the verify service, "
                       "comma-separated [default: 20,200]")
    bench.add_argument("--send-ahead", type=lambda t: t.split(","), default=["auto", "off"],
                       help="send-ahead settings to run at each round trip, comma-separated [default: auto,off]")
    bench.add_argument("--modes", type=lambda t: t.split(","), default=["default", "autoregressive"],
                       help="decoding modes (default = the orchestrator's own) [default: default,autoregressive]")
    bench.add_argument("--max-new-tokens", type=int, default=64, help="tokens per request [default: 64]")
    bench.add_argument("--prompts", nargs="+", default=[str(bundled_dir() / f) for f in DEFAULT_PROMPT_FILES],
                       help="prompt files [default: the bundled code, prose and chat prompts]")
    bench.add_argument("--per-class", type=int, default=2, help="prompts of each class [default: 2]")
    bench.add_argument("--target-model", default=config.EMBEDDED_TARGET)
    bench.add_argument("--draft-models", default=config.EMBEDDED_DRAFT, help="comma-separated")
    bench.add_argument("--plot", metavar="FILE.png", help="draw tokens/s against the round trip")
    bench.set_defaults(func=main)


def main(args) -> int:
    runs = run(args)
    print(report(runs))
    if args.plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")
    return 1 if mismatches(runs) else 0
