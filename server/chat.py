"""POST /v1/chat/completions: the tokenizer's chat template, streaming, logprobs, structured
outputs and tool calls (server/tool_calls.py)."""

from __future__ import annotations

import json
import math
import time
from typing import AsyncIterator

from jinja2 import TemplateError

from balcony_runtime.sampler import TokenLogprobs
from server import sse
from server.completions import sampling_params
from server.errors import APIError
from server.generation_group import ChoiceResult, ChoiceSpec, GenerationGroup, usage
from server.protocol import ChatCompletionRequest, ChatMessage
from server.tool_calls import ParsedCallStream, ToolCallStream, finished_message, parsed_message, tool_calling
from server.tool_parsers import CallParser, ToolCallFormat


def template_message(m: ChatMessage) -> dict:
    """One message as transformers' chat templates take it: tool calls and tool results pass
    through, for templates that render them (the others show only role and content)."""
    message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": c.type,
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in m.tool_calls]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    return message


def _arguments(text: str):
    # transformers' templates expect arguments as a mapping (they render it with tojson), while
    # OpenAI sends the model's JSON text; text that is not a JSON object passes through as is.
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def chat_prompt_ids(body: ChatCompletionRequest, tokenizer) -> list[int]:
    messages = [template_message(m) for m in body.messages]
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "this model has no chat template; use /v1/completions")
    # Templates that render tools show them to the model whatever tool_choice says; others ignore them.
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # templates raise to refuse a conversation (say, roles out of order)
        raise APIError(400, f"the model's chat template refused these messages: {exc}", param="messages") from exc
    return tokenizer.encode(text, add_special_tokens=False)


def build_specs(body: ChatCompletionRequest, tokenizer, max_model_len: int, model_name: str,
                tool_format: ToolCallFormat) -> list[ChoiceSpec]:
    """``tool_format``: the call format tool_choice "auto" needs (app.py picks it at load)."""
    if body.effective_tool_choice == "auto" and tool_format.parser is None:
        # The model would have to choose between text and a call in a format its template taught it.
        raise APIError(400, f"tool_choice 'auto' (the default with tools) is not supported for {model_name}: "
                            f"{tool_format.note}; "
                            "send tool_choice 'required' or {'type': 'function', 'function': {'name': ...}} to "
                            "have a call decoded under the tools' schemas, or 'none'", param="tool_choice")
    ids = chat_prompt_ids(body, tokenizer)
    limit = body.output_limit
    max_tokens = limit if limit is not None else max(0, max_model_len - len(ids))
    top = (body.top_logprobs or 0) if body.logprobs else None
    calling = tool_calling(body)
    # A forced tool call's grammar takes the place of response_format (that shapes text replies);
    # with "auto" the text is free, or under response_format if given (then it is not parsed).
    structured = calling.constraint() if calling else (body.response_format and body.response_format.constraint())
    return [ChoiceSpec(ids, sampling_params(body, max_tokens, i, top, None, structured), 0) for i in range(body.n)]


def chat_logprobs(tokenizer, entries: list[TokenLogprobs]) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    # Tokens a grammar forbade have logprob -inf, which JSON cannot carry: they are left out.
    return {"content": [{**item(e.token_id, e.logprob),
                         "top_logprobs": [item(t, lp) for t, lp in e.top if math.isfinite(lp)]}
                        for e in entries]}


def auto_parser(body: ChatCompletionRequest, parser: CallParser | None) -> CallParser | None:
    """The parser that reads calls out of this request's text: tool_choice "auto" only, and not
    when response_format constrains the text (a reply shaped by it is the format's, not a call)."""
    if body.effective_tool_choice != "auto" or (body.response_format and body.response_format.constraint()):
        return None
    return parser


def max_calls(body: ChatCompletionRequest) -> int | None:
    return 1 if body.parallel_tool_calls is False else None


def choice_message(body: ChatCompletionRequest, r: ChoiceResult, parser: CallParser | None) -> tuple[dict, str | None]:
    """A finished choice's message and finish_reason: text, a forced call, or what "auto" parsed."""
    calling = tool_calling(body)
    if calling is not None:
        return finished_message(calling, r.text, r.finish_reason)
    if (auto := auto_parser(body, parser)) is not None:
        return parsed_message(auto, r.text, r.finish_reason, max_calls(body))
    return {"role": "assistant", "content": r.text}, r.finish_reason


async def chat_complete(body: ChatCompletionRequest, group: GenerationGroup, tokenizer, model_name: str,
                        parser: CallParser | None = None) -> dict:
    results = await group.collect()
    messages = [choice_message(body, r, parser) for r in results]
    return {
        "id": f"chatcmpl-{group.id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {"index": r.index, "message": message,
             "logprobs": chat_logprobs(tokenizer, r.logprobs) if body.logprobs else None,
             "finish_reason": finish_reason}
            for r, (message, finish_reason) in zip(results, messages)
        ],
        "usage": usage(results),
        "balcony": group.balcony_info(group.measured_ms()),
    }


async def stream_chat(body: ChatCompletionRequest, group: GenerationGroup, tokenizer,
                      model_name: str, parser: CallParser | None = None) -> AsyncIterator[bytes]:
    created, cid = int(time.time()), f"chatcmpl-{group.id}"
    results = [ChoiceResult(request_id=rid, index=i, spec=spec)
               for i, (rid, spec) in enumerate(zip(group.request_ids, group.specs))]

    def payload(choices: list[dict], **extra) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name, "choices": choices,
                **extra}

    def chunk(choices: list[dict], **extra) -> bytes:
        if body.continuous_usage:
            extra.setdefault("usage", usage(results))
        return sse.event(payload(choices, **extra))

    # Most events are one token's text and nothing else: those are spliced into a template.
    plain = sse.text_events(lambda index, text: payload([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]))

    calling, auto = tool_calling(body), auto_parser(body, parser)
    if calling is not None:
        streams = [ToolCallStream(calling) for _ in results]
    elif auto is not None:
        streams = [ParsedCallStream(auto, max_calls(body)) for _ in results]
    else:
        streams = None
    # The role first, one chunk per choice, the first carrying the routing decision; a named tool
    # call is known at once, so its first delta rides along.
    for i in range(len(results)):
        extra = {"balcony": group.balcony_info(None)} if i == 0 else {}
        delta = {"role": "assistant", "content": None if calling else ""}
        for head in streams[i].deltas("", None) if streams else ():
            delta.update(head)
        yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}], **extra)
    async for batch in group.batches():
        events = []  # the batch's events, sent in one write
        for index, out in batch:
            results[index].absorb(out)
            if not (out.new_text or out.finished or out.new_token_ids):
                continue
            logprobs = chat_logprobs(tokenizer, out.new_logprobs) if body.logprobs and out.new_logprobs else None
            reason = out.finish_reason if out.finished else None
            if (plain is not None and streams is None and out.new_text and logprobs is None and reason is None
                    and not body.continuous_usage):
                events.append(plain(index, out.new_text))
                continue
            if streams is None:
                deltas = [{"content": out.new_text} if out.new_text else {}]
            else:  # one content piece or one tool_calls entry per chunk, as OpenAI sends them
                deltas = streams[index].deltas(results[index].text, reason) or [{}]
                reason = streams[index].finish_reason(reason)
            for k, delta in enumerate(deltas):
                last = k == len(deltas) - 1
                events.append(chunk([{"index": index, "delta": delta, "logprobs": logprobs if last else None,
                                      "finish_reason": reason if last else None}]))
        if events:
            yield b"".join(events)
    if body.include_usage:
        yield chunk([], usage=usage(results), balcony=group.balcony_info(group.measured_ms()))
    yield sse.DONE
