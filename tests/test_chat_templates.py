"""Chat templates as real models ship them: tools passed to the template with the loss on every
assistant turn (tool calls included), templates that rewrite history (each assistant turn trained
on exactly what the template renders when generating it; the rewritten turns reported), and
exceptions inside a template as one-line errors naming file:line.

Inputs include the shared cases `tests/cases/sharegpt_tools/` and `tests/cases/reasoning_template/`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_cli import mlx_lora, write_config
from test_prepare import read_rows, run_cli

from mlx_lora.chat import render
from mlx_lora.config import DataConfig
from mlx_lora.data import DataError, load_split, row_examples
from mlx_lora.models import load_model
from mlx_lora.prepare.stats import token_length

CASES = Path(__file__).parent / "cases"
# A Qwen2.5-style tool template, reduced: tools in the system turn, calls as <tool_call> JSON.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{{ messages[0].content if messages[0].role == 'system' else 'You help.' }}"
    "\n# Tools\n{% for t in tools %}\n{{ t.function | tojson }}{% endfor %}<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{% elif m.role != 'system' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    _, tokenizer, _ = load_model(str(tiny_model_dir))
    original = tokenizer.chat_template
    yield tokenizer
    tokenizer.chat_template = original


def targets(tokenizer, tokens, mask) -> list[str]:
    """The decoded runs of target tokens, in order."""
    spans, current = [], []
    for token, is_target in zip(tokens, mask):
        if is_target:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


# --- tools ---------------------------------------------------------------------------------------

def test_shared_tool_case_converts_and_trains_on_the_tool_call(tmp_path, tokenizer):
    out = tmp_path / "data"
    code, printed, err = run_cli(CASES / "sharegpt_tools" / "sharegpt_tools.json", "-o", out,
                                 "--valid-fraction", "0", "--test-fraction", "0")
    assert code == 0, err
    rows = {len(r["messages"]): r for r in read_rows(out / "train.jsonl")}
    call_row, plain_row = rows[5], rows[3]
    call = {"name": "get_weather", "arguments": {"city": "Lyon"}}
    assert call_row["messages"] == [
        {"role": "system", "content": "You are a weather helper."},
        {"role": "user", "content": "What is the weather in Lyon today?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": '{"temp_c": 14, "sky": "cloudy"}'},
        {"role": "assistant", "content": "It is 14 °C and cloudy in Lyon."}]
    assert call_row["tools"][0]["type"] == "function" and call_row["tools"][0]["function"]["name"] == "get_weather"
    assert "tools" not in plain_row and plain_row["messages"][0]["role"] == "system"
    assert "fields not carried" not in printed

    tokenizer.chat_template = TOOL_TEMPLATE
    (example,), rewritten = row_examples(tokenizer, call_row, "chat", train_on_prompt=False)
    assert not rewritten
    text = tokenizer.decode(example.tokens)
    assert text == render(tokenizer, call_row["messages"], False, call_row["tools"])
    assert '"description": "Weather for a city"' in text  # the tools reached the template
    assert targets(tokenizer, example.tokens, example.mask) == [
        f"<tool_call>{json.dumps(call)}</tool_call><|im_end|>\n", "It is 14 °C and cloudy in Lyon.<|im_end|>\n"]
    assert example.tools == call_row["tools"]  # evaluation prompts carry them too


def test_openai_and_alpaca_tool_rows(tmp_path, tokenizer):
    spec = {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "alpaca.json").write_text(json.dumps(
        [{"instruction": "Add 2 and 2.", "output": "4", "tools": [{"type": "function", "function": spec}]}]))
    source = tmp_path / "in" / "openai.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "1+2?"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]},
                      {"role": "tool", "tool_call_id": "c1", "content": "3"},
                      {"role": "assistant", "content": "3"}], "tools": json.dumps([spec])},
    ]) + "\n")
    out = tmp_path / "out"
    code, _, err = run_cli(tmp_path / "in", "-o", out, "--valid-fraction", "0", "--test-fraction", "0")
    assert code == 0, err
    rows = read_rows(out / "train.jsonl")
    assert all(r["tools"] == [{"type": "function", "function": spec}] for r in rows)
    alpaca = next(r for r in rows if r["messages"][-1]["content"] == "4")
    assert alpaca["messages"] == [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}]
    tokenizer.chat_template = TOOL_TEMPLATE
    openai = next(r for r in rows if len(r["messages"]) == 4)
    (example,), _ = row_examples(tokenizer, openai, "chat", False)
    assert targets(tokenizer, example.tokens, example.mask) == [
        '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><|im_end|>\n', "3<|im_end|>\n"]
    # A template that renders nothing of the tools would train calls to unseen tools: refused.
    tokenizer.chat_template = (CASES / "reasoning_template" / "template.jinja").read_text()
    with pytest.raises(DataError, match="the row has 'tools' but the chat template renders nothing of them"):
        row_examples(tokenizer, alpaca, "chat", False)
    # A function_call turn that is not JSON names its field.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                  {"from": "function_call", "value": "get_weather(Lyon)"}]}]))
    code, _, err = run_cli(bad, "-o", tmp_path / "o2")
    assert code == 1 and "field 'conversations[1].value' is not valid JSON" in err


# --- templates that rewrite history --------------------------------------------------------------

def test_shared_reasoning_case_trains_each_turn_as_generated(tmp_path, tokenizer):
    tokenizer.chat_template = (CASES / "reasoning_template" / "template.jinja").read_text()
    stats_path = CASES / "reasoning_template" / "train.jsonl"
    row = json.loads(stats_path.read_text().splitlines()[0])
    examples, rewritten = row_examples(tokenizer, row, "chat", False)
    assert rewritten == [1] and len(examples) == 2
    first, second = examples
    assert targets(tokenizer, first.tokens, first.mask) == ["<think>6*7 is 42.</think>\n42<|im_end|>\n"]
    assert targets(tokenizer, second.tokens, second.mask) == ["<think>42+1 is 43.</think>\n43<|im_end|>\n"]
    # The second turn's context is what the template gives when generating it: the first reply stripped.
    assert tokenizer.decode(second.tokens) == (
        "<|im_start|>user\nWhat is 6 times 7?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"
        "<|im_start|>user\nAnd plus 1?<|im_end|>\n<|im_start|>assistant\n<think>42+1 is 43.</think>\n43<|im_end|>\n")
    assert second.prompt_messages == row["messages"][:3] and first.prompt_messages is None
    # The converter's token statistics count what training holds: the longest example.
    assert token_length(tokenizer, row) == max(len(first.tokens), len(second.tokens))


def test_template_that_redates_every_prefix_gives_one_example_per_turn(tokenizer):
    # Another member of the kind: the header depends on the whole conversation (here it counts the
    # questions), so every earlier turn is rendered differently once later turns follow.
    tokenizer.chat_template = ("questions={{ messages | selectattr('role', 'equalto', 'user') | list | length }}\n{% for m in messages %}<|im_start|>{{ m.role }}\n"
                               "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                               "<|im_start|>assistant\n{% endif %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
                {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]
    examples, rewritten = row_examples(tokenizer, {"messages": messages}, "chat", False)
    assert rewritten == [1, 3]
    assert [targets(tokenizer, e.tokens, e.mask) for e in examples] == [
        ["b<|im_end|>\n"], ["d<|im_end|>\n"], ["f<|im_end|>\n"]]
    assert tokenizer.decode(examples[2].tokens).startswith("questions=3\n")  # as rendered when generating turn 3


def test_reasoning_case_through_the_cli_reports_the_rewritten_turns(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(CASES / "reasoning_template" / "train.jsonl", data / "train.jsonl")
    config = write_config(tmp_path, tiny_model_dir, data, eval={"enabled": False},
                          training={"batch_size": 1, "iters": 2, "steps_per_eval": 0, "save_every": 0},
                          data={"chat_template": str(CASES / "reasoning_template" / "template.jinja")})
    result = mlx_lora("train", config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data train: 3 examples" in result.stdout
    assert ("data train: the chat template rewrites 1 earlier assistant turn(s) in 1 row(s) once later turns "
            "follow (e.g. train.jsonl:1 messages[1])") in result.stdout


# --- errors inside templates ---------------------------------------------------------------------

NO_SYSTEM = ("{%- for m in messages %}\n{%- if m.role == 'system' %}\n"
             "{{ raise_exception('System role not supported') }}\n{%- endif %}\n"
             "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}\n{%- endfor %}\n"
             "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_template_exceptions_are_one_line_errors_naming_file_and_line(tiny_model_dir, tmp_path, tokenizer):
    template = tmp_path / "gemma_like.jinja"
    template.write_text(NO_SYSTEM)
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]}
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps(row) + "\n")
    config = write_config(tmp_path, tiny_model_dir, data, eval={"enabled": False},
                          data={"chat_template": str(template)})
    result = mlx_lora("train", config)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert f"{data / 'train.jsonl'}:1: the chat template failed ({template}:3: TemplateError: System role not supported)" in line
    # The converter's token statistics go through the same rendering: same message, with the record.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for stale in model.glob("chat_template.*"):
        stale.unlink()
    config_json = json.loads((model / "tokenizer_config.json").read_text())
    config_json.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config_json))
    (model / "chat_template.jinja").write_text(NO_SYSTEM)
    code, _, err = run_cli(data / "train.jsonl", "-o", tmp_path / "out", "--model", model,
                           "--valid-fraction", "0", "--test-fraction", "0")
    assert code == 1
    assert f"the chat template failed ({model / 'chat_template.jinja'}:3: TemplateError: System role not supported)" in err
    # A syntax error in the template names its line too.
    tokenizer.chat_template = "{% for m in messages %}\n{{ m.content }\n{% endfor %}"
    with pytest.raises(DataError, match=r"chat_template.jinja:2: TemplateSyntaxError: unexpected '}'\); fix the template's syntax"):
        load_split(data / "train.jsonl", tokenizer, DataConfig(path=str(data)))
