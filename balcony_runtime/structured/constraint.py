"""What a request's output must match, as plain data carried on SamplingParams. No llguidance here."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class StructuredOutput:
    """The output must be JSON valid under this schema (and nothing else follows it).

    OpenAI's ``json_object`` is the schema ``{"type": "object"}``. The schema is kept as compact JSON
    text, the key under which its compiled grammar is cached. Keys are not sorted: llguidance writes
    an object's properties in the schema's order, so two orders are two grammars.
    """

    json_schema: str  # the JSON schema, as JSON text

    def __post_init__(self) -> None:
        try:
            schema = json.loads(self.json_schema)
        except ValueError as exc:
            raise ValueError(f"json_schema is not JSON: {exc}") from exc
        if not isinstance(schema, (dict, bool)):  # true / false are valid (trivial) schemas
            raise ValueError("a JSON schema must be an object")

    @classmethod
    def of_schema(cls, schema: dict | bool) -> "StructuredOutput":
        return cls(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def json_object(cls) -> "StructuredOutput":
        return cls.of_schema({"type": "object"})
