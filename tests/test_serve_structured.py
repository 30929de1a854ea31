"""Structured output and tools: `response_format` json_schema output validates (50 random schemas,
batched with each other), tool calls round-trip through the official `openai` SDK (plain and
streamed), and the bad-input answers (invalid schema, a template without tool support)."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from test_serve import start_server

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

# A ChatML template with tools in the JSON tool-call format (mlx-lm infers its `json_tools` parser).
TOOLS_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\nTools:' }}{% for tool in tools %}{{ ' ' + (tool | tojson) }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}{{ '<|im_start|>assistant\\n' }}"
    "{%- for call in message.tool_calls %}{% set tool_call = call.function %}"
    "{{ '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + (tool_call.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 12},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A small JSON schema whose instances are short (bounded strings, numbers and arrays)."""
    kinds = ["integer", "boolean", "string", "enum", "null", "array"] + (["object"] * 2 if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cyan", 3, True], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    if kind == "object":
        names = rng.sample(["id", "name", "tags", "ok", "size", "when", "meta"], rng.randint(1, 4))
        return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
                "required": names, "additionalProperties": False}
    return {"type": kind}


def test_json_schema_outputs_validate_on_50_random_schemas(tiny_model_dir):
    from jsonschema.validators import validator_for

    from mlx_lora.serve.constraints import response_grammar
    from mlx_lora.serve.engine import Engine
    from mlx_lora.serve.schemas import ResponseFormat
    from mlx_lora.serve.scheduler import Sequence

    engine = Engine.from_source(str(tiny_model_dir))
    compiler = engine.grammar_compiler()
    rng = random.Random(0)
    schemas = [{"type": "object", "properties": {"answer": random_schema(rng)}, "required": ["answer"],
                "additionalProperties": False} for _ in range(50)]
    outputs = {}
    for i, schema in enumerate(schemas):
        fmt = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        factory = compiler.factory(response_grammar(fmt), "response_format")
        outputs[i] = {"tokens": [], "finish": None}
        engine.scheduler.add(Sequence(prompt=engine.tokenizer.encode(f"answer {i}"), max_tokens=400,
                                      on_token=lambda e, i=i: outputs[i]["tokens"].append(e.token) or False,
                                      on_finish=lambda r, i=i: outputs[i].update(finish=r), constraint=factory()))
    while not engine.scheduler.idle():  # 8 at a time: constrained rows share batches
        engine.scheduler.step()
    for i, schema in enumerate(schemas):
        text = engine.tokenizer.decode(outputs[i]["tokens"])
        assert outputs[i]["finish"] == "stop", (schema, text)
        validator_for(schema)(schema).validate(json.loads(text))


@pytest.fixture(scope="module")
def tool_model_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools-model") / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def sdk(tool_model_dir):
    with start_server(tool_model_dir, {}, max_tokens=400) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_tool_call_round_trip_through_the_sdk(sdk):
    messages = [{"role": "user", "content": "what is the weather in Paris?"}]
    first = sdk.chat.completions.create(model="base", messages=messages, tools=[WEATHER], tool_choice="required",
                                        max_tokens=120)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the assistant's call and the tool's answer go back in the next turn
    follow = messages + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = sdk.chat.completions.create(model="base", messages=follow, tools=[WEATHER], max_tokens=5)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_streamed_tool_call_sends_the_name_first_then_arguments_in_pieces(sdk):
    kwargs = {"model": "base", "messages": [{"role": "user", "content": "what is the weather in Paris?"}],
              "tools": [WEATHER], "max_tokens": 120,
              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    plain = sdk.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = list(sdk.chat.completions.create(**kwargs, stream=True))
    entries = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    head, rest = entries[0], entries[1:]
    assert head.id and head.type == "function" and head.function.name == "get_weather" and head.function.arguments == ""
    assert all(e.index == 0 and e.id is None and e.function.name is None for e in rest)
    assert len(rest) >= 3  # '{"city": ...', ', "days": ...', '}': one piece per completed argument at least
    assert "".join(e.function.arguments for e in rest) == plain.function.arguments  # greedy: the same call
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # the SDK's own stream accumulation yields the non-streamed call
    with sdk.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == (plain.function.name, plain.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"


def test_tool_call_cut_by_max_tokens_comes_back_as_a_cut_call_not_markup(sdk):
    """As OpenAI answers a call cut short: finish_reason "length", the call's name and its arguments as
    far as they were written; no `<tool_call>` text in the content, streamed or not."""
    kwargs = {"model": "base", "messages": [{"role": "user", "content": "what is the weather in Paris?"}],
              "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole = sdk.chat.completions.create(**kwargs, max_tokens=120)
    full = whole.choices[0].message.tool_calls[0].function.arguments
    for cut in (whole.usage.completion_tokens - 4, whole.usage.completion_tokens // 2):
        choice = sdk.chat.completions.create(**kwargs, max_tokens=cut).choices[0]
        assert choice.finish_reason == "length" and not choice.message.content
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and full.startswith(call.function.arguments)
        chunks = list(sdk.chat.completions.create(**kwargs, max_tokens=cut, stream=True))
        assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        entries = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert entries[0].function.name == "get_weather"
        assert "".join(e.function.arguments or "" for e in entries) == call.function.arguments
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_tool_call_deltas_join_to_the_final_arguments_at_every_cut():
    from types import SimpleNamespace

    from mlx_lm.tool_parsers import json_tools, pythonic, qwen3_coder

    from mlx_lora.serve.tool_deltas import ToolCallDeltas

    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris", "days": 12, '
            '"tags": ["a", {"b": null}], "ok": true}}\n</tool_call>')
    final = [{"id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(
        {"city": 'Pa"ris', "days": 12, "tags": ["a", {"b": None}], "ok": True})}}]
    json_tok = SimpleNamespace(tool_call_start="<tool_call>", tool_call_end="</tool_call>",
                               tool_parser=json_tools.parse_tool_call)
    for step in (1, 3, 7):  # the text arrives in pieces of 1, 3, 7 characters
        deltas = ToolCallDeltas(json_tok)
        entries = [e for cut in range(step, len(text) + step, step) for e in deltas.update(text[:cut])]
        assert entries[0]["function"]["name"] == "get_weather" and len(entries) >= 5
        streamed = "".join(e["function"]["arguments"] for e in entries)
        assert final[0]["function"]["arguments"].startswith(streamed)  # never a piece to take back
        entries += deltas.complete([dict(final[0])])
        assert "".join(e["function"]["arguments"] for e in entries) == final[0]["function"]["arguments"]
        assert [e for e in entries if "id" in e] == [entries[0]]
    # Qwen3-Coder XML: the format's own parser on the completed parameters
    xml = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nPa\"ris\n</parameter>\n<parameter=days>\n12\n"
           "</parameter>\n</function>\n</tool_call>")
    xml_tok = SimpleNamespace(tool_call_start="<tool_call>", tool_call_end="</tool_call>",
                              tool_parser=qwen3_coder.parse_tool_call)
    xml_final = {"id": "call_y", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(
        {"city": 'Pa"ris', "days": 12})}}
    deltas = ToolCallDeltas(xml_tok, [WEATHER])
    entries = [e for cut in range(1, len(xml) + 1) for e in deltas.update(xml[:cut])]
    assert entries[0]["function"]["name"] == "get_weather" and len(entries) == 4  # name, '{', city, days
    entries += deltas.complete([dict(xml_final)])
    assert "".join(e["function"]["arguments"] for e in entries) == xml_final["function"]["arguments"]
    # a format parsed only at the end (pythonic): one name entry, then the arguments
    py_tok = SimpleNamespace(tool_call_start="<|tool_call_start|>", tool_call_end="<|tool_call_end|>",
                             tool_parser=pythonic.parse_tool_call)
    deltas = ToolCallDeltas(py_tok)
    assert deltas.update("<|tool_call_start|>[get_weather(city=") == []
    entries = deltas.complete([dict(final[0])])
    assert entries[0]["function"] == {"name": "get_weather", "arguments": ""} and entries[0]["id"] == "call_x"
    assert entries[1] == {"index": 0, "function": {"arguments": final[0]["function"]["arguments"]}}


def test_json_object_and_schema_through_the_sdk(sdk):
    schema = WEATHER["function"]["parameters"]
    result = sdk.chat.completions.create(model="base", messages=[{"role": "user", "content": "weather?"}],
                                         max_tokens=200, response_format={
                                             "type": "json_schema", "json_schema": {"name": "w", "schema": schema}})
    jsonschema.validate(json.loads(result.choices[0].message.content), schema)
    loose = sdk.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
                                        response_format={"type": "json_object"})
    assert loose.choices[0].message.content.startswith("{")  # a random model may run out of tokens inside a string


def test_structured_bad_input(sdk, tiny_model_dir):
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="base", messages=messages, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "wat"}}})
    assert err.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="base", messages=messages, tools=[WEATHER],
                                    tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.value.body["param"] == "tool_choice"
    deep = {"type": "integer"}
    for _ in range(150):  # deeper than jsonschema's checker can walk: a 400, not a 500 and a logged traceback
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(openai.BadRequestError, match="nests too deeply") as err:
        sdk.chat.completions.create(model="base", messages=messages, max_tokens=2, response_format={
            "type": "json_schema", "json_schema": {"name": "deep", "schema": deep}})
    assert err.value.body["param"] == "response_format"
    nested_tool = {"type": "function", "function": {"name": "deep", "parameters": deep}}
    with pytest.raises(openai.BadRequestError, match="nests too deeply") as err:
        sdk.chat.completions.create(model="base", messages=messages, max_tokens=2, tools=[nested_tool],
                                    tool_choice="required")
    assert err.value.body["param"] == "tools"
    with start_server(tiny_model_dir, {}) as (url, _):  # ChatML without tools
        plain = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no tool support") as err:
            plain.chat.completions.create(model="base", messages=messages, tools=[WEATHER])
        assert err.value.body["param"] == "tools"


def template_with_calls(call: str) -> str:
    """TOOLS_TEMPLATE with the assistant's calls rendered by the jinja expression `call` (of tool_call)."""
    json_call = ("'<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + (tool_call.arguments | tojson) "
                 "+ '}\\n</tool_call>'")
    assert json_call in TOOLS_TEMPLATE
    return TOOLS_TEMPLATE.replace(json_call, call)


MISTRAL_CALL = "'[TOOL_CALLS][{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + (tool_call.arguments | tojson) + '}]'"
QWEN3_CODER_CALL = "'<tool_call>\\n<function=' + tool_call.name + '>\\n</function>\\n</tool_call>'"
PYTHONIC_CALL = "'<|tool_call_start|>[' + tool_call.name + '()]<|tool_call_end|>'"


@pytest.mark.parametrize("family, call", [("mistral", MISTRAL_CALL), ("qwen3_coder", QWEN3_CODER_CALL),
                                          ("pythonic", PYTHONIC_CALL)])
def test_forced_tool_call_per_template_family(tiny_model_dir, tmp_path, family, call):
    folder = tmp_path / family
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(template_with_calls(call))
    kwargs = {"model": "base", "messages": [{"role": "user", "content": "weather in Paris?"}], "tools": [WEATHER],
              "max_tokens": 120, "tool_choice": "required"}
    with start_server(folder, {}, max_tokens=400) as (url, engine):
        assert engine.tokenizer.tool_parser.__module__.endswith(family)  # mlx-lm inferred this family
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        if family == "pythonic":  # parsed when a model writes it, not forced
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(**kwargs)
            assert err.value.body["param"] == "tool_choice" and "pythonic" in err.value.body["message"]
            assert client.chat.completions.create(**{**kwargs, "tool_choice": "auto", "max_tokens": 4}).choices
            return
        plain = client.chat.completions.create(**kwargs).choices[0]
        assert plain.finish_reason == "tool_calls" and plain.message.tool_calls[0].function.name == "get_weather"
        jsonschema.validate(json.loads(plain.message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
        with client.chat.completions.stream(**kwargs) as stream:
            final = stream.get_final_completion()
        streamed = final.choices[0].message.tool_calls[0].function
        assert (streamed.name, streamed.arguments) == (plain.message.tool_calls[0].function.name,
                                                       plain.message.tool_calls[0].function.arguments)


def test_a_forced_call_of_a_function_without_parameters_has_empty_arguments(sdk):
    # OpenAI: "Omitting parameters defines a function with an empty parameter list"
    ping = {"type": "function", "function": {"name": "ping"}}
    done = sdk.chat.completions.create(model="base", messages=[{"role": "user", "content": "ping it"}], tools=[ping],
                                       tool_choice="required", max_tokens=60)
    call = done.choices[0].message.tool_calls[0]
    assert call.function.name == "ping" and json.loads(call.function.arguments) == {}
    # the schema the grammar is built from admits {} and nothing else (it admitted any object)
    from mlx_lora.serve.schemas import Tool

    parameters = Tool(**ping).function.parameters
    jsonschema.validate({}, parameters)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"description": "Paris"}, parameters)
