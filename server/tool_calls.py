"""Tool calls: the grammar a forced tool_choice implies, the calls read back, and their stream.

``tool_choice`` "required" or a named function makes the reply one tool call, decoded under a JSON
schema (structured/) so its arguments always parse against the function's parameters:
- a named function: the output is the arguments object itself (as vLLM does);
- "required": the output is ``{"name": ..., "arguments": ...}``, an anyOf with one branch per tool
  whose name is a const and whose arguments follow that tool's parameters. llguidance writes
  properties in schema order with no free whitespace, so the text is exactly
  ``{"name":"<name>","arguments":<arguments>}`` and the arguments can be streamed as they come.
"none" decodes freely (the tools still reach the chat template). "auto" decodes freely too, and the
parser of the call format the model's chat template taught it (tool_parsers.py, chosen at load)
reads any calls out of the text, as vLLM does; a template that declares no tools, or calls in a
format with no parser here, makes "auto" a 400 (chat.py's).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from balcony_runtime.structured.constraint import StructuredOutput
from server.protocol import ChatCompletionRequest, NamedToolChoice
from server.tool_parsers import CallParser, ParsedCall

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
    """The tool call this request forces, or None (no tools, "none", or "auto": see parsed_message)."""
    choice = body.effective_tool_choice
    if choice not in ("required",) and not isinstance(choice, NamedToolChoice):
        return None
    parameters = {t.function.name: t.function.parameters or _NO_ARGUMENTS for t in body.tools}
    return ToolCalling(parameters, choice.function.name if isinstance(choice, NamedToolChoice) else None)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finished_message(calling: ToolCalling, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """The assistant message and finish_reason of a finished choice whose call was forced."""
    name, arguments = calling.split(text, finish_reason or "stop")
    if name is None:  # cut before the name was complete: nothing to call
        return {"role": "assistant", "content": text}, finish_reason
    call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return message, "tool_calls" if finish_reason == "stop" else finish_reason


def parsed_message(parser: CallParser, text: str, finish_reason: str | None,
                   max_calls: int | None) -> tuple[dict, str | None]:
    """The assistant message and finish_reason of a finished "auto" choice: its text, and its calls
    when the parser finds any (then content is null unless text came with them)."""
    segments = parser.parse(text, final=True)
    calls = [s for s in segments if isinstance(s, ParsedCall)][:max_calls]
    content = "".join(s for s in segments if isinstance(s, str))
    if not calls:
        return {"role": "assistant", "content": content}, finish_reason
    message = {"role": "assistant", "content": content or None,
               "tool_calls": [{"id": new_call_id(), "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}
    return message, "tool_calls" if finish_reason == "stop" else finish_reason


@dataclass
class ToolCallStream:
    """One choice's forced tool call as OpenAI streams it: a first delta with id, type, name and
    empty arguments, then the arguments in pieces."""

    calling: ToolCalling
    id: str = field(default_factory=new_call_id)
    announced: bool = False  # the first delta went out
    sent: int = 0  # characters of the arguments sent

    def deltas(self, text: str, finish_reason: str | None) -> list[dict]:
        """Chunk deltas for the output so far (possibly none), one ``tool_calls`` entry each, or the
        text when the output ended before the name."""
        name, arguments = self.calling.split(text, finish_reason)
        out = []
        if name is not None and not self.announced:
            self.announced = True
            out.append(_call_head(0, self.id, name))
        if self.announced and len(arguments) > self.sent:
            out.append(_call_arguments(0, arguments[self.sent:]))
            self.sent = len(arguments)
        if finish_reason is not None and not self.announced and text:  # cut before its name: text
            out = [{"content": text}]
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.announced else reason


@dataclass
class ParsedCallStream:
    """One "auto" choice as OpenAI streams it: text as content deltas until a call begins, then
    each call, once its JSON is complete, as a delta with index, id, type, name and empty arguments
    followed by one with its arguments (tool_parsers.py holds back what may still change)."""

    parser: CallParser
    max_calls: int | None = None  # parallel_tool_calls false: 1 (later calls are dropped)
    done: int = 0  # segments sent whole
    sent_chars: int = 0  # characters sent of segment ``done`` (text that may still grow)
    calls: int = 0  # calls sent

    def deltas(self, text: str, finish_reason: str | None) -> list[dict]:
        segments = self.parser.parse(text, final=finish_reason is not None)
        out = []
        for k in range(self.done, len(segments)):
            segment = segments[k]
            if isinstance(segment, str):
                if len(segment) > self.sent_chars:
                    out.append({"content": segment[self.sent_chars:]})
                self.sent_chars = len(segment)
                if k == len(segments) - 1:  # the last text may still grow
                    break
            elif self.max_calls is None or self.calls < self.max_calls:
                out += [_call_head(self.calls, new_call_id(), segment.name),
                        _call_arguments(self.calls, segment.arguments)]
                self.calls += 1
            self.done, self.sent_chars = k + 1, 0
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.calls else reason


def _call_head(index: int, call_id: str, name: str) -> dict:
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}


def _call_arguments(index: int, arguments: str) -> dict:
    return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}
