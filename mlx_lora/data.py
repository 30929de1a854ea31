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

from .chat import ChatTemplateError, tokenize_conversation
from .config import DataConfig

SPLITS = ("train", "valid", "test")
ROLES = ("system", "user", "assistant", "tool")
MAX_REWRITE_EXAMPLES = 5  # rows named in the summary when the chat template rewrites turns
TOOLS_NOT_RENDERED = ("the row has 'tools' but the chat template renders nothing of them, so the model would learn "
                      "tool calls without seeing the tools; use a tool-aware template (data.chat_template) or drop 'tools'")
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
    tools: list[dict] | None = None  # the row's tools, for the generation prompt

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    targets_cut_off: int = 0  # of dropped_no_target: truncation removed all their targets
    dropped_identical: int = 0  # preference pairs whose chosen and rejected are the same
    tokens: int = 0
    target_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    rewritten_rows: int = 0  # rows whose chat template rewrites earlier assistant turns
    rewritten_turns: int = 0
    rewritten_examples: list[str] = field(default_factory=list)  # "train.jsonl:3 messages[1]"
    templated_completions: int = 0  # prompt/completion rows rendered through the chat template
    unused_fields: dict = field(default_factory=dict)  # key the row format does not read -> rows that had it

    def summary(self) -> dict:
        lengths = sorted(self.lengths) or [0]
        return {
            "rows": self.rows, "examples": len(self.lengths), "truncated": self.truncated,
            "rewritten_rows": self.rewritten_rows, "rewritten_turns": self.rewritten_turns,
            "rewritten_examples": self.rewritten_examples, "templated_completions": self.templated_completions,
            "unused_fields": dict(sorted(self.unused_fields.items())),
            "dropped_overlong": self.dropped_overlong, "dropped_no_target": self.dropped_no_target,
            "targets_cut_off": self.targets_cut_off,
            "dropped_identical": self.dropped_identical, "tokens": self.tokens, "target_tokens": self.target_tokens,
            "max_length": lengths[-1], "median_length": lengths[len(lengths) // 2],
        }


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a JSONL file; errors name the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (data.path must hold train.jsonl, and test.jsonl unless "
                        "eval.enabled is false; valid.jsonl is optional; make them with data_transform.py)")
    rows = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{line_number}:{err.start + 1}: not UTF-8 (byte 0x{raw[err.start]:02x}); save "
                                "the file as UTF-8, or convert it with data_transform.py --encoding NAME") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # without its newline, so an error's column is this line's
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


def _check_tools(row: dict, where: str) -> None:
    """`tools` must be a list of function specs (a JSON string of one is parsed in place)."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = row["tools"] = json.loads(tools)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: 'tools' is a string but not JSON ({err.msg}); write the list itself") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: 'tools' must be a list of function specs, got {type(tools).__name__}; "
                        "convert the file with data_transform.py")


FORMAT_KEYS = {"chat": ("messages", "tools"), "completions": ("prompt", "completion"), "text": ("text",)}


def _did_you_mean(key: str, row: dict) -> str:
    """" (the row has 'completon'; did you mean 'completion'?)" when one of the row's keys is close to `key`."""
    import difflib

    close = difflib.get_close_matches(key, [k for k in row if isinstance(k, str)], n=1, cutoff=0.7)
    return f" (the row has {close[0]!r}; did you mean {key!r}?)" if close else ""


def unused_keys(row: dict, fmt: str) -> list[str]:
    """The row's keys that a row of format `fmt` does not read (counted and named in the data summary)."""
    return [key for key in row if key not in FORMAT_KEYS[fmt]]


def row_format(row: dict, where: str) -> str:
    if "chosen" in row or "rejected" in row:
        raise DataError(f"{where}: a preference row (chosen/rejected) in an SFT run; set training.objective: dpo "
                        "or orpo, or give rows with 'messages', 'prompt'+'completion' or 'text'")
    if "messages" in row:
        _check_messages(row["messages"], where)
        _check_tools(row, where)
        return "chat"
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if key not in row:
                raise DataError(f"{where}: '{key}' is missing{_did_you_mean(key, row)}; a prompt/completion row "
                                "needs both")
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(row.get(key)).__name__}")
        return "completions"
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return "text"
    hint = next((h for h in (_did_you_mean(k, row) for k in ("messages", "prompt", "completion", "text")) if h), "")
    raise DataError(f"{where}: unknown row format with keys {sorted(row)}{hint}; expected 'messages', "
                    "'prompt'+'completion' or 'text' (data_transform.py converts other shapes)")


def _encode(tokenizer, text: str, first: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=first))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def completion_uses_template(tokenizer, completions_as_chat: bool = True) -> bool:
    """Whether prompt/completion rows are rendered through the chat template (one user turn, one reply)."""
    return completions_as_chat and has_chat_template(tokenizer)


def row_examples(tokenizer, row: dict, fmt: str, train_on_prompt: bool,
                 completions_as_chat: bool = True) -> tuple[list[Example], list[int]]:
    """(examples, message indices of assistant turns the chat template rewrites) of one row.

    A chat row gives one example, or one more per turn that the template renders differently
    once later turns follow (see `chat.tokenize_conversation`); other rows give one. A
    prompt/completion row goes through the chat template when the tokenizer has one and
    `completions_as_chat` (`data.completions_as_chat`), else it is the raw prompt + completion.
    """
    eos = tokenizer.eos_token_id
    rewritten: list[int] = []
    if fmt == "completions" and completion_uses_template(tokenizer, completions_as_chat):
        row = {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]}
        fmt = "chat"
    if fmt == "chat":
        messages, tools = row["messages"], row.get("tools")
        try:
            chat = tokenize_conversation(tokenizer, messages, tools)
        except ChatTemplateError as err:
            raise DataError(str(err)) from None
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        examples = [Example(tokens, mask) for tokens, mask in chat.examples]
        # Generation-based evaluation asks for the last reply once, in the full context.
        examples[-1].prompt_messages, examples[-1].tools = messages[:last], tools
        examples[-1].reference = messages[last].get("content")
        rewritten = chat.rewritten
        if chat.tools_ignored:
            raise DataError(TOOLS_NOT_RENDERED)
    elif fmt == "completions":
        prompt = _encode(tokenizer, row["prompt"], first=True)
        completion = _encode(tokenizer, row["completion"], first=False) + [eos]
        examples = [Example(prompt + completion, [False] * len(prompt) + [True] * len(completion),
                            prompt_text=row["prompt"], reference=row["completion"])]
    else:
        tokens = _encode(tokenizer, row["text"], first=True) + [eos]
        examples = [Example(tokens, [True] * len(tokens))]
    if train_on_prompt:
        for example in examples:
            example.mask = [True] * len(example.tokens)
    return examples, rewritten


def tokenize_row(tokenizer, row: dict, fmt: str, train_on_prompt: bool, completions_as_chat: bool = True) -> Example:
    """The example of one row that holds its last target (a chat's last assistant turn)."""
    return row_examples(tokenizer, row, fmt, train_on_prompt, completions_as_chat)[0][-1]


def tokenize_chat(tokenizer, messages: list[dict], tools=None) -> tuple[list[int], list[bool]]:
    """(tokens, mask) of a chat that the template renders prefix by prefix (one example)."""
    chat = tokenize_conversation(tokenizer, messages, tools)
    if len(chat.examples) != 1:
        raise DataError(f"the chat template rewrites assistant turn(s) {chat.rewritten}; use row_examples")
    return chat.examples[0]


def load_split(path: Path, tokenizer, config: DataConfig, stats: DataStats | None = None) -> list[Example]:
    """Tokenize one JSONL split, applying the overlong policy and counting what was changed."""
    return tokenize_rows(path, read_jsonl(path), tokenizer, config, stats)


def tokenize_rows(path: Path, rows: list[tuple[int, dict]], tokenizer, config: DataConfig,
                  stats: DataStats | None = None) -> list[Example]:
    """Tokenize (line number, row) pairs read from `path`, applying the overlong policy and counting."""
    stats = stats if stats is not None else DataStats()
    examples = []
    formats: dict[str, int] = {}
    for line_number, row in rows:
        where = f"{path}:{line_number}"
        fmt = row_format(row, where)
        formats.setdefault(fmt, line_number)
        if len(formats) > 1:
            raise DataError(f"{path}: mixes formats ({', '.join(f'{k} at line {v}' for k, v in formats.items())}); "
                            "convert the file with data_transform.py")
        try:
            row_list, rewritten = row_examples(tokenizer, row, fmt, config.train_on_prompt, config.completions_as_chat)
        except DataError as err:
            raise DataError(f"{where}: {err}") from err
        stats.rows += 1
        for key in unused_keys(row, fmt):
            stats.unused_fields[key] = stats.unused_fields.get(key, 0) + 1
        if fmt == "completions" and completion_uses_template(tokenizer, config.completions_as_chat):
            stats.templated_completions += 1
        if rewritten:
            stats.rewritten_rows += 1
            stats.rewritten_turns += len(rewritten)
            if len(stats.rewritten_examples) < MAX_REWRITE_EXAMPLES:
                stats.rewritten_examples.append(f"{path.name}:{line_number} " + ", ".join(f"messages[{i}]" for i in rewritten))
        for example in row_list:
            had_target = any(example.mask[1:])
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
                stats.targets_cut_off += had_target  # every target token lay past the truncation
                continue
            stats.tokens += len(example.tokens)
            stats.target_tokens += sum(example.mask[1:])
            stats.lengths.append(len(example.tokens))
            examples.append(example)
    if not examples:
        cut = (f", {stats.targets_cut_off} of them because truncation to data.max_seq_length cut off every "
               "target token: raise data.max_seq_length") if stats.targets_cut_off else ""
        raise DataError(f"{path}: every example was dropped ({stats.dropped_overlong} longer than "
                        f"data.max_seq_length={config.max_seq_length}, {stats.dropped_no_target} with no target tokens{cut})")
    return examples


def carve_valid(rows: list[tuple[int, dict]], fraction: float, seed: int, path: Path) -> tuple[list, list]:
    """(train rows, valid rows): `fraction` of `rows` (at least one) held out by a seeded shuffle.

    The held-out rows keep their line numbers, so errors still point into train.jsonl.
    """
    count = max(1, int(len(rows) * fraction + 0.5))
    if count >= len(rows):
        raise DataError(f"{path}: {len(rows)} row(s), too few to hold out data.valid_fraction={fraction:g} "
                        "and keep training rows; add rows, lower data.valid_fraction or add a valid.jsonl")
    held = set(np.random.default_rng([seed, 1]).permutation(len(rows))[:count].tolist())
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


def load_datasets(config: DataConfig, tokenizer, splits=SPLITS, seed: int = 0,
                  rows_tokenizer=None) -> tuple[dict[str, list], dict[str, dict]]:
    """Tokenized examples and statistics for each requested split of `config.path`.

    `rows_tokenizer(path, rows, tokenizer, config, stats)` turns one split's rows into items
    (default `tokenize_rows`; `preference_data.load_datasets_for` passes its pair reader).

    train.jsonl and test.jsonl must exist when asked for. valid.jsonl is optional: without it,
    `config.valid_fraction` > 0 holds out that part of train.jsonl (seeded by `seed`), and 0
    gives an empty valid split (no validation loss). `stats[split]["source"]` says which.
    """
    folder = Path(config.path)
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is not a folder; it must hold train.jsonl, and test.jsonl unless "
                        "eval.enabled is false (valid.jsonl is optional; make them with data_transform.py)")
    datasets, stats = {}, {}
    rows = {split: None for split in splits}
    paths = {split: folder / f"{split}.jsonl" for split in splits}
    sources = {split: f"{split}.jsonl" for split in splits}
    if "valid" in splits and not (folder / "valid.jsonl").is_file():
        if config.valid_fraction > 0:
            train_path = paths["valid"] = folder / "train.jsonl"
            rows["train"], rows["valid"] = carve_valid(read_jsonl(train_path), config.valid_fraction, seed, train_path)
            sources["valid"] = f"{len(rows['valid'])} row(s) held out of train.jsonl (data.valid_fraction {config.valid_fraction:g})"
            sources["train"] = "train.jsonl less the held-out rows"
        else:
            rows["valid"] = []
            sources["valid"] = "none (no valid.jsonl and data.valid_fraction is 0: no validation loss)"
    elif "valid" in splits and config.valid_fraction > 0:
        raise DataError(f"data.valid_fraction {config.valid_fraction:g} asks to hold out part of train.jsonl, but "
                        f"{folder / 'valid.jsonl'} exists; use one or the other (set data.valid_fraction: 0)")
    for split in splits:
        split_stats = DataStats()
        path = paths[split]
        if split == "test" and not path.is_file():
            raise DataError(f"{path}: file not found; evaluation needs a test split: make one with "
                            "data_transform.py --test-fraction F, or set eval.enabled: false")
        split_rows = rows[split]
        if split_rows is None:
            split_rows = read_jsonl(path)
        datasets[split] = (rows_tokenizer or tokenize_rows)(path, split_rows, tokenizer, config, split_stats) if split_rows else []
        stats[split] = {**split_stats.summary(), "source": sources[split]}
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
