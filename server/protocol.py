"""OpenAI request and response schemas (pydantic: the HTTP edge only).

Fields OpenAI defines that this server does not implement are refused with a 400 rather than
silently ignored; unknown fields are refused too (``extra="forbid"``). The exceptions are hints and
bookkeeping that change no output (``store``, ``metadata``, ``service_tier``...): real clients send
them on every request, so they are accepted and ignored.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from balcony_runtime.sampling_params import MAX_TOP_LOGPROBS
from balcony_runtime.structured.constraint import StructuredOutput

# OpenAI's rule for function and response-format names.
_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class _RequestPart(BaseModel):
    """Every model of a request body: unknown fields are refused, and null means left out."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_left_out(cls, data):
        # OpenAI's API takes null for every optional field and reads it as the default (clients
        # built from its spec send it): a null in a field whose default is not null is dropped, so
        # the field counts as left out (and --override-generation-config's value applies to it).
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or k not in fields or fields[k].is_required() or fields[k].default is None}


class StreamOptions(_RequestPart):
    include_usage: bool = False  # a final usage-only chunk
    # vLLM's: every chunk also carries the usage so far; as in vLLM, only together with include_usage.
    continuous_usage_stats: Optional[bool] = False
    # OpenAI's: pads chunks against length side channels; a hint, ignored here.
    include_obfuscation: Optional[bool] = None


class JsonSchemaFormat(_RequestPart):
    model_config = ConfigDict(populate_by_name=True)  # merged with _RequestPart's (extra="forbid")
    name: str = Field(pattern=_NAME_PATTERN)
    description: Optional[str] = None
    # "schema" would shadow a BaseModel attribute; absent, any JSON object will do (as OpenAI's
    # reference allows omitting it).
    schema_: Optional[Union[dict, bool]] = Field(None, alias="schema")
    # Strict or not, the schema is enforced: constrained decoding costs the same either way.
    strict: Optional[bool] = None


class ResponseFormat(_RequestPart):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _check_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and allowed only there")
        return self

    def constraint(self) -> Optional[StructuredOutput]:
        if self.type == "json_object" or (self.type == "json_schema" and self.json_schema.schema_ is None):
            return StructuredOutput.json_object()
        if self.type == "json_schema":
            return StructuredOutput.of_schema(self.json_schema.schema_)
        return None


class _Common(_RequestPart):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="extension: keep the k most likely tokens (0/-1: all)")
    n: int = Field(1, ge=1, le=16)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: Optional[str] = None
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence")
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=1024)
    # Structured outputs (json_object, json_schema) by constrained decoding; vLLM takes it on
    # completions too.
    response_format: Optional[ResponseFormat] = None

    @model_validator(mode="after")
    def _check_common(self):
        # Keys must parse as ids here; values and id ranges are SamplingParams' and the engine's checks.
        for token in self.logit_bias or {}:
            if not token.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be at most 4 non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def grammar_param(self) -> str:
        """The field an invalid grammar is blamed on."""
        return "response_format"


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    # Defined by OpenAI, not implemented here: refused when set.
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @model_validator(mode="after")
    def _check_unsupported(self):
        for name in ("suffix", "best_of"):
            value = getattr(self, name)
            if value is not None and not (name == "best_of" and value == 1):
                raise ValueError(f"'{name}' is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.stream and self.echo and self.max_tokens == 0:
            raise ValueError("echo with max_tokens 0 is not supported when streaming")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        """The batch of prompts: a string, a list of strings, token ids, or a list of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class FunctionDefinition(_RequestPart):
    name: str = Field(pattern=_NAME_PATTERN)
    description: Optional[str] = None
    parameters: Optional[dict] = None  # a JSON schema; absent: the function takes no arguments
    strict: Optional[bool] = None  # arguments always follow the schema here, strict or not


class Tool(_RequestPart):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_RequestPart):
    name: str


class NamedToolChoice(_RequestPart):
    type: Literal["function"]
    function: NamedFunction


class ToolCallFunction(_RequestPart):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_RequestPart):
    """A tool call an earlier assistant turn made, sent back as history."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


# Fields only an assistant message may carry. The openai SDK's ``message.model_dump()`` sends them
# all, mostly as null, so a reply appended to the history comes back with them.
_ASSISTANT_ONLY = ("tool_calls", "refusal", "annotations", "audio", "function_call")


class ChatMessage(_RequestPart):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Optional[Union[str, list[dict]]] = None  # null only on assistant messages
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    refusal: Optional[str] = None
    annotations: Optional[list[dict]] = None  # citations on an earlier reply: nothing to render
    audio: Optional[dict] = None  # a reference to an earlier audio reply: refused when set
    function_call: Optional[dict] = None  # tool_calls' deprecated predecessor: refused when set
    tool_call_id: Optional[str] = None  # tool messages: the call this message answers

    @model_validator(mode="after")
    def _check_role_fields(self):
        if self.role != "assistant":
            for name in _ASSISTANT_ONLY:
                if getattr(self, name) is not None:
                    raise ValueError(f"'{name}' is only allowed on assistant messages")
            if self.content is None:
                raise ValueError(f"{self.role} messages need content")
        if self.audio is not None:
            raise ValueError("'audio' is not supported by this server")
        if self.function_call is not None:
            raise ValueError("'function_call' is not supported by this server; send tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("'tool_call_id' is required on tool messages and allowed only there")
        return self

    def text(self) -> str:
        """The text the chat template renders. Null content (an assistant turn that only called
        tools, or declined) renders as empty, as in vLLM, or as the refusal when there is one."""
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            kind = "refusal" if part.get("type") == "refusal" and self.role == "assistant" else "text"
            if part.get("type") != kind or not isinstance(part.get(kind), str):
                raise ValueError("only text content parts are supported")
            parts.append(part[kind])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Tool]] = Field(None, max_length=128)
    # None means "auto" with tools, as in OpenAI; see server/tool_calls.py for what each choice does.
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None  # false: an "auto" reply keeps its first call (a forced one makes one)
    # Hints and bookkeeping that change no output here: accepted and ignored.
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None

    @model_validator(mode="after")
    def _check_unsupported(self):
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice is only allowed when tools are specified")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names the function {self.tool_choice.function.name!r}, "
                             f"which is not among the tools ({', '.join(names)})")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        for m in self.messages:
            m.text()
        return self

    @property
    def effective_tool_choice(self) -> Union[str, NamedToolChoice, None]:
        """None without tools; OpenAI's default with tools is "auto"."""
        if not self.tools:
            return None
        return self.tool_choice if self.tool_choice is not None else "auto"

    @property
    def grammar_param(self) -> str:
        return "response_format" if self.effective_tool_choice in (None, "none") else "tools"

    @property
    def output_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody
