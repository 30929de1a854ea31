"""Token statistics of the converter, and the training loader reading its output, with a tiny word-level tokenizer."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from mlx_lora.prepare.cli import main
from mlx_lora.prepare.stats import summarise, token_length

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "hi hello what is the date today answer yes no a b c one two three user assistant system".split()


def make_tokenizer(folder: Path | None = None, chat_template: str | None = CHATML):
    """A word-level tokenizer (one id per word) with ChatML specials; saved to `folder` if given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<unk>",
                                   additional_special_tokens=specials[1:])
    if chat_template:
        fast.chat_template = chat_template
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def test_summarise_matches_a_direct_definition():
    lengths = [7, 1, 9, 3, 3, 12, 5, 8, 2, 10, 4, 6, 11, 30, 2, 5, 9, 1, 14, 20, 3]
    s = summarise(lengths, max_seq_length=10)
    ordered = sorted(lengths)
    assert (s["min"], s["max"], s["examples"]) == (1, 30, 21)
    assert s["median"] == ordered[10]
    assert s["p95"] == ordered[math.ceil(0.95 * 21) - 1]  # nearest rank: 20
    assert s["over_max_seq_length"] == sum(x > 10 for x in lengths) == 5
    assert summarise([4, 6], 5)["median"] == 5


@pytest.mark.parametrize("chat_template", [CHATML, None])
def test_token_length_agrees_with_the_training_loader(chat_template):
    """Lengths counted by the converter equal those of mlx_lora.data's tokenization."""
    data = pytest.importorskip("mlx_lora.data", reason="the core's training loader (mlx_lora/data.py) is not present")
    tokenizer = make_tokenizer(chat_template=chat_template)
    rows = [{"prompt": "what is the date", "completion": "today"}, {"text": "one two three"}]
    if chat_template:
        rows.append({"messages": [{"role": "system", "content": "a b"}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what"},
                                  {"role": "assistant", "content": "yes no"}]})
    for row in rows:
        fmt = "chat" if "messages" in row else "completions" if "prompt" in row else "text"
        example = data.tokenize_row(tokenizer, row, fmt, train_on_prompt=False)
        assert token_length(tokenizer, row) == len(example.tokens), row


def test_library_token_stats_in_report(tmp_path):
    from mlx_lora.prepare import PrepareOptions, prepare

    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"prompt": " ".join(["a"] * n), "completion": "b"}) + "\n" for n in range(1, 21)))
    tokenizer = make_tokenizer()
    report = prepare(PrepareOptions(inputs=(source,), output_dir=tmp_path / "out", max_seq_length=20), tokenizer=tokenizer)
    # As a chat: <|im_start|> user a*n <|im_end|> <|im_start|> assistant b <|im_end|> (the
    # pre-tokenizer drops newlines) = n + 7 tokens for n = 1..20; over 20 for n = 14..20.
    stats = report["token_stats"]["all"]
    assert (stats["min"], stats["max"], stats["examples"]) == (8, 27, 20)
    assert stats["over_max_seq_length"] == 7
    assert sum(report["token_stats"][s]["examples"] for s in ("train", "valid", "test")) == 20


def test_cli_model_folder_end_to_end(tmp_path):
    folder = tmp_path / "tok"
    make_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"instruction": "what is the date", "output": "today " * i}) + "\n" for i in range(1, 11)))
    out, err = io.StringIO(), io.StringIO()
    code = main([str(source), "-o", str(tmp_path / "out"), "--model", str(folder), "--max-seq-length", "16"],
                stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    # <|im_start|> user what is the date <|im_end|> <|im_start|> assistant today*i <|im_end|> = 10 + i tokens.
    assert "tokens all: min 11, median 15.5, p95 20, max 20; 4 of 10 over 16" in out.getvalue()
    report = json.loads((tmp_path / "out" / "transform_report.json").read_text())
    assert report["token_stats"]["all"]["over_max_seq_length"] == 4


def test_training_loader_reads_every_output_format(tmp_path):
    data = pytest.importorskip("mlx_lora.data", reason="the core's training loader (mlx_lora/data.py) is not present")
    from mlx_lora.config import DataConfig

    tokenizer = make_tokenizer()
    inputs = {
        "chat": [{"conversations": [{"from": "human", "value": f"what {w}"}, {"from": "gpt", "value": w}]} for w in WORDS[:10]],
        "completions": [{"instruction": f"what {w}", "output": w} for w in WORDS[:10]],
        "text": [{"text": f"one two {w}"} for w in WORDS[:10]],
    }
    for output_format, records in inputs.items():
        source = tmp_path / f"{output_format}.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in records))
        out = tmp_path / f"out-{output_format}"
        code = main([str(source), "-o", str(out), "--output-format", output_format], stdout=io.StringIO(), stderr=io.StringIO())
        assert code == 0
        datasets, stats = data.load_datasets(DataConfig(path=str(out)), tokenizer)
        assert {s: len(v) for s, v in datasets.items()} == {"train": 8, "valid": 1, "test": 1}
        assert all(any(e.mask[1:]) for e in datasets["train"])  # every example has something to learn
