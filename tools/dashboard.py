"""``specdec dashboard LOG_DIR``: explore generation logs in the browser (Streamlit).

This module starts the app (``dashboard_app.py`` beside it) and holds what the app renders that is
worth testing without a browser: the generation view of one :class:`~specdec.records.GenerationLog`,
the text of every round with accepted draft tokens in green, the target's corrections in red, and
each round's proposals in a tooltip. LOG_DIR may be a ``specdec bench`` output directory or a
running cluster's ``--log-dir``: the app lists the directory again on every rerun and every few
seconds, so new logs show up as the orchestrator writes them.
"""

from __future__ import annotations

import html
import os
import subprocess
import sys
from pathlib import Path

from specdec.records import GenerationLog, RoundRecord

APP = Path(__file__).with_name("dashboard_app.py")

# The CSS classes the generation view uses; tests and custom styles can rely on them.
ACCEPTED, CORRECTION, BONUS, PLAIN = "sd-accepted", "sd-correction", "sd-bonus", "sd-plain"
STYLE = {
    ACCEPTED: "background-color:#c6efce;color:#006100",  # green: accepted draft tokens
    CORRECTION: "background-color:#ffc7ce;color:#9c0006",  # red: the target replaced a drafted token
    BONUS: "color:inherit;border-bottom:1px dotted #888",  # the target's own token after a fully accepted draft
    PLAIN: "color:inherit",  # no drafts (autoregressive, baselines)
}


def token_kinds(log: GenerationLog) -> list[tuple[int, str, int | None]]:
    """(token id, kind, round index) for each generated token, following the rounds in order.

    A round adds its accepted draft tokens, then the target's token (a correction when it replaced a
    drafted token). The last round may have been cut by a stop string or max_new_tokens; tokens the
    rounds do not account for (baselines, a log without rounds) are plain."""
    tokens = log.result.token_ids
    kinds: list[tuple[int, str, int | None]] = []
    for r in log.result.rounds:
        for token in r.accepted:
            kinds.append((token, ACCEPTED, r.index))
        if r.bonus_token is not None:
            kinds.append((r.bonus_token, CORRECTION if r.bonus_is_correction else BONUS, r.index))
    if [t for t, _, _ in kinds[: len(tokens)]] != tokens:
        return [(t, PLAIN, None) for t in tokens]
    return kinds[: len(tokens)]


def round_tooltip(r: RoundRecord, decode) -> str:
    """Plain text for a title attribute: what each draft proposed this round and what the target kept."""
    lines = [f"round {r.index}: {r.accepted_count} accepted"
             + (", then a correction" if r.bonus_is_correction else ", then the target's token")
             + (f" (fallback: {r.fallback_reason})" if r.fallback else "")]
    for draft, beams in r.proposals.items():
        for i, beam in enumerate(beams):
            lines.append(f"{draft} beam {i}: {decode(beam)!r}")
    timing = [f"draft {r.draft_ms:.1f} ms", f"verify {r.verify_ms:.1f} ms", f"tree {r.tree_nodes} nodes" if r.tree_nodes else ""]
    lines.append(", ".join(t for t in timing if t))
    return "\n".join(line for line in lines if line)


def generation_html(log: GenerationLog, token_texts: list[str], decode) -> str:
    """The generation view: prompt in grey, then every token as a span coloured by its kind.

    ``token_texts[i]`` is the text token i added (they join to the output); ``decode(ids)`` renders a
    proposal for the tooltips."""
    tips = {r.index: html.escape(round_tooltip(r, decode), quote=True).replace("\n", "&#10;") for r in log.result.rounds}
    pieces = []
    for (token, kind, index), text in zip(token_kinds(log), token_texts):
        shown = html.escape(text).replace("\n", "↵\n") if text else "&#8203;"
        title = f' title="{tips[index]}"' if index is not None else ""
        pieces.append(f'<span class="sd-tok {kind}" data-round="{index if index is not None else ""}" '
                      f'style="{STYLE[kind]}"{title}>{shown}</span>')
    prompt = html.escape(log.prompt)
    return (
        '<div class="sd-generation" style="font-family:ui-monospace,Menlo,Consolas,monospace;font-size:0.9rem;'
        'line-height:1.6;white-space:pre-wrap;border:1px solid #ddd;border-radius:6px;padding:0.75rem">'
        f'<span class="sd-prompt" style="color:#888">{prompt}</span>{"".join(pieces)}</div>'
    )


LEGEND_HTML = (
    '<div class="sd-legend" style="font-size:0.85rem;margin:0.25rem 0 0.75rem 0">'
    f'<span class="sd-tok {ACCEPTED}" style="{STYLE[ACCEPTED]}">accepted draft token</span> '
    f'<span class="sd-tok {CORRECTION}" style="{STYLE[CORRECTION]}">target correction</span> '
    f'<span class="sd-tok {BONUS}" style="{STYLE[BONUS]}">target token after a fully accepted draft</span> '
    '<span style="color:#888">prompt</span> · hover a token for its round\'s proposals</div>'
)


def add_parser(commands) -> None:
    cmd = commands.add_parser("dashboard", help="explore generation logs in the browser (Streamlit)")
    cmd.add_argument("log_dir", type=Path, help="a `specdec bench` output directory or an orchestrator --log-dir")
    cmd.add_argument("--port", type=int, default=8501, help="HTTP port [default: %(default)s]")
    cmd.add_argument("--host", default="127.0.0.1", help="address to listen on [default: %(default)s]")
    cmd.add_argument("--refresh-s", type=float, default=5.0, help="how often to look for new logs, seconds (0 = only on reload) [default: %(default)s]")
    cmd.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    cmd.add_argument("--traces", type=Path, help="a trace file (the services' --trace-file, or with --otlp-json the collector's "
                     "export): a Traces tab with each request's timeline, and each generation's own beside its log")
    cmd.add_argument("--otlp-json", action="store_true", help="--traces is OTLP/JSON (compose/traces/traces.jsonl)")
    cmd.add_argument("--jaeger-url", default="", help="link each generation's trace id to this Jaeger UI (http://127.0.0.1:16686)")
    cmd.set_defaults(func=cmd_dashboard)


def streamlit_command(log_dir: Path, port: int, host: str = "127.0.0.1", refresh_s: float = 5.0, headless: bool = True,
                      traces: Path | None = None, otlp_json: bool = False, jaeger_url: str = "") -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.port", str(port), "--server.address", host, "--server.headless", str(headless).lower(),
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--", "--log-dir", str(Path(log_dir).resolve()), "--refresh-s", str(refresh_s),
        *(["--traces", str(Path(traces).resolve())] if traces else []), *(["--otlp-json"] if otlp_json else []),
        *(["--jaeger-url", jaeger_url] if jaeger_url else []),
    ]


def cmd_dashboard(args) -> int:
    if not args.log_dir.is_dir():
        print(f"specdec dashboard: {args.log_dir} is not a directory", file=sys.stderr)
        return 2
    if args.traces and not args.traces.is_file():
        print(f"specdec dashboard: --traces {args.traces} is not a file", file=sys.stderr)
        return 2
    command = streamlit_command(args.log_dir, args.port, args.host, args.refresh_s, headless=args.no_browser,
                                traces=args.traces, otlp_json=args.otlp_json, jaeger_url=args.jaeger_url)
    print(f"specdec dashboard: http://{args.host}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr)
    try:
        return subprocess.call(command, env={**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"})
    except KeyboardInterrupt:
        return 130
