"""The engine requests behind one HTTP request (several prompts, n choices), routed together.

The first choice is routed by its budget; the others are served at the exit it got, so one HTTP
request reports one exit. Errors while queueing become OpenAI errors; closing the group (a client
that went away) aborts every choice still running.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from balcony_runtime.engine import LLMEngine
from balcony_runtime.request_output import CompletedRequest, RequestOutput
from balcony_runtime.errors import InvalidGrammar, RequestError
from balcony_runtime.routing.router import BudgetUnmeetable, RouteDecision
from balcony_runtime.sampling_params import SamplingParams
from server.async_engine import AsyncEngine, Draining, EngineFailed, GroupEntry, QueueFull, Submission
from server.errors import APIError
from server.routing_headers import exit_name


@dataclass
class ChoiceSpec:
    prompt_ids: list[int]
    params: SamplingParams
    prompt_index: int  # which of the request's prompts this choice continues


@dataclass(kw_only=True)
class ChoiceResult(CompletedRequest):
    """One choice's whole output, accumulated as the engine's outputs arrive."""

    index: int  # the choice's index in the response
    spec: ChoiceSpec


class GenerationGroup:
    def __init__(self, engine: AsyncEngine, specs: list[ChoiceSpec], budget_ms: float | None,
                 forced_exit: int | None, received: float):
        self.engine = engine
        self.specs = specs
        self.budget_ms = budget_ms
        self.forced_exit = forced_exit
        self.received = received
        self.id = uuid.uuid4().hex[:24]
        self.request_ids: list[str] = []
        self.submissions: list[Submission] = []
        self.decision: RouteDecision | None = None

    async def submit(self) -> RouteDecision:
        """Queue every choice; on any error, the choices already queued are aborted."""
        entries, first_of_prompt = [], {}
        for i, spec in enumerate(self.specs):
            rid = f"{self.id}-{i}"
            # The other choices of a prompt read its blocks from the prefix cache once the first
            # choice has computed them: the prompt is prefilled once.
            leader = first_of_prompt.setdefault(spec.prompt_index, rid)
            entries.append(GroupEntry(rid, spec.prompt_ids, spec.params, leader if leader != rid else None))
        try:
            # Every choice carries the budget (each is judged hit or miss); only the first routes.
            self.submissions = await self.engine.submit_group(entries, self.budget_ms, self.forced_exit,
                                                              self.received)
        except BaseException as exc:
            raise _as_api_error(exc) from exc
        self.request_ids = [s.request_id for s in self.submissions]
        self.decision = self.submissions[0].decision
        return self.decision

    @property
    def exit_label(self) -> str:
        return exit_name(self.decision.exit_layer, self.engine.engine.model.full_depth)

    def balcony_info(self, measured_ms: float | None) -> dict:
        d = self.decision
        return {
            "exit": self.exit_label,
            "exit_layers": d.exit_layer,
            "budget_ms": d.budget_ms,
            "predicted_ms": round(d.predicted_ms, 1),
            "predicted_fit": d.predicted_fit,
            "measured_ms": None if measured_ms is None else round(measured_ms, 1),
            "forced": d.forced,
        }

    def measured_ms(self) -> float:
        return 1000 * (time.monotonic() - self.received)

    async def batches(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        """Every choice's outputs as they come, tagged with the choice index, in lists of those
        ready together (AsyncEngine.stream): a streaming response sends each list in one write."""
        if len(self.submissions) == 1:
            # One choice (most requests): its stream read directly, without a task and a second
            # queue in between, which every token of every stream would cross.
            try:
                async for batch in self.engine.stream(self.submissions[0]):
                    yield [(0, out) for out in batch]
            except Exception as exc:
                raise _as_api_error(exc)
            finally:
                self._abort_unfinished()
            return
        merged: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int, submission: Submission) -> None:
            try:
                async for batch in self.engine.stream(submission):
                    await merged.put([(index, out) for out in batch])
            except Exception as exc:
                await merged.put(exc)
            finally:
                await merged.put(done)

        tasks = [asyncio.create_task(pump(i, sub)) for i, sub in enumerate(self.submissions)]
        remaining = len(tasks)
        try:
            while remaining:
                ready = [await merged.get()]
                while not merged.empty():
                    ready.append(merged.get_nowait())
                batch = []
                for item in ready:
                    if item is done:
                        remaining -= 1
                    elif isinstance(item, Exception):
                        if batch:
                            yield batch  # what came before the error is still sent
                        raise _as_api_error(item)
                    else:
                        batch += item
                if batch:
                    yield batch
        finally:
            for task in tasks:
                task.cancel()
            self._abort_unfinished()

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every choice's outputs as they come, one at a time, tagged with the choice index."""
        async for batch in self.batches():
            for item in batch:
                yield item

    def _abort_unfinished(self) -> None:
        """The reader has stopped: abort the group's requests still running (a no-op for finished ones)."""
        for rid in self.request_ids:
            self.engine.abort(rid)

    async def collect(self) -> list[ChoiceResult]:
        results = [ChoiceResult(request_id=rid, index=i, spec=spec)
                   for i, (rid, spec) in enumerate(zip(self.request_ids, self.specs))]
        async for index, out in self.events():
            results[index].absorb(out)
        return results


async def compile_grammars(engine: LLMEngine, specs: list[ChoiceSpec], param: str) -> None:
    """Compile each distinct grammar of these choices in a worker thread before they are queued:
    an invalid schema becomes a 400 naming ``param``, and the engine's step loop, which serves every
    other request, only copies the compiled grammar."""
    for constraint in {s.params.structured for s in specs if s.params.structured is not None}:
        try:
            await asyncio.to_thread(engine.grammars.matcher, constraint)
        except InvalidGrammar as exc:
            raise APIError(400, f"{param}: {exc}", param=param) from exc


def usage(results: list[ChoiceResult]) -> dict:
    """OpenAI's token counts, so far while streaming: each prompt once (its choices share it) and
    every choice's generated tokens; cached_tokens: prompt tokens the prefix cache served, counted
    on each prompt's first choice (the others read that choice's blocks)."""
    first: dict[int, ChoiceResult] = {}
    for r in results:
        first.setdefault(r.spec.prompt_index, r)
    prompt = sum(len(r.spec.prompt_ids) for r in first.values())
    cached = sum(r.num_cached_tokens for r in first.values())
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _as_api_error(exc: BaseException) -> BaseException:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError(429, f"server busy: {exc}; retry later", "rate_limit_error",
                        code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, BudgetUnmeetable):
        return APIError(429, str(exc), "rate_limit_error", param="X-Latency-Budget-Ms",
                        code="budget_unmeetable",
                        headers={"Retry-After": str(max(1, round(exc.retry_after_s)))})
    if isinstance(exc, Draining):
        return APIError(503, "the server is shutting down", "unavailable_error", code="draining")
    if isinstance(exc, EngineFailed):
        return APIError(500, str(exc), "internal_error")
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), "invalid_request_error")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), "invalid_request_error")
    return exc
