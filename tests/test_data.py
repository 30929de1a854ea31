"""Data loading: masks cover exactly the assistant tokens, bad rows are named, batches are stable."""

import json

import numpy as np
import pytest

from mlx_lora.config import DataConfig
from mlx_lora.data import (BatchPosition, DataError, collate, iterate_train, load_datasets, load_split,
                           tokenize_chat, tokenize_row)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_mask_marks_exactly_every_assistant_turn(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "say fox"},
        {"role": "assistant", "content": "fox"},
        {"role": "user", "content": "and again"},
        {"role": "assistant", "content": "fox fox"},
    ]
    tokens, mask = tokenize_chat(tokenizer, messages)
    assert len(tokens) == len(mask)
    assert tokenizer.decode(tokens) == tokenizer.apply_chat_template(messages, tokenize=False)
    # The masked tokens, in order, are the two assistant turns with their end-of-turn markers.
    spans, current = [], []
    for token, is_target in zip(tokens, mask):
        if is_target:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    assert spans == ["fox<|im_end|>\n", "fox fox<|im_end|>\n"]


def test_train_on_prompt_and_completions_and_text(tokenizer):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    example = tokenize_row(tokenizer, chat, "chat", train_on_prompt=True)
    assert all(example.mask)
    completion = tokenize_row(tokenizer, {"prompt": "hi", "completion": "hello"}, "completions", False)
    chat_example = tokenize_row(tokenizer, chat, "chat", False)
    assert completion.tokens == chat_example.tokens and completion.mask == chat_example.mask
    text = tokenize_row(tokenizer, {"text": "the quick fox"}, "text", False)
    assert all(text.mask) and text.tokens[-1] == tokenizer.eos_token_id


def test_completion_rows_through_the_chat_template_are_counted_and_can_stay_raw(tmp_path, tokenizer):
    from mlx_lora.data import DataStats
    from mlx_lora.run import describe_data

    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "hi", "completion": "hello"}, {"prompt": "a", "completion": "b"}])
    stats = DataStats()
    templated = load_split(path, tokenizer, DataConfig(path=str(tmp_path)), stats)
    assert tokenizer.decode(templated[0].tokens).startswith("<|im_start|>") and stats.templated_completions == 2
    lines = describe_data({"train": {**stats.summary(), "source": "train.jsonl"}})
    assert any("2 prompt/completion row(s) formatted with the chat template" in line
               and "data.completions_as_chat=false" in line for line in lines)
    stats = DataStats()
    raw = load_split(path, tokenizer, DataConfig(path=str(tmp_path), completions_as_chat=False), stats)
    prompt = tokenizer.encode("hi")
    assert raw[0].tokens[:len(prompt)] == prompt and "<|im_start|>" not in tokenizer.decode(raw[0].tokens)
    assert raw[0].mask == [False] * len(prompt) + [True] * (len(raw[0].tokens) - len(prompt))
    assert raw[0].prompt_text == "hi" and raw[0].reference == "hello"  # evaluation prompts it the same raw way
    assert stats.templated_completions == 0
    assert not any("prompt/completion" in line for line in describe_data({"train": {**stats.summary(), "source": "train.jsonl"}}))


@pytest.mark.parametrize("row, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', r"bad\.jsonl:2:48: invalid JSON"),  # where it ends
    ({"messages": [{"role": "user", "content": "only a question"}]}, r"bad\.jsonl:2: no assistant message"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"bad\.jsonl:2: messages\[0\]\.role is 'robot'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     r"bad\.jsonl:2: messages\[0\]\.content must be a string"),
    ({"prompt": "p", "completion": ["x"]}, r"bad\.jsonl:2: 'completion' must be a string"),
    ({"question": "q"}, r"bad\.jsonl:2: unknown row format"),
    ({"text": "fine"}, r"bad\.jsonl: mixes formats \(chat at line 1, text at line 2\)"),
])
def test_bad_rows_name_file_and_line(tmp_path, tokenizer, row, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=message):
        load_split(path, tokenizer, DataConfig(path=str(tmp_path)))


def test_missing_and_empty_files(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data.path: .* is not a folder"):
        load_datasets(DataConfig(path=str(tmp_path / "nope")), tokenizer)
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"train\.jsonl: no examples \(the file is empty\)"):
        load_datasets(DataConfig(path=str(tmp_path)), tokenizer)
    write_jsonl(tmp_path / "train.jsonl", [{"text": "some words"}])
    with pytest.raises(DataError, match=r"test\.jsonl: file not found; evaluation needs a test split"):
        load_datasets(DataConfig(path=str(tmp_path)), tokenizer)


def test_overlong_rows_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    long_answer = "fox " * 60
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long_answer}]}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    from mlx_lora.data import DataStats

    stats = DataStats()
    kept = load_split(path, tokenizer, DataConfig(path=str(tmp_path), max_seq_length=24), stats)
    assert len(kept) == 2 and stats.truncated == 1 and max(len(e.tokens) for e in kept) == 24
    stats = DataStats()
    kept = load_split(path, tokenizer, DataConfig(path=str(tmp_path), max_seq_length=24, overlong="drop"), stats)
    assert len(kept) == 1 and stats.dropped_overlong == 1


def test_batches_group_lengths_and_resume_position_is_exact(tiny_data_dir, tokenizer):
    datasets, _ = load_datasets(DataConfig(path=str(tiny_data_dir)), tokenizer)
    train = datasets["train"]
    stream = iterate_train(train, 4, seed=3, position=BatchPosition())
    first = [next(stream) for _ in range(9)]  # crosses an epoch boundary (24 rows / 4 = 6 batches)
    resumed = iterate_train(train, 4, seed=3, position=BatchPosition(epoch=1, index=1))
    for expected in first[7:]:
        got = next(resumed)
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    tokens, mask, count = collate(train, [0, 1, 2])
    assert tokens.shape[1] % 8 == 0 and mask.shape == (3, tokens.shape[1] - 1)
    assert count == sum(len(train[i].tokens) for i in range(3))


def test_atomic_writes_follow_the_umask(tmp_path):
    import stat

    from mlx_lora.checkpoints import UMASK, atomic_folder, write_json

    write_json(tmp_path / "eval.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "eval.json").stat().st_mode) == 0o666 & ~UMASK  # not mkstemp's 0600
    with atomic_folder(tmp_path / "fused") as staging:
        (staging / "x").write_text("y")
    assert stat.S_IMODE((tmp_path / "fused").stat().st_mode) == 0o777 & ~UMASK


def test_truncation_that_cuts_off_every_answer_is_named(tmp_path, tokenizer):
    import json as _json

    from mlx_lora.config import DataConfig
    from mlx_lora.data import DataError, DataStats, load_split
    from mlx_lora.run import describe_data

    long_prompt = "hello world " * 40
    rows = [{"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "Paris."}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Paris."}]}]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    stats = DataStats()
    kept = load_split(path, tokenizer, DataConfig(path=str(tmp_path), max_seq_length=40), stats)
    assert len(kept) == 1 and stats.dropped_no_target == 1 and stats.targets_cut_off == 1
    line = describe_data({"test": {**stats.summary(), "source": "test.jsonl"}})[0]
    assert "1 dropped with no target tokens" in line and "cut off every target token" in line
    path.write_text(_json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match="truncation to data.max_seq_length cut off every target token: raise"):
        load_split(path, tokenizer, DataConfig(path=str(tmp_path), max_seq_length=40), DataStats())


def test_fields_a_row_format_does_not_read_are_counted_and_named(tmp_path, tokenizer):
    from mlx_lora.data import DataStats
    from mlx_lora.run import describe_data

    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b", "weight": 0},
                                                   {"prompt": "x", "completion": "y", "id": 7, "weight": 1},
                                                   {"prompt": "x2", "completion": "y"}])
    stats = DataStats()
    assert len(load_split(path, tokenizer, DataConfig(path=str(tmp_path)), stats)) == 3
    assert stats.summary()["unused_fields"] == {"id": 1, "weight": 2}
    lines = describe_data({"train": {**stats.summary(), "source": "train.jsonl"}})
    assert any("fields not used by training: id (1 row), weight (2 rows)" in line for line in lines)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    stats = DataStats()
    load_split(write_jsonl(tmp_path / "chat.jsonl", [chat]), tokenizer, DataConfig(path=str(tmp_path)), stats)
    assert stats.unused_fields == {}


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a b", "completon": "c"}, "'completion' is missing (the row has 'completon'; did you mean 'completion'?)"),
    ({"promt": "a b", "completion": "c"}, "'prompt' is missing (the row has 'promt'; did you mean 'prompt'?)"),
    ({"mesages": [{"role": "user", "content": "x"}]}, "did you mean 'messages'?"),
])
def test_a_misspelled_row_key_gets_a_did_you_mean(tmp_path, tokenizer, row, message):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "x", "completion": "y"}, row])
    with pytest.raises(DataError) as err:
        load_split(path, tokenizer, DataConfig(path=str(tmp_path)))
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


def test_a_file_that_is_not_utf8_names_its_line_and_the_fix(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "x", "completion": "y"}\n{"prompt": "caf\xe9", "completion": "y"}\n')
    with pytest.raises(DataError) as err:
        load_split(path, tokenizer, DataConfig(path=str(tmp_path)))
    assert str(err.value).startswith(f"{path}:2:16: not UTF-8 (byte 0xe9)") and "--encoding" in str(err.value)
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "x", "completion": "y"}\n')  # a byte-order mark alone is fine
    assert len(load_split(path, tokenizer, DataConfig(path=str(tmp_path)))) == 1
