"""How one request wants its tokens chosen and when it wants to stop."""

from __future__ import annotations

from dataclasses import dataclass, field

from balcony_runtime.structured.constraint import StructuredOutput

MAX_TOP_LOGPROBS = 20  # OpenAI's cap on top-n logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. Invalid values raise ValueError at construction."""

    max_tokens: int = 16  # most tokens to generate; 0 is allowed (prompt logprobs only)
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 disables
    seed: int | None = None  # makes this request's sampling reproducible whatever the batch
    presence_penalty: float = 0.0  # OpenAI semantics, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI semantics, in [-2, 2]
    stop: tuple[str, ...] = ()  # stop strings; the matched string is not returned
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end generation (returned)
    ignore_eos: bool = False  # keep generating past the tokenizer's end-of-sequence token
    logprobs: int | None = None  # None: no logprobs; n: chosen token's logprob plus top-n
    prompt_logprobs: int | None = None  # None: none; n: each prompt token's logprob plus top-n
    # (token id, bias) pairs added to the logits after penalties, before sampling (OpenAI's
    # logit_bias): -100 in effect bans a token, +100 in effect forces it.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # The output must be JSON valid under this schema (structured/): sampling keeps only the tokens
    # the grammar allows, and the request stops ("stop") once the JSON is complete.
    structured: StructuredOutput | None = None
    extra: dict = field(default_factory=dict, compare=False)  # free-form, ignored by the runtime

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {value}")
        bias = tuple((int(token), float(value)) for token, value in dict(self.logit_bias).items())
        for token, value in bias:
            if token < 0:
                raise ValueError(f"logit_bias token ids must be non-negative, got {token}")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {token}")
        object.__setattr__(self, "logit_bias", bias)
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured must be a StructuredOutput, got {type(self.structured).__name__}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0
