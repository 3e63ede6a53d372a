"""``specdec analyze LOG_DIR``: what a directory of generation logs says about each configuration.

It reads every generation log (:class:`specdec.records.GenerationLog`, the one format) found
anywhere under LOG_DIR, and skips other JSON:

- the orchestrator's own logs (``--log-dir``, one per generation: stats and every round's
  proposals, accepted tokens and bonus token, or by default, without ``--log-text``, their counts
  only; each draft by its service name, its model a field of its stats), and
- the per-run logs of ``specdec bench`` (``runs/*.json``): the same record plus a ``bench``
  section (model set, prompt and its class, wall time, time to first token, the lossless check),
  including the baselines, transformers' target-only and assisted generation, measured in the same
  sweep.

:func:`load_runs` is the loader the benchmark and the dashboard use too: one flat record per run,
its ``log`` the typed record itself.

Words, as in vLLM's spec-decode docs: a round drafts up to ``gamma`` tokens per beam; the target
**accepts** the longest drafted prefix it agrees with and adds one token of its own, a **bonus**
token, which is a **correction** when it replaced a drafted token. *Acceptance rate* is accepted
draft tokens over the positions the drafts could have had accepted (the longest beam each round);
*acceptance at position i* is, over rounds that drafted that far, the share whose i-th token was
accepted.

Expected speedup follows Leviathan et al., "Fast Inference from Transformers via Speculative
Decoding" (2023), section 3: with per-token acceptance alpha and gamma drafted tokens, a round yields
``E = (1 - alpha**(gamma + 1)) / (1 - alpha)`` tokens and costs ``gamma * c + 1`` target steps,
``c`` being a draft step's cost over a target step's, so the speedup is ``E / (gamma * c + 1)``. It
assumes verifying gamma + 1 tokens costs one target step; where the measured speedup falls short of
it, the ``verify/step`` column (a verify call's cost over one target step) usually says why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

from specdec.records import DecodingMode, GenerationLog, RoundRecord

TARGET_ONLY, ASSISTED, LLAMA_CPP = "target-only", "assisted", "llama-cpp"
BASELINES = (TARGET_ONLY, ASSISTED, LLAMA_CPP)
ALL_CLASSES = "all"
NO_CLASS = "-"  # orchestrator logs carry no prompt class


# --------------------------------------------------------------------------- one run


def configuration_label(mode: str, settings: dict) -> str:
    """The name a configuration goes by in every table, e.g. ``specdec-tree w=2 d=4 nodes<=64``."""
    if mode == "tree" and "beam_width" not in settings and settings.get("adaptive"):
        return "specdec-default (cost model)"  # the orchestrator's own defaults as bounds (a sweep's `default: true`)
    fixed = " fixed" if settings.get("adaptive") is False else ""
    if mode == "sequential":
        return f"specdec-sequential k={settings['draft_length']}{fixed}"
    if mode == "tree":
        return f"specdec-tree w={settings['beam_width']} d={settings['beam_depth']} nodes<={settings['max_tree_nodes']}{fixed}"
    if mode == LLAMA_CPP and settings.get("draft_length"):  # llama.cpp's own draft-model speculation
        return f"{mode} speculative k={settings['draft_length']}"
    if mode in BASELINES:
        return " ".join([mode, *([settings["dtype"]] if settings.get("dtype") else [])])
    return f"specdec-{mode}"


def mode_settings(mode: str, request: dict) -> dict:
    if mode == "sequential":
        return {"draft_length": request["draft_length"]}
    if mode == "tree":
        return {k: request[k] for k in ("beam_width", "beam_depth", "max_tree_nodes")}
    return {}


def acceptance_by_position(rounds) -> dict[int, tuple[int, int]]:
    """position (1 = first drafted token) -> (rounds that drafted that far, rounds that had it accepted).

    ``rounds``: one ``(drafted depth, accepted)`` pair per round, the longest path drafted and how many
    of its tokens the target accepted. The one computation behind every "acceptance at position i"
    here and in ``specdec traces analyze``."""
    table: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for depth, accepted in rounds:
        for position in range(1, depth + 1):
            table[position][0] += 1
            table[position][1] += accepted >= position
    return {p: (d, a) for p, (d, a) in sorted(table.items())}


def acceptance_by_draft_position(rounds: list[RoundRecord]) -> dict[str, dict[int, tuple[int, int]]]:
    """:func:`acceptance_by_position` for each draft, and over all drafts (``all``).

    A draft is credited with position i when one of its beams carries the accepted path's first i
    tokens, as the controller credits a draft whose beam passed through an accepted tree node. A log
    written without text has beam lengths only: there the controller's own credit (accepted_by_draft)
    says how far each draft's beams agreed."""
    per_draft: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in rounds:
        for name, lengths in r.beam_lengths.items():
            if lengths:
                if r.token_counts is None:
                    agreed = max(common_prefix(beam, r.accepted) for beam in r.proposals[name])
                else:
                    agreed = r.accepted_by_draft.get(name, 0)
                per_draft[name].append((max(lengths), agreed))
    tables = {name: acceptance_by_position(pairs) for name, pairs in per_draft.items()}
    everything = acceptance_by_position((r.drafted_depth, r.accepted_count) for r in rounds)
    return tables | ({ALL_CLASSES: everything} if everything else {})


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def prediction(rounds) -> dict:
    """What the cost model expected of a run's rounds against what they did, both in tokens per second
    of drafting and verifying (the first round, which also reads the prompt, left out)."""
    timed = [r for r in rounds[1:] if r.predicted_ms > 0 and r.draft_ms + r.verify_ms > 0]
    if not timed:
        return {"predicted_tokens_per_s": None, "round_tokens_per_s": None, "prediction_error": None}
    predicted = sum(r.expected_tokens for r in timed) / sum(r.predicted_ms for r in timed) * 1e3
    measured = sum(r.new_token_count for r in timed) / sum(r.draft_ms + r.verify_ms for r in timed) * 1e3
    return {"predicted_tokens_per_s": predicted, "round_tokens_per_s": measured,
            "prediction_error": predicted / measured - 1 if measured else None}


def run_metrics(log: GenerationLog) -> dict:
    """The per-run figures every table is built from, from a log's stats and rounds.

    The names starting ``tree_`` and the sequential ones (drafted, accepted, corrections, per-draft
    acceptance, savings versus greedy) are the ones earlier benchmark logs used; they are filled for
    every speculative mode (a sequential round verifies its chains as a tree, too)."""
    stats, rounds = log.result.stats, log.result.rounds
    tokens = stats.tokens_generated or len(log.result.token_ids)
    n_rounds = len(rounds) or stats.rounds
    depths = [r.drafted_depth for r in rounds]
    accepted = [r.accepted_count for r in rounds]
    if not rounds and stats.mode == ASSISTED and n_rounds:
        # transformers' assisted generation logs no rounds, only how many there were: each added its
        # accepted draft tokens and one target token.
        accepted = [(tokens - n_rounds) / n_rounds] * n_rounds
    positions = acceptance_by_draft_position(rounds)
    models = {d.draft: d.model for d in stats.drafts}
    by_draft = {
        name: {"model": models.get(name, ""), "drafted_positions": sum(d for d, _ in table.values()),
               "accepted_tokens": sum(a for _, a in table.values())}
        for name, table in positions.items() if name != ALL_CLASSES
    }
    for values in by_draft.values():
        values["acceptance_rate"] = ratio(values["accepted_tokens"], values["drafted_positions"])
    drafted_positions = sum(depths)
    # Leviathan's alpha, estimated from where each chain stopped: a round with k of gamma accepted
    # saw k acceptances and, when k < gamma, one rejection.
    trials = sum(min(k + 1, g) for k, g in zip(accepted, depths) if g)
    speculative = bool(rounds) and stats.mode not in ("", DecodingMode.AUTOREGRESSIVE, *BASELINES)
    return {
        "tokens_generated": tokens,
        "rounds": n_rounds,
        # Fields of earlier benchmark logs, by their names.
        "tree_accepted_tokens": stats.draft_tokens_accepted or round(sum(accepted)),
        "tree_bonus_tokens": stats.bonus_tokens,
        "tree_nodes_total": stats.tree_nodes_total,
        "tree_avg_branching_factor": stats.tree_avg_branching_factor,
        "tree_verification_calls": n_rounds,  # one verify call per round
        "accepted_sequences": [r.accepted for r in rounds],
        "drafted_tokens": stats.draft_tokens_proposed,
        "accepted_tokens": sum(accepted),
        "corrections": sum(r.bonus_is_correction for r in rounds),
        "per_draft_acceptance": {name: v["acceptance_rate"] for name, v in by_draft.items()},
        # Greedy decoding calls the target once per token; these are the calls speculation saved.
        "target_calls_saved": tokens - n_rounds if rounds else 0,
        "savings_vs_greedy": ratio(tokens - n_rounds, tokens) if rounds else 0.0,
        # Derived figures.
        "speculative": speculative,
        "fallback_rounds": sum(r.fallback for r in rounds),
        "drafted_positions": drafted_positions,
        "acceptance_rate": ratio(sum(accepted), drafted_positions),
        "alpha": ratio(sum(accepted), trials),
        "alpha_trials": trials,
        "gamma": ratio(drafted_positions, sum(1 for g in depths if g)),
        "accepted_per_round": ratio(sum(accepted), n_rounds),
        "tokens_per_round": ratio(tokens, n_rounds),
        "tree_nodes_per_round": ratio(stats.tree_nodes_total, n_rounds),
        "by_draft": by_draft,
        "acceptance_by_position": {name: {str(i): {"drafted": d, "accepted": a, "rate": ratio(a, d)} for i, (d, a) in table.items()}
                                   for name, table in positions.items()},
        **prediction(rounds),
        "draft_ms": stats.draft_ms,
        "verify_ms": stats.verify_ms,
        "other_ms": stats.other_ms,
        "total_ms": stats.total_ms,
        "draft_share": ratio(stats.draft_ms, stats.total_ms),
        "verify_share": ratio(stats.verify_ms, stats.total_ms),
        "other_share": ratio(stats.other_ms, stats.total_ms),
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


# --------------------------------------------------------------------------- reading a directory


def normalise(log: GenerationLog, path: Path) -> dict:
    """One flat record per run, the same for bench logs and the orchestrator's own; ``log`` is the run's
    whole record (its tokens, rounds and stats), the rest what the tables group and sort by."""
    stats = log.result.stats
    metrics = log.metrics or run_metrics(log)
    bench = log.bench
    if bench:
        record = {
            "source": "bench",
            "run_id": bench["run_id"],
            "method": bench["method"],
            "mode": bench["mode"],
            "settings": bench["settings"],
            "label": bench["label"],
            "model_set": bench["model_set"],
            "draft_models": bench["draft_models"],
            "prompt_id": bench["prompt_id"],
            "class": bench["class"],
            "repeat": bench["repeat"],
            "max_new_tokens": bench["max_new_tokens"],
            "seconds": bench["seconds"],
            "tokens_per_s": bench["tokens_per_s"],
            "ttft_ms": bench["ttft_ms"],
            "speedup": bench.get("speedup"),
            "lossless": bench.get("matches_target"),
            "load_average_1m": bench.get("load_average_1m"),
        }
    else:
        mode = stats.mode or log.request["mode"]
        settings = mode_settings(mode, log.request)
        # A draft is its model; logs written before drafts carried their model name only their service name.
        drafts = [d.model or d.draft for d in stats.drafts] if mode != DecodingMode.AUTOREGRESSIVE else []
        record = {
            "source": "orchestrator",
            "run_id": path.stem,
            "method": f"specdec-{mode}",
            "mode": mode,
            "settings": settings,
            "label": configuration_label(mode, settings),
            "model_set": "+".join(drafts) or "-",
            "draft_models": drafts,
            "prompt_id": prompt_key(log),
            "class": NO_CLASS,
            "repeat": 0,
            "max_new_tokens": log.request.get("max_new_tokens"),
            "seconds": stats.total_ms / 1e3,
            "tokens_per_s": stats.tokens_per_second,
            "ttft_ms": stats.time_to_first_token_ms,
            "speedup": None,
            "lossless": None,
            "load_average_1m": None,
        }
    record.update({
        "path": str(path),
        "mtime": path.stat().st_mtime if path.exists() else 0.0,
        "target_model": log.target_model,
        "log": log,
        "metrics": metrics,
    })
    return record


def prompt_key(log: GenerationLog) -> str:
    if log.prompt:
        first_line = log.prompt.strip().splitlines()[0] if log.prompt.strip() else log.prompt
        return first_line[:48]
    return f"prompt of {log.request.get('prompt_tokens', '?')} tokens"


def log_files(log_dir: Path) -> list[Path]:
    return sorted(p for p in Path(log_dir).rglob("*.json") if p.is_file() and not p.name.startswith("."))


def load_runs(log_dir: Path) -> list[dict]:
    """Every run log under log_dir (any depth), oldest first; files that are not run logs are skipped."""
    records = []
    for path in log_files(log_dir):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written right now, or not ours
        if GenerationLog.looks_like(data):
            try:
                records.append(normalise(GenerationLog.from_json(data), path))
            except (KeyError, TypeError, ValueError):
                continue
    records.sort(key=lambda r: (r["mtime"], r["path"]))
    return records


# --------------------------------------------------------------------------- aggregating


def group_key(record: dict) -> tuple:
    return (record["model_set"], record["label"], record["max_new_tokens"])


def summarise(records: list[dict]) -> list[dict]:
    """One row per (model set, configuration, max_new_tokens, prompt class), plus the class ``all``.

    tokens/s is the median over prompts of each prompt's median over repetitions, and speedup is that
    over target-only's in the same class and max_new_tokens; the round figures are pooled."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        for cls in dict.fromkeys((r["class"], ALL_CLASSES)):
            groups[(*group_key(r), cls)].append(r)
    rows = []
    for (model_set, label, max_new_tokens, cls), mine in groups.items():
        first = mine[0]
        by_prompt: dict[str, list[dict]] = defaultdict(list)
        for r in mine:
            by_prompt[r["prompt_id"]].append(r)
        m = [r["metrics"] for r in mine]
        rounds = sum(x["rounds"] for x in m)
        drafted = sum(x["drafted_positions"] for x in m)
        accepted = sum(x["accepted_tokens"] for x in m)
        gamma_rounds = sum(x["rounds"] for x in m if x["gamma"])
        total_ms = sum(x["total_ms"] for x in m)
        positions = pool_positions(x["acceptance_by_position"] for x in m)
        by_draft = pool_drafts(x["by_draft"] for x in m)
        ttfts = [r["ttft_ms"] for r in mine if r["ttft_ms"] is not None]
        speculative = first["mode"] not in BASELINES
        if not speculative:  # no rounds of ours: keep only what a baseline measures
            rounds, drafted, total_ms = (rounds if first["mode"] == ASSISTED else 0), 0, 0
        rows.append({
            "model_set": model_set,
            "target_model": first["target_model"],
            "draft_models": "+".join(first["draft_models"]),
            "method": first["method"],
            "mode": first["mode"],
            "label": label,
            "settings": json.dumps(first["settings"], sort_keys=True),
            "draft_length": first["settings"].get("draft_length", ""),
            "beam_width": first["settings"].get("beam_width", ""),
            "beam_depth": first["settings"].get("beam_depth", ""),
            "max_tree_nodes": first["settings"].get("max_tree_nodes", ""),
            "max_new_tokens": max_new_tokens,
            "class": cls,
            "prompts": len(by_prompt),
            "runs": len(mine),
            "new_tokens": sum(r["metrics"]["tokens_generated"] for r in mine),
            "seconds": sum(r["seconds"] for r in mine),
            "tokens_per_s": statistics.median(statistics.median(r["tokens_per_s"] for r in rs) for rs in by_prompt.values()),
            "speedup": None,
            "speedup_vs_assisted": None,
            "ttft_ms": statistics.median(ttfts) if ttfts else None,
            "rounds": rounds,
            "accepted_per_round": ratio(accepted, rounds) if rounds else None,
            "tokens_per_round": ratio(sum(x["tokens_generated"] for x in m), rounds) if rounds else None,
            "acceptance_rate": ratio(accepted, drafted) if drafted else None,
            "alpha": ratio(accepted, sum(x["alpha_trials"] for x in m)) if drafted else None,
            "gamma": ratio(drafted, gamma_rounds) if gamma_rounds else None,
            "acceptance_by_draft": json.dumps({k: round(v["acceptance_rate"], 4) for k, v in by_draft.items()}),
            "acceptance_by_position": json.dumps({k: round(v, 4) for k, v in positions.items()}),
            "tree_nodes_per_round": ratio(sum(x["tree_nodes_total"] for x in m), rounds) if rounds and speculative else None,
            "tree_avg_branching_factor": ratio(sum(x["tree_avg_branching_factor"] * x["rounds"] for x in m), rounds) if rounds and speculative else None,
            "corrections": sum(x["corrections"] for x in m) if speculative else None,
            "savings_vs_greedy": ratio(sum(x["target_calls_saved"] for x in m), sum(x["tokens_generated"] for x in m)) if rounds else None,
            "draft_ms_per_round": ratio(sum(x["draft_ms"] for x in m), rounds) if rounds and speculative else None,
            "verify_ms_per_round": ratio(sum(x["verify_ms"] for x in m), rounds) if rounds and speculative else None,
            "other_ms_per_round": ratio(sum(x["other_ms"] for x in m), rounds) if rounds and speculative else None,
            "draft_share": ratio(sum(x["draft_ms"] for x in m), total_ms) if total_ms else None,
            "verify_share": ratio(sum(x["verify_ms"] for x in m), total_ms) if total_ms else None,
            "other_share": ratio(sum(x["other_ms"] for x in m), total_ms) if total_ms else None,
            # The cost model's predicted tokens/s over what its rounds did, minus one (median over runs).
            "prediction_error": statistics.median(errors) if (errors := [x["prediction_error"] for x in m if x.get("prediction_error") is not None]) else None,
            "lossless": all(r["lossless"] is not False for r in mine),
            "max_load_average_1m": max((r["load_average_1m"] for r in mine if r["load_average_1m"] is not None), default=None),
        })
    relate(rows)
    rows.sort(key=lambda row: (row["class"] == ALL_CLASSES, row["class"], row["max_new_tokens"] or 0,
                               row["mode"] not in BASELINES, row["model_set"], row["label"]))
    return rows


def pool_positions(tables) -> dict[str, float]:
    """Acceptance at each position over every draft of every run (the ``all`` table)."""
    pooled: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for table in tables:
        for position, v in table.get(ALL_CLASSES, {}).items():
            pooled[int(position)][0] += v["drafted"]
            pooled[int(position)][1] += v["accepted"]
    return {str(p): ratio(a, d) for p, (d, a) in sorted(pooled.items())}


def pool_drafts(tables) -> dict[str, dict]:
    """Each draft model's acceptance over the runs (a run's draft without a recorded model: its service name)."""
    pooled: dict[str, dict] = defaultdict(lambda: {"drafted_positions": 0, "accepted_tokens": 0})
    for table in tables:
        for name, v in table.items():
            model = v.get("model") or name
            pooled[model]["drafted_positions"] += v["drafted_positions"]
            pooled[model]["accepted_tokens"] += v["accepted_tokens"]
    for v in pooled.values():
        v["acceptance_rate"] = ratio(v["accepted_tokens"], v["drafted_positions"])
    return dict(pooled)


def relate(rows: list[dict]) -> None:
    """Speedups against the baselines measured in the same class and max_new_tokens (target-only: the
    fastest of its dtypes), and the expected speedup."""
    target, assisted = {}, {}
    for r in sorted(rows, key=lambda r: r["tokens_per_s"] or 0.0):  # the fastest dtype's row is kept
        if r["mode"] == TARGET_ONLY:
            target[r["class"], r["max_new_tokens"]] = r
        elif r["mode"] == ASSISTED:
            assisted[r["class"], r["max_new_tokens"], r["draft_models"]] = r
    for row in rows:
        reference = target.get((row["class"], row["max_new_tokens"]))
        if reference and reference["tokens_per_s"]:
            row["speedup"] = row["tokens_per_s"] / reference["tokens_per_s"]
        first_draft = row["draft_models"].split("+")[0]
        helper = assisted.get((row["class"], row["max_new_tokens"], first_draft))
        if helper and helper["tokens_per_s"] and row["mode"] != TARGET_ONLY:
            row["speedup_vs_assisted"] = row["tokens_per_s"] / helper["tokens_per_s"]
        row.update(expected_speedup(row, reference))


def expected_speedup(row: dict, reference: dict | None) -> dict:
    """Leviathan et al.'s speedup from this row's measured acceptance and costs (see the module docstring).

    A target step's cost is target-only's time per token in the same sweep; without a target-only
    run (the orchestrator's own logs) it is this configuration's verify call, which overstates it
    wherever verifying many tokens costs more than one."""
    empty = {"expected_tokens_per_round": None, "draft_cost_ratio": None, "verify_cost_ratio": None,
             "expected_speedup": None, "speedup_vs_expected": None, "target_step_ms": None}
    if row["mode"] in BASELINES or not row["gamma"] or not row["rounds"]:
        return empty
    if reference and reference["tokens_per_s"]:
        step_ms = 1e3 / reference["tokens_per_s"]
    else:
        step_ms = row["verify_ms_per_round"]
    if not step_ms:
        return empty
    gamma, alpha = row["gamma"], row["alpha"] or 0.0
    c = row["draft_ms_per_round"] / gamma / step_ms
    if row["mode"] == "tree":
        tokens_per_round = row["tokens_per_round"]  # a tree's rounds are not one chain: measured
    else:
        tokens_per_round = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    expected = tokens_per_round / (gamma * c + 1)
    return {
        "expected_tokens_per_round": tokens_per_round,
        "draft_cost_ratio": c,
        "verify_cost_ratio": row["verify_ms_per_round"] / step_ms,
        "expected_speedup": expected,
        "speedup_vs_expected": row["speedup"] / expected if row["speedup"] is not None and expected else None,
        "target_step_ms": step_ms,
    }


def best_rows(rows: list[dict], mode: str, cls: str, max_new_tokens, model_set: str | None = None) -> dict | None:
    """The fastest configuration of a mode: by speedup where there is a target-only run, else tokens/s."""
    mine = [r for r in rows if r["mode"] == mode and r["class"] == cls and r["max_new_tokens"] == max_new_tokens
            and (model_set is None or r["model_set"] == model_set)]
    return max(mine, key=lambda r: (r["speedup"] if r["speedup"] is not None else 0.0, r["tokens_per_s"]), default=None)


# --------------------------------------------------------------------------- printing


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def text_table(headers: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    for line in lines:
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(out)


def best_per_class_table(rows: list[dict]) -> str:
    """Best sequential and best tree configuration per prompt class, next to both baselines."""
    out = []
    for cls, max_new_tokens in dict.fromkeys((r["class"], r["max_new_tokens"]) for r in rows):
        lines = []
        for mode in (TARGET_ONLY, ASSISTED, LLAMA_CPP, "autoregressive", "sequential", "tree"):
            for model_set in dict.fromkeys(r["model_set"] for r in rows if r["mode"] == mode):
                if mode in BASELINES:  # every dtype a baseline ran in
                    shown = [r for r in rows if (r["mode"], r["class"], r["max_new_tokens"], r["model_set"]) == (mode, cls, max_new_tokens, model_set)]
                else:
                    shown = [b] if (b := best_rows(rows, mode, cls, max_new_tokens, model_set)) else []
                for best in shown:
                    lines.append([
                        best["label"] if mode in BASELINES else f"best {mode}: {best['label'].removeprefix('specdec-' + mode).strip() or '-'}",
                        best["model_set"] if mode != TARGET_ONLY else "-",
                        fmt(best["tokens_per_s"]), fmt(best["speedup"], ".2f", "x"), fmt(best["ttft_ms"], ".0f"),
                        fmt(best["accepted_per_round"]), fmt(best["acceptance_rate"]), fmt(best.get("prediction_error"), "+.0%"),
                        str(best["runs"]), "ok" if best["lossless"] else "MISMATCH",
                    ])
        n = max((r["prompts"] for r in rows if r["class"] == cls and r["max_new_tokens"] == max_new_tokens), default=0)
        out.append(f"\nclass {cls}, max_new_tokens {max_new_tokens} ({n} prompt{'s' if n != 1 else ''})")
        out.append(text_table(["configuration", "model set", "tok/s", "speedup", "TTFT ms", "acc/round", "accept", "pred err",
                               "runs", "lossless"], lines))
    return "\n".join(out)


def model_set_table(rows: list[dict]) -> str:
    lines = []
    for max_new_tokens in dict.fromkeys(r["max_new_tokens"] for r in rows):
        for model_set in dict.fromkeys(r["model_set"] for r in rows if r["mode"] not in BASELINES):
            mine = [r for r in rows if r["model_set"] == model_set and r["class"] == ALL_CLASSES and r["max_new_tokens"] == max_new_tokens]
            if not mine:
                continue
            seq = best_rows(rows, "sequential", ALL_CLASSES, max_new_tokens, model_set)
            tree = best_rows(rows, "tree", ALL_CLASSES, max_new_tokens, model_set)
            first_draft = mine[0]["draft_models"].split("+")[0]
            helper = next((r for r in rows if r["mode"] == ASSISTED and r["class"] == ALL_CLASSES
                           and r["max_new_tokens"] == max_new_tokens and r["draft_models"] == first_draft), None)
            drafts = {}
            for r in mine:
                if r["mode"] in ("sequential", "tree"):
                    for name, rate in json.loads(r["acceptance_by_draft"]).items():
                        drafts.setdefault(name, []).append(rate)
            lines.append([
                model_set, str(max_new_tokens),
                fmt(helper["speedup"], ".2f", "x") if helper else "-",
                f"{seq['label'].removeprefix('specdec-sequential ')} {fmt(seq['speedup'], '.2f', 'x')}" if seq else "-",
                f"{tree['label'].removeprefix('specdec-tree ')} {fmt(tree['speedup'], '.2f', 'x')}" if tree else "-",
                fmt(seq["tokens_per_s"]) if seq else "-", fmt(tree["tokens_per_s"]) if tree else "-",
                ", ".join(f"{name} {statistics.mean(v):.2f}" for name, v in drafts.items()) or "-",
            ])
    return text_table(["model set", "max new", "assisted", "best sequential", "best tree", "seq tok/s", "tree tok/s",
                       "acceptance by draft (mean over configurations)"], lines)


def expected_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["class"] != ALL_CLASSES or r["expected_speedup"] is None:
            continue
        lines.append([
            r["label"], r["model_set"], str(r["max_new_tokens"]), fmt(r["alpha"]), fmt(r["gamma"], ".1f"),
            fmt(r["draft_cost_ratio"], ".3f"), fmt(r["verify_cost_ratio"]), fmt(r["expected_tokens_per_round"]),
            fmt(r["tokens_per_round"]), fmt(r["expected_speedup"], ".2f", "x"), fmt(r["speedup"], ".2f", "x"),
            fmt(r["speedup_vs_expected"], ".0%"),
        ])
    return text_table(["configuration", "model set", "max new", "alpha", "gamma", "c", "verify/step", "E tok/rnd",
                       "meas tok/rnd", "expected", "measured", "of limit"], lines)


def all_configurations_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["class"] != ALL_CLASSES:
            continue
        split = "-" if r["draft_share"] is None else f"{r['draft_share']:.0%}/{r['verify_share']:.0%}/{r['other_share']:.0%}"
        lines.append([
            r["label"], r["model_set"], str(r["max_new_tokens"]), fmt(r["tokens_per_s"]), fmt(r["speedup"], ".2f", "x"),
            fmt(r["ttft_ms"], ".0f"), fmt(r["tokens_per_round"]), fmt(r["acceptance_rate"]), fmt(r["tree_nodes_per_round"], ".1f"),
            fmt(r["tree_avg_branching_factor"]), split, str(r["runs"]),
        ])
    return text_table(["configuration", "model set", "max new", "tok/s", "speedup", "TTFT ms", "tok/round", "accept",
                       "nodes/rnd", "branching", "draft/verify/other", "runs"], lines)


def position_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["class"] != ALL_CLASSES or r["mode"] not in ("sequential", "tree"):
            continue
        positions = json.loads(r["acceptance_by_position"])
        lines.append([r["label"], r["model_set"], "  ".join(f"{p}:{v:.2f}" for p, v in positions.items())])
    return text_table(["configuration", "model set", "acceptance at draft position 1, 2, ..."], lines)


def shape_table(records: list[dict]) -> str:
    """Per speculative configuration and model set, the round shapes the policy chose (width x depth,
    or none), most frequent first, and per round the predicted against the measured milliseconds of
    drafting and verifying (medians; each run's first round, which also reads the prompt, left out)."""
    shapes: dict[tuple[str, str], Counter] = defaultdict(Counter)
    times: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        if r["mode"] in BASELINES or r["mode"] == DecodingMode.AUTOREGRESSIVE:
            continue
        key = (r["label"], r["model_set"])
        for i, rnd in enumerate(r["log"].result.rounds):
            shapes[key][f"{rnd.chosen_width}x{rnd.chosen_depth}" if rnd.chosen_width else "none"] += 1
            if i and rnd.predicted_ms > 0:
                times[key].append((rnd.predicted_ms, rnd.draft_ms + rnd.verify_ms))
    lines = []
    for key, counts in shapes.items():
        total = sum(counts.values())
        chosen = ", ".join(f"{shape} {n / total:.0%}" for shape, n in counts.most_common(5))
        pairs = times.get(key, [])
        predicted = fmt(statistics.median(p for p, _ in pairs), ".0f") if pairs else "-"
        measured = fmt(statistics.median(m for _, m in pairs), ".0f") if pairs else "-"
        lines.append([*key, str(total), chosen, predicted, measured])
    return text_table(["configuration", "model set", "rounds", "chosen shapes (width x depth)", "pred ms/rnd", "meas ms/rnd"], lines)


def report(records: list[dict], rows: list[dict]) -> str:
    sources = defaultdict(int)
    for r in records:
        sources[r["source"]] += 1
    out = [f"{len(records)} runs ({', '.join(f'{n} from {s}' for s, n in sources.items())}); "
           f"target {', '.join(sorted({r['target_model'] for r in records if r['target_model']})) or '-'}; "
           f"model sets {', '.join(dict.fromkeys(r['model_set'] for r in records if r['mode'] not in BASELINES)) or '-'}"]
    if not any(r["mode"] == TARGET_ONLY for r in records):
        out.append("no target-only runs here (orchestrator logs): speedups need a `specdec bench` sweep; "
                   "the expected speedup uses each configuration's verify call as the target step")
    out.append("\n== best configurations per prompt class (speedup over target-only in the same sweep) ==")
    out.append(best_per_class_table(rows))
    out.append("\n== model sets (all prompts) ==")
    out.append(model_set_table(rows))
    out.append("\n== expected (Leviathan et al.) vs measured speedup (all prompts) ==")
    out.append("alpha: per-token acceptance; gamma: tokens drafted per round; c: draft step / target step; "
               "verify/step: verify call / target step;\nE tok/rnd: (1-alpha^(gamma+1))/(1-alpha), measured for trees; "
               "expected = E / (gamma*c + 1)")
    out.append(expected_table(rows))
    out.append("\n== every configuration (all prompts) ==")
    out.append(all_configurations_table(rows))
    out.append("\n== acceptance by draft position (all prompts) ==")
    out.append(position_table(rows))
    out.append("\n== round shapes chosen, and each round's predicted against measured time (all prompts) ==")
    out.append(shape_table(records))
    lossy = [r for r in records if r["lossless"] is False]
    if lossy:
        out.append(f"\nlossless check FAILED for {len(lossy)} run(s): " + ", ".join(r["run_id"] for r in lossy[:10]))
    return "\n".join(out)


# --------------------------------------------------------------------------- command


def add_parser(commands) -> None:
    cmd = commands.add_parser("analyze", help="summary tables from a directory of generation logs (bench sweeps or --log-dir)")
    cmd.add_argument("log_dir", type=Path, help="a `specdec bench` output directory or an orchestrator --log-dir")
    cmd.add_argument("--json", action="store_true", help="print the summary rows as JSON instead of tables")
    cmd.add_argument("--csv", type=Path, metavar="FILE", help="also write the summary rows to FILE")
    cmd.set_defaults(func=cmd_analyze_logs)


def cmd_analyze_logs(args) -> int:
    if not args.log_dir.is_dir():
        print(f"specdec analyze: {args.log_dir} is not a directory", file=sys.stderr)
        return 2
    records = load_runs(args.log_dir)
    if not records:
        print(f"specdec analyze: no generation logs under {args.log_dir}", file=sys.stderr)
        return 1
    rows = summarise(records)
    if args.csv:
        write_csv(rows, args.csv)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(report(records, rows))
    return 0


def write_csv(rows: list[dict], path: Path) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyze", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
