"""Structured outputs: sampling constrained to a JSON schema, per request, in mixed batches.

The grammar engine is llguidance (guidance-ai, Microsoft; https://github.com/guidance-ai/llguidance),
chosen over xgrammar because it computes each token mask on the fly from the grammar and a token
trie: a new schema costs about a millisecond to compile and nothing per vocabulary, where xgrammar
precompiles a per-vocabulary token cache for each grammar, which a server taking arbitrary user
schemas pays on the request's critical path. It is maintained, a single wheel with no Python
dependencies, and what vLLM (its default for JSON schema) and llama.cpp use, so schemas behave here as
they do there. Masks for a 49k vocabulary take about 0.1 ms per row and drop the GIL, so a step's
masks are filled in one batched call in a worker thread while the model runs (token_masks.py).

- constraint.py: what a request asks for (a JSON schema), plain data on SamplingParams.
- compiler.py: schema -> llguidance matcher, compiled once per schema (LRU) and copied per request.
- request_grammar.py: one request's place in its grammar, advanced by each sampled token.
- token_masks.py: the masks of a step's constrained rows, filled in one call and applied to logits.

Nothing is imported here, so SamplingParams can carry a constraint without loading llguidance.
"""
