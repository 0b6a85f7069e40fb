"""Tool calls in a model's own format, read back from its free text (``tool_choice: "auto"``).

A chat template that declares tools teaches the model a call format; the parser of that format is
chosen once at model load from the template's text (``parser_for_template``), where vLLM has it
named by hand (``--tool-call-parser``). Two formats, as vLLM's parsers of the same names read them:
- hermes (Qwen2.5, Hermes 2 Pro and 3, SmolLM3): ``<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`` anywhere in the reply, any number of times, with text around the calls;
- llama3_json (LLaMA 3.1 and 3.2 instruct): the reply is a bare ``{"name": ..., "parameters": {...}}``
  object, after an optional ``<|python_tag|>``; several are separated by ``;``.

``parse(text, final)`` splits a reply into text and calls, and is the same function for a whole
reply and for a stream. While the reply is unfinished (``final`` False) it returns only what more
text cannot change: a call once its JSON object is complete, text once it cannot be the start of a
call. So what a stream sends adds up to the whole reply's parse, wherever the reply is cut, and a
call is sent whole: a malformed one can still turn back into text. Anything that does not parse as
a call stays text, markers and all; a call's arguments are re-serialised JSON, as in vLLM.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Protocol, Union


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text


Segment = Union[str, ParsedCall]  # text (never empty) or a call


class CallParser(Protocol):
    name: str  # vLLM's name for the format

    def parse(self, text: str, final: bool) -> list[Segment]:
        """The reply split into text and calls; adjacent text is one segment. Unless ``final``, only
        what is settled: every later parse of a longer reply starts with these segments, except
        that the last one, when text, may have grown."""


# A JSON string (or an unterminated one, to the end of the text) or a brace.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[{}]', re.DOTALL)
_SPACE = re.compile(r"\s*")


def _skip_space(text: str, i: int) -> int:
    return _SPACE.match(text, i).end()


def _object_end(text: str, i: int) -> int | None:
    """Where the object opened at ``text[i] == "{"`` closes (braces in strings do not count), or
    None while it has not closed yet."""
    depth = 0
    for token in _TOKEN.finditer(text, i):
        if token.group() == "{":
            depth += 1
        elif token.group() == "}":
            depth -= 1
            if depth == 0:
                return token.end()
    return None


def _read_call(text: str, i: int, final: bool) -> tuple[ParsedCall | None, int] | None:
    """The call whose JSON object starts at ``i`` (after whitespace) and where it ends; (None, i)
    when what is there is not a call; None when more text is needed to tell."""
    start = _skip_space(text, i)
    if start == len(text):
        return (None, i) if final else None
    if text[start] != "{":
        return None, i
    end = _object_end(text, start)
    if end is None:
        return (None, i) if final else None
    try:
        value = json.loads(text[start:end], strict=False)  # strict=False: raw newlines in strings
    except ValueError:
        return None, i
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None, i
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False)), end


def _add_text(segments: list[Segment], text: str) -> None:
    if not text:
        return
    if segments and isinstance(segments[-1], str):
        segments[-1] += text
    else:
        segments.append(text)


def _settled_end(text: str, start: int, marker: str) -> int:
    """End of the text from ``start`` that no more text can turn into a call's start: it leaves out
    a tail that may become ``marker`` and the whitespace before it (dropped before a call)."""
    end = len(text)
    for k in range(min(len(marker) - 1, end - start), 0, -1):
        if text.endswith(marker[:k]):
            end -= k
            break
    return start + len(text[start:end].rstrip())


class Hermes:
    """``<tool_call>{...}</tool_call>`` blocks among text. The whitespace around a call is dropped;
    the closing tag may be missing (vLLM accepts that too)."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> list[Segment]:
        segments: list[Segment] = []
        pos = search = 0  # text starts at pos; the next start marker is looked for from search
        while (start := text.find(self.START, search)) >= 0:
            read = _read_call(text, start + len(self.START), final)
            if read is None:  # a call may be starting: the text before it is settled
                _add_text(segments, text[pos:start].rstrip())
                return segments
            call, end = read
            if call is None:  # not a call: the marker is text
                search = start + len(self.START)
                continue
            _add_text(segments, text[pos:start].rstrip())
            segments.append(call)
            after = _skip_space(text, end)
            if text.startswith(self.END, after):
                after = _skip_space(text, after + len(self.END))
            elif not final and after < len(text) and self.END.startswith(text[after:]):
                return segments  # the closing tag may be coming: the text after the call is not settled
            pos = search = after
        _add_text(segments, text[pos:] if final else text[pos:_settled_end(text, pos, self.START)])
        return segments


class Llama3Json:
    """A reply that is one or more ``{"name", "parameters"}`` objects (``arguments`` is taken too);
    a reply that starts otherwise is text, and text after the calls stays text."""

    name = "llama3_json"
    TAG = "<|python_tag|>"  # a special token, usually dropped from the text before it gets here

    def parse(self, text: str, final: bool) -> list[Segment]:
        i = _skip_space(text, 0)
        if text.startswith(self.TAG, i):
            i += len(self.TAG)
        elif not final and self.TAG.startswith(text[i:]):
            return []  # nothing yet, or the tag still arriving
        segments: list[Segment] = []
        while True:
            read = _read_call(text, i, final)
            if read is None:
                return segments
            call, end = read
            if call is None:  # the rest is text; all of it when no call came before
                _add_text(segments, text[i:] if segments else text)
                return segments
            segments.append(call)
            i = _skip_space(text, end)
            if text.startswith(";", i):
                i = _skip_space(text, i + 1)


PARSERS: dict[str, CallParser] = {p.name: p for p in (Hermes(), Llama3Json())}


def chat_template_text(tokenizer) -> str:
    """The tokenizer's chat template; a dict of named templates (older transformers) as one text."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "\n".join(template.values()) if isinstance(template, dict) else template


def template_declares_tools(template: str) -> bool:
    """Whether a chat template renders a ``tools`` list (so the model was taught a call format): a
    template that never reads the variable cannot have."""
    return re.search(r"\btools\b", template) is not None


@dataclass(frozen=True)
class ToolCallFormat:
    """tool_choice "auto"'s parser for this server, and a note: which format and why, or why none
    (for the start-up log and the 400 an "auto" request then gets)."""

    parser: CallParser | None
    note: str


def select_format(setting: str, template: str) -> ToolCallFormat:
    """``setting``: --tool-call-parser ("auto": the format the chat template teaches, a parser's
    name, or "none")."""
    if setting == "none":
        return ToolCallFormat(None, "the server runs with --tool-call-parser none")
    if setting != "auto":
        return ToolCallFormat(PARSERS[setting], f"{setting} calls, as --tool-call-parser names")
    parser = parser_for_template(template)
    if parser is not None:
        return ToolCallFormat(parser, f"{parser.name} calls, as the chat template declares")
    if template_declares_tools(template):
        return ToolCallFormat(None, "its chat template declares tools in a call format this server has no "
                                    "parser for (it reads hermes <tool_call> and llama3_json calls; "
                                    "--tool-call-parser names one)")
    return ToolCallFormat(None, "its chat template declares no tools, so it was never taught a call format")


def parser_for_template(template: str) -> CallParser | None:
    """The parser of the call format this chat template teaches, or None (no tools declared, or a
    format not parsed here, such as Mistral's ``[TOOL_CALLS]``)."""
    if not template_declares_tools(template):
        return None
    if "<tool_call>" in template:
        return PARSERS["hermes"]
    if "<|python_tag|>" in template or '"parameters"' in template:
        return PARSERS["llama3_json"]
    return None
