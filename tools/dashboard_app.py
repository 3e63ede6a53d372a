"""The Streamlit app behind ``specdec dashboard LOG_DIR`` (run it through that command).

Reads every generation log under LOG_DIR with :func:`specdec.tools.analyze.load_runs` (bench
sweeps and the orchestrator's own ``--log-dir`` alike, each run's
:class:`~specdec.records.GenerationLog`), lists the directory again every ``--refresh-s`` seconds
and reruns when a log was added or changed, and shows: the generation view (see
:func:`specdec.tools.dashboard.generation_html`), plots, statistics per strategy, the best
configurations and the model sets side by side, all under the sidebar's filters; with ``--traces``
each generation's timeline of rounds from its trace, and a Traces tab (``specdec traces analyze``'s
picture and summary).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from specdec.records import GenerationLog
from specdec.tools import analyze, dashboard, traces


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="specdec dashboard app")
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    parser.add_argument("--refresh-s", type=float, default=5.0)
    parser.add_argument("--traces", type=Path)
    parser.add_argument("--otlp-json", action="store_true")
    parser.add_argument("--jaeger-url", default="")
    return parser.parse_known_args(sys.argv[1:])[0]


def listing(log_dir: Path) -> tuple:
    """What the directory holds now: a new or rewritten log changes it."""
    out = []
    for path in analyze.log_files(log_dir):
        try:
            stat = path.stat()
        except OSError:
            continue
        out.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(out)


@st.cache_data(show_spinner="reading logs ...", max_entries=4)
def load(log_dir: str, signature: tuple) -> list[dict]:
    return analyze.load_runs(Path(log_dir))


@st.cache_data(show_spinner="reading traces ...", max_entries=2)
def load_traces(path: str, otlp_json: bool, signature: tuple) -> list:
    """Every generation the trace file holds (``signature``: its size and time, so a grown file is read again)."""
    return traces.analyze(traces.load_spans(path, otlp_json=otlp_json))


def trace_analyses(opts) -> dict:
    """trace id -> the analysis of that generation, from --traces ({} without it, or unreadable)."""
    if opts.traces is None:
        return {}
    try:
        stat = opts.traces.stat()
        return {r.trace_id: r for r in load_traces(str(opts.traces), opts.otlp_json, (stat.st_mtime_ns, stat.st_size))}
    except (OSError, ValueError) as exc:
        st.sidebar.warning(f"cannot read the traces in {opts.traces}: {exc}")
        return {}


def timeline_png(requests: list) -> bytes:
    """The trace analysis's picture (:func:`specdec.tools.traces.plot`) as PNG bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        return traces.plot(requests, Path(tmp) / "timeline.png").read_bytes()


def trace_line(record: dict, analyses: dict, jaeger_url: str) -> None:
    """The generation's trace id (a link into Jaeger with --jaeger-url), and its timeline when --traces holds it."""
    trace_id = record["log"].request.get("trace_id", "")
    if not trace_id:
        return
    link = f"[{trace_id}]({jaeger_url.rstrip('/')}/trace/{trace_id})" if jaeger_url else f"`{trace_id}`"
    st.markdown(f"trace {link}")
    found = analyses.get(trace_id)
    if found is not None and found.rounds:
        st.image(timeline_png([found]), caption="this generation's rounds, from its trace")


def traces_tab(opts, analyses: dict) -> None:
    if opts.traces is None:
        st.info("Start the dashboard with --traces FILE (the services' --trace-file, or with --otlp-json the collector's "
                "compose/traces/traces.jsonl) to see each request's timeline of rounds and the acceptance by position.")
        return
    requests = sorted(analyses.values(), key=lambda r: r.trace_id)
    if not requests:
        st.info(f"No generations in {opts.traces} yet.")
        return
    st.caption(f"{len(requests)} generations in {opts.traces}; the picture shows the {min(len(requests), traces.PLOT_REQUESTS)} "
               "slowest, each round split by where its time went")
    slowest = sorted(requests, key=lambda r: r.duration_ms, reverse=True)
    if any(r.rounds for r in slowest):
        st.image(timeline_png(slowest))
    st.code(traces.format_report(slowest, rounds_table=False), language=None)


@st.cache_resource(show_spinner=False)
def tokenizer_for(target_model: str):
    """The target's tokenizer, for the proposals in the tooltips; None where it cannot be loaded here."""
    try:
        from transformers import AutoTokenizer

        from specdec.model_store import resolve_model

        return AutoTokenizer.from_pretrained(resolve_model(target_model))
    except Exception:  # noqa: BLE001 (any failure: fall back to the texts the log itself holds)
        return None


def decoder(record: dict, texts: list[str]):
    tokenizer = tokenizer_for(record["target_model"]) if record["target_model"] else None
    if tokenizer is not None:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    known = dict(zip(record["log"].result.token_ids, texts))  # the tokens the output itself holds
    return lambda ids: "".join(known.get(t, f"<{t}>") for t in ids)


def token_texts(record: dict) -> list[str]:
    """The text each generated token adds: from the log, else decoded here with the target's tokenizer."""
    from specdec.detokenize import token_texts as decode_each

    log: GenerationLog = record["log"]
    tokens = log.result.token_ids
    if len(log.token_texts) == len(tokens):
        return log.token_texts
    tokenizer = tokenizer_for(record["target_model"]) if record["target_model"] else None
    if tokenizer is None:
        return [f"<{t}>" for t in tokens]
    return decode_each(tokenizer, tokens)


def pick(label: str, values: list, key: str) -> list:
    """A multiselect where nothing chosen means everything."""
    chosen = st.sidebar.multiselect(label, values, key=key, placeholder="all")
    return chosen or values


def runs_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        m = r["metrics"]
        rows.append({
            "run": r["run_id"], "source": r["source"], "model set": r["model_set"], "mode": r["mode"],
            "configuration": r["label"], "class": r["class"], "prompt": r["prompt_id"], "max new": r["max_new_tokens"],
            "repeat": r["repeat"], "tokens": m["tokens_generated"], "tok/s": r["tokens_per_s"], "speedup": r["speedup"],
            "TTFT ms": r["ttft_ms"], "accepted/round": m["accepted_per_round"] if m["rounds"] else None,
            "acceptance": m["acceptance_rate"] if m["drafted_positions"] else None,
            "draft length": r["settings"].get("draft_length"), "beam width": r["settings"].get("beam_width"),
            "beam depth": r["settings"].get("beam_depth"), "tree nodes/round": m["tree_nodes_per_round"] or None,
            "branching": m["tree_avg_branching_factor"] or None, "draft ms": m["draft_ms"], "verify ms": m["verify_ms"],
            "other ms": m["other_ms"], "lossless": r["lossless"],
        })
    return pd.DataFrame(rows)


def summary_frame(rows: list[dict], columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame([{title: row[key] for key, title in columns.items()} for row in rows])


SUMMARY_COLUMNS = {
    "class": "class", "model_set": "model set", "label": "configuration", "max_new_tokens": "max new", "runs": "runs",
    "tokens_per_s": "tok/s", "speedup": "speedup", "speedup_vs_assisted": "vs assisted", "ttft_ms": "TTFT ms",
    "accepted_per_round": "accepted/round", "tokens_per_round": "tokens/round", "acceptance_rate": "acceptance",
    "tree_nodes_per_round": "tree nodes/round", "tree_avg_branching_factor": "branching", "draft_share": "draft share",
    "verify_share": "verify share", "other_share": "other share", "expected_speedup": "expected speedup",
    "lossless": "lossless",
}


def generation_tab(records: list[dict], analyses: dict, jaeger_url: str = "") -> None:
    if not records:
        st.info("No generation matches the filters.")
        return
    names = [f"{r['prompt_id']} · {r['label']} · {r['model_set']} · rep {r['repeat']} · {Path(r['path']).name}" for r in records]
    index = st.selectbox("Generation", range(len(records)), index=len(records) - 1, format_func=names.__getitem__,
                         help="newest last; the filters in the sidebar narrow the list")
    record = records[index]
    m = record["metrics"]
    cols = st.columns(6)
    cols[0].metric("tokens", m["tokens_generated"])
    cols[1].metric("tokens/s", f"{record['tokens_per_s']:.2f}")
    cols[2].metric("speedup", "-" if record["speedup"] is None else f"{record['speedup']:.2f}x")
    cols[3].metric("TTFT ms", "-" if record["ttft_ms"] is None else f"{record['ttft_ms']:.0f}")
    cols[4].metric("accepted/round", f"{m['accepted_per_round']:.2f}" if m["rounds"] else "-")
    cols[5].metric("acceptance", f"{m['acceptance_rate']:.2f}" if m["drafted_positions"] else "-")
    trace_line(record, analyses, jaeger_url)
    texts = token_texts(record)
    log: GenerationLog = record["log"]
    if log.with_text:
        st.html(dashboard.LEGEND_HTML)
        st.html(dashboard.generation_html(log, texts, decoder(record, texts)))
    else:
        st.caption("This log holds statistics and token counts only: the orchestrator writes the prompt, "
                   "the output and each round's tokens with --log-text (SPECDEC_LOG_TEXT=true).")
    if not log.result.rounds:
        st.caption("A baseline (or a log without rounds): no drafts to colour.")
        return
    decode = decoder(record, texts)
    st.subheader("Rounds")
    rounds = pd.DataFrame([{
        "round": r.index, "accepted": r.accepted_count, "accepted text": decode(r.accepted),
        "target token": decode([r.bonus_token]) if r.bonus_token is not None else "",
        "correction": r.bonus_is_correction, "winning draft": r.winning_draft,
        "tree nodes": r.tree_nodes, "draft ms": r.draft_ms, "verify ms": r.verify_ms,
        "proposals": " | ".join(f"{d}: " + " / ".join(repr(decode(b)) for b in beams) for d, beams in r.proposals.items())
        if r.token_counts is None else " | ".join(f"{d}: beams of {', '.join(map(str, n))} tokens" for d, n in r.beam_lengths.items()),
    } for r in log.result.rounds])
    split = rounds.melt(id_vars=["round"], value_vars=["draft ms", "verify ms"], var_name="part", value_name="ms")
    st.altair_chart(alt.Chart(split, title="time per round").mark_bar().encode(
        x=alt.X("round:O"), y=alt.Y("ms:Q", stack="zero"), color=alt.Color("part:N"), tooltip=["round", "part", "ms"]),
        use_container_width=True)
    st.dataframe(rounds, hide_index=True, use_container_width=True)


def plots_tab(frame: pd.DataFrame, rows: list[dict]) -> None:
    if frame.empty:
        st.info("No generation matches the filters.")
        return
    y = "speedup" if frame["speedup"].notna().any() else "tok/s"
    tooltip = ["configuration", "model set", "prompt", "class", "tok/s", "speedup", "acceptance"]
    left, right = st.columns(2)
    with left:
        mode_scatter(frame, "sequential", f"{y} vs draft length (sequential)", x=alt.X("draft length:Q"), y=alt.Y(f"{y}:Q"),
                     color="class:N", shape="model set:N", tooltip=tooltip)
    with right:
        mode_scatter(frame, "tree", f"{y} vs tree size (tree)", x=alt.X("tree nodes/round:Q"), y=alt.Y(f"{y}:Q"),
                     color="configuration:N", shape="class:N", tooltip=tooltip + ["tree nodes/round", "branching"])
    positions = [{"configuration": f"{r['label']} ({r['model_set']})", "position": int(p), "acceptance": v}
                 for r in rows if r["class"] == analyze.ALL_CLASSES and r["mode"] in ("sequential", "tree")
                 for p, v in json.loads(r["acceptance_by_position"]).items()]
    left, right = st.columns(2)
    with left:
        if positions:
            st.altair_chart(alt.Chart(pd.DataFrame(positions), title="acceptance vs depth (draft position)")
                            .mark_line(point=True).encode(x=alt.X("position:O", title="draft position"),
                                                          y=alt.Y("acceptance:Q", scale=alt.Scale(domain=[0, 1])),
                                                          color="configuration:N", tooltip=["configuration", "position", "acceptance"]),
                            use_container_width=True)
    split = [{"configuration": f"{r['label']} ({r['model_set']})", "part": part, "ms per round": r[f"{part}_ms_per_round"]}
             for r in rows if r["class"] == analyze.ALL_CLASSES and r["draft_ms_per_round"] is not None
             for part in ("draft", "verify", "other")]
    with right:
        if split:
            st.altair_chart(alt.Chart(pd.DataFrame(split), title="time split per round (mean)").mark_bar().encode(
                y=alt.Y("configuration:N", title=None), x=alt.X("ms per round:Q", stack="zero"), color="part:N",
                tooltip=["configuration", "part", "ms per round"]), use_container_width=True)


def mode_scatter(frame: pd.DataFrame, mode: str, title: str, **encoding) -> None:
    """One mode's runs as points (``encoding``: Altair's channels), or a note that none passed the filters."""
    runs = frame[frame["mode"] == mode]
    if runs.empty:
        st.caption(f"no {mode} runs")
        return
    st.altair_chart(alt.Chart(runs, title=title).mark_circle(size=70).encode(**encoding), use_container_width=True)


def best_tab(rows: list[dict]) -> None:
    best = []
    for cls, max_new in dict.fromkeys((r["class"], r["max_new_tokens"]) for r in rows):
        for mode in (analyze.TARGET_ONLY, analyze.ASSISTED, "autoregressive", "sequential", "tree"):
            row = analyze.best_rows(rows, mode, cls, max_new)
            if row is not None:
                best.append(row)
    if not best:
        st.info("No generation matches the filters.")
        return
    st.caption("The fastest configuration of each mode, per prompt class (speedup over target-only in the same sweep; "
               "tokens/s where there is none).")
    st.dataframe(summary_frame(best, {"class": "class", "max_new_tokens": "max new", "mode": "mode", **SUMMARY_COLUMNS}),
                 hide_index=True, use_container_width=True)
    expected = [r for r in rows if r["class"] == analyze.ALL_CLASSES and r["expected_speedup"] is not None]
    if expected:
        st.subheader("Expected (Leviathan et al.) vs measured speedup")
        st.caption("expected = E / (gamma·c + 1), E = (1 − alpha^(gamma+1)) / (1 − alpha), measured E for trees; "
                   "c = draft step / target step; verify/step = a verify call / a target step.")
        st.dataframe(summary_frame(expected, {
            "label": "configuration", "model_set": "model set", "alpha": "alpha", "gamma": "gamma", "draft_cost_ratio": "c",
            "verify_cost_ratio": "verify/step", "expected_tokens_per_round": "E tokens/round",
            "tokens_per_round": "measured tokens/round", "expected_speedup": "expected", "speedup": "measured",
            "speedup_vs_expected": "of limit"}), hide_index=True, use_container_width=True)


def model_sets_tab(rows: list[dict]) -> None:
    sets = list(dict.fromkeys(r["model_set"] for r in rows if r["mode"] not in analyze.BASELINES))
    if not sets:
        st.info("No speculative runs match the filters.")
        return
    best = []
    for model_set in sets:
        for max_new in dict.fromkeys(r["max_new_tokens"] for r in rows):
            for mode in ("sequential", "tree"):
                row = analyze.best_rows(rows, mode, analyze.ALL_CLASSES, max_new, model_set)
                if row is not None:
                    best.append(row)
    frame = summary_frame(best, {"model_set": "model set", "mode": "mode", **SUMMARY_COLUMNS})
    y = "speedup" if frame["speedup"].notna().any() else "tok/s"
    st.altair_chart(alt.Chart(frame, title=f"best {y} per model set (all prompts)").mark_bar().encode(
        x=alt.X("model set:N"), xOffset="mode:N", y=alt.Y(f"{y}:Q"), color="mode:N",
        tooltip=["model set", "configuration", "tok/s", "speedup", "acceptance"]), use_container_width=True)
    st.dataframe(frame, hide_index=True, use_container_width=True)
    drafts = [{"model set": r["model_set"], "configuration": r["label"], "draft": d, "acceptance": v}
              for r in rows if r["class"] == analyze.ALL_CLASSES and r["mode"] in ("sequential", "tree")
              for d, v in json.loads(r["acceptance_by_draft"]).items()]
    if drafts:
        st.subheader("Acceptance per draft")
        st.dataframe(pd.DataFrame(drafts), hide_index=True, use_container_width=True)


def main() -> None:
    opts = options()
    st.set_page_config(page_title="specdec dashboard", layout="wide")
    log_dir = opts.log_dir
    st.sidebar.title("specdec")
    st.sidebar.caption(f"logs: `{log_dir}`")
    st.sidebar.button("Reload logs", help="read the directory again now")
    signature = listing(log_dir)
    st.session_state["signature"] = signature
    records = load(str(log_dir), signature)

    if opts.refresh_s > 0:
        @st.fragment(run_every=opts.refresh_s)
        def watch() -> None:
            # A log added or rewritten since the last run: run the whole page again on the new data.
            if listing(log_dir) != st.session_state.get("signature"):
                st.rerun()

        with st.sidebar:
            watch()
            st.caption(f"checks for new logs every {opts.refresh_s:g} s")

    st.title("Speculative decoding runs")
    if not records:
        st.info(f"No generation logs under {log_dir} yet. This page shows them as they are written.")
        return
    st.sidebar.header("Filters")
    chosen = records
    for label, key in (("source", "source"), ("model set", "model_set"), ("mode", "mode"), ("configuration", "label"),
                       ("prompt class", "class"), ("prompt", "prompt_id"), ("max new tokens", "max_new_tokens")):
        values = list(dict.fromkeys(r[key] for r in records))
        if len(values) > 1:
            keep = set(pick(label, values, key))
            chosen = [r for r in chosen if r[key] in keep]
    st.html(f'<div class="sd-count" data-count="{len(records)}" style="color:#666;font-size:0.85rem">'
            f'{len(records)} generations in {log_dir}; {len(chosen)} match the filters</div>')
    rows = analyze.summarise(chosen) if chosen else []
    analyses = trace_analyses(opts)
    tabs = st.tabs(["Generation", "Plots", "Strategies", "Best configurations", "Model sets", "Traces"])
    with tabs[0]:
        generation_tab(chosen, analyses, opts.jaeger_url)
    with tabs[1]:
        plots_tab(runs_frame(chosen), rows)
    with tabs[2]:
        st.caption("Aggregated per configuration and prompt class: tokens/s is the median over prompts, round figures are pooled.")
        classes = list(dict.fromkeys(r["class"] for r in rows))
        cls = st.radio("prompt class", classes, index=len(classes) - 1 if classes else 0, horizontal=True) if classes else None
        st.dataframe(summary_frame([r for r in rows if r["class"] == cls], SUMMARY_COLUMNS), hide_index=True, use_container_width=True)
        st.subheader("Every run")
        st.dataframe(runs_frame(chosen), hide_index=True, use_container_width=True)
    with tabs[3]:
        best_tab(rows)
    with tabs[4]:
        model_sets_tab(rows)
    with tabs[5]:
        traces_tab(opts, analyses)


main()
