"""The converter's preference inputs: HH-RLHF transcripts, scored lists, OpenAI preference JSONL
and native rows become rows that DPO / ORPO training reads; ties and identical answers are counted."""

from __future__ import annotations

import json

import pytest

from mlx_lora.config import DataConfig
from mlx_lora.data import DataStats
from mlx_lora.prepare import PrepareOptions, TransformError, prepare
from mlx_lora.preference_data import load_preference_split

HH = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4, I think.\n\nHuman: Sure?\n\nAssistant: Yes, 4.",
      "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4, I think.\n\nHuman: Sure?\n\nAssistant: No idea."}
SCORED = {"instruction": "Name a fox colour.", "completions": [
    {"response": "Red.", "overall_score": 8.5}, {"response": "Blue.", "overall_score": 2},
    {"response": "Orange-red.", "overall_score": 7}]}
OPENAI = {"input": {"messages": [{"role": "user", "content": "Hello"}]},
          "preferred_output": [{"role": "assistant", "content": "Hi! How can I help?"}],
          "non_preferred_output": [{"role": "assistant", "content": "What."}]}
IMPLICIT = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},  # trl-lib/hh-rlhf
                       {"role": "user", "content": "and you?"}, {"role": "assistant", "content": "fine, thanks"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
                         {"role": "user", "content": "and you?"}, {"role": "assistant", "content": "go away"}]}
BINARIZED = {"prompt": "Say hi", "chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
             "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "no"}]}
# HuggingFaceH4/ultrafeedback_binarized as published: `messages` is the whole chosen conversation, not the prompt
PUBLISHED = {**BINARIZED, "prompt_id": "0f3a", "messages": BINARIZED["chosen"], "score_chosen": 9.0, "score_rejected": 2.0}


def convert(tmp_path, *files, **options):
    """Each of `files` (a list of rows) is one input file (a file holds one format)."""
    sources = []
    for i, rows in enumerate(files):
        sources.append(tmp_path / ("raw.jsonl" if i == 0 else f"raw{i}.jsonl"))
        sources[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare(PrepareOptions(inputs=tuple(sources), output_dir=tmp_path / "out", valid_fraction=0,
                                    test_fraction=0, dedupe=False, **options))
    written = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    return report, written


@pytest.mark.parametrize("raw,expected", [
    (HH, {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, I think."},
                       {"role": "user", "content": "Sure?"}], "chosen": "Yes, 4.", "rejected": "No idea."}),
    (SCORED, {"prompt": "Name a fox colour.", "chosen": "Red.", "rejected": "Blue."}),
    (OPENAI, {"messages": [{"role": "user", "content": "Hello"}], "chosen": "Hi! How can I help?", "rejected": "What."}),
    (BINARIZED, {"prompt": "Say hi", "chosen": "hi", "rejected": "no"}),
    (PUBLISHED, {"prompt": "Say hi", "chosen": "hi", "rejected": "no"}),
    (IMPLICIT, {"messages": IMPLICIT["chosen"][:3], "chosen": "fine, thanks", "rejected": "go away"}),
], ids=["hh-rlhf", "scored", "openai-preference", "binarized", "binarized-published", "implicit-prompt"])
def test_each_preference_shape_becomes_a_training_row(tmp_path, tiny_model_dir, raw, expected):
    report, written = convert(tmp_path, [raw])
    assert written == [expected]
    from mlx_lora.models import load_model

    _, tokenizer, _ = load_model(str(tiny_model_dir))
    (pair,) = load_preference_split(tmp_path / "out" / "train.jsonl", tokenizer, DataConfig(path=str(tmp_path)))
    assert any(pair.chosen.mask) and any(pair.rejected.mask)


def test_ties_and_identical_answers_are_counted_not_written(tmp_path):
    tie = {"prompt": "x", "responses": [{"text": "a", "score": 3}, {"text": "b", "score": 3}]}
    same = {"prompt": "x", "chosen": "a", "rejected": "a"}
    report, written = convert(tmp_path, [SCORED, tie], [same, BINARIZED])
    assert len(written) == 2
    assert report["totals"]["skipped"] == {"tie": 1, "identical": 1}
    assert [r["rows_read"] for r in report["inputs"]] == [2, 2]


@pytest.mark.parametrize("good,raw,message", [
    (BINARIZED, {"prompt": "x", "chosen": "a"}, "raw.jsonl:2:1: missing 'rejected'"),
    (OPENAI, {"input": {"messages": [{"role": "user", "content": "x"}]},
              "preferred_output": [{"role": "assistant", "content": "a"}]},
     "raw.jsonl:2:1: missing 'non_preferred_output'"),
    (HH, {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"},
     "raw.jsonl:2:1: 'chosen' and 'rejected' differ before their last reply"),
    (SCORED, {"prompt": "x", "completions": [{"response": "a"}, {"response": "b", "score": 1}]},
     "raw.jsonl:2:17: completions[0] needs a text"),
])
def test_bad_preference_records_name_file_and_line(tmp_path, good, raw, message):
    with pytest.raises(TransformError) as err:
        convert(tmp_path, [good, raw])
    assert message in str(err.value)


def test_skipping_sft_rows_mixed_into_a_pair_file_keeps_every_pair(tmp_path):
    # a stray SFT row skips itself with --skip-invalid, not every pair after it
    pairs = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(6)]
    report, written = convert(tmp_path, pairs[:2] + [{"prompt": "x", "completion": "y"}] + pairs[2:], skip_invalid=True)
    assert len(written) == 6 and report["totals"]["skipped"] == {"invalid_record": 1}


def test_scored_format_on_a_record_without_scored_answers_is_one_line(tmp_path):
    no_prompt = {"completions": SCORED["completions"]}
    for raw, missing in ((HH, "no 'completions'"), (no_prompt, "no prompt")):
        with pytest.raises(TransformError, match=f"--format scored reads .* {missing}"):
            convert(tmp_path, [raw], input_format="scored")


def test_openai_preference_tools_are_kept_and_other_input_fields_named(tmp_path, tiny_model_dir):
    # Before: `input.tools` and `input.parallel_tool_calls` vanished unreported (only `metadata` was named).
    spec = {"name": "get_w", "description": "weather by city", "parameters": {"type": "object", "properties": {}}}
    call = {"id": "c1", "type": "function", "function": {"name": "get_w", "arguments": "{\"city\": \"Lyon\"}"}}
    raw = {"input": {"messages": [{"role": "user", "content": "weather?", "name": "ann"}],
                     "tools": [{"type": "function", "function": spec}], "parallel_tool_calls": True},
           "preferred_output": [{"role": "assistant", "content": None, "tool_calls": [call]}],
           "non_preferred_output": [{"role": "assistant", "content": "no idea"}], "metadata": {"src": "x"}}
    report, written = convert(tmp_path, [raw, OPENAI])
    assert written[0] == {"messages": [{"role": "user", "content": "weather?", "name": "ann"}],
                          "tools": [{"type": "function", "function": spec}],
                          "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}],
                          "rejected": "no idea"}
    assert "tools" not in written[1]
    assert report["inputs"][0]["dropped_fields"] == {"input.parallel_tool_calls": 1, "metadata": 1}

    from mlx_lora.models import load_model
    from test_chat_templates import TOOL_TEMPLATE

    _, tokenizer, _ = load_model(str(tiny_model_dir))
    tokenizer.chat_template = TOOL_TEMPLATE
    pair = load_preference_split(tmp_path / "out" / "train.jsonl", tokenizer, DataConfig(path=str(tmp_path)))[0]
    assert '"description": "weather by city"' in tokenizer.decode(pair.chosen.tokens)
    assert "<tool_call>" in tokenizer.decode([t for t, m in zip(pair.chosen.tokens, pair.chosen.mask) if m])


def test_native_preference_rows_keep_tools(tmp_path):
    spec = {"name": "add", "parameters": {}}
    row = {"prompt": "1+1?", "chosen": "2", "rejected": "3"}
    report, written = convert(tmp_path, [{**row, "tools": json.dumps([spec])}])  # a JSON string, as some datasets store it
    assert written == [{**row, "tools": [{"type": "function", "function": spec}]}]
    assert report["totals"]["dropped_fields"] == {}


def test_fields_inside_scored_answers_are_named_when_dropped(tmp_path):
    raw = {"instruction": "Name a fox colour.", "completions": [
        {"response": "Red.", "overall_score": 8.5, "model": "a", "critique": "good"},
        {"response": "Blue.", "overall_score": 2, "model": "b", "annotations": {}}]}
    report, _ = convert(tmp_path, [raw, SCORED])
    assert report["inputs"][0]["dropped_fields"] == {"completions[].critique": 1, "completions[].model": 1}


@pytest.mark.parametrize("raw,message", [
    ({"prompt": "x", "chosen": "a", "rejcted": "b"}, "raw.jsonl:1:1: missing 'rejected' (the row has 'rejcted'; "
                                                    "did you mean 'rejected'?)"),
    ({"promt": "x", "chosen": "a", "rejected": "b"}, "(the row has 'promt'; did you mean 'prompt'?)"),
])
def test_misspelled_preference_keys_get_a_did_you_mean(tmp_path, raw, message):
    with pytest.raises(TransformError) as err:
        convert(tmp_path, [raw])
    assert message in str(err.value)


def test_a_pairs_own_system_prompt_is_kept_and_system_fills_only_rows_without(tmp_path):
    orca = {"system": "You are an AI assistant.", "question": "Compute 1*1.", "chosen": "1", "rejected": "2"}
    plain = {"question": "Compute 2*1.", "chosen": "2", "rejected": "3"}
    report, written = convert(tmp_path, [orca, plain], system="Default system.")
    assert [row["messages"][0]["content"] for row in written] == ["You are an AI assistant.", "Default system."]
    assert not report["inputs"][0]["dropped_fields"]


def test_an_sft_output_format_for_preference_pairs_is_refused(tmp_path):
    with pytest.raises(TransformError, match="--output-format completions is for SFT rows"):
        convert(tmp_path, [BINARIZED], output_format="completions")


def test_pair_columns_of_other_names_are_read_with_chosen_and_rejected_keys(tmp_path):
    # A spreadsheet of pairs under the user's own headers, in any case, and the same in JSONL
    table = tmp_path / "pairs.csv"
    table.write_text("Frage,Good,Bad,id\nWhat is 2+2?,4,5,a\nCapital of France?,Paris,Rome,b\n")
    report = prepare(PrepareOptions(inputs=(table,), output_dir=tmp_path / "out", valid_fraction=0, test_fraction=0,
                                    prompt_key="frage", chosen_key="good", rejected_key="bad"))
    written = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert sorted(written, key=str) == [{"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
                                        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}]
    assert report["totals"]["dropped_fields"] == {"id": 2}  # the column not read is named, as ever
    (tmp_path / "j").mkdir()
    _, rows = convert(tmp_path / "j", [{"question": "Hi?", "good": "Hello!", "bad": "Go."}],
                      chosen_key="good", rejected_key="bad")
    assert rows == [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go."}]


def test_pair_keys_that_match_nothing_are_named(tmp_path):
    with pytest.raises(TransformError, match=r"no field 'gud' \(--chosen-key\) in this record, which has 'question', "
                                             r"'good', 'bad'"):
        convert(tmp_path, [{"question": "Hi?", "good": "Hello!", "bad": "Go."}], chosen_key="gud", rejected_key="bad")
    with pytest.raises(TransformError, match=r"--chosen-key good and --rejected-key bad: no record has that field"):
        (tmp_path / "sft").mkdir()
        convert(tmp_path / "sft", [{"prompt": "Hi?", "completion": "Hello!"}], chosen_key="good", rejected_key="bad")


def test_hh_transcripts_whose_leading_blank_lines_were_stripped_read_the_same(tmp_path):
    stripped = {key: text.lstrip("\n") for key, text in HH.items()}  # "Human: ..." as some copies store it
    _, rows = convert(tmp_path, [stripped])
    (tmp_path / "orig").mkdir()
    _, expected = convert(tmp_path / "orig", [HH])
    assert rows == expected and rows[0]["chosen"] == "Yes, 4."
