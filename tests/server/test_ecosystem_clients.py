"""The clients people use, on their default code paths, against a live server: langchain-openai
(invoke, stream, batch, ``with_structured_output`` in both its modes at every exit) and litellm."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

MODEL = "smollm2-135m"
EXITS = ("8", "15", "22", "full")


class City(BaseModel):
    """A city and its country."""

    name: str = Field(max_length=12, description="the city")
    country: str = Field(max_length=12, description="its country")


def chat(server, exit_name: str | None = None, **kwargs):
    from langchain_openai import ChatOpenAI

    headers = {"X-Balcony-Exit": exit_name} if exit_name else None
    return ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0,
                      max_retries=0, default_headers=headers, **kwargs)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize("exit_name", EXITS)
def test_langchain_structured_output_is_a_validated_object_at_every_exit(default_server, method, exit_name):
    structured = chat(default_server, exit_name, max_tokens=48).with_structured_output(City, method=method)
    city = structured.invoke("Name a city in France.")
    assert isinstance(city, City)  # langchain parsed and validated it against the schema


def test_langchain_invoke_stream_and_batch_agree(default_server):
    model = chat(default_server, max_tokens=8)
    whole = model.invoke("Say hello.").content
    streamed = "".join(chunk.content for chunk in model.stream("Say hello."))
    batched = [m.content for m in model.batch(["Say hello.", "Say hello."])]
    assert whole and streamed == whole and batched == [whole, whole]


def test_litellm_completion_and_stream(default_server):
    import litellm

    args = dict(model=f"openai/{MODEL}", api_base=default_server.url + "/v1", api_key="unused",
                messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    whole = litellm.completion(**args)
    text = whole.choices[0].message.content
    assert text and whole.usage.completion_tokens == 8
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(stream=True, **args))
    assert streamed == text
