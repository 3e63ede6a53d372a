"""Tools on the chat route: OpenAI's ``tools`` and ``tool_choice``, rendered by the model's own chat
template and the model's tool calls parsed back into ``tool_calls``.

The calls are read in the format the Hermes and Qwen2.5 templates teach their models (the embedded
pair's): each call a JSON object ``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and
``</tool_call>`` lines. ``tool_choice``:

- ``auto`` (the default when there are tools): the model decides; calls it writes are parsed out;
- ``none``: no tool is offered to the model, its text is the answer;
- ``required``, or a named function: the output is constrained (:mod:`specdec.grammar`) to tool
  calls, a named one to that function, each call's ``arguments`` to the function's own parameter
  schema, so the arguments always parse and validate. As for every grammar, speculation stays exact.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from specdec.errors import InvalidRequest
from specdec.grammar import JSON_OPTIONS, Grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALLS = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128
NO_PARAMETERS = {"type": "object", "properties": {}}  # OpenAI: parameters left out = a function of none


def refused(message: str, param: str) -> InvalidRequest:
    """A 400 naming ``param`` (the HTTP door reads it: ``ApiError.of``)."""
    error = InvalidRequest(message)
    error.param = param
    return error


@dataclass(frozen=True)
class Tools:
    """A chat request's tools as the template and the parser need them."""

    offered: list[dict]  # the tools as the template renders them (OpenAI's shape); [] = none
    grammar: Grammar | None  # the output's constraint (required, or a named function)
    parse: bool  # whether tool calls are parsed out of the output


LINE_BREAK = json.dumps("\n")
ANY_BREAK = "/[ \\n]{0,2}/"  # a tokenizer that cannot write a line break: up to two spaces or breaks
TEXT_TAGS = (json.dumps(OPEN), json.dumps(CLOSE), LINE_BREAK)


def tag_terms(tokenizer) -> tuple[str, str, str]:
    """The opening and closing tags and the break around a call as the grammar must name them: a
    tag is a token of its own where the tokenizer has one (Qwen2.5's ``<tool_call>`` is; the grammar
    sees such a token as a token, not as its text), else its text; the break is the format's line
    break (exactly: then the whole frame of a call is forced, free drafts), where the tokenizer can
    write one."""
    vocab = tokenizer.get_vocab()
    tags = [f"<[{vocab[tag]}]>" if tag in vocab else json.dumps(tag) for tag in (OPEN, CLOSE)]
    writes_breaks = tokenizer.decode(tokenizer("\n", add_special_tokens=False).input_ids) == "\n"
    return tags[0], tags[1], LINE_BREAK if writes_breaks else ANY_BREAK


def tools_of(tools: list[Any] | None, tool_choice: Any, parallel: bool | None, tags: tuple[str, str, str] = TEXT_TAGS) -> Tools:
    """Check ``tools`` and ``tool_choice`` (400s naming the field) and resolve them; ``tags``: the
    grammar's names of the call's tags (:func:`tag_terms`)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise refused("tool_choice names a tool but no tools are given", param="tool_choice")
        return Tools([], None, False)
    if len(tools) > MAX_TOOLS:
        raise refused(f"tools has {len(tools)} entries; at most {MAX_TOOLS}", param="tools")
    functions = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(function, dict):
            raise refused(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", param="tools")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise refused(f"tools[{i}].function.name must be 1 to 64 letters, digits, _ or -", param="tools")
        if name in functions:
            raise refused(f"tools[{i}]: a second function named {name!r}", param="tools")
        parameters = function.get("parameters", NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise refused(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        functions[name] = parameters
    if tool_choice in (None, "auto"):
        return Tools(list(tools), None, True)
    if tool_choice == "none":
        return Tools([], None, False)
    if tool_choice == "required":
        chosen = list(functions)
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in functions:
            raise refused(f"tool_choice names the function {name!r}, which tools does not hold", param="tool_choice")
        chosen = [name]
    else:
        raise refused("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                            "{\"name\": ...}}", param="tool_choice")
    return Tools(list(tools), call_grammar({name: functions[name] for name in chosen}, parallel is not False, tags), True)


def call_grammar(functions: dict[str, dict], parallel: bool, tags: tuple[str, str, str] = TEXT_TAGS) -> Grammar:
    """Tool calls only: one (or with ``parallel``, one or more) ``<tool_call>`` blocks, each naming
    one of ``functions`` with arguments its schema allows."""
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": name}, "arguments": parameters}} for name, parameters in functions.items()]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    more = " (GAP block)*" if parallel else ""  # further calls, a line apart
    lark = "\n".join([f"start: block{more}", f"block: {tags[0]} GAP call GAP {tags[1]}", f"GAP: {tags[2]}",
                      f"call: %json {json.dumps(schema | {'x-guidance': JSON_OPTIONS})}", ""])
    try:
        grammar = Grammar("lark", lark)
        grammar.llguidance()
    except InvalidRequest as exc:  # a parameters schema that cannot be compiled
        raise refused(f"tools: a parameters schema cannot be used: {exc}", param="tools") from None
    return grammar


def parse_calls(text: str) -> tuple[str | None, list[dict]]:
    """The text outside tool calls (None when nothing else is left) and each call in OpenAI's shape;
    a block whose JSON does not parse as a call stays in the text."""
    calls, kept, last = [], [], 0
    for match in _CALLS.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        arguments = call.get("arguments", {})
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def held_back(text: str) -> int:
    """How much of a streamed ``text`` may go out as content now: up to a tool call's opening tag,
    or, while the text ends in what could begin one, up to that."""
    at = text.find(OPEN)
    if at >= 0:
        return at
    for keep in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)
