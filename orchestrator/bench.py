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
  :class:`~orchestrator.cluster.LocalCluster`, so the numbers include real processes and real gRPC.

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
import csv
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
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


@dataclass(frozen=True)
class Prompt:
    id: str
    cls: str  # "code" or "prose"
    text: str


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
        if not isinstance(item, dict) or item.get("class") not in ("code", "prose") or not item.get("prompt") or not item.get("id"):
            raise BenchError(f'{path}:{n}: need {{"id": ..., "class": "code" or "prose", "prompt": ...}}')
        prompts.append(Prompt(item["id"], item["class"], item["prompt"]))
    if len({p.id for p in prompts}) != len(prompts):
        raise BenchError(f"{path}: prompt ids must be unique")
    if not prompts:
        raise BenchError(f"{path} holds no prompts")
    return prompts


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
    import torch

    runner.bar.set_description("loading models")
    target, _ = load_model(target_model)
    draft = load_model(draft_model)[0] if any(m.mode == ASSISTED for m in methods) else None
    eos = target.generation_config.eos_token_id
    pad_token_id = next(t for t in (target.generation_config.pad_token_id, tokenizer.pad_token_id,
                                    eos[0] if isinstance(eos, list) else eos, 0) if t is not None)

    def generate(assistant):
        @torch.inference_mode()
        def call(prompt_ids: list[int], max_new_tokens: int):
            ids = torch.tensor([prompt_ids])
            extra = {"assistant_model": assistant} if assistant is not None else {}
            out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, use_cache=True, pad_token_id=pad_token_id, **extra)
            return out[0, len(prompt_ids):].tolist(), {}
        return call

    for method in methods:
        runner.run(method, generate(draft if method.mode == ASSISTED else None))
    used = assisted_settings(draft) if draft is not None else {}
    # Free both models before the cluster loads its own copies (memory, and no stray threads).
    del target, draft
    gc.collect()
    return used


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


def run_cluster(runner: Runner, methods: list[Method], settings: config.ClusterSettings) -> None:
    """The specdec modes, each request over gRPC to a LocalCluster, one at a time."""
    import grpc

    from orchestrator.cli import stats_dict
    from orchestrator.cluster import LocalCluster
    from specdec.v1 import generation_pb2, generation_pb2_grpc

    mode_enum = {
        "autoregressive": generation_pb2.DECODING_MODE_AUTOREGRESSIVE,
        "sequential": generation_pb2.DECODING_MODE_SEQUENTIAL,
        "tree": generation_pb2.DECODING_MODE_TREE,
    }
    runner.bar.set_description("starting the cluster")
    cluster = LocalCluster(settings)
    try:
        cluster.start()
    except RuntimeError as exc:  # a service that did not come up; the message carries its log
        raise BenchError(f"the cluster did not start: {exc}") from None
    try:
        with grpc.insecure_channel(cluster.orchestrator_address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            warmed: set[str] = set()
            for method in methods:
                def call(prompt_ids: list[int], max_new_tokens: int, method=method):
                    request = generation_pb2.GenerateRequest(
                        prompt_token_ids=prompt_ids,
                        max_new_tokens=max_new_tokens,
                        mode=mode_enum[method.mode],
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
    finally:
        cluster.stop()


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


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
    prompt_ids = {p.id: tokenizer(p.text).input_ids for p in prompts}
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
