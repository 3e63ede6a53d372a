"""Structured output and a forced tool call over the OpenAI-compatible HTTP API, each asked in
autoregressive and in tree mode: the answers must be the same, and the tokens/s of each and their
ratio are printed (what the README's figures for structured output come from).

    specdec cluster up &                       # the embedded pair; HTTP on :8000
    python examples/structured_output.py       # --url http://HOST:PORT, --max-tokens N

Standard library only, as a service calling specdec might be.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "language", "version", "license", "dependencies", "description"],
          "properties": {"name": {"type": "string"}, "language": {"type": "string"}, "version": {"type": "string"},
                         "license": {"type": "string", "enum": ["MIT", "Apache-2.0", "BSD-3-Clause", "GPL-3.0"]},
                         "dependencies": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                         "description": {"type": "string"}}}
TOOL = {"type": "function", "function": {
    "name": "create_issue", "description": "Open an issue in the tracker",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["title", "body", "labels", "priority"],
                   "properties": {"title": {"type": "string"}, "body": {"type": "string"},
                                  "labels": {"type": "array", "items": {"type": "string", "enum": ["bug", "feature", "docs", "question"]}},
                                  "priority": {"type": "string", "enum": ["low", "medium", "high"]}}}}}
ASKS = [
    ("JSON schema", "Describe the Python package 'requests' as JSON.",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "package", "schema": SCHEMA}}}),
    ("JSON schema", "Describe the JavaScript library 'lodash' as JSON.",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "package", "schema": SCHEMA}}}),
    ("tool call", "The login page crashes when the password field is empty. Please file it.",
     {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "create_issue"}}, "parallel_tool_calls": False}),
    ("tool call", "We need dark mode in the settings screen; open a ticket.",
     {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "create_issue"}}, "parallel_tool_calls": False}),
]


def chat(url: str, mode: str, content: str, max_tokens: int, **fields) -> tuple[float, dict]:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0, "mode": mode, **fields}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=1800) as reply:
        answer = json.load(reply)
    return time.perf_counter() - start, answer


def answer_of(answer: dict) -> str:
    message = answer["choices"][0]["message"]
    return json.dumps(message.get("tool_calls") and [c["function"] for c in message["tool_calls"]]) + (message["content"] or "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    for kind, content, fields in ASKS:
        speed, answers = {}, {}
        for mode in ("autoregressive", "tree"):
            seconds, answer = chat(args.url, mode, content, args.max_tokens, **fields)
            speed[mode] = answer["usage"]["completion_tokens"] / seconds
            answers[mode] = answer_of(answer)
        same = answers["tree"] == answers["autoregressive"]
        print(f"{kind:12s} autoregressive {speed['autoregressive']:.2f} tokens/s, tree {speed['tree']:.2f}: "
              f"{speed['tree'] / speed['autoregressive']:.2f}x, same answer: {same}")
        print(f"  {answers['tree'][:160]}")


if __name__ == "__main__":
    main()
