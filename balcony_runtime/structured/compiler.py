"""JSON schema -> llguidance matcher, compiled once per schema and copied for each request.

A matcher's grammar (its lexer and parser tables) is built from the schema once, kept in a small
LRU cache in its pristine state, and every request gets a ``deep_copy`` of it (about a microsecond;
building costs a millisecond for a small schema, far more for a large one). The server compiles a
request's schema in a worker thread before queueing it, which both answers an invalid schema with a
400 and keeps the build off the engine's step loop; the engine's copy is then a cache hit.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf

from balcony_runtime.errors import InvalidGrammar
from balcony_runtime.structured.constraint import StructuredOutput
from balcony_runtime.structured.request_grammar import RequestGrammar

# No free whitespace between JSON tokens: a grammar that lets whitespace repeat lets a weak exit
# spend all of max_tokens on newlines and never close the object. Every token then advances the JSON.
_JSON_OPTIONS = {"whitespace_flexible": False}


NUMBER_STEP = 1e-6  # numbers are written with at most this many decimals unless the schema says otherwise
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema):
    """The schema as decoded: every output still validates against the original, but the grammar
    ends where a weak exit would otherwise ramble until max_tokens cuts the JSON.

    ``additionalProperties: false`` on every object that lists its properties and says nothing about
    others (as xgrammar's strict mode, vLLM's default, does; a schema that sets it keeps its choice),
    and numbers written with at most six decimals (``multipleOf``) unless the schema gives a step."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: ({name: closed_objects(sub) for name, sub in value.items()}  # name -> schema maps
                 if key in _SCHEMA_MAPS and isinstance(value, dict) else closed_objects(value))
           for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    types = out.get("type")
    if (types == "number" or (isinstance(types, list) and "number" in types)) and "multipleOf" not in out:
        # A number's fraction has no length limit either: a weak exit that likes digits writes
        # "10.0000000..." until max_tokens. Six decimals bound it (and any such value is valid).
        out["multipleOf"] = NUMBER_STEP
    return out


class GrammarCompiler:
    """Thread-safe: the server compiles in worker threads while the step loop takes copies."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 64):
        self._hf_tokenizer = tokenizer  # a fast Hugging Face tokenizer
        self._vocab_size = vocab_size  # the model's logits width, which the masks must cover
        self._cache_size = cache_size  # pristine matchers kept, least recently used dropped first
        self._cache: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary (its token trie), built on first use: about 1.5 s for
        a 49k vocabulary, paid only by servers that see a structured request."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self._vocab_size)
            return self._tokenizer

    def has(self, constraint: StructuredOutput) -> bool:
        """Whether this schema's matcher is compiled and cached (new_state will not compile)."""
        with self._lock:
            return constraint in self._cache

    def matcher(self, constraint: StructuredOutput) -> llguidance.LLMatcher:
        """The pristine matcher of this schema (never advance it: copy it); raises InvalidGrammar."""
        with self._lock:
            cached = self._cache.get(constraint)
            if cached is not None:
                self._cache.move_to_end(constraint)
                return cached
        matcher = self._compile(constraint)  # outside the lock: a large schema takes a while
        with self._lock:
            self._cache[constraint] = matcher
            self._cache.move_to_end(constraint)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def new_state(self, constraint: StructuredOutput) -> RequestGrammar:
        """A request's own matcher, at the start of the grammar."""
        return RequestGrammar(self.matcher(constraint).deep_copy())

    def _compile(self, constraint: StructuredOutput) -> llguidance.LLMatcher:
        try:
            schema = json.dumps(closed_objects(json.loads(constraint.json_schema)))
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidGrammar(f"invalid JSON schema: {exc}") from exc
        # Building never raises for a bad grammar: the matcher starts in an error state instead.
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidGrammar(f"invalid JSON schema: {matcher.get_error()}")
        return matcher
