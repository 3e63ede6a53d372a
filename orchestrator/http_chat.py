"""The HTTP door's chat template: a chat request's messages to the target's prompt tokens."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from specdec.errors import InvalidRequest, NotReady
from specdec.orchestrator.http_responses import ApiError
from specdec.orchestrator.http_schemas import Message

log = logging.getLogger("specdec.orchestrator.http")


class ChatTemplate:
    """Messages to prompt tokens: the target tokenizer's chat template, or ``--chat-template``'s."""

    def __init__(self, generations, path: str = "") -> None:
        self.generations = generations
        self.template: str | None = None
        if path:
            try:
                self.template = Path(path).expanduser().read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise NotReady(f"--chat-template {path}: cannot read it ({exc})") from None
        elif not getattr(generations.tokenizer, "chat_template", None):
            log.info("the target's tokenizer has no chat template: /v1/chat/completions answers 400 until --chat-template is set")

    def prompt_ids(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """The prompt's tokens: ``messages`` (and ``tools``, OpenAI's shape) as the template renders them."""
        tokenizer = self.generations.tokenizer
        if self.template is None and not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "the target model's tokenizer has no chat template; start the orchestrator with "
                                "--chat-template FILE (SPECDEC_CHAT_TEMPLATE)", param="messages")
        limit = self.generations.settings.max_chat_messages
        if len(messages) > limit:
            raise ApiError(400, f"messages has {len(messages)} entries; at most {limit} are accepted (--max-chat-messages)",
                           param="messages")
        conversation = [{**_extra(m), "role": m.role, "content": message_text(m, i)}
                        | ({"name": m.name} if m.name is not None else {}) for i, m in enumerate(messages)]
        # Sized before the template renders them (it only adds), and again after.
        context, longest = self.generations.target_info.max_context, self.generations.longest_token_chars
        chars = sum(len(c["content"]) for c in conversation)
        if context and chars > context * longest:
            raise InvalidRequest(f"the messages hold {chars} characters; the model's context of {context} tokens "
                                 f"holds at most {context * longest}")
        try:
            text = tokenizer.apply_chat_template(conversation, tools=tools or None, chat_template=self.template,
                                                 add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception: TemplateError)
            raise ApiError(400, f"messages: the chat template refused them: {exc}", param="messages") from None
        # Sized before tokenised, as the gRPC API's text prompts are: a text far past the context takes long.
        if context and len(text) > context * longest:
            raise InvalidRequest(f"the messages make a prompt of {len(text)} characters; the model's context of "
                                 f"{context} tokens holds at most {context * longest}")
        # The template writes any special tokens it wants (a BOS, the role markers): none added here.
        return self.generations.tokenize(text, "messages", add_special_tokens=False)


def message_text(message: Message, index: int) -> str:
    """A chat message's text: its content, or its text parts joined (a 400 for any other part)."""
    if not isinstance(message.content, list):
        return message.content or ""
    if any(part.type != "text" or part.text is None for part in message.content):
        raise ApiError(400, f"messages[{index}].content: only text parts are supported", param="messages")
    return "".join(part.text for part in message.content)


def _extra(message: Message) -> dict:
    """A message's other fields for the template (``tool_calls``, ``tool_call_id``, ...), an earlier
    tool call's ``arguments`` as an object: OpenAI sends them as a JSON string, the templates write
    them out as JSON themselves."""
    extra = dict(message.model_extra or {})
    calls = extra.get("tool_calls")
    if isinstance(calls, list):
        extra["tool_calls"] = [_with_object_arguments(call) for call in calls]
    return extra


def _with_object_arguments(call):
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}
