"""Prompt sets and sweep files, in one place: the files ``benchmarks/`` ships (installed as
``specdec.benchmarks``) and the prompt format that ``specdec bench`` and ``specdec loadtest`` read.

A prompt file holds one JSON object a line: ``{"id", "class": "code" | "prose", "prompt"}``, or for
chat ``{"id", "class": "chat", "messages": [{"role", "content"}, ...]}`` (rendered with the target
tokenizer's chat template). Bundled files are found through :mod:`importlib.resources`, so they are
there in an installed wheel as well as in a checkout.
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

PROMPT_CLASSES = ("code", "prose", "chat", "edit")  # edit: chat requests whose answer copies the prompt
QUICK_PROMPTS = "prompts/quick.jsonl"  # 4 code and 2 prose prompts: the quick benchmark's and the load test's default


class PromptFileError(ValueError):
    """A prompt or sweep file that cannot be used, named in the message."""


@dataclass(frozen=True)
class Prompt:
    id: str
    cls: str  # one of PROMPT_CLASSES
    text: str  # the raw prompt; for chat prompts, the messages as plain text (what the tables show)
    messages: tuple = ()  # chat prompts: ({"role": ..., "content": ...}, ...), rendered with the chat template


def bundled_dir() -> Path:
    """The directory of the shipped benchmark files (``benchmarks/`` in a checkout)."""
    return Path(importlib.resources.files("specdec.benchmarks"))


def bundled_sweeps() -> list[str]:
    """The names of the shipped sweep files: ``quick``, ``bench``, ``bench-gpu``."""
    return sorted(p.stem for p in bundled_dir().glob("*.yaml"))


def sweep_file(name_or_path: str | Path) -> Path:
    """A sweep file by path, or a shipped one by name (``quick`` or ``quick.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.name == str(name_or_path):  # a bare name: look among the shipped files
        shipped = bundled_dir() / (path.name if path.suffix == ".yaml" else path.name + ".yaml")
        if shipped.is_file():
            return shipped
    raise PromptFileError(f"no sweep file {name_or_path!r}: give a path, or one of the shipped sweeps: {', '.join(bundled_sweeps())}")


def load_prompts(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise PromptFileError(f"no prompts file at {path}")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{n}: not JSON: {exc}") from None
        prompts.append(prompt_from(item, f"{path}:{n}"))
    if len({p.id for p in prompts}) != len(prompts):
        raise PromptFileError(f"{path}: prompt ids must be unique")
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    return prompts


def prompt_from(item, where: str) -> Prompt:
    """``{"id", "class", "prompt"}``, or for chat ``{"id", "class": "chat", "messages": [{"role", "content"}, ...]}``."""
    need = f'{where}: need {{"id": ..., "class": one of {", ".join(PROMPT_CLASSES)}, "prompt": text or "messages": [...]}}'
    if not isinstance(item, dict) or item.get("class") not in PROMPT_CLASSES or not item.get("id"):
        raise PromptFileError(need)
    messages = item.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise PromptFileError(f'{where}: "messages" must be a list of {{"role": ..., "content": ...}}')
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return Prompt(str(item["id"]), item["class"], text, tuple(dict(role=m["role"], content=m["content"]) for m in messages))
    if not isinstance(item.get("prompt"), str) or not item["prompt"]:
        raise PromptFileError(need)
    return Prompt(str(item["id"]), item["class"], item["prompt"])


def text_prompts(path: Path) -> list[str]:
    """The prompts of a prompt file as plain text, for callers that send text (chat prompts need a template)."""
    prompts = load_prompts(path)
    chat = [p.id for p in prompts if p.messages]
    if chat:
        raise PromptFileError(f"{path}: chat prompts ({', '.join(chat)}) need the target's chat template; "
                              "give a file of text prompts")
    return [p.text for p in prompts]


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
