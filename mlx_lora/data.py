"""Training data: read the train/valid/test JSONL splits, tokenize with loss masks, and batch.

Rows use mlx-lm's formats: `{"messages": [...]}` (chat), `{"prompt", "completion"}` and `{"text"}`.
The loss covers assistant/completion tokens only (every assistant turn of a chat) unless
`train_on_prompt` is set. Batches group examples of similar length so little is padding; the
batch order is a pure function of (seed, epoch), which makes resuming exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .config import DataConfig

SPLITS = ("train", "valid", "test")
ROLES = ("system", "user", "assistant", "tool")
PAD_MULTIPLE = 8  # pad batches to a multiple of 8 tokens: few distinct shapes for mx.compile, little waste


class DataError(ValueError):
    """A problem in a data file, naming the file and line."""


@dataclass
class Example:
    """One tokenized example; `mask[i]` says whether token i is a training target."""

    tokens: list[int]
    mask: list[bool]
    prompt_messages: list[dict] | None = None  # for generation-based evaluation
    prompt_text: str | None = None
    reference: str | None = None

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    dropped_identical: int = 0  # preference pairs whose chosen and rejected are the same
    tokens: int = 0
    target_tokens: int = 0
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        lengths = sorted(self.lengths) or [0]
        return {
            "rows": self.rows, "examples": len(self.lengths), "truncated": self.truncated,
            "dropped_overlong": self.dropped_overlong, "dropped_no_target": self.dropped_no_target,
            "dropped_identical": self.dropped_identical, "tokens": self.tokens, "target_tokens": self.target_tokens,
            "max_length": lengths[-1], "median_length": lengths[len(lengths) // 2],
        }


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a JSONL file; errors name the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (data.path must hold {', '.join(s + '.jsonl' for s in SPLITS)}; "
                        "make them with data_transform.py)")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_number}:{err.colno}: invalid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_number, row))
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise DataError(f"{where}: messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise DataError(f"{where}: messages[{i}].content must be a string, got {type(content).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so there is nothing to learn; add one or drop the row")


def row_format(row: dict, where: str) -> str:
    if "chosen" in row or "rejected" in row:
        raise DataError(f"{where}: a preference row (chosen/rejected) in an SFT run; set training.objective: dpo "
                        "or orpo, or give rows with 'messages', 'prompt'+'completion' or 'text'")
    if "messages" in row:
        _check_messages(row["messages"], where)
        return "chat"
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(row.get(key)).__name__}")
        return "completions"
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return "text"
    raise DataError(f"{where}: unknown row format with keys {sorted(row)}; expected 'messages', 'prompt'+'completion' or 'text'")


def _encode(tokenizer, text: str, first: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=first))


def _render(tokenizer, messages, add_generation_prompt: bool, tools=None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_chat(tokenizer, messages: list[dict], tools=None, first_target: int = 0) -> tuple[list[int], list[bool]]:
    """Tokens of a chat with the mask set on every assistant turn (its content and end-of-turn).

    Assistant turns before message index `first_target` are context, not targets (a preference
    pair's shared conversation prefix).
    """
    # Render growing prefixes: the text between "prompt up to turn i" and "conversation up to
    # turn i" is assistant turn i. Each piece is tokenized alone, as at inference time. The
    # template writes any BOS itself, so no special tokens are added on top (no double BOS).
    tokens: list[int] = []
    mask: list[bool] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "set data.train_on_prompt: true or use a completions dataset")
        for piece, is_target in ((prompt[len(rendered):], False), (full[len(prompt):], i >= first_target)):
            ids = _encode(tokenizer, piece, first=False) if piece else []
            tokens += ids
            mask += [is_target] * len(ids)
        rendered = full
    tail = _render(tokenizer, messages, add_generation_prompt=False, tools=tools)[len(rendered):]
    if tail:
        ids = _encode(tokenizer, tail, first=False)
        tokens += ids
        mask += [False] * len(ids)
    return tokens, mask


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def tokenize_row(tokenizer, row: dict, fmt: str, train_on_prompt: bool) -> Example:
    eos = tokenizer.eos_token_id
    if fmt == "completions" and has_chat_template(tokenizer):
        row = {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]}
        fmt = "chat"
    if fmt == "chat":
        messages = row["messages"]
        tokens, mask = tokenize_chat(tokenizer, messages, row.get("tools"))
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        example = Example(tokens, mask, prompt_messages=messages[:last], reference=messages[last].get("content"))
    elif fmt == "completions":
        prompt = _encode(tokenizer, row["prompt"], first=True)
        completion = _encode(tokenizer, row["completion"], first=False) + [eos]
        example = Example(prompt + completion, [False] * len(prompt) + [True] * len(completion),
                          prompt_text=row["prompt"], reference=row["completion"])
    else:
        tokens = _encode(tokenizer, row["text"], first=True) + [eos]
        example = Example(tokens, [True] * len(tokens))
    if train_on_prompt:
        example.mask = [True] * len(example.tokens)
    return example


def load_split(path: Path, tokenizer, config: DataConfig, stats: DataStats | None = None) -> list[Example]:
    """Tokenize one JSONL split, applying the overlong policy and counting what was changed."""
    stats = stats if stats is not None else DataStats()
    examples = []
    formats: dict[str, int] = {}
    for line_number, row in read_jsonl(path):
        where = f"{path}:{line_number}"
        fmt = row_format(row, where)
        formats.setdefault(fmt, line_number)
        if len(formats) > 1:
            raise DataError(f"{path}: mixes formats ({', '.join(f'{k} at line {v}' for k, v in formats.items())}); "
                            "convert the file with data_transform.py")
        try:
            example = tokenize_row(tokenizer, row, fmt, config.train_on_prompt)
        except DataError as err:
            raise DataError(f"{where}: {err}") from err
        stats.rows += 1
        if len(example.tokens) > config.max_seq_length:
            if config.overlong == "drop":
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
            example.tokens = example.tokens[: config.max_seq_length]
            example.mask = example.mask[: config.max_seq_length]
        # The first token is never a target (nothing predicts it), so need a target after it.
        if not any(example.mask[1:]):
            stats.dropped_no_target += 1
            continue
        stats.tokens += len(example.tokens)
        stats.target_tokens += sum(example.mask[1:])
        stats.lengths.append(len(example.tokens))
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: every example was dropped ({stats.dropped_overlong} longer than "
                        f"data.max_seq_length={config.max_seq_length}, {stats.dropped_no_target} with no target tokens)")
    return examples


def load_datasets(config: DataConfig, tokenizer, splits=SPLITS, split_loader=None) -> tuple[dict[str, list], dict[str, dict]]:
    """Tokenized examples and statistics for each split of `config.path`.

    `split_loader(path, tokenizer, config, stats)` reads one split (default `load_split`;
    `preference_data.load_datasets_for` passes its pair reader).
    """
    folder = Path(config.path)
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is not a folder; it must hold train.jsonl, valid.jsonl and test.jsonl")
    loader = split_loader or load_split
    datasets, stats = {}, {}
    for split in splits:
        split_stats = DataStats()
        datasets[split] = loader(folder / f"{split}.jsonl", tokenizer, config, split_stats)
        stats[split] = split_stats.summary()
    return datasets, stats


# --- batching ---------------------------------------------------------------------------------

def make_batches(examples: list[Example], batch_size: int) -> list[list[int]]:
    """Index lists of `batch_size` examples of similar length (sorted, then chunked)."""
    if len(examples) < batch_size:
        raise DataError(f"the split has {len(examples)} examples, fewer than training.batch_size={batch_size}")
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    return [order[i: i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def epoch_order(num_batches: int, seed: int, epoch: int) -> np.ndarray:
    """The batch order of one epoch: deterministic in (seed, epoch), so a resumed run sees the same."""
    return np.random.default_rng([seed, epoch]).permutation(num_batches)


def collate(examples: list[Example], indices: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens (B, T) int32, target mask (B, T-1) float32, non-padding token count) for one batch."""
    rows = [examples[i] for i in indices]
    longest = max(len(r.tokens) for r in rows)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for j, row in enumerate(rows):
        tokens[j, : len(row.tokens)] = row.tokens
        mask[j, : len(row.mask)] = row.mask
    return tokens, mask[:, 1:], sum(len(r.tokens) for r in rows)


@dataclass
class BatchPosition:
    """Where the training stream is: epoch and batch index within it (saved in checkpoints)."""

    epoch: int = 0
    index: int = 0


def iterate_train(examples: list, batch_size: int, seed: int, position: BatchPosition,
                  collate_fn=collate) -> Iterator[tuple]:
    """Endless shuffled batches from `position` on; advances `position` as it yields.

    `examples` are Examples (batched by `collate`) or preference pairs (`preference_data.collate_pairs`).
    """
    batches = make_batches(examples, batch_size)
    while True:
        order = epoch_order(len(batches), seed, position.epoch)
        while position.index < len(order):
            batch = collate_fn(examples, batches[order[position.index]])
            position.index += 1
            yield batch
        position.epoch += 1
        position.index = 0


def iterate_eval(examples: list, batch_size: int, max_batches: int = -1, collate_fn=collate) -> Iterator[tuple]:
    """Batches in length order for evaluation (the last one may be smaller)."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if max_batches != -1:
        chunks = chunks[:max_batches]
    for chunk in chunks:
        yield collate_fn(examples, chunk)
