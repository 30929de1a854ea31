"""The official `openai` Python SDK against the server: models, chat (plain and streamed), completions."""

from __future__ import annotations

import json

import pytest

from test_serve import make_adapter, start_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def sdk(tiny_model_dir, tmp_path_factory):
    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "a", seed=1)
    with start_server(tiny_model_dir, {"tuned": adapter}, api_key="k") as (url, engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        client._engine = engine  # for tests that hold the generation worker
        yield client


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



def test_a_stream_waiting_for_its_first_token_sends_keep_alive_comments(sdk, monkeypatch):
    """While a streamed request's prompt is read (slow steps here), SSE comment lines keep bytes flowing (a
    client's read timeout counts from the last byte); the SDK skips them and gets the same answer."""
    import threading
    import time

    import httpx

    from mlx_lora.serve import responses

    engine = sdk._engine
    messages = [{"role": "user", "content": "say hello"}]
    plain = sdk.chat.completions.create(model="tuned", messages=messages, max_tokens=6, temperature=0)
    monkeypatch.setattr(responses, "KEEPALIVE_S", 0.05)
    step = engine.scheduler.step

    def slow_step():  # a machine reading a long prompt: 0.3 s a step
        time.sleep(0.3)
        step()

    monkeypatch.setattr(engine.scheduler, "step", slow_step)
    lines, texts = [], []

    def raw():
        body = {"model": "tuned", "messages": messages, "max_tokens": 6, "temperature": 0, "stream": True}
        with httpx.stream("POST", str(sdk.base_url) + "chat/completions", json=body,
                          headers={"Authorization": "Bearer k"}, timeout=30) as response:
            lines.extend(line for line in response.iter_lines() if line)

    def with_sdk():
        stream = sdk.chat.completions.create(model="tuned", messages=messages, max_tokens=6, temperature=0,
                                             stream=True)
        texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))

    threads = [threading.Thread(target=raw), threading.Thread(target=with_sdk)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert texts == [plain.choices[0].message.content]
    assert lines[0].startswith("data: ") and lines[-1] == "data: [DONE]"
    assert lines[1] == ": keep-alive"  # after the role chunk, before any token
    assert "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines
                   if line.startswith("data: {")) == texts[0]

def test_one_model_is_retrieved_by_name(sdk):
    assert sdk.models.retrieve("base").id == "base"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve("nope")
    assert "base" in missing.value.message


def test_completions(sdk):
    result = sdk.completions.create(model="base", prompt="say hello", max_tokens=4)
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 4


def test_sdk_errors(sdk):
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], n=3)


def test_logprobs_through_the_sdk(sdk):
    messages = [{"role": "user", "content": "say hello"}]
    chat = sdk.chat.completions.create(model="tuned", messages=messages, max_tokens=5, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    # the tokens' bytes join back into the text (a token holding part of a character is named "bytes:\\xNN")
    joined = b"".join(bytes(c.bytes) for c in content).decode("utf-8", errors="replace")
    assert joined == chat.choices[0].message.content
    for entry in content:  # greedy: the chosen token is the most likely
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    text = sdk.completions.create(model="base", prompt="say hello", max_tokens=4, logprobs=3)
    assert len(text.choices[0].logprobs.token_logprobs) == 4 and len(text.choices[0].logprobs.top_logprobs[0]) <= 3


def test_prompt_cache_reports_cached_tokens(sdk):
    messages = [{"role": "system", "content": "You answer dates in ISO 8601. " * 4}, {"role": "user", "content": "today"}]
    first = sdk.chat.completions.create(model="tuned", messages=messages, max_tokens=4)
    second = sdk.chat.completions.create(model="tuned", messages=messages, max_tokens=4)
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    other = sdk.chat.completions.create(model="base", messages=messages, max_tokens=4)  # another adapter's KV is not reused
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_every_field_the_sdk_can_send_is_known():
    """Fields in the installed SDK's request types are never refused as unrecognized (at worst ignored, and named)."""
    from openai.types import completion_create_params as text
    from openai.types.chat import completion_create_params as chat

    from mlx_lora.serve.schemas import ChatCompletionRequest, CompletionRequest

    for params, request in ((chat.CompletionCreateParamsBase, ChatCompletionRequest),
                            (text.CompletionCreateParamsBase, CompletionRequest)):
        sent = set(params.__annotations__) | {"stream"}
        assert sent <= request.known_fields(), sorted(sent - request.known_fields())


def test_every_nested_field_the_sdk_can_send_is_known():
    """Inside messages, content parts, tools, tool calls, tool choice, response formats and stream
    options too, the SDK's request fields are known (acted on, or accepted and named)."""
    import typing

    import openai.types.chat as chat
    from openai.types.chat import chat_completion_message_function_tool_call_param as call
    from openai.types.chat import chat_completion_named_tool_choice_param as named
    from openai.types.shared_params import FunctionDefinition
    from openai.types.shared_params.response_format_json_schema import JSONSchema, ResponseFormatJSONSchema

    from mlx_lora.serve import schemas

    messages = [chat.ChatCompletionSystemMessageParam, chat.ChatCompletionDeveloperMessageParam,
                chat.ChatCompletionUserMessageParam, chat.ChatCompletionAssistantMessageParam,
                chat.ChatCompletionToolMessageParam]
    pairs = [*((m, schemas.ChatMessage) for m in messages),
             (chat.ChatCompletionContentPartTextParam, schemas.TextPart),
             (chat.ChatCompletionMessageToolCallParam, schemas.ToolCall), (call.Function, schemas.ToolCallFunction),
             (chat.ChatCompletionFunctionToolParam, schemas.Tool), (FunctionDefinition, schemas.FunctionDefinition),
             (chat.ChatCompletionNamedToolChoiceParam, schemas.NamedToolChoice), (named.Function, schemas.NamedFunction),
             (ResponseFormatJSONSchema, schemas.ResponseFormat), (JSONSchema, schemas.JSONSchemaFormat),
             (chat.ChatCompletionStreamOptionsParam, schemas.StreamOptions)]
    for sdk_type, ours in pairs:
        sent = set(typing.get_type_hints(sdk_type))
        assert sent <= ours.known_fields(), (sdk_type.__name__, sorted(sent - ours.known_fields()))
    # what a client appends to `messages` from a response, the parse() / stream() helpers' included
    from openai.types.chat import ChatCompletionMessage, ParsedChatCompletionMessage
    from openai.types.chat.parsed_function_tool_call import ParsedFunction

    for sdk_model, ours in ((ChatCompletionMessage, schemas.ChatMessage),
                            (ParsedChatCompletionMessage, schemas.ChatMessage), (ParsedFunction, schemas.ToolCallFunction)):
        assert set(sdk_model.model_fields) <= ours.known_fields(), sdk_model.__name__


def test_nested_fields_are_named_when_ignored_and_refused_when_unknown(sdk):
    tools = [{"type": "function", "function": {"name": "get_date", "description": "today", "strict": True,
                                               "parameters": {"type": "object", "properties": {}}}}]
    first = sdk.chat.completions.create(model="base", messages=[{"role": "user", "content": "say hello"}], max_tokens=2)
    echoed = first.choices[0].message.model_dump()  # content, refusal, role, annotations, audio, function_call, tool_calls
    echoed["refusal"] = "none"  # a non-null OpenAI field we do not act on
    messages = [{"role": "user", "content": "say hello"}, echoed, {"role": "user", "content": "again"}]
    raw = sdk.chat.completions.with_raw_response.create(model="base", messages=messages, max_tokens=2, user="u")
    assert raw.headers["x-ignored-fields"] == "messages.1.refusal, user"
    assert raw.parse().usage.completion_tokens == 2
    # (this tiny model's template has no tools: the request object itself names them)
    from mlx_lora.serve.schemas import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({
        "messages": messages, "tools": tools, "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
        "response_format": {"type": "json_schema", "json_schema": {"name": "d", "description": "x", "schema": {}}}})
    assert body.ignored_fields() == ["messages.1.refusal", "response_format.json_schema.description",
                                     "stream_options.include_obfuscation", "tools.0.function.strict"]
    typo = [{**tools[0], "function": {**tools[0]["function"], "descripton": "x"}}]
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="base", messages=messages[:1], max_tokens=2, tools=typo)
    assert refused.value.param == "tools.0.function.descripton" and "'description'" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi", "nmae": "x"}], max_tokens=2)
    assert refused.value.param == "messages.0.nmae" and "'name'" in refused.value.message


def test_sdk_extra_fields(sdk):
    messages = [{"role": "user", "content": "say hello"}]
    raw = sdk.chat.completions.with_raw_response.create(model="base", messages=messages, max_tokens=2, user="u",
                                                        store=False, metadata={"run": "1"})
    assert raw.headers["x-ignored-fields"] == "metadata, store, user"
    assert raw.parse().usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="base", messages=messages, max_tokens=2, extra_body={"temprature": 0.1})
    assert refused.value.param == "temprature" and "temperature" in refused.value.message


def test_openai_shapes_that_were_refused(sdk):
    messages = [{"role": "user", "content": "say hello"}]
    greedy = sdk.chat.completions.create(model="tuned", messages=messages, max_tokens=5, temperature=0)
    # top_p 0 (OpenAI takes 0 <= top_p <= 1): only the most likely token is kept, so sampling is greedy
    nucleus = sdk.chat.completions.create(model="tuned", messages=messages, max_tokens=5, temperature=1.5, top_p=0,
                                          seed=3)
    assert nucleus.choices[0].message.content == greedy.choices[0].message.content
    # an assistant's refusal echoed back in the history, as the SDK returns it
    history = messages + [{"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
                          {"role": "user", "content": "ok"}]
    assert sdk.chat.completions.create(model="tuned", messages=history, max_tokens=2).choices[0].finish_reason
    import httpx  # the SDK cannot send NaN; Python's json (and so a client built on it) can
    body = '{"model": "tuned", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    nan = httpx.post(f"{sdk.base_url}chat/completions", content=body, timeout=30,
                     headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
    assert nan.status_code == 400 and "finite number" in nan.json()["error"]["message"], nan.text
    assert nan.json()["error"]["param"] == "temperature"
    json_type = {"Authorization": "Bearer k", "Content-Type": "application/json"}
    lone = httpx.post(f"{sdk.base_url}chat/completions", timeout=30, headers=json_type,
                      content='{"model": "tuned", "messages": [{"role": "user", "content": "a\\ud800b"}]}')
    assert lone.status_code == 400 and "lone UTF-16 surrogate" in lone.json()["error"]["message"], lone.text
    assert lone.json()["error"]["message"].startswith("messages.0.content:")  # not the tokenizer's TextEncodeInput
    untyped = httpx.post(f"{sdk.base_url}chat/completions", timeout=30, headers={"Authorization": "Bearer k"},
                         content='{"model": "tuned", "messages": [{"role": "user", "content": "x"}]}')  # curl -d
    assert untyped.status_code == 400 and "Content-Type: application/json" in untyped.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="the list is empty"):
        sdk.completions.create(model="tuned", prompt=[], max_tokens=2)


def test_logprobs_of_tokens_holding_part_of_a_character_keep_their_bytes(sdk, tiny_model_dir):
    # (last in the module: its requests fill the base's prompt cache)
    from mlx_lm.tokenizer_utils import _byte_decoder  # GPT-2's byte alphabet: character -> byte
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    byte_of = {i: _byte_decoder().get(tokenizer.convert_ids_to_tokens(i), -1) for i in range(len(tokenizer))}
    partial = [i for i, b in byte_of.items() if b >= 0x80][:5]  # one byte each, no whole UTF-8 character
    assert len(partial) == 5
    bias = {str(i): 100 - 10 * n for n, i in enumerate(partial)}  # these five are the most likely, in this order
    chat = sdk.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       logprobs=True, top_logprobs=5, logit_bias=bias)
    first = chat.choices[0].logprobs.content[0]
    assert first.bytes == [byte_of[partial[0]]] and first.token == "bytes:\\x%02x" % first.bytes[0]
    assert [t.bytes for t in first.top_logprobs] == [[byte_of[i]] for i in partial]  # were U+FFFD's 3 bytes
    text = sdk.completions.create(model="base", prompt="x", max_tokens=2, logprobs=5, logit_bias=bias)
    top = text.choices[0].logprobs.top_logprobs[0]
    assert len(top) == 5  # five tokens, five names (all were "\ufffd", one key)
    assert text.choices[0].logprobs.text_offset[-1] <= len(text.choices[0].text)
