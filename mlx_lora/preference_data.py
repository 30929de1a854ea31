"""Preference data for DPO / ORPO: read chosen/rejected rows, tokenize both answers, batch pairs.

A row is `{"prompt": str, "chosen": ..., "rejected": ...}` or `{"messages": [...], "chosen": ...,
"rejected": ...}`: the prompt (or the shared conversation prefix) followed by two answers, each a
string, one assistant message, or a list of messages; either may carry `tools` (function specs,
passed to the chat template as for SFT chat rows). Only the answers' tokens are targets. A
batch of B pairs is one (2B, T) array, chosen rows first, then rejected (TRL's concatenated
forward), so both answers of a pair go through the model together. Reading, splits and batching
order are `data.py`'s; this module owns only what differs for pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat import ChatTemplateError, render
from .config import DataConfig
from . import data
from .data import PAD_MULTIPLE, TOOLS_NOT_RENDERED, DataError, DataStats, Example, _check_messages, _check_tools, \
    _did_you_mean, _encode, has_chat_template, read_jsonl, tokenize_chat

ANSWER_KEYS = ("chosen", "rejected")
# The keys each row shape reads (a row with 'messages' is that shape, whatever else it has); any
# other key is counted in the data summary as not used by training, as `data.FORMAT_KEYS` for SFT.
PAIR_FORMAT_KEYS = {"messages": ("messages", "chosen", "rejected", "tools"),
                    "prompt": ("prompt", "chosen", "rejected", "tools")}
# The per-batch preference metrics (batch means), in the order both backends' losses return them.
METRICS = ("reward_margin", "reward_accuracy", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps")
FORMAT_HINT = ('rows with "prompt" (or "messages") plus "chosen" and "rejected"; '
               "convert HH-RLHF, UltraFeedback or OpenAI preference files with data_transform.py")


@dataclass
class PreferencePair:
    """One prompt with a preferred and a dispreferred answer, each tokenized with its target mask."""

    chosen: Example
    rejected: Example
    nll_on_prompt: bool = False  # ORPO's NLL term covers the prompt too (data.train_on_prompt), as TRL's

    @property
    def length(self) -> int:
        """Tokens of the longer sequence: what the pair costs in a padded batch."""
        return max(len(self.chosen.tokens), len(self.rejected.tokens))


def _answer_messages(value, key: str, where: str) -> list[dict]:
    """An answer as a list of messages (a string is one assistant message)."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: '{key}' is an empty string")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a string, an assistant message or a list of messages, "
                        f"got {type(value).__name__}")
    _check_messages(value, f"{where}: '{key}'")
    return value


def _hint(keys: tuple[str, ...], row: dict) -> str:
    """`data._did_you_mean` for the first of `keys` that one of the row's keys is close to."""
    return next((h for h in (_did_you_mean(k, row) for k in keys) if h), "")


def parse_row(row: dict, where: str, objective: str) -> tuple[list[dict] | str, list[dict], list[dict]]:
    """(prompt: prefix messages or a string, chosen messages, rejected messages) of one row.

    Raises DataError naming `where` (file:line) for an SFT row, a missing field (with a did-you-mean
    when the row has a key close to it) or a wrong type.
    """
    if not any(key in row for key in ANSWER_KEYS):
        kind = next((k for k in ("messages", "prompt", "text") if k in row), None)
        raise DataError(f"{where}: training.objective: {objective} needs preference data ({FORMAT_HINT}); "
                        f"this row has {f'an SFT {kind!r} field' if kind else f'keys {sorted(row)}'}"
                        f"{_hint(ANSWER_KEYS, row)}")
    for key in ANSWER_KEYS:
        if key not in row:
            raise DataError(f"{where}: missing '{key}'{_did_you_mean(key, row)}; a preference row needs both "
                            "'chosen' and 'rejected'")
    if "messages" in row:
        prefix = row["messages"]
        if not isinstance(prefix, list) or not prefix:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        _check_messages(prefix + [{"role": "assistant", "content": ""}], f"{where}: 'messages'")
        prompt = prefix
    elif isinstance(row.get("prompt"), str):
        prompt = row["prompt"]
    else:
        got = type(row.get("prompt")).__name__ if "prompt" in row else f"nothing{_hint(('prompt', 'messages'), row)}"
        raise DataError(f"{where}: missing 'prompt' (a string) or 'messages' (the conversation before the answers); "
                        f"got {got}")
    return prompt, _answer_messages(row["chosen"], "chosen", where), _answer_messages(row["rejected"], "rejected", where)


def _keep_last_runs(mask: list[bool], runs: int) -> list[bool]:
    """`mask` with only its last `runs` contiguous target runs (one per assistant turn) kept."""
    kept, seen, inside = list(mask), 0, False
    for i in range(len(mask) - 1, -1, -1):
        if mask[i] and not inside:
            seen += 1
        inside = mask[i]
        if seen > runs:
            kept[i] = False
    return kept


def _check_template_shows_tools(tokenizer, prefix: list[dict], tools: list[dict]) -> None:
    """Refuse tools the chat template renders nothing of (the model would learn calls to unseen tools)."""
    if render(tokenizer, prefix, True, tools) == render(tokenizer, prefix, True, None):
        raise DataError(TOOLS_NOT_RENDERED)


def tokenize_answer(tokenizer, prompt: list[dict] | str, answer: list[dict],
                    tools: list[dict] | None = None) -> Example:
    """Prompt + answer as one Example whose mask covers the answer's assistant tokens only.

    `tools` (function specs) go to the chat template with the conversation, as for SFT chat rows.
    """
    if has_chat_template(tokenizer):
        prefix = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        try:
            if tools:
                _check_template_shows_tools(tokenizer, prefix, tools)
            tokens, mask = tokenize_chat(tokenizer, prefix + answer, tools)
        except ChatTemplateError as err:
            raise DataError(str(err)) from None
        # Assistant turns of the shared prefix are context: each turn is one run of targets.
        mask = _keep_last_runs(mask, sum(m["role"] == "assistant" for m in answer))
        return Example(tokens, mask, prompt_messages=prefix, tools=tools or None)
    if tools:
        raise DataError("the row has 'tools' but the tokenizer has no chat template to show them to the model; "
                        "set data.chat_template to a tool-aware template or drop 'tools'")
    if not isinstance(prompt, str) or len(answer) != 1 or answer[0]["role"] != "assistant":
        raise DataError("the tokenizer has no chat template, so rows need a 'prompt' string and one answer string")
    prompt_ids = _encode(tokenizer, prompt, first=True)
    answer_ids = _encode(tokenizer, answer[0]["content"], first=False) + [tokenizer.eos_token_id]
    return Example(prompt_ids + answer_ids, [False] * len(prompt_ids) + [True] * len(answer_ids), prompt_text=prompt)


def _fit(example: Example, config: DataConfig, stats: DataStats) -> Example | None:
    """Apply the overlong policy to one sequence; None when it is dropped."""
    if len(example.tokens) <= config.max_seq_length:
        return example
    if config.overlong == "drop":
        return None
    example.tokens = example.tokens[: config.max_seq_length]
    example.mask = example.mask[: config.max_seq_length]
    return example


def load_preference_split(path: Path, tokenizer, config: DataConfig, stats: DataStats | None = None,
                          objective: str = "dpo") -> list[PreferencePair]:
    """Tokenize one preference split file (see `tokenize_pair_rows`)."""
    return tokenize_pair_rows(path, read_jsonl(path), tokenizer, config, stats, objective)


def tokenize_pair_rows(path: Path, rows: list[tuple[int, dict]], tokenizer, config: DataConfig,
                       stats: DataStats | None = None, objective: str = "dpo") -> list[PreferencePair]:
    """Tokenize (line number, row) pairs of `path`. Identical answers, overlong pairs (with overlong:
    drop) and pairs left without an answer token are dropped and counted in `stats`; errors name file:line."""
    stats = stats if stats is not None else DataStats()
    pairs = []
    for line_number, row in rows:
        where = f"{path}:{line_number}"
        prompt, chosen, rejected = parse_row(row, where, objective)
        _check_tools(row, where)
        stats.rows += 1
        for key in row:
            if key not in PAIR_FORMAT_KEYS["messages" if "messages" in row else "prompt"]:
                stats.unused_fields[key] = stats.unused_fields.get(key, 0) + 1
        if chosen == rejected:
            stats.dropped_identical += 1
            continue
        try:
            answers = [tokenize_answer(tokenizer, prompt, answer, row.get("tools")) for answer in (chosen, rejected)]
        except DataError as err:
            raise DataError(f"{where}: {err}") from err
        lengths = [len(a.tokens) for a in answers]
        fitted = [_fit(a, config, stats) for a in answers]
        if any(a is None for a in fitted):
            stats.dropped_overlong += 1
            continue
        if max(lengths) > config.max_seq_length:
            stats.truncated += 1
        if not all(any(a.mask[1:]) for a in fitted):
            stats.dropped_no_target += 1
            continue
        pair = PreferencePair(*fitted, nll_on_prompt=config.train_on_prompt)
        stats.tokens += sum(len(a.tokens) for a in fitted)
        stats.target_tokens += sum(sum(a.mask[1:]) for a in fitted)
        stats.lengths.append(pair.length)
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: every pair was dropped ({stats.dropped_identical} with identical chosen and "
                        f"rejected, {stats.dropped_overlong} longer than data.max_seq_length={config.max_seq_length}, "
                        f"{stats.dropped_no_target} with no answer tokens left)")
    return pairs


def load_datasets_for(config: DataConfig, tokenizer, objective: str, splits=data.SPLITS, seed: int = 0):
    """`data.load_datasets` for `training.objective`: examples for sft, preference pairs for dpo / orpo."""
    if objective == "sft":
        return data.load_datasets(config, tokenizer, splits, seed=seed)

    def pair_rows(path, rows, tokenizer, config, stats):
        return tokenize_pair_rows(path, rows, tokenizer, config, stats, objective)

    return data.load_datasets(config, tokenizer, splits, seed=seed, rows_tokenizer=pair_rows)


def collate_pairs(pairs: list[PreferencePair], indices: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """One batch of B pairs: (tokens (2B, T) int32, masks (2, 2B, T-1) float32, non-padding token count).

    Rows 0..B-1 are the chosen answers, B..2B-1 the rejected ones. `masks[0]` marks the answer
    (target) tokens, whose log-probabilities DPO/ORPO compare; `masks[1]` marks the tokens of
    ORPO's NLL term: the answer's, or every real token when the pair's `nll_on_prompt` is set.
    """
    rows = [pairs[i].chosen for i in indices] + [pairs[i].rejected for i in indices]
    longest = max(len(r.tokens) for r in rows)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens = np.zeros((len(rows), width), np.int32)
    masks = np.zeros((2, len(rows), width), np.float32)
    on_prompt = [pairs[i].nll_on_prompt for i in indices] * 2
    for j, row in enumerate(rows):
        tokens[j, : len(row.tokens)] = row.tokens
        masks[0, j, : len(row.mask)] = row.mask
        masks[1, j, : len(row.tokens)] = 1.0 if on_prompt[j] else row.mask
    return tokens, masks[:, :, 1:], sum(len(r.tokens) for r in rows)
