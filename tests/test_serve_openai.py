"""The official `openai` Python SDK against the server: models, chat (plain and streamed), completions."""

from __future__ import annotations

import pytest

from test_serve import make_adapter, start_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def sdk(tiny_model_dir, tmp_path_factory):
    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "a", seed=1)
    with start_server(tiny_model_dir, {"tuned": adapter}, api_key="k") as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)


def test_models_list(sdk):
    assert [m.id for m in sdk.models.list()] == ["base", "tuned"]


def test_chat_plain_and_streamed_agree(sdk):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hello"}]
    plain = sdk.chat.completions.create(model="tuned", messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 6
    stream = sdk.chat.completions.create(model="tuned", messages=messages, max_tokens=6, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6


def test_completions(sdk):
    result = sdk.completions.create(model="base", prompt="say hello", max_tokens=4)
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 4


def test_sdk_errors(sdk):
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], n=3)
