"""POST /v1/completions: OpenAI's legacy completions, with echo and logprobs for scoring."""

from __future__ import annotations

import math
import time
from typing import AsyncIterator

from balcony_runtime.sampler import TokenLogprobs
from balcony_runtime.sampling_params import SamplingParams
from balcony_runtime.structured.constraint import StructuredOutput
from server import sse
from server.errors import APIError
from server.generation_group import ChoiceResult, ChoiceSpec, GenerationGroup, usage
from server.protocol import CompletionRequest


def sampling_params(body, max_tokens: int, seed_offset: int, logprobs: int | None,
                    prompt_logprobs: int | None, structured: StructuredOutput | None) -> SamplingParams:
    """One choice's sampling settings; choice i of n uses seed + i so the n choices differ.
    ``structured``: the grammar its output must follow (response_format, or a forced tool call)."""
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            seed=None if body.seed is None else body.seed + seed_offset,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            stop=body.stop_list, ignore_eos=body.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=tuple((int(token), value) for token, value in (body.logit_bias or {}).items()),
            structured=structured,
        )
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


def build_specs(body: CompletionRequest, tokenize) -> list[ChoiceSpec]:
    specs = []
    want_prompt_logprobs = body.echo and body.logprobs is not None
    structured = body.response_format.constraint() if body.response_format else None
    for p_index, prompt in enumerate(body.prompts()):
        ids = tokenize(prompt)
        for i in range(body.n):
            params = sampling_params(body, body.max_tokens if body.max_tokens is not None else 16, i,
                                     body.logprobs, body.logprobs if want_prompt_logprobs else None, structured)
            specs.append(ChoiceSpec(ids, params, p_index))
    return specs


def legacy_logprobs(tokenizer, entries: list[TokenLogprobs | None], start_offset: int = 0) -> dict:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = start_offset
    for entry in entries:
        if entry is None:  # the first prompt token has no logprob
            continue
        text = tokenizer.decode([entry.token_id])
        tokens.append(text)
        token_lps.append(entry.logprob)
        # Tokens a grammar forbade have logprob -inf, which JSON cannot carry: left out.
        tops.append({tokenizer.decode([t]): lp for t, lp in entry.top if math.isfinite(lp)} if entry.top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def choice_logprobs(tokenizer, body: CompletionRequest, choice: ChoiceResult) -> dict | None:
    if body.logprobs is None:
        return None
    entries: list[TokenLogprobs | None] = list(choice.logprobs)
    if body.echo:
        first = choice.spec.prompt_ids[0]
        head = legacy_logprobs(tokenizer, choice.prompt_logprobs or [])
        head = {  # the first prompt token: present with a null logprob, as OpenAI does
            "tokens": [tokenizer.decode([first])] + head["tokens"],
            "token_logprobs": [None] + head["token_logprobs"],
            "top_logprobs": [None] + head["top_logprobs"],
            "text_offset": [],
        }
        body_part = legacy_logprobs(tokenizer, entries)
        merged = {k: head[k] + body_part[k] for k in ("tokens", "token_logprobs", "top_logprobs")}
        offsets, offset = [], 0
        for t in merged["tokens"]:
            offsets.append(offset)
            offset += len(t)
        merged["text_offset"] = offsets
        return merged
    return legacy_logprobs(tokenizer, entries)


async def complete(body: CompletionRequest, group: GenerationGroup, tokenizer, model_name: str) -> dict:
    results = await group.collect()
    choices = []
    for r in results:
        text = r.text
        if body.echo:
            text = tokenizer.decode(r.spec.prompt_ids) + text
        choices.append({"index": r.index, "text": text, "logprobs": choice_logprobs(tokenizer, body, r),
                        "finish_reason": r.finish_reason})
    return {
        "id": f"cmpl-{group.id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": usage(results),
        "balcony": group.balcony_info(group.measured_ms()),
    }


async def stream_completion(body: CompletionRequest, group: GenerationGroup, tokenizer,
                            model_name: str) -> AsyncIterator[bytes]:
    created, cid = int(time.time()), f"cmpl-{group.id}"
    results = [ChoiceResult(request_id=rid, index=i, spec=spec)
               for i, (rid, spec) in enumerate(zip(group.request_ids, group.specs))]
    first = True

    def payload(choices: list[dict], **extra) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": model_name, "choices": choices,
                **extra}

    def chunk(choices: list[dict], **extra) -> bytes:
        if body.continuous_usage:
            extra.setdefault("usage", usage(results))
        return sse.event(payload(choices, **extra))

    # Most events are one token's text and nothing else: those are spliced into a template.
    plain = sse.text_events(lambda index, text: payload([{"index": index, "text": text, "logprobs": None, "finish_reason": None}]))

    if body.echo:
        echoed = [{"index": i, "text": tokenizer.decode(s.prompt_ids), "logprobs": None, "finish_reason": None}
                  for i, s in enumerate(group.specs)]
        yield chunk(echoed, balcony=group.balcony_info(None))
        first = False
    async for batch in group.batches():
        events = []  # the batch's events, sent in one write
        for index, out in batch:
            r = results[index]
            r.absorb(out)
            if not (out.new_text or out.finished or out.new_token_ids):
                continue
            logprobs = None
            if body.logprobs is not None and out.new_logprobs:
                logprobs = legacy_logprobs(tokenizer, out.new_logprobs, start_offset=r.text_length - len(out.new_text))
            if plain is not None and logprobs is None and not (first or out.finished or body.continuous_usage):
                events.append(plain(index, out.new_text))
                continue
            choice = {"index": index, "text": out.new_text, "logprobs": logprobs,
                      "finish_reason": out.finish_reason if out.finished else None}
            if first:
                events.append(chunk([choice], balcony=group.balcony_info(None)))
                first = False
            else:
                events.append(chunk([choice]))
        if events:
            yield b"".join(events)
    if body.include_usage:
        yield chunk([], usage=usage(results), balcony=group.balcony_info(group.measured_ms()))
    yield sse.DONE
