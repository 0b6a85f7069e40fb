"""Tool calls by constrained decoding: the grammar a tool_choice implies, and the call read back.

``tool_choice`` "required" or a named function makes the reply one tool call, decoded under a JSON
schema (structured/) so its arguments always parse against the function's parameters:
- a named function: the output is the arguments object itself (as vLLM does);
- "required": the output is ``{"name": ..., "arguments": ...}``, an anyOf with one branch per tool
  whose name is a const and whose arguments follow that tool's parameters. llguidance writes
  properties in schema order with no free whitespace, so the text is exactly
  ``{"name":"<name>","arguments":<arguments>}`` and the arguments can be streamed as they come.
"none" decodes freely (the tools still reach the chat template). "auto" would need the model to
choose between text and a call in its own format, which only a template that declares tools
defines; the 400 for the others is chat.py's.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from balcony_runtime.structured.constraint import StructuredOutput
from server.protocol import ChatCompletionRequest, NamedToolChoice

# The head of a "required" call: its name once the string is closed, then where its arguments start.
_NAME = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*(?:,\s*"arguments"\s*:\s*)?')
_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolCalling:
    """How one request's reply becomes a tool call."""

    parameters: dict[str, dict]  # function name -> the JSON schema of its arguments, in tools' order
    forced: str | None  # tool_choice named this function: the output is its arguments alone

    def constraint(self) -> StructuredOutput:
        if self.forced is not None:
            return StructuredOutput.of_schema(self.parameters[self.forced])
        branches = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
                     "required": ["name", "arguments"], "additionalProperties": False}
                    for name, schema in self.parameters.items()]
        return StructuredOutput.of_schema(branches[0] if len(branches) == 1 else {"anyOf": branches})

    def split(self, text: str, finish_reason: str | None) -> tuple[str | None, str]:
        """(function name, arguments text) of the output so far; the name is None until known.

        ``finish_reason`` None: still running, so a "required" call holds back its last character,
        which may be the wrapper's closing brace. "stop": the grammar completed, so that brace goes.
        Anything else (cut by max_tokens): the arguments are whatever came, unfinished."""
        if self.forced is not None:
            return self.forced, text
        head = _NAME.match(text)
        if head is None:
            return None, ""
        name = json.loads(f'"{head.group(1)}"')
        if not head.group(0).rstrip().endswith(":"):  # the name is out, its arguments not yet
            return name, ""
        arguments = text[head.end():]
        if finish_reason is None:
            arguments = arguments[:-1]
        elif finish_reason == "stop":
            arguments = arguments.rstrip().removesuffix("}")
        return name, arguments


def tool_calling(body: ChatCompletionRequest) -> ToolCalling | None:
    """The tool call this request forces, or None (no tools, "none", or "auto": see chat.py)."""
    choice = body.effective_tool_choice
    if choice not in ("required",) and not isinstance(choice, NamedToolChoice):
        return None
    parameters = {t.function.name: t.function.parameters or _NO_ARGUMENTS for t in body.tools}
    return ToolCalling(parameters, choice.function.name if isinstance(choice, NamedToolChoice) else None)


def template_declares_tools(tokenizer) -> bool:
    """Whether the model's chat template renders a ``tools`` list (so the model was taught a call
    format): a template that never reads the variable cannot have."""
    return re.search(r"\btools\b", getattr(tokenizer, "chat_template", None) or "") is not None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finished_message(calling: ToolCalling, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """The assistant message and finish_reason of a finished choice."""
    name, arguments = calling.split(text, finish_reason or "stop")
    if name is None:  # cut before the name was complete: nothing to call
        return {"role": "assistant", "content": text}, finish_reason
    call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return message, "tool_calls" if finish_reason == "stop" else finish_reason


@dataclass
class ToolCallStream:
    """One choice's tool call as OpenAI streams it: a first delta with id, type, name and empty
    arguments, then the arguments in pieces."""

    calling: ToolCalling
    id: str = field(default_factory=new_call_id)
    announced: bool = False  # the first delta went out
    sent: int = 0  # characters of the arguments sent

    def deltas(self, text: str, finish_reason: str | None) -> list[dict]:
        """``tool_calls`` delta entries for the output so far (possibly none)."""
        name, arguments = self.calling.split(text, finish_reason)
        out = []
        if name is not None and not self.announced:
            self.announced = True
            out.append({"index": 0, "id": self.id, "type": "function", "function": {"name": name, "arguments": ""}})
        if self.announced and len(arguments) > self.sent:
            out.append({"index": 0, "function": {"arguments": arguments[self.sent:]}})
            self.sent = len(arguments)
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.announced else reason
