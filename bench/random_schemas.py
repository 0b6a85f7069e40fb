"""Random small JSON schemas through `response_format` (json_schema, strict) at random exits: every
reply must parse and validate. Against a running server:

    python bench/random_schemas.py --url http://127.0.0.1:8000 --requests 100 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys

import jsonschema
import openai

LEAVES = [
    lambda r: {"type": "integer", "minimum": 0, "maximum": r.choice([9, 99, 999])},
    lambda r: {"type": "string", "maxLength": r.choice([4, 8, 16])},
    lambda r: {"type": "boolean"},
    lambda r: {"enum": r.sample(["red", "green", "blue", "small", "large", "yes", "no"], 3)},
    lambda r: {"type": "number", "minimum": -10, "maximum": 10},
]
NAMES = ["name", "age", "city", "color", "size", "count", "ok", "score", "tag", "level"]


def random_schema(r: random.Random, depth: int = 0) -> dict:
    keys = r.sample(NAMES, r.randint(1, 3))
    props = {}
    for key in keys:
        roll = r.random()
        if depth < 1 and roll < 0.2:
            props[key] = random_schema(r, depth + 1)
        elif roll < 0.35:
            props[key] = {"type": "array", "items": r.choice(LEAVES)(r), "maxItems": 3}
        else:
            props[key] = r.choice(LEAVES)(r)
    return {"type": "object", "properties": props, "required": keys, "additionalProperties": False}


async def one(client, r: random.Random, i: int, exits: list[str]) -> tuple[bool, str]:
    schema, exit_name = random_schema(r), r.choice(exits)
    reply = await client.chat.completions.create(
        model=client.model_name, messages=[{"role": "user", "content": "Describe something as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}},
        max_tokens=200, temperature=0.7, seed=i, extra_headers={"X-Balcony-Exit": exit_name})
    text = reply.choices[0].message.content
    try:
        jsonschema.validate(json.loads(text), schema)
        return True, exit_name
    except (ValueError, jsonschema.ValidationError) as exc:
        return False, f"exit {exit_name} finish {reply.choices[0].finish_reason}: {exc!s:.200} in {text!r:.200}"


async def main_async(args) -> int:
    client = openai.AsyncOpenAI(base_url=args.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    client.model_name = (await client.models.list()).data[0].id
    exits = args.exits.split(",")
    r = random.Random(args.seed)
    rngs = [random.Random(r.random()) for _ in range(args.requests)]
    gate = asyncio.Semaphore(args.concurrency)

    async def bounded(i):
        async with gate:
            return await one(client, rngs[i], i, exits)

    results = await asyncio.gather(*(bounded(i) for i in range(args.requests)))
    ok = sum(1 for good, _ in results if good)
    print(f"{ok}/{len(results)} replies parse and validate against their random schema "
          f"(exits {args.exits}, seed {args.seed})")
    for good, what in results:
        if not good:
            print("  FAIL", what)
    return 0 if ok == len(results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--exits", default="8,15,22,full")
    parser.add_argument("--seed", type=int, default=0)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
