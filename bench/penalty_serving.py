"""96 streamed chat requests, 32 in flight, a quarter at each exit (X-Balcony-Exit), against a
running `balcony serve`: tokens/s and empty answers. Run once against a server started plainly and
once with `--override-generation-config '{"frequency_penalty": 0.5}'` to see what a penalty on
every row costs the server (docs/benchmarks.md "Penalties").

    python bench/penalty_serving.py http://127.0.0.1:8000
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx

EXITS = ("8", "15", "22", "full")
REQUESTS, IN_FLIGHT, MAX_TOKENS = 96, 32, 64


async def ask(client: httpx.AsyncClient, url: str, i: int) -> tuple[int, str]:
    """(completion tokens, text) of request i, streamed."""
    body = {"model": "smollm2-135m", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Tell me something about the number {i}."}]}
    tokens, text = 0, ""
    async with client.stream("POST", url + "/v1/chat/completions", json=body,
                             headers={"X-Balcony-Exit": EXITS[i % len(EXITS)]}) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"request {i}: HTTP {reply.status_code}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            text += "".join(choice["delta"].get("content") or "" for choice in chunk["choices"])
    return tokens, text


async def main(url: str) -> None:
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def limited(client: httpx.AsyncClient, i: int) -> tuple[int, str]:
        async with slots:
            return await ask(client, url, i)

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(*(limited(client, i) for i in range(REQUESTS)))
        seconds = time.perf_counter() - start
    tokens = sum(t for t, _ in answers)
    empty = sum(1 for _, text in answers if not text.strip())
    print(f"{len(answers)} requests, {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tokens/s; "
          f"{empty} empty answers")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
