"""``specdec bench``: speculative decoding through the services against transformers' own baselines.

One pipeline, driven by a sweep file (YAML): ``specdec bench`` runs the shipped quick set
(``benchmarks/quick.yaml``); ``--config NAME`` picks another shipped one (``bench``, ``bench-gpu``)
and ``--config FILE`` any file (``benchmarks/bench.yaml`` explains every key; :mod:`specdec.tools.sweep`
reads it and plans the runs). Every configuration
decodes the same prompts, greedily, for the same number of new tokens, from the same prompt token ids
(the target tokenizer's, fed as ids):

- ``target-only``: ``transformers`` greedy ``generate`` of the target alone, with its KV cache, in
  this process. It is the reference both for speed (speedup = tokens/s over target-only's on the
  same prompt) and for output: greedy speculative decoding is lossless, so every run's tokens must
  equal target-only's, and any that do not are reported as a MISMATCH.
- ``assisted``: ``transformers`` assisted generation (``assistant_model`` = each draft set's first
  draft), in this process, with the library's defaults, which the logs record: up to
  ``num_assistant_tokens`` = 20 draft tokens a round on a ``constant`` schedule, the draft stopping
  early once its top probability falls below ``assistant_confidence_threshold`` = 0.4 (the threshold
  adapts only when scikit-learn is installed).
- ``specdec-autoregressive``, ``specdec-sequential``, ``specdec-tree``: ``GenerateStream`` over gRPC
  on a :class:`~specdec.tools.cluster.LocalCluster` (one per draft-model set), so the numbers include
  real processes and real gRPC, and the time to the first token.

Timing is wall time around one generation, after one uncounted warm-up per method; each run also
records the machine's 1-minute load average, because other work on the same cores stretches wall
times. Methods never overlap: the in-process models do all their runs first and are freed (the
target is ~7 GB in float32) before a cluster starts, and a cluster's processes are idle between
requests, so sending one request at a time is enough.

Each run is written, whole, as one :class:`~specdec.records.GenerationLog` in ``OUT/runs/`` (the
orchestrator's own log of the call, or for the baselines the same record built here, plus a
``bench`` section and the analysis' ``metrics``), so a sweep that stops resumes where it stopped:
runs whose log exists are not run again. At the end: ``benchmark_summary.csv`` (one row per model
set, configuration, max_new_tokens and prompt class, from :mod:`specdec.tools.analyze`),
``speedup.png``, and the tables on stdout.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from specdec import config
from specdec.model_store import ModelStoreError, load_model, resolve_model
from specdec.records import DecodingMode, GenerationLog, GenerationResult, GenerationStats, RoundRecord
from specdec.tools import analyze
from specdec.tools.prompts import PromptFileError, bundled_sweeps, encode_prompt, sweep_file
from specdec.tools.sweep import (ASSISTED, LLAMA_CPP, STOCK_DTYPES, TARGET_ONLY, BenchError, ModelSet, RunSpec, SweepConfig,
                                 load_sweep_config, sweep_plan)

# transformers' assisted-generation knobs, recorded with their effective values.
ASSISTED_KEYS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


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
        # (prompt id, max_new_tokens, the target's quantization) -> the reference run's tokens
        self.reference: dict[tuple[str, int, str], list[int]] = {}
        self.numerics = {m.name: m.target_quantize for m in cfg.model_sets}
        # target-only's tokens/s by (prompt, max_new_tokens), then dtype
        self.target_tps: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.speedups: dict[tuple[str, str], list[float]] = defaultdict(list)  # (model set, label) -> per-run speedups
        for path in sorted(self.runs_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                if GenerationLog.looks_like(data):
                    self.remember(GenerationLog.from_json(data))
            except (OSError, ValueError, KeyError, TypeError):
                continue

    def path(self, spec: RunSpec) -> Path:
        return self.runs_dir / f"{spec.run_id}.json"

    def done(self, spec: RunSpec) -> bool:
        return self.path(spec).is_file()

    def stopped(self) -> bool:
        return self.limit is not None and self.new_runs >= self.limit

    def remember(self, log: GenerationLog) -> None:
        """What a finished run's log says that later runs need: the reference tokens and speeds, mismatches."""
        b = log.bench
        key = (b["prompt_id"], b["max_new_tokens"])
        numerics = self.numerics.get(b.get("model_set", ""), "")
        if b["mode"] == self.cfg.reference_mode and "dtype" not in b["settings"]:
            self.reference.setdefault((*key, numerics), log.result.token_ids)
        if b["mode"] == TARGET_ONLY:
            self.target_tps[key][b["settings"].get("dtype", "")].append(b["tokens_per_s"])
        elif b.get("speedup") is not None:
            self.speedups[(b["model_set"], b["label"])].append(b["speedup"])
        if b.get("matches_target") is False:
            self.mismatches.append(f"MISMATCH {b['run_id']}: differs from {self.reference_name} at new token {b['first_mismatch']}")

    @property
    def reference_name(self) -> str:
        return "target-only" if self.cfg.reference_mode == TARGET_ONLY else f"specdec-{self.cfg.reference_mode}"

    def best(self) -> str:
        scored = {name: statistics.median(v) for name, v in self.speedups.items() if v}
        if not scored:
            return ""
        model_set, label = max(scored, key=scored.get)
        return f"best: {label} ({model_set}) {scored[model_set, label]:.2f}x"

    def record(self, spec: RunSpec, log: GenerationLog, seconds: float, ttft_ms: float | None, prompt_text: str,
               prompt_ids: list[int]) -> GenerationLog:
        """Complete a run's log (the prompt, the lossless check, speedup, metrics) and write it into place."""
        tokens = log.result.token_ids
        key = (spec.prompt.id, spec.max_new_tokens)
        # A quantized target's runs are held to that target's own one-token decoding.
        reference_key = (*key, spec.model_set.target_quantize if spec.model_set else "")
        # The reference (SweepConfig.reference_mode): target-only in the sweep's dtype, or with dtype
        # auto the services' own one-token decoding. Another dtype's runs and llama.cpp's (its own
        # quantized weights) are speed figures only.
        baseline_dtype = spec.method.settings.get("dtype")
        if spec.method.mode == self.cfg.reference_mode and baseline_dtype is None:
            reference = self.reference.setdefault(reference_key, tokens)
        else:
            reference = None if baseline_dtype or spec.method.mode == LLAMA_CPP else self.reference.get(reference_key)
        tokens_per_s = len(tokens) / seconds if seconds > 0 else 0.0
        if spec.method.mode == TARGET_ONLY:
            self.target_tps[key][baseline_dtype or ""].append(tokens_per_s)
        check = {"matches_target": None, "first_mismatch": None}
        if reference is not None:
            check["matches_target"] = tokens == reference
            if tokens != reference:
                at = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
                check["first_mismatch"] = at
                line = (f"MISMATCH {spec.run_id}: differs from {self.reference_name} at new token {at} "
                        f"(got {tokens[at:at + 4]}, {self.reference_name} {reference[at:at + 4]})")
                self.mismatches.append(line)
                self.bar.write(line)
        # The fastest target-only dtype's median on this prompt
        target_tps = max((statistics.median(v) for v in self.target_tps.get(key, {}).values() if v), default=None)
        log.prompt, log.prompt_token_ids = prompt_text, prompt_ids
        log.bench = {
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
            "prompt_tokens": len(prompt_ids),
            "tokens": len(tokens),
            "seconds": seconds,
            "tokens_per_s": tokens_per_s,
            "ttft_ms": ttft_ms,
            # Over target-only's median tokens/s on this prompt, measured in this sweep.
            "speedup": tokens_per_s / target_tps if target_tps else None,
            "load_average_1m": os.getloadavg()[0],
            "dtype": baseline_dtype or self.cfg.dtype,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **check,
        }
        log.metrics = analyze.run_metrics(log)
        path = self.path(spec)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(log.to_json(), indent=1))
        os.replace(tmp, path)  # a log is there whole or not at all: resuming trusts every file it finds
        self.new_runs += 1
        if spec.method.mode not in analyze.BASELINES and log.bench["speedup"] is not None:
            self.speedups[(spec.set_name, spec.method.label)].append(log.bench["speedup"])
        self.bar.update(1)
        best = self.best()
        if best:
            self.bar.set_postfix_str(best, refresh=False)
        return log


# --------------------------------------------------------------------------- the baselines, in this process


def sweep_baselines(sweep: Sweep, pending: list[RunSpec], tokenizer, encoded: dict[str, tuple[str, list[int]]]) -> None:
    """target-only and assisted generation in this process (the target loaded once per dtype, each draft in turn)."""
    cfg = sweep.cfg
    for dtype in cfg.baseline_dtypes or [cfg.dtype]:
        mine = [s for s in pending if s.method.settings.get("dtype", cfg.dtype) == dtype and s.method.mode != LLAMA_CPP]
        if mine and not sweep.stopped():
            _baselines_in(sweep, mine, tokenizer, encoded, dtype)
    llama = [s for s in pending if s.method.mode == LLAMA_CPP]
    if llama and not sweep.stopped():
        llama_baseline(sweep, llama, tokenizer, encoded)


def llama_baseline(sweep: Sweep, pending: list[RunSpec], tokenizer, encoded: dict) -> None:
    """llama.cpp (llama-cpp-python) greedy decoding of the target's own GGUF file, with as many threads
    as torch uses here: what users run on a CPU instead; and, for runs that name a draft, llama.cpp's
    own draft-model speculation (the draft's GGUF proposing ``draft_length`` tokens a step through the
    binding's draft-model hook, the target checking them in one batch). A speed figure only: its
    Q4_K_M arithmetic is not the converted model's, so its tokens are not held to target-only's.
    Skipped, with a message, where llama-cpp-python is not installed (``make llama-cpp``) or no GGUF
    file was kept."""
    import torch

    try:
        import llama_cpp
    except ImportError:
        sweep.bar.write("llama-cpp baseline skipped: llama-cpp-python is not installed (make llama-cpp)")
        return
    target = _gguf_of(sweep, sweep.cfg.target_model)
    if target is None:
        return
    threads = torch.get_num_threads()
    groups: dict[tuple, list[RunSpec]] = {}
    for spec in pending:
        settings = spec.method.settings
        groups.setdefault((settings.get("draft_model"), settings.get("draft_length")), []).append(spec)
    for (draft_model, draft_length), specs in groups.items():
        draft = None
        if draft_model is not None:
            draft_gguf = _gguf_of(sweep, draft_model)
            if draft_gguf is None:
                continue
            draft = GgufDraft(llama_cpp, draft_gguf, draft_length, threads)
        if sweep.stopped():
            return
        sweep.bar.set_description(f"loading {target.name} into llama.cpp ({threads} threads)")
        llm = load_llama(llama_cpp, target, threads, draft_model=draft)
        _llama_runs(sweep, specs, tokenizer, encoded, llm, {"gguf": target.name, "threads": threads,
                    "llama_cpp_python": llama_cpp.__version__,
                    **({"draft_gguf": draft.path.name, "draft_length": draft_length} if draft else {})})
        del llm, draft
        gc.collect()


def gguf_for(model: str) -> Path | None:
    """The GGUF file llama.cpp runs for ``model``: an embedded model's kept file, or a path to one."""
    from specdec.model_store import EMBEDDED_MODELS, gguf_path

    return gguf_path(model) if model in EMBEDDED_MODELS else (Path(model) if model.endswith(".gguf") else None)


def _gguf_of(sweep: Sweep, model: str) -> Path | None:
    """:func:`gguf_for`, said on the progress bar where there is none."""
    gguf = gguf_for(model)
    if gguf is None:
        sweep.bar.write(f"llama-cpp baseline skipped: no GGUF file for {model} (an embedded model fetched before GGUF "
                        f"files were kept: delete its directory and run `specdec models fetch` again)")
    return gguf


def load_llama(llama_cpp, path: Path, threads: int, **kwargs):
    """A llama.cpp model on ``threads`` threads for one-token steps and batches alike."""
    return llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=4096, verbose=False,
                           **kwargs)


class GgufDraft:
    """A draft model for llama-cpp-python's speculation hook (its ``LlamaDraftModel`` interface: called
    with every token so far, returns the tokens to propose): another llama.cpp model decoding
    ``length`` tokens greedily, its cache reused across calls up to the longest common prefix."""

    def __init__(self, llama_cpp, path: Path, length: int, threads: int) -> None:
        self.path, self.length = path, length
        self.llm = load_llama(llama_cpp, path, threads)

    def __call__(self, input_ids, /, **kwargs):
        import numpy as np

        return np.array(llama_greedy(self.llm, [int(t) for t in input_ids], self.length, set())[0], dtype=np.intc)


def llama_greedy(llm, ids: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], float | None]:
    """llama.cpp's greedy decoding of ``ids``: the new tokens, and seconds to the first (None: none)."""
    out, start, first = [], time.perf_counter(), None
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        first = first if first is not None else time.perf_counter() - start
        out.append(token)
        if token in eos or len(out) >= max_new_tokens:
            break
    return out, first


def llama_stock_run(model: str, prompt_ids: list[int], max_new_tokens: int, progress=lambda text: None,
                    warmup_tokens: int = 8):
    """llama.cpp decoding ``model``'s own GGUF alone, greedy, with torch's thread count, timed after a
    warm-up (the demo's other comparison); None where llama-cpp-python is not installed or the
    model kept no GGUF file."""
    import torch

    try:
        import llama_cpp
    except ImportError:
        return None
    gguf = gguf_for(model)
    if gguf is None:
        return None
    threads = torch.get_num_threads()
    progress(f"llama.cpp on {gguf.name} ({threads} threads): loading")
    llm = load_llama(llama_cpp, gguf, threads)
    llama_greedy(llm, prompt_ids, min(warmup_tokens, max_new_tokens), {llm.token_eos()})
    progress(f"llama.cpp on {gguf.name}: {max_new_tokens} tokens")
    start = time.perf_counter()
    tokens, _ = llama_greedy(llm, prompt_ids, max_new_tokens, {llm.token_eos()})
    run = StockRun(f"llama.cpp {gguf.name.split('.')[-2]} ({threads} threads)", tokens, time.perf_counter() - start)
    del llm
    gc.collect()
    return run


def _llama_runs(sweep: Sweep, pending: list[RunSpec], tokenizer, encoded: dict, llm, about: dict) -> None:
    """Time each of ``pending`` on the loaded llama.cpp model ``llm``; ``about`` goes into each log's request."""
    from specdec.detokenize import token_texts

    eos = {llm.token_eos(), *(tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, list) else [tokenizer.eos_token_id])}

    def call(ids: list[int], max_new_tokens: int) -> tuple[list[int], float | None]:
        return llama_greedy(llm, ids, max_new_tokens, eos)

    def log_of(spec: RunSpec, ids: list[int], tokens: list[int], first: float | None, seconds: float):
        stats = GenerationStats(
            mode=LLAMA_CPP, prompt_tokens=len(ids), tokens_generated=len(tokens), rounds=len(tokens),
            total_ms=seconds * 1e3, tokens_per_second=len(tokens) / seconds if seconds else 0.0,
            time_to_first_token_ms=first * 1e3 if first is not None else 0.0,
        )
        result = GenerationResult(token_ids=tokens, text=tokenizer.decode(tokens, skip_special_tokens=True),
                                  finish_reason="length" if len(tokens) >= spec.max_new_tokens else "eos", stats=stats)
        request = {"mode": LLAMA_CPP, "max_new_tokens": spec.max_new_tokens, "prompt_tokens": len(ids), **about}
        log = GenerationLog(result, target_model=sweep.cfg.target_model, request=request,
                            token_texts=token_texts(tokenizer, tokens))
        return log, first * 1e3 if first is not None else None

    sweep.bar.set_description("llama-cpp" + (f" speculative k={about['draft_length']}" if "draft_length" in about else ""))
    _time_each(sweep, pending, encoded, call, log_of)


def _time_each(sweep: Sweep, specs: list[RunSpec], encoded: dict, call, log_of) -> None:
    """Baseline runs timed alike: one uncounted warm-up, then each run's wall time around
    ``call(ids, max_new_tokens)`` (which returns the tokens and what else it measured), recorded as
    ``log_of(spec, ids, tokens, measured, seconds)`` makes it: (GenerationLog, time to first token in ms)."""
    call(encoded[specs[0].prompt.id][1], min(sweep.cfg.warmup_tokens, specs[0].max_new_tokens))  # uncounted warm-up
    for spec in specs:
        if sweep.stopped():
            break
        text, ids = encoded[spec.prompt.id]
        start = time.perf_counter()
        tokens, measured = call(ids, spec.max_new_tokens)
        seconds = time.perf_counter() - start
        log, ttft_ms = log_of(spec, ids, tokens, measured, seconds)
        sweep.record(spec, log, seconds, ttft_ms, text, ids)


def _baselines_in(sweep: Sweep, pending: list[RunSpec], tokenizer, encoded: dict, dtype: str) -> None:
    from specdec.detokenize import token_texts

    cfg = sweep.cfg
    sweep.bar.set_description(f"loading the target ({dtype})")
    target, _ = load_model(cfg.target_model, device=cfg.baseline_device, dtype=dtype)
    pad_token_id = pad_token_for(target, tokenizer)
    drafts = [None] + list(dict.fromkeys(s.method.settings["draft_model"] for s in pending if s.method.mode == ASSISTED))
    for draft_name in drafts:
        mine = [s for s in pending if s.method.settings.get("draft_model") == draft_name]
        if not mine or sweep.stopped():
            continue
        assistant = None
        if draft_name is not None:
            sweep.bar.set_description(f"loading {draft_name}")
            assistant = load_model(draft_name, device=cfg.baseline_device, dtype=dtype)[0]
        call = baseline_call(target, assistant, pad_token_id, device=cfg.baseline_device)
        sweep.bar.set_description(mine[0].method.label + (f" ({draft_name})" if draft_name else ""))
        def log_of(spec: RunSpec, ids: list[int], tokens: list[int], extra: dict, seconds: float):
            ttft_ms = extra["time_to_first_token_ms"]
            # Assisted generation hands over one piece per round: its accepted draft tokens, then the target's.
            rounds = extra["output_pieces"] if spec.method.mode == ASSISTED else len(tokens)
            stats = GenerationStats(
                mode=spec.method.mode, prompt_tokens=len(ids), tokens_generated=len(tokens), rounds=rounds,
                draft_tokens_accepted=len(tokens) - rounds if spec.method.mode == ASSISTED else 0,
                mean_accepted_per_round=len(tokens) / rounds if rounds else 0.0,
                total_ms=seconds * 1e3, tokens_per_second=len(tokens) / seconds if seconds else 0.0,
                time_to_first_token_ms=ttft_ms or 0.0,
            )
            result = GenerationResult(
                token_ids=tokens, text=tokenizer.decode(tokens, skip_special_tokens=True),  # as the orchestrator decodes
                finish_reason="length" if len(tokens) >= spec.max_new_tokens else "eos", stats=stats,
            )
            request = {"mode": spec.method.mode, "max_new_tokens": spec.max_new_tokens, "prompt_tokens": len(ids), "dtype": dtype,
                       **({"assistant": assisted_settings(assistant)} if assistant is not None else {})}
            return GenerationLog(result, target_model=cfg.target_model, request=request, token_texts=token_texts(tokenizer, tokens)), ttft_ms

        _time_each(sweep, mine, encoded, call, log_of)
        del assistant, call
        gc.collect()
    del target
    gc.collect()


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


@dataclass
class StockRun:
    dtype: str
    tokens: list[int]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else 0.0


def stock_runs(model: str, prompt_ids: list[int], max_new_tokens: int, dtypes=STOCK_DTYPES, device: str = "cpu",
               progress=lambda text: None, warmup_tokens: int = 8) -> list[StockRun]:
    """The target alone through transformers' own greedy ``generate`` (its KV cache, no specdec
    code), timed in each of ``dtypes`` after an uncounted warm-up: what a user already has. Each
    model is loaded, run and freed before the next."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    runs = []
    for dtype in dtypes:
        progress(f"stock transformers generate, {dtype}: loading")
        target, _ = load_model(model, device=device, dtype=dtype)
        call = baseline_call(target, None, pad_token_for(target, tokenizer), device=device)
        call(prompt_ids, min(warmup_tokens, max_new_tokens))
        progress(f"stock transformers generate, {dtype}: {max_new_tokens} tokens")
        start = time.perf_counter()
        tokens, _ = call(prompt_ids, max_new_tokens)
        runs.append(StockRun(dtype, tokens, time.perf_counter() - start))
        del target, call
        gc.collect()
    return runs


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


# --------------------------------------------------------------------------- specdec, through a local cluster


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


def sweep_cluster(sweep: Sweep, model_set: ModelSet, pending: list[RunSpec], tokenizer,
                  encoded: dict[str, tuple[str, list[int]]]) -> None:
    """One LocalCluster for the model set, reused by all its runs; each run a GenerateStream call."""
    from specdec.detokenize import token_texts

    if not pending or sweep.stopped():
        return
    cfg = sweep.cfg
    # The orchestrator's own log of each generation is the base of the run's log; it is read, then
    # removed. With its tokens and text (log_text): the run's log shows them, and the lossless check
    # compares them.
    orchestrator_logs = Path(tempfile.mkdtemp(prefix="specdec-bench-logs-"))
    settings = config.from_env(
        config.ClusterSettings, target_model=cfg.target_model, draft_models=model_set.drafts, prompt_lookup=model_set.lookup,
        verify_device=cfg.verify_device, draft_devices=cfg.draft_devices, dtype=cfg.dtype, port=0,
        log_dir=str(orchestrator_logs), log_text=True, startup_timeout_s=cfg.startup_timeout_s, trace_file="", metrics_port=0,
        adaptive=cfg.adaptive,
        **{key: value for key, value in (("target_quantize", model_set.target_quantize),
                                         ("draft_quantize", model_set.draft_quantize)) if value},
    )
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
                if len(log.token_texts) != len(tokens):
                    log.token_texts = token_texts(tokenizer, tokens)
                sweep.record(spec, log, seconds, ttft_ms, text, ids)
    finally:
        shutil.rmtree(orchestrator_logs, ignore_errors=True)


def stream_generate(stub, cluster, spec: RunSpec, prompt_ids: list[int], max_new_tokens: int,
                    target_model: str = "") -> tuple[list[int], float, float | None, GenerationLog]:
    """One GenerateStream call, timed here: (tokens, seconds, time to first token ms, the log the stream makes)."""
    import grpc

    from specdec.records import finish_reason_from_pb
    from specdec.v1 import generation_pb2

    request = generation_pb2.GenerateRequest(
        prompt_token_ids=prompt_ids,
        max_new_tokens=max_new_tokens,
        mode=DecodingMode(spec.method.mode).to_pb(),
        speculation=generation_pb2.SpeculationParams(**spec.method.settings),
        include_rounds=True,
    )
    tokens, texts, rounds, last, first = [], [], [], None, None
    start = time.perf_counter()
    try:
        for message in stub.GenerateStream(request, timeout=3600):
            if message.token_ids and first is None:
                first = time.perf_counter() - start
            tokens += message.token_ids
            texts.append(message.text)
            if message.HasField("round"):
                rounds.append(RoundRecord.from_pb(message.round))
            if message.HasField("stats"):
                last = message
    except grpc.RpcError as exc:
        logs = "\n".join(f"--- {p.name} log:\n{p.log_tail()}" for p in cluster.processes)
        raise BenchError(f"{spec.run_id}: GenerateStream failed: {exc.code().name}: {exc.details()}\n{logs}") from None
    seconds = time.perf_counter() - start
    if last is None:
        raise BenchError(f"{spec.run_id}: GenerateStream ended without its statistics")
    result = GenerationResult(token_ids=tokens, text="".join(texts), finish_reason=finish_reason_from_pb(last.finish_reason),
                              stats=GenerationStats.from_pb(last.stats), rounds=rounds)
    request_json = {"max_new_tokens": max_new_tokens, "mode": spec.method.mode, **spec.method.settings, "prompt_tokens": len(prompt_ids)}
    log = GenerationLog(result, target_model=target_model, request=request_json)
    return tokens, seconds, first * 1e3 if first is not None else None, log


def orchestrator_log(log_dir: Path, tokens: list[int]) -> GenerationLog | None:
    """The orchestrator's log of the call just made (the only one in log_dir), if it is that call's."""
    files = list(log_dir.glob("*.json"))
    if len(files) != 1:
        return None
    try:
        data = json.loads(files[0].read_text())
    except (OSError, ValueError):
        return None
    files[0].unlink()
    if not GenerationLog.looks_like(data) or data["token_ids"] != tokens:
        return None
    return GenerationLog.from_json(data)


# --------------------------------------------------------------------------- the whole sweep


def sweep(cfg: SweepConfig, limit: int | None = None, dry_run: bool = False) -> int:
    import transformers
    from tqdm import tqdm
    from transformers import AutoTokenizer

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
    # One tokenisation, sent as ids to every method, so all of them see exactly the same input.
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.target_model))
    encoded = {p.id: encode_prompt(tokenizer, p) for p in cfg.prompts}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_sweep_meta(cfg, out_dir, plan, encoded)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        # Other work on the same cores slows every method unevenly; say so next to the numbers.
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
        plot_speedup(rows, out_dir / "speedup.png")
        print(analyze.best_per_class_table(rows))
        print("\nmodel sets (all prompts):\n" + analyze.model_set_table(rows))
    if runner.mismatches:
        print(f"\nlossless check FAILED: {len(runner.mismatches)} run(s) differ from {runner.reference_name}:")
        for line in runner.mismatches:
            print("  " + line)
    else:
        print(f"\nlossless check passed: all {len(records)} runs checked equal {runner.reference_name}'s tokens")
    print(f"\n{len(plan) - left} of {len(plan)} runs done ({runner.new_runs} now)"
          + (f"; {left} left: run the same command again to go on" if left else "")
          + f"\nlogs in {out_dir / 'runs'}/, summary in {out_dir / 'benchmark_summary.csv'} and {out_dir / 'speedup.png'}; "
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


def plot_speedup(rows: list[dict], path: Path) -> None:
    """Bars of each configuration's speedup over target-only, one colour per prompt class."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["speedup"] is not None]
    if not shown:
        return
    several_lengths = len({r["max_new_tokens"] for r in shown}) > 1

    def name(row: dict) -> str:
        where = "" if row["model_set"] == "-" else f" ({row['model_set']})"
        return row["label"] + where + (f" n={row['max_new_tokens']}" if several_lengths else "")

    names = list(dict.fromkeys(name(r) for r in shown))
    classes = list(dict.fromkeys(r["class"] for r in shown))
    width = 0.8 / len(classes)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.5))
    for i, cls in enumerate(classes):
        speedup = {name(r): r["speedup"] for r in shown if r["class"] == cls}
        xs = [x + (i - (len(classes) - 1) / 2) * width for x in range(len(names))]
        bars = ax.bar(xs, [speedup.get(n, 0.0) for n in names], width, label=cls)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup over target-only (tokens/s)")
    ax.set_title("specdec bench: median tokens/s over prompts, relative to target-only")
    ax.legend(title="prompts")
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- command


def add_parser(commands) -> None:
    shipped = ", ".join(bundled_sweeps())
    cmd = commands.add_parser(
        "bench", help="benchmark specdec against target-only and assisted generation (a sweep; default: the quick set)",
        description="Run the sweep a YAML file describes, comparing specdec's modes with transformers' target-only and "
        "assisted generation on the same prompts, with a lossless check. Each run's log goes to OUT/runs/; run the "
        "same command again to resume an interrupted sweep.",
    )
    cmd.add_argument("--config", default="quick", metavar="NAME|FILE",
                     help=f"a sweep file, or a shipped one by name ({shipped}) [default: quick]")
    cmd.add_argument("--out", type=Path, help="output directory [default: the file's output_dir]")
    cmd.add_argument("--limit", type=int, help="stop after this many new runs (run again to go on)")
    cmd.add_argument("--dry-run", action="store_true", help="list the runs still to do, run nothing")
    cmd.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    try:
        cfg = load_sweep_config(sweep_file(args.config))
        if args.out:
            cfg.output_dir = args.out
        return sweep(cfg, limit=args.limit, dry_run=args.dry_run)
    except KeyboardInterrupt:
        print("\nspecdec bench: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (BenchError, PromptFileError, ModelStoreError) as exc:
        print(f"specdec bench: {exc}", file=sys.stderr)
        return 1
