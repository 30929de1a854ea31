"""Token statistics of converted rows: lengths as the trainer will see them, and their summary.

The tokenizer is passed in (any object with `encode` and `apply_chat_template`); loading one
from a model source is `mlx_lora.models.load_tokenizer`'s job.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer renders chats (completions rows are then tokenized as a chat, as in training)."""
    return bool(getattr(tokenizer, "chat_template", None))


def token_length(tokenizer: Any, row: dict) -> int:
    """Tokens of one output row, counted the way `mlx_lora.data` tokenizes it for training.

    Chat rows go through the chat template (the longest of their training examples);
    completions rows too when the tokenizer has one, else prompt + completion + EOS; text rows
    are the text + EOS.
    """
    if "chosen" in row:  # a preference pair: the longer of prompt + chosen and prompt + rejected
        prompt = {k: v for k, v in row.items() if k in ("prompt", "messages", "tools")}
        return max(token_length(tokenizer, _answer_row(prompt, row[key])) for key in ("chosen", "rejected"))
    if "prompt" in row and has_chat_template(tokenizer):
        row = {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]}
    if "messages" in row:
        # As training sees it: a template that rewrites earlier turns gives several examples
        # (mlx_lora.chat); the longest is what data.max_seq_length must hold. Errors inside the
        # template name its file:line.
        from mlx_lora.chat import tokenize_conversation

        return max(len(tokens) for tokens, _ in tokenize_conversation(tokenizer, row["messages"], row.get("tools")).examples)
    if "prompt" in row:
        return len(tokenizer.encode(row["prompt"])) + len(tokenizer.encode(row["completion"], add_special_tokens=False)) + 1
    return len(tokenizer.encode(row["text"])) + 1


def _answer_row(prompt: dict, answer: Any) -> dict:
    """A preference row's prompt with one answer, as an SFT row (tools kept: training shows them too)."""
    answer = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
    tools = {"tools": prompt["tools"]} if prompt.get("tools") else {}
    if "messages" in prompt:
        return {"messages": prompt["messages"] + answer, **tools}
    if len(answer) == 1 and not tools:
        return {"prompt": prompt["prompt"], "completion": answer[0]["content"]}
    return {"messages": [{"role": "user", "content": prompt["prompt"]}] + answer, **tools}


def _whole(x: float) -> float | int:
    """38.0 as 38 (a median of two token counts is printed like a count when it is one)."""
    return int(x) if float(x).is_integer() else x


def summarise(lengths: Sequence[int], max_seq_length: int) -> dict:
    """min / median / p95 / max token lengths and how many exceed `max_seq_length`."""
    if not lengths:
        return {"examples": 0}
    ordered = sorted(lengths)
    n = len(ordered)
    return {
        "examples": n,
        "min": ordered[0],
        "median": ordered[(n - 1) // 2] if n % 2 else _whole((ordered[n // 2 - 1] + ordered[n // 2]) / 2),
        "p95": ordered[max(0, math.ceil(0.95 * n) - 1)],  # nearest-rank percentile: a length that occurs
        "max": ordered[-1],
        "max_seq_length": max_seq_length,
        "over_max_seq_length": sum(1 for x in ordered if x > max_seq_length),
    }
