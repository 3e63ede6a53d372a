"""``specdec bench``: speculative decoding through the services against transformers' own baselines.

Every method decodes the same prompts (``bench/prompts/quick.jsonl``: code and prose), greedily, for
the same number of new tokens, from the same prompt token ids (the target tokenizer's, fed as ids):

- ``target-only``: ``transformers`` greedy ``generate`` of the target alone, with its KV cache. It is
  the reference both for speed (speedup = tokens/s over target-only's) and for output: greedy
  speculative decoding is lossless, so every method's tokens must equal target-only's, and any that
  do not are reported as a MISMATCH.
- ``assisted``: ``transformers`` assisted generation (``assistant_model=draft``) with the library's
  defaults, which the results record: up to ``num_assistant_tokens`` = 20 draft tokens a round on a
  ``constant`` schedule, the draft stopping early once its top probability falls below
  ``assistant_confidence_threshold`` = 0.4 (the threshold adapts only when scikit-learn is installed).
- ``specdec-autoregressive``, ``specdec-sequential``, ``specdec-tree``: ``Generate`` over gRPC on a
  :class:`~specdec.tools.cluster.LocalCluster`, so the numbers include real processes and real gRPC.

Timing is wall time per prompt around one generation, after one uncounted warm-up per method;
each run also records the machine's 1-minute load average, because other work on the same cores
stretches wall times (and, with spinning worker threads, CPU times too) and must be visible next to them.
On a small CPU machine two methods running at once would slow each other down, so they never
overlap: the in-process models do all their runs first and are freed (which also keeps memory in
bounds: the target is ~7 GB in float32) before the cluster starts, and the cluster's processes are
idle between requests, so sending one request at a time is enough.

Writes ``<out>/<timestamp>/results.json`` (every run, with the response statistics),
``summary.csv`` (one row per class and method) and ``speedup.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from specdec import config
from specdec.model_store import ModelStoreError, load_model, resolve_model

TARGET_ONLY, ASSISTED = "target-only", "assisted"
SPECDEC_MODES = config.MODES  # autoregressive, sequential, tree
ALL_MODES = (TARGET_ONLY, ASSISTED, *SPECDEC_MODES)
ALL_CLASSES = "all"  # the pseudo-class of every prompt together
DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "bench" / "prompts" / "quick.jsonl"
# --quick sweeps a few small settings per mode: all of them together fit in ~15 minutes on 2 cores.
QUICK_DRAFT_LENGTHS = (4, 6, 8)
QUICK_TREE_SHAPES = ((2, 4), (3, 4), (2, 6))  # (beam_width, beam_depth)
WARMUP_TOKENS = 8  # enough for a few rounds: every code path runs once before timing starts
# transformers' assisted-generation knobs, recorded with their effective values.
ASSISTED_KEYS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


class BenchError(RuntimeError):
    """A failure to report in one message (with the services' logs) rather than a traceback."""


PROMPT_CLASSES = ("code", "prose", "chat")


@dataclass(frozen=True)
class Prompt:
    id: str
    cls: str  # one of PROMPT_CLASSES
    text: str  # the raw prompt; for chat prompts, the messages as plain text (what the tables show)
    messages: tuple = ()  # chat prompts: ({"role": ..., "content": ...}, ...), rendered with the chat template


@dataclass
class Method:
    mode: str  # one of ALL_MODES
    settings: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.mode if self.mode in (TARGET_ONLY, ASSISTED) else f"specdec-{self.mode}"

    @property
    def settings_text(self) -> str:
        s = self.settings
        if self.mode == "sequential":
            return f"k={s['draft_length']}"
        if self.mode == "tree":
            return f"w={s['beam_width']} d={s['beam_depth']} nodes<={s['max_tree_nodes']}"
        if self.mode == ASSISTED:
            return "transformers defaults"
        return "-"

    @property
    def label(self) -> str:
        return f"{self.name} {self.settings_text}" if self.mode in ("sequential", "tree") else self.name


# --------------------------------------------------------------------------- arguments


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = config.SpeculationDefaults()
    parser = argparse.ArgumentParser(
        prog="specdec bench",
        description="Benchmark specdec's modes against transformers' target-only and assisted generation, "
        "on the same prompts, with a lossless check.",
        epilog="Sweeps from a YAML file, resumable, with per-run logs: specdec bench --config FILE "
        "(see: specdec bench --config FILE --help, and benchmarks/bench.yaml).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="sweep draft lengths " + ",".join(map(str, QUICK_DRAFT_LENGTHS)) + " and tree shapes "
                        + ", ".join(f"{w}x{d}" for w, d in QUICK_TREE_SHAPES)
                        + " (WIDTHxDEPTH) unless those flags are given; without it, one setting per mode")
    parser.add_argument("--target-model", default=config.EMBEDDED_TARGET, help="embedded alias, local path or hub id [default: %(default)s]")
    parser.add_argument("--draft-model", default=config.EMBEDDED_DRAFT, help="draft for assisted and specdec [default: %(default)s]")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generation [default: %(default)s]")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                        help='JSON lines {"id", "class", "prompt"} [default: bench/prompts/quick.jsonl]')
    parser.add_argument("--out", type=Path, default=Path("bench_results"),
                        help="results go to OUT/<timestamp>/ [default: %(default)s]")
    parser.add_argument("--modes", default=",".join(ALL_MODES),
                        help=f"comma-separated, of {', '.join(ALL_MODES)}; {TARGET_ONLY} always runs (it is the reference) [default: all]")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and method [default: %(default)s]")
    parser.add_argument("--draft-length", type=int_list, default=None,
                        help=f"sequential: draft lengths, comma-separated [default: {defaults.draft_length}]")
    parser.add_argument("--beam-width", type=int_list, default=None,
                        help=f"tree: beam widths, comma-separated, paired position by position with --beam-depth [default: {defaults.beam_width}]")
    parser.add_argument("--beam-depth", type=int_list, default=None, help=f"tree: beam depths [default: {defaults.beam_depth}]")
    parser.add_argument("--max-tree-nodes", type=int, default=defaults.max_tree_nodes, help="tree: node cap [default: %(default)s]")
    args = parser.parse_args(argv)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(ALL_MODES)}")
    args.modes = [m for m in ALL_MODES if m == TARGET_ONLY or m in modes]
    if args.max_new_tokens < 1 or args.repeats < 1:
        parser.error("--max-new-tokens and --repeats must be at least 1")

    quick = args.quick
    if args.draft_length is None:
        args.draft_length = list(QUICK_DRAFT_LENGTHS) if quick else [defaults.draft_length]
    if args.beam_width is None and args.beam_depth is None and quick:
        args.tree_shapes = list(QUICK_TREE_SHAPES)
    else:
        widths = args.beam_width or [defaults.beam_width]
        depths = args.beam_depth or [defaults.beam_depth]
        if len(widths) != len(depths) and 1 not in (len(widths), len(depths)):
            parser.error("--beam-width and --beam-depth need the same number of values (or one of them a single value)")
        n = max(len(widths), len(depths))
        args.tree_shapes = list(zip(widths * n if len(widths) == 1 else widths, depths * n if len(depths) == 1 else depths))
    return args


def load_prompts(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise BenchError(f"no prompts file at {path}")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path}:{n}: not JSON: {exc}") from None
        prompts.append(prompt_from(item, f"{path}:{n}"))
    if len({p.id for p in prompts}) != len(prompts):
        raise BenchError(f"{path}: prompt ids must be unique")
    if not prompts:
        raise BenchError(f"{path} holds no prompts")
    return prompts


def prompt_from(item, where: str) -> Prompt:
    """``{"id", "class", "prompt"}``, or for chat ``{"id", "class": "chat", "messages": [{"role", "content"}, ...]}``."""
    need = f'{where}: need {{"id": ..., "class": one of {", ".join(PROMPT_CLASSES)}, "prompt": text or "messages": [...]}}'
    if not isinstance(item, dict) or item.get("class") not in PROMPT_CLASSES or not item.get("id"):
        raise BenchError(need)
    messages = item.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise BenchError(f'{where}: "messages" must be a list of {{"role": ..., "content": ...}}')
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return Prompt(str(item["id"]), item["class"], text, tuple(dict(role=m["role"], content=m["content"]) for m in messages))
    if not isinstance(item.get("prompt"), str) or not item["prompt"]:
        raise BenchError(need)
    return Prompt(str(item["id"]), item["class"], item["prompt"])


def encode_prompt(tokenizer, prompt: Prompt) -> tuple[str, list[int]]:
    """The text the target sees and its token ids. Chat prompts go through the tokenizer's chat template
    (with the assistant's turn opened); a tokenizer without one gets plain ``role: content`` lines."""
    if not prompt.messages:
        return prompt.text, tokenizer(prompt.text).input_ids
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(prompt.messages), tokenize=False, add_generation_prompt=True)
    else:
        text = prompt.text + "\nassistant:"
    return text, tokenizer(text, add_special_tokens=False).input_ids


def methods_for(args: argparse.Namespace) -> list[Method]:
    methods = []
    for mode in args.modes:
        if mode == "sequential":
            methods += [Method(mode, {"draft_length": k}) for k in args.draft_length]
        elif mode == "tree":
            methods += [Method(mode, {"beam_width": w, "beam_depth": d, "max_tree_nodes": args.max_tree_nodes})
                        for w, d in args.tree_shapes]
        else:
            methods.append(Method(mode))
    return methods


# --------------------------------------------------------------------------- running


class Runner:
    """Runs methods over the prompts, records every run, and checks each against target-only's tokens."""

    def __init__(self, prompts: list[Prompt], prompt_ids: dict[str, list[int]], repeats: int, max_new_tokens: int, bar) -> None:
        self.prompts = prompts
        self.prompt_ids = prompt_ids
        self.repeats = repeats
        self.max_new_tokens = max_new_tokens
        self.bar = bar
        self.runs: list[dict] = []
        self.reference: dict[str, list[int]] = {}  # prompt id -> target-only tokens
        self.mismatches: list[str] = []

    def run(self, method: Method, generate, warm_up: bool = True) -> None:
        """``generate(prompt_ids, max_new_tokens) -> (tokens, stats)``; timed here, around the call."""
        self.bar.set_description(method.label)
        if warm_up:
            self.bar.set_postfix_str("warm-up")
            generate(self.prompt_ids[self.prompts[0].id], min(WARMUP_TOKENS, self.max_new_tokens))
        self.bar.set_postfix_str("")
        for repeat in range(self.repeats):
            for prompt in self.prompts:
                ids = self.prompt_ids[prompt.id]
                start = time.perf_counter()
                tokens, stats = generate(ids, self.max_new_tokens)
                seconds = time.perf_counter() - start
                self.runs.append({
                    "method": method.name,
                    "mode": method.mode,
                    "settings": method.settings,
                    "label": method.label,
                    "prompt_id": prompt.id,
                    "class": prompt.cls,
                    "repeat": repeat,
                    "prompt_tokens": len(ids),
                    "tokens": len(tokens),
                    "seconds": seconds,
                    "tokens_per_s": len(tokens) / seconds,
                    "load_average_1m": os.getloadavg()[0],
                    "token_ids": tokens,
                    **self.check(method, prompt, tokens),
                    "stats": stats,
                })
                self.bar.update(1)

    def check(self, method: Method, prompt: Prompt, tokens: list[int]) -> dict:
        reference = self.reference.setdefault(prompt.id, tokens)  # target-only runs first
        if tokens == reference:
            return {"matches_target": True, "first_mismatch": None}
        at = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
        line = (f"MISMATCH {method.label} on {prompt.id}: differs from target-only at new token {at} "
                f"(got {tokens[at:at + 4]}, target-only {reference[at:at + 4]}; lengths {len(tokens)} vs {len(reference)})")
        self.mismatches.append(line)
        self.bar.write(line)
        return {"matches_target": False, "first_mismatch": at}


def run_in_process(runner: Runner, methods: list[Method], target_model: str, draft_model: str, tokenizer) -> dict:
    """target-only and assisted in this process; returns the assisted settings transformers used."""
    runner.bar.set_description("loading models")
    target, _ = load_model(target_model)
    draft = load_model(draft_model)[0] if any(m.mode == ASSISTED for m in methods) else None
    pad_token_id = pad_token_for(target, tokenizer)
    for method in methods:
        runner.run(method, baseline_call(target, draft if method.mode == ASSISTED else None, pad_token_id))
    used = assisted_settings(draft) if draft is not None else {}
    # Free both models before the cluster loads its own copies (memory, and no stray threads).
    del target, draft
    gc.collect()
    return used


def pad_token_for(target, tokenizer) -> int:
    eos = target.generation_config.eos_token_id
    return next(t for t in (target.generation_config.pad_token_id, tokenizer.pad_token_id,
                            eos[0] if isinstance(eos, list) else eos, 0) if t is not None)


def baseline_call(target, assistant, pad_token_id: int, device: str = "cpu"):
    """``call(prompt_ids, max_new_tokens) -> (new tokens, stats)``: transformers greedy ``generate`` with
    its KV cache, assisted by ``assistant`` when given. stats holds the time to the first new token and
    how many pieces the output came in (one per token alone; one per round when assisted)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenClock(BaseStreamer):
        # generate() hands the streamer the prompt first, then each step's (or round's) new tokens.
        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.puts = 0
            self.first_token_s = None

        def put(self, value) -> None:
            self.puts += 1
            if self.puts == 2:
                self.first_token_s = time.perf_counter() - self.start

        def end(self) -> None:
            pass

    @torch.inference_mode()
    def call(prompt_ids: list[int], max_new_tokens: int):
        ids = torch.tensor([prompt_ids], device=device)
        extra = {"assistant_model": assistant} if assistant is not None else {}
        clock = FirstTokenClock()
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, use_cache=True, pad_token_id=pad_token_id, streamer=clock, **extra)
        first = clock.first_token_s
        return out[0, len(prompt_ids):].tolist(), {
            "time_to_first_token_ms": first * 1e3 if first is not None else None,
            "output_pieces": max(0, clock.puts - 1),
        }
    return call


def assisted_settings(draft) -> dict:
    """The assisted-generation settings in effect: the draft's generation config, else transformers' defaults."""
    generation_config = draft.generation_config
    # A private helper, so tolerate its absence: the recorded values are then the config's own.
    library = getattr(generation_config, "_get_default_generation_params", dict)()
    used = {}
    for key in ASSISTED_KEYS:
        value = getattr(generation_config, key, None)
        used[key] = library.get(key) if value is None else value
    used["confidence_threshold_adapts"] = importlib.util.find_spec("sklearn") is not None
    return used


@contextlib.contextmanager
def running_cluster(settings: config.ClusterSettings, what: str):
    """A LocalCluster started for ``what`` and a GenerationService stub on it; stopped on exit."""
    import grpc

    from specdec.tools.cluster import LocalCluster
    from specdec.v1 import generation_pb2_grpc

    cluster = LocalCluster(settings)
    try:
        cluster.start()
    except RuntimeError as exc:  # a service that did not come up; the message carries its log
        raise BenchError(f"the cluster for {what} did not start: {exc}") from None
    try:
        with grpc.insecure_channel(cluster.orchestrator_address) as channel:
            yield cluster, generation_pb2_grpc.GenerationServiceStub(channel)
    finally:
        cluster.stop()


def run_cluster(runner: Runner, methods: list[Method], settings: config.ClusterSettings) -> None:
    """The specdec modes, each request over gRPC to a LocalCluster, one at a time."""
    import grpc

    from specdec.tools.cli import stats_dict
    from specdec.v1 import generation_pb2

    runner.bar.set_description("starting the cluster")
    with running_cluster(settings, "the benchmark") as (cluster, stub):
        warmed: set[str] = set()
        for method in methods:
            def call(prompt_ids: list[int], max_new_tokens: int, method=method):
                request = generation_pb2.GenerateRequest(
                    prompt_token_ids=prompt_ids,
                    max_new_tokens=max_new_tokens,
                    mode=generation_pb2.DecodingMode.Value("DECODING_MODE_" + method.mode.upper()),
                    speculation=generation_pb2.SpeculationParams(**method.settings),
                )
                try:
                    reply = stub.Generate(request, timeout=3600)
                except grpc.RpcError as exc:
                    logs = "\n".join(f"--- {p.name} log:\n{p.log_tail()}" for p in cluster.processes)
                    raise BenchError(f"{method.label}: Generate failed: {exc.code().name}: {exc.details()}\n{logs}") from None
                return list(reply.token_ids), stats_dict(reply.stats)
            # The services stay warm across settings of one mode: one warm-up per mode is enough.
            runner.run(method, call, warm_up=method.mode not in warmed)
            warmed.add(method.mode)


# --------------------------------------------------------------------------- summarising


def summarise(runs: list[dict], methods: list[Method], classes: list[str]) -> list[dict]:
    """One row per (class, method): tokens/s is the median over prompts (each prompt's median over repeats)."""
    rows = []
    for cls in classes:
        for method in methods:
            mine = [r for r in runs if r["label"] == method.label and cls in (r["class"], ALL_CLASSES)]
            by_prompt: dict[str, list[float]] = {}
            for r in mine:
                by_prompt.setdefault(r["prompt_id"], []).append(r["tokens_per_s"])
            rounds = sum(r["stats"].get("rounds", 0) for r in mine)
            rows.append({
                "class": cls,
                "method": method.name,
                "mode": method.mode,
                "settings": json.dumps(method.settings, sort_keys=True),
                "label": method.label,
                "prompts": len(by_prompt),
                "runs": len(mine),
                "new_tokens": sum(r["tokens"] for r in mine),
                "seconds": sum(r["seconds"] for r in mine),
                "tokens_per_s": statistics.median(statistics.median(v) for v in by_prompt.values()),
                "max_load_average_1m": max(r["load_average_1m"] for r in mine),
                # Accepted draft tokens + bonus per verify round, pooled over the runs.
                "mean_accepted_per_round": sum(r["tokens"] for r in mine) / rounds if rounds else None,
                "lossless": all(r["matches_target"] for r in mine),
            })
    for row in rows:
        peers = [r for r in rows if r["class"] == row["class"]]
        reference = next(r for r in peers if r["mode"] == TARGET_ONLY)["tokens_per_s"]
        row["speedup"] = row["tokens_per_s"] / reference
        row["best_of_mode"] = row["tokens_per_s"] == max(r["tokens_per_s"] for r in peers if r["mode"] == row["mode"])
    return rows


def format_table(rows: list[dict], cls: str, prompts: int, max_new_tokens: int) -> str:
    lines = [f"\n{cls} ({prompts} prompt{'s' if prompts != 1 else ''}, up to {max_new_tokens} new tokens each; * = best of its mode)",
             f"{'method':<24} {'settings':<22} {'tok/s':>7} {'speedup':>8} {'tok/round':>10} {'max load':>9}  lossless"]
    for r in (r for r in rows if r["class"] == cls):
        method = Method(r["mode"], json.loads(r["settings"]))
        per_round = f"{r['mean_accepted_per_round']:.2f}" if r["mean_accepted_per_round"] is not None else "-"
        best = "*" if r["best_of_mode"] and sum(x["class"] == cls and x["mode"] == r["mode"] for x in rows) > 1 else " "
        lines.append(f"{best}{method.name:<23} {method.settings_text:<22} {r['tokens_per_s']:>7.2f} "
                     f"{r['speedup']:>7.2f}x {per_round:>10} {r['max_load_average_1m']:>9.1f}  {'ok' if r['lossless'] else 'MISMATCH'}")
    return "\n".join(lines)


def plot_speedup(rows: list[dict], classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows))
    width = 0.8 / len(classes)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.5))
    for i, cls in enumerate(classes):
        speedup = {r["label"]: r["speedup"] for r in rows if r["class"] == cls}
        xs = [x + (i - (len(classes) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(xs, [speedup[label] for label in labels], width, label=cls)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup over target-only (tokens/s)")
    ax.set_title("specdec bench: median tokens/s over prompts, relative to target-only")
    ax.legend(title="prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: Path, meta: dict, runs: list[dict], rows: list[dict], mismatches: list[str], classes: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta, "lossless": {"passed": not mismatches, "mismatches": mismatches}, "summary": rows, "runs": runs}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_speedup(rows, classes, out_dir / "speedup.png")


# --------------------------------------------------------------------------- sweeps (--config)
# `specdec bench --config FILE`: every combination a YAML file lists, each run logged as one JSON file
# in OUT/runs/ (written whole, then renamed into place), so a sweep that stops resumes where it
# stopped: runs whose log exists are not run again.

SWEEP_KEYS = {
    "name", "target_model", "draft_model_sets", "max_new_tokens", "modes", "baselines", "sequential", "tree",
    "prompt_files", "prompts", "classes", "prompts_per_class", "repetitions", "dtype", "devices", "output_dir",
    "warmup_tokens", "startup_timeout_s",
}


@dataclass(frozen=True)
class ModelSet:
    name: str
    models: tuple[str, ...]


@dataclass
class SweepConfig:
    path: Path
    name: str
    target_model: str
    model_sets: list[ModelSet]
    max_new_tokens: list[int]
    modes: list[str]  # speculative modes, through the cluster
    baselines: list[str]  # target-only always; assisted unless left out
    draft_lengths: list[int]
    tree_shapes: list[tuple[int, int]]  # (beam_width, beam_depth)
    max_tree_nodes: int
    prompts: list[Prompt]
    repetitions: int
    dtype: str
    verify_device: str
    draft_devices: list[str]
    baseline_device: str
    output_dir: Path
    warmup_tokens: int
    startup_timeout_s: int


@dataclass(frozen=True)
class RunSpec:
    method: Method
    model_set: ModelSet | None  # None for the baselines
    prompt: Prompt
    max_new_tokens: int
    repeat: int

    @property
    def set_name(self) -> str:
        if self.method.mode == TARGET_ONLY:
            return "-"
        if self.method.mode == ASSISTED:
            return self.method.settings["draft_model"]
        return self.model_set.name

    @property
    def draft_models(self) -> list[str]:
        if self.method.mode == ASSISTED:
            return [self.method.settings["draft_model"]]
        return list(self.model_set.models) if self.model_set and self.method.mode != "autoregressive" else []

    @property
    def run_id(self) -> str:
        s = self.method.settings
        what = {
            TARGET_ONLY: "target-only",
            ASSISTED: f"assisted-{slug(s.get('draft_model', ''))}",
            "autoregressive": "autoregressive",
            "sequential": f"sequential-k{s.get('draft_length')}",
            "tree": f"tree-w{s.get('beam_width')}-d{s.get('beam_depth')}-n{s.get('max_tree_nodes')}",
        }[self.method.mode]
        where = "baseline" if self.model_set is None else slug(self.model_set.name)
        return f"{where}--{what}--n{self.max_new_tokens}--{slug(self.prompt.id)}--r{self.repeat}"


def slug(text: str) -> str:
    """A file-name-safe form: a model path keeps its last part."""
    text = text.rstrip("/").rsplit("/", 1)[-1] if "/" in text else text
    return "".join(c if c.isalnum() or c in "._+-" else "-" for c in text) or "x"


def _list(value, kind, key: str, where: Path) -> list:
    items = value if isinstance(value, list) else [value]
    try:
        return [kind(v) for v in items]
    except (TypeError, ValueError):
        raise BenchError(f"{where}: {key} must be a {kind.__name__} or a list of them, got {value!r}") from None


def load_sweep_config(path: Path) -> SweepConfig:
    """Read and check a sweep file (see benchmarks/bench.yaml for every key, with comments)."""
    import yaml

    if not path.is_file():
        raise BenchError(f"no sweep config at {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BenchError(f"{path}: not YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise BenchError(f"{path}: expected a mapping of settings")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise BenchError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(SWEEP_KEYS))}")
    defaults = config.SpeculationDefaults()
    name = str(raw.get("name") or path.stem)
    target = str(raw.get("target_model") or config.EMBEDDED_TARGET)

    model_sets = []
    for i, item in enumerate(raw.get("draft_model_sets") or [[config.EMBEDDED_DRAFT]]):
        if isinstance(item, dict):
            models, set_name = item.get("models"), item.get("name")
        else:
            models, set_name = item, None
        models = [m.strip() for m in (models.split(",") if isinstance(models, str) else models or []) if str(m).strip()]
        if not models:
            raise BenchError(f"{path}: draft_model_sets[{i}] names no draft model")
        model_sets.append(ModelSet(str(set_name or "+".join(slug(m) for m in models)), tuple(models)))
    if len({m.name for m in model_sets}) != len(model_sets):
        raise BenchError(f"{path}: draft_model_sets need distinct names")

    modes = _list(raw.get("modes", ["sequential", "tree"]), str, "modes", path)
    bad = [m for m in modes if m not in SPECDEC_MODES]
    baselines = _list(raw.get("baselines", [TARGET_ONLY, ASSISTED]), str, "baselines", path)
    bad += [b for b in baselines if b not in (TARGET_ONLY, ASSISTED)]
    if bad:
        raise BenchError(f"{path}: unknown mode(s) {', '.join(bad)}; modes: {', '.join(SPECDEC_MODES)}; "
                         f"baselines: {TARGET_ONLY}, {ASSISTED}")
    baselines = [TARGET_ONLY] + [b for b in baselines if b == ASSISTED][:1]  # target-only is the reference: always

    sequential, tree = raw.get("sequential") or {}, raw.get("tree") or {}
    draft_lengths = _list(sequential.get("draft_lengths", defaults.draft_length), int, "sequential.draft_lengths", path)
    if "shapes" in tree:
        shapes = [tuple(_list(shape, int, "tree.shapes", path)) for shape in tree["shapes"]]
        if any(len(shape) != 2 for shape in shapes):
            raise BenchError(f"{path}: tree.shapes holds [beam_width, beam_depth] pairs")
    else:
        widths = _list(tree.get("beam_widths", defaults.beam_width), int, "tree.beam_widths", path)
        depths = _list(tree.get("beam_depths", defaults.beam_depth), int, "tree.beam_depths", path)
        shapes = [(w, d) for w in widths for d in depths]
    max_new_tokens = _list(raw.get("max_new_tokens", 64), int, "max_new_tokens", path)
    numbers = [*draft_lengths, *(v for shape in shapes for v in shape), *max_new_tokens]
    if any(n < 1 for n in numbers):
        raise BenchError(f"{path}: draft lengths, beam widths and depths and max_new_tokens must be at least 1")

    here = path.parent
    prompts: list[Prompt] = []
    for file in _list(raw.get("prompt_files", []), str, "prompt_files", path):
        prompts += load_prompts(here / file)
    for i, item in enumerate(raw.get("prompts") or []):
        prompts.append(prompt_from(item, f"{path}: prompts[{i}]"))
    classes = _list(raw.get("classes", list(PROMPT_CLASSES)), str, "classes", path)
    prompts = [p for p in prompts if p.cls in classes]
    per_class = raw.get("prompts_per_class")
    if per_class:
        prompts = [p for p in prompts if [q.id for q in prompts if q.cls == p.cls].index(p.id) < int(per_class)]
    if not prompts:
        raise BenchError(f"{path}: no prompts (set prompt_files or prompts; check classes)")
    if len({p.id for p in prompts}) != len(prompts):
        raise BenchError(f"{path}: prompt ids must be unique across files")

    devices = raw.get("devices") or {}
    verify_device = str(devices.get("verify", "cpu"))
    repetitions = int(raw.get("repetitions", 1))
    if repetitions < 1:
        raise BenchError(f"{path}: repetitions must be at least 1")
    return SweepConfig(
        path=path, name=name, target_model=target, model_sets=model_sets, max_new_tokens=max_new_tokens,
        modes=[m for m in SPECDEC_MODES if m in modes], baselines=baselines, draft_lengths=draft_lengths,
        tree_shapes=shapes, max_tree_nodes=int(tree.get("max_tree_nodes", defaults.max_tree_nodes)), prompts=prompts,
        repetitions=repetitions, dtype=str(raw.get("dtype", "float32")), verify_device=verify_device,
        draft_devices=_list(devices.get("drafts", verify_device), str, "devices.drafts", path),
        baseline_device=str(devices.get("baselines", verify_device)),
        output_dir=Path(raw.get("output_dir") or Path("bench_results") / slug(name)),
        warmup_tokens=int(raw.get("warmup_tokens", WARMUP_TOKENS)),
        startup_timeout_s=int(raw.get("startup_timeout_s", 600)),
    )


def sweep_plan(cfg: SweepConfig) -> list[RunSpec]:
    """Every run, in the order they go: target-only, assisted, then each model set's modes on its own cluster."""
    def each(method: Method, model_set: ModelSet | None) -> list[RunSpec]:
        return [RunSpec(method, model_set, prompt, n, repeat)
                for n in cfg.max_new_tokens for repeat in range(cfg.repetitions) for prompt in cfg.prompts]

    plan = each(Method(TARGET_ONLY), None)
    if ASSISTED in cfg.baselines:
        for draft in dict.fromkeys(s.models[0] for s in cfg.model_sets):  # assisted takes one draft: each set's first
            plan += each(Method(ASSISTED, {"draft_model": draft}), None)
    for model_set in cfg.model_sets:
        for mode in cfg.modes:
            if mode == "sequential":
                methods = [Method(mode, {"draft_length": k}) for k in cfg.draft_lengths]
            elif mode == "tree":
                methods = [Method(mode, {"beam_width": w, "beam_depth": d, "max_tree_nodes": cfg.max_tree_nodes})
                           for w, d in cfg.tree_shapes]
            else:
                methods = [Method(mode)]
            for method in methods:
                plan += each(method, model_set)
    return plan


class Sweep:
    """Runs a plan's missing runs and writes each one's log as it finishes."""

    def __init__(self, cfg: SweepConfig, out_dir: Path, bar, limit: int | None = None) -> None:
        self.cfg = cfg
        self.runs_dir = out_dir / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.bar = bar
        self.limit = limit
        self.new_runs = 0
        self.mismatches: list[str] = []
        self.reference: dict[tuple[str, int], list[int]] = {}  # (prompt id, max_new_tokens) -> target-only tokens
        self.target_tps: dict[tuple[str, int], list[float]] = defaultdict(list)
        self.speedups: dict[tuple[str, str], list[float]] = defaultdict(list)  # (model set, label) -> per-run speedups
        for path in sorted(self.runs_dir.glob("*.json")):
            try:
                self.remember(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError):
                continue

    def path(self, spec: RunSpec) -> Path:
        return self.runs_dir / f"{spec.run_id}.json"

    def done(self, spec: RunSpec) -> bool:
        return self.path(spec).is_file()

    def stopped(self) -> bool:
        return self.limit is not None and self.new_runs >= self.limit

    def remember(self, log: dict) -> None:
        b = log["bench"]
        key = (b["prompt_id"], b["max_new_tokens"])
        if b["mode"] == TARGET_ONLY:
            self.reference.setdefault(key, log["token_ids"])
            self.target_tps[key].append(b["tokens_per_s"])
        elif b.get("speedup") is not None:
            self.speedups[(b["model_set"], b["label"])].append(b["speedup"])
        if b.get("matches_target") is False:
            self.mismatches.append(f"MISMATCH {b['run_id']}: differs from target-only at new token {b['first_mismatch']}")

    def best(self) -> str:
        scored = {name: statistics.median(v) for name, v in self.speedups.items() if v}
        if not scored:
            return ""
        model_set, label = max(scored, key=scored.get)
        return f"best: {label} ({model_set}) {scored[model_set, label]:.2f}x"

    def record(self, spec: RunSpec, tokens: list[int], seconds: float, ttft_ms: float | None, log: dict,
               token_texts: list[str], prompt_text: str) -> dict:
        """Complete a run's log (the lossless check, speedup, metrics) and write it into place."""
        from specdec.tools import analyze

        key = (spec.prompt.id, spec.max_new_tokens)
        reference = self.reference.setdefault(key, tokens) if spec.method.mode == TARGET_ONLY else self.reference.get(key)
        tokens_per_s = len(tokens) / seconds if seconds > 0 else 0.0
        if spec.method.mode == TARGET_ONLY:
            self.target_tps[key].append(tokens_per_s)
        check = {"matches_target": None, "first_mismatch": None}
        if reference is not None:
            check["matches_target"] = tokens == reference
            if tokens != reference:
                at = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
                check["first_mismatch"] = at
                line = (f"MISMATCH {spec.run_id}: differs from target-only at new token {at} "
                        f"(got {tokens[at:at + 4]}, target-only {reference[at:at + 4]})")
                self.mismatches.append(line)
                self.bar.write(line)
        target_tps = self.target_tps.get(key)
        log = {
            **log,
            "prompt": prompt_text,
            "token_texts": token_texts,
            "bench": {
                "run_id": spec.run_id,
                "sweep": self.cfg.name,
                "method": spec.method.name,
                "mode": spec.method.mode,
                "settings": spec.method.settings,
                "label": spec.method.label,
                "model_set": spec.set_name,
                "draft_models": spec.draft_models,
                "prompt_id": spec.prompt.id,
                "class": spec.prompt.cls,
                "repeat": spec.repeat,
                "max_new_tokens": spec.max_new_tokens,
                "prompt_tokens": len(log.get("prompt_token_ids") or []) or log["stats"].get("prompt_tokens"),
                "tokens": len(tokens),
                "seconds": seconds,
                "tokens_per_s": tokens_per_s,
                "ttft_ms": ttft_ms,
                # Over target-only's median tokens/s on this prompt, measured in this sweep.
                "speedup": tokens_per_s / statistics.median(target_tps) if target_tps else None,
                "load_average_1m": os.getloadavg()[0],
                "dtype": self.cfg.dtype,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **check,
            },
        }
        log["metrics"] = analyze.run_metrics(log)
        path = self.path(spec)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(log, indent=1))
        os.replace(tmp, path)  # a log is there whole or not at all: resuming trusts every file it finds
        self.new_runs += 1
        if spec.method.mode not in (TARGET_ONLY, ASSISTED) and log["bench"]["speedup"] is not None:
            self.speedups[(spec.set_name, spec.method.label)].append(log["bench"]["speedup"])
        self.bar.update(1)
        best = self.best()
        if best:
            self.bar.set_postfix_str(best, refresh=False)
        return log


def sweep_baselines(sweep: Sweep, pending: list[RunSpec], tokenizer, encoded: dict[str, tuple[str, list[int]]]) -> None:
    """target-only and assisted generation in this process (target loaded once, each draft in turn)."""
    from specdec.orchestrator.server import token_texts

    if not pending:
        return
    cfg = sweep.cfg
    sweep.bar.set_description("loading the target")
    target, _ = load_model(cfg.target_model, device=cfg.baseline_device, dtype=cfg.dtype)
    pad_token_id = pad_token_for(target, tokenizer)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731 (as the orchestrator decodes)
    drafts = [None] + list(dict.fromkeys(s.method.settings["draft_model"] for s in pending if s.method.mode == ASSISTED))
    for draft_name in drafts:
        mine = [s for s in pending if s.method.settings.get("draft_model") == draft_name]
        if not mine or sweep.stopped():
            continue
        assistant = None
        if draft_name is not None:
            sweep.bar.set_description(f"loading {draft_name}")
            assistant = load_model(draft_name, device=cfg.baseline_device, dtype=cfg.dtype)[0]
        call = baseline_call(target, assistant, pad_token_id, device=cfg.baseline_device)
        sweep.bar.set_description(mine[0].method.label + (f" ({draft_name})" if draft_name else ""))
        call(encoded[mine[0].prompt.id][1], min(cfg.warmup_tokens, mine[0].max_new_tokens))  # uncounted warm-up
        for spec in mine:
            if sweep.stopped():
                break
            text, ids = encoded[spec.prompt.id]
            start = time.perf_counter()
            tokens, extra = call(ids, spec.max_new_tokens)
            seconds = time.perf_counter() - start
            pieces = extra["output_pieces"]
            stats = {
                "mode": spec.method.mode,
                "prompt_tokens": len(ids),
                "tokens_generated": len(tokens),
                "total_ms": seconds * 1e3,
                "tokens_per_second": len(tokens) / seconds if seconds else 0.0,
                "time_to_first_token_ms": extra["time_to_first_token_ms"],
                # Assisted generation hands over one piece per round: accepted draft tokens + the target's.
                "rounds": pieces if spec.method.mode == ASSISTED else len(tokens),
                "mean_accepted_per_round": len(tokens) / pieces if pieces else 0.0,
            }
            log = {
                "target_model": cfg.target_model,
                "request": {"mode": spec.method.mode, "max_new_tokens": spec.max_new_tokens, "prompt_tokens": len(ids),
                            **({"assistant": assisted_settings(assistant)} if assistant is not None else {})},
                "text": decode(tokens),
                "token_ids": tokens,
                "finish_reason": "length" if len(tokens) >= spec.max_new_tokens else "stop",
                "stats": stats,
                "rounds": [],
                "prompt_token_ids": ids,
            }
            sweep.record(spec, tokens, seconds, extra["time_to_first_token_ms"], log, token_texts(tokens, decode), text)
        del assistant, call
        gc.collect()
    del target
    gc.collect()


def sweep_cluster(sweep: Sweep, model_set: ModelSet, pending: list[RunSpec], tokenizer,
                  encoded: dict[str, tuple[str, list[int]]]) -> None:
    """One LocalCluster for the model set, reused by all its runs; each run a GenerateStream call."""
    import shutil
    import tempfile

    from specdec.orchestrator.server import token_texts

    if not pending or sweep.stopped():
        return
    cfg = sweep.cfg
    # The orchestrator's own per-generation log is the base of each run's log; it is read, then removed.
    orchestrator_logs = Path(tempfile.mkdtemp(prefix="specdec-bench-logs-"))
    settings = config.from_env(
        config.ClusterSettings, target_model=cfg.target_model, draft_models=list(model_set.models),
        verify_device=cfg.verify_device, draft_devices=cfg.draft_devices, dtype=cfg.dtype, port=0,
        log_dir=str(orchestrator_logs), startup_timeout_s=cfg.startup_timeout_s, trace_file="", metrics_port=0,
    )
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    sweep.bar.set_description(f"starting the cluster for {model_set.name}")
    try:
        with running_cluster(settings, model_set.name) as (cluster, stub):
            warmed: set[str] = set()
            for spec in pending:
                if sweep.stopped():
                    break
                text, ids = encoded[spec.prompt.id]
                sweep.bar.set_description(f"{model_set.name}: {spec.method.label}")
                if spec.method.mode not in warmed:  # the services stay warm across settings of one mode
                    stream_generate(stub, cluster, spec, ids, min(cfg.warmup_tokens, spec.max_new_tokens))
                    warmed.add(spec.method.mode)
                for old in orchestrator_logs.glob("*.json"):
                    old.unlink()
                tokens, seconds, ttft_ms, streamed = stream_generate(stub, cluster, spec, ids, spec.max_new_tokens, cfg.target_model)
                log = orchestrator_log(orchestrator_logs, tokens) or streamed
                log["prompt_token_ids"] = ids
                texts = log.get("token_texts") or token_texts(tokens, decode)
                sweep.record(spec, tokens, seconds, ttft_ms, log, texts, text)
    finally:
        shutil.rmtree(orchestrator_logs, ignore_errors=True)


def stream_generate(stub, cluster, spec: RunSpec, prompt_ids: list[int], max_new_tokens: int, target_model: str = ""):
    """One GenerateStream call, timed here: (tokens, seconds, time to first token ms, a log built from the stream)."""
    import grpc

    from specdec.v1 import generation_pb2

    request = generation_pb2.GenerateRequest(
        prompt_token_ids=prompt_ids,
        max_new_tokens=max_new_tokens,
        mode=generation_pb2.DecodingMode.Value("DECODING_MODE_" + spec.method.mode.upper()),
        speculation=generation_pb2.SpeculationParams(**spec.method.settings),
        include_rounds=True,
    )
    tokens, rounds, stats, finish, first = [], [], {}, 0, None
    start = time.perf_counter()
    try:
        for message in stub.GenerateStream(request, timeout=3600):
            if message.token_ids and first is None:
                first = time.perf_counter() - start
            tokens += message.token_ids
            if message.HasField("round"):
                rounds.append(message.round)
            if message.HasField("stats"):
                stats, finish = stats_plain(message.stats), message.finish_reason
    except grpc.RpcError as exc:
        logs = "\n".join(f"--- {p.name} log:\n{p.log_tail()}" for p in cluster.processes)
        raise BenchError(f"{spec.run_id}: GenerateStream failed: {exc.code().name}: {exc.details()}\n{logs}") from None
    seconds = time.perf_counter() - start
    streamed = {
        "target_model": target_model,
        "request": {"max_new_tokens": max_new_tokens, "mode": spec.method.mode, **spec.method.settings,
                    "prompt_tokens": len(prompt_ids)},
        "text": "",
        "token_ids": tokens,
        "finish_reason": {1: "length", 2: "stop"}.get(finish, ""),
        "stats": stats,
        "rounds": [
            {
                "index": r.index,
                "proposals": {p.draft: [list(b.token_ids) for b in p.beams] for p in r.proposals},
                "accepted": list(r.accepted_token_ids),
                "bonus_token": r.bonus_token_id if r.bonus_token_id >= 0 else None,
                "bonus_is_correction": r.bonus_is_correction,
                "winning_draft": r.winning_draft,
                "tree_nodes": r.tree_nodes,
                "draft_ms": r.draft_ms,
                "verify_ms": r.verify_ms,
                "fallback": r.fallback,
                "fallback_reason": r.fallback_reason,
            }
            for r in rounds
        ],
    }
    return tokens, seconds, first * 1e3 if first is not None else None, streamed


def stats_plain(stats) -> dict:
    """GenerationStats as the orchestrator's log writes them: numbers as numbers, drafts by name."""
    out = {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields if f.name != "drafts"}
    out["drafts"] = {d.draft: {"proposed_tokens": d.proposed_tokens, "accepted_tokens": d.accepted_tokens,
                               "acceptance_rate": d.acceptance_rate} for d in stats.drafts}
    return out


def orchestrator_log(log_dir: Path, tokens: list[int]) -> dict | None:
    """The orchestrator's statistics file for the call just made (the only one in log_dir), if it is that call's."""
    files = list(log_dir.glob("*.json"))
    if len(files) != 1:
        return None
    try:
        log = json.loads(files[0].read_text())
    except (OSError, ValueError):
        return None
    files[0].unlink()
    return log if log.get("token_ids") == tokens else None


def sweep_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="specdec bench --config",
        description="Run the sweep a YAML file describes (see benchmarks/bench.yaml). Each run's log goes to "
        "OUT/runs/; run the same command again to resume an interrupted sweep.",
    )
    parser.add_argument("--config", type=Path, required=True, help="the sweep file")
    parser.add_argument("--out", type=Path, help="output directory [default: the file's output_dir]")
    parser.add_argument("--limit", type=int, help="stop after this many new runs (run again to go on)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs still to do, run nothing")
    args = parser.parse_args(argv)
    try:
        cfg = load_sweep_config(args.config)
        if args.out:
            cfg.output_dir = args.out
        return sweep(cfg, limit=args.limit, dry_run=args.dry_run)
    except KeyboardInterrupt:
        print("\nspecdec bench: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (BenchError, ModelStoreError) as exc:
        print(f"specdec bench: {exc}", file=sys.stderr)
        return 1


def sweep(cfg: SweepConfig, limit: int | None = None, dry_run: bool = False) -> int:
    import transformers
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from specdec.tools import analyze

    plan = sweep_plan(cfg)
    out_dir = cfg.output_dir
    if len({s.run_id for s in plan}) != len(plan):
        raise BenchError("two runs of the plan share a log name; give the prompts or model sets distinct names")
    if dry_run:
        todo = [s for s in plan if not (out_dir / "runs" / f"{s.run_id}.json").is_file()]
        for spec in todo:
            print(spec.run_id)
        print(f"{len(todo)} of {len(plan)} runs to do; logs in {out_dir / 'runs'}/", file=sys.stderr)
        return 0
    transformers.logging.set_verbosity_error()  # keep generate's advice off the progress bar
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.target_model))
    encoded = {p.id: encode_prompt(tokenizer, p) for p in cfg.prompts}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_sweep_meta(cfg, out_dir, plan, encoded)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"specdec bench: warning: load average {load:.1f} on {os.cpu_count()} cores; timings will be noisy", file=sys.stderr)

    done = sum((out_dir / "runs" / f"{s.run_id}.json").is_file() for s in plan)
    # initial: the rate, and so the time left, counts only the runs this session does.
    with tqdm(total=len(plan), initial=done, unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
        runner = Sweep(cfg, out_dir, bar, limit)
        bar.set_postfix_str(runner.best())
        sweep_baselines(runner, [s for s in plan if s.model_set is None and not runner.done(s)], tokenizer, encoded)
        for model_set in cfg.model_sets:
            pending = [s for s in plan if s.model_set == model_set and not runner.done(s)]
            sweep_cluster(runner, model_set, pending, tokenizer, encoded)

    records = [r for r in analyze.load_runs(out_dir / "runs") if r["source"] == "bench"]
    left = sum(not runner.done(s) for s in plan)
    if records:
        rows = analyze.summarise(records)
        analyze.write_csv(rows, out_dir / "benchmark_summary.csv")
        print(analyze.best_per_class_table(rows))
        print("\nmodel sets (all prompts):\n" + analyze.model_set_table(rows))
    if runner.mismatches:
        print(f"\nlossless check FAILED: {len(runner.mismatches)} run(s) differ from target-only:")
        for line in runner.mismatches:
            print("  " + line)
    else:
        print(f"\nlossless check passed: all {len(records)} runs equal target-only's tokens")
    print(f"\n{len(plan) - left} of {len(plan)} runs done ({runner.new_runs} now)"
          + (f"; {left} left: run the same command again to go on" if left else "")
          + f"\nlogs in {out_dir / 'runs'}/, summary in {out_dir / 'benchmark_summary.csv'}; "
          f"`specdec analyze {out_dir}` for every table, `specdec dashboard {out_dir}` to explore")
    return 1 if runner.mismatches else 0


def write_sweep_meta(cfg: SweepConfig, out_dir: Path, plan: list[RunSpec], encoded: dict) -> None:
    """sweep.json: what the sweep is (config, prompts as the target sees them, machine); each session appends its start."""
    import torch
    import transformers

    from specdec import __version__

    path = out_dir / "sweep.json"
    sessions = []
    if path.is_file():
        try:
            sessions = json.loads(path.read_text()).get("sessions", [])
        except (OSError, ValueError):
            pass
    sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_average": os.getloadavg(),
                     "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
    meta = {
        "name": cfg.name,
        "config_file": str(cfg.path),
        "config": cfg.path.read_text(),
        "target_model": cfg.target_model,
        "model_sets": [{"name": s.name, "models": list(s.models)} for s in cfg.model_sets],
        "runs_planned": len(plan),
        "prompts": [{"id": p.id, "class": p.cls, "text": encoded[p.id][0], "prompt_token_ids": encoded[p.id][1]} for p in cfg.prompts],
        "dtype": cfg.dtype,
        "devices": {"verify": cfg.verify_device, "drafts": cfg.draft_devices, "baselines": cfg.baseline_device},
        "versions": {"specdec": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "sessions": sessions,
    }
    tmp = out_dir / ".sweep.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return sweep_main(argv)
    args = parse_args(argv)
    try:
        return bench(args)
    except KeyboardInterrupt:
        return 130
    except (BenchError, ModelStoreError) as exc:
        print(f"specdec bench: {exc}", file=sys.stderr)
        return 1


def bench(args: argparse.Namespace) -> int:
    import torch
    import transformers
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from specdec import __version__

    transformers.logging.set_verbosity_error()  # keep generate's advice off the progress bar
    started, wall_start = time.strftime("%Y%m%dT%H%M%S"), time.perf_counter()
    prompts = load_prompts(args.prompts)
    methods = methods_for(args)
    load_start = os.getloadavg()
    if load_start[0] > 0.5 * (os.cpu_count() or 1):
        # Other work on the same cores slows every method unevenly; say so next to the numbers.
        print(f"specdec bench: warning: load average {load_start[0]:.1f} on {os.cpu_count()} cores; "
              "timings will be noisy", file=sys.stderr)
    classes = list(dict.fromkeys(p.cls for p in prompts)) + [ALL_CLASSES]
    # One tokenisation, sent as ids to every method, so all of them see exactly the same input.
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.target_model))
    prompt_ids = {p.id: encode_prompt(tokenizer, p)[1] for p in prompts}
    # float32 on CPU like the baselines, whatever SPECDEC_* variables say; no per-request log files.
    cluster_settings = config.from_env(
        config.ClusterSettings, target_model=args.target_model, draft_models=[args.draft_model],
        verify_device="cpu", draft_devices=["cpu"], dtype="float32", port=0, log_dir="",
    )

    in_process = [m for m in methods if m.mode in (TARGET_ONLY, ASSISTED)]
    on_cluster = [m for m in methods if m.mode in SPECDEC_MODES]
    with tqdm(total=len(methods) * len(prompts) * args.repeats, unit="run", file=sys.stderr) as bar:
        runner = Runner(prompts, prompt_ids, args.repeats, args.max_new_tokens, bar)
        assisted = run_in_process(runner, in_process, args.target_model, args.draft_model, tokenizer)
        if on_cluster:
            run_cluster(runner, on_cluster, cluster_settings)

    rows = summarise(runner.runs, methods, classes)
    wall_s = time.perf_counter() - wall_start
    out_dir = args.out / started
    meta = {
        "started": started,
        "wall_s": wall_s,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "target_model": args.target_model,
        "draft_model": args.draft_model,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "warmup_tokens": min(WARMUP_TOKENS, args.max_new_tokens),
        "prompts_file": str(args.prompts),
        "prompts": [{"id": p.id, "class": p.cls, "prompt": p.text, "prompt_token_ids": prompt_ids[p.id]} for p in prompts],
        "methods": [{"method": m.name, "mode": m.mode, "settings": m.settings, "label": m.label} for m in methods],
        "assisted_settings": assisted,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "versions": {"specdec": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
    write_outputs(out_dir, meta, runner.runs, rows, runner.mismatches, classes)

    for cls in classes:
        print(format_table(rows, cls, len({r["prompt_id"] for r in runner.runs if cls in (r["class"], ALL_CLASSES)}), args.max_new_tokens))
    print("\nbest of each mode (all prompts):")
    for row in rows:
        if row["class"] == ALL_CLASSES and row["best_of_mode"]:
            print(f"  {row['label']:<40} {row['tokens_per_s']:6.2f} tok/s  {row['speedup']:.2f}x")
    if assisted:
        print("\nassisted: transformers defaults " + ", ".join(f"{k}={v}" for k, v in assisted.items()))
    loads = [r["load_average_1m"] for r in runner.runs]
    print(f"\nmax load: the highest 1-minute load average seen after a run. Over all runs: "
          f"median {statistics.median(loads):.1f}, max {max(loads):.1f}, on {os.cpu_count()} cores"
          + ("; above the core count, other work was likely competing and stretching wall times" if max(loads) > (os.cpu_count() or 1) else ""))
    if runner.mismatches:
        print(f"\nlossless check FAILED: {len(runner.mismatches)} run(s) differ from target-only:")
        for line in runner.mismatches:
            print("  " + line)
    else:
        print(f"\nlossless check passed: all {len(runner.runs)} runs equal target-only's tokens")
    print(f"\nwall time {wall_s / 60:.1f} min; results in {out_dir}/ (results.json, summary.csv, speedup.png)")
    return 1 if runner.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
