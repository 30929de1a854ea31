"""Streamed tool calls as OpenAI `delta.tool_calls`: the id and name first, then the arguments in pieces.

OpenAI's stream sends each call as `{"index", "id", "type", "function": {"name", "arguments": ""}}`
once, then `{"index", "function": {"arguments": piece}}` chunks whose concatenation is the
call's arguments; the `openai` SDK (and every client) joins them by `index`. The joined arguments
here are exactly what the non-streamed answer holds: `json.dumps` of the parsed arguments.

For the JSON tool-call format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, mlx-lm's
`json_tools`) the name is sent as soon as it is written and each argument as soon as its value is
complete: `{"city": "Paris"`, then `, "days": 3`, then `}`; every piece is a prefix of the final
`json.dumps`, because a completed key's value never changes. Other formats (XML-like, pythonic,
Mistral's) are parsed by their mlx-lm parser when the call ends and sent as one name chunk and one
arguments chunk.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Optional

NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*\{')
_DECODER = json.JSONDecoder()


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def partial_json_call(body: str) -> tuple[Optional[str], Optional[dict]]:
    """(name, the arguments whose values are complete) of a JSON tool call still being written.

    `body` is the text after the start marker, e.g. `{"name": "f", "arguments": {"a": 1, "b": "x`
    -> ("f", {"a": 1}). The arguments are None until their object has opened.
    """
    opened = ARGUMENTS.search(body)
    named = NAME.search(body[: opened.start()] if opened else body)
    name = json.loads(f'"{named.group(1)}"') if named else None
    if opened is None:
        return name, None
    pairs: dict = {}
    pos = opened.end()
    while True:
        pos = _skip_space(body, pos)
        if pos >= len(body) or body[pos] == "}":
            return name, pairs
        try:
            key, pos = _DECODER.raw_decode(body, pos)
            pos = _skip_space(body, pos)
            if pos >= len(body) or body[pos] != ":" or not isinstance(key, str):
                return name, pairs
            value, pos = _DECODER.raw_decode(body, _skip_space(body, pos + 1))
        except json.JSONDecodeError:
            return name, pairs
        pos = _skip_space(body, pos)
        if pos >= len(body) or body[pos] not in ",}":  # a number may still grow: wait for what follows
            return name, pairs
        pairs[key] = value
        pos += body[pos] == ","


class ToolCallDeltas:
    """One sequence's streamed tool calls: `update(text)` while the call is written, `complete(calls)` at the end."""

    def __init__(self, tokenizer):
        self.start = tokenizer.tool_call_start
        self.end = tokenizer.tool_call_end
        parser = getattr(tokenizer, "tool_parser", None)
        self.incremental = parser is not None and parser.__module__.endswith("json_tools")
        self.sent: list[dict] = []  # per call index: {"id", "name", "arguments" sent so far}

    def update(self, tool_text: str) -> list[dict]:
        """The delta.tool_calls entries that `tool_text` (from the first start marker on) adds."""
        if not self.incremental:
            return []
        deltas = []
        for index, region in enumerate(tool_text.split(self.start)[1:]):
            body = region.split(self.end)[0] if self.end else region
            name, arguments = partial_json_call(body)
            if name is None:
                break  # calls are sent in order: a later one waits for this one's name
            if index == len(self.sent):
                self.sent.append({"id": "call_" + uuid.uuid4().hex[:24], "name": name, "arguments": ""})
                deltas.append({"index": index, "id": self.sent[index]["id"], "type": "function",
                               "function": {"name": name, "arguments": ""}})
            if arguments is not None:
                deltas += self._more(index, json.dumps(arguments)[:-1])  # without the closing brace
        return deltas

    def complete(self, calls: list[dict]) -> list[dict]:
        """The remaining entries so the joined stream equals `calls` (final, parsed); gives `calls` the sent ids."""
        deltas = []
        for index, call in enumerate(calls):
            function = call["function"]
            if index < len(self.sent) and self.sent[index]["name"] == function["name"]:
                call["id"] = self.sent[index]["id"]
            else:
                self.sent[index:] = [{"id": call["id"], "name": function["name"], "arguments": ""}]
                deltas.append({"index": index, "id": call["id"], "type": "function",
                               "function": {"name": function["name"], "arguments": ""}})
            deltas += self._more(index, function["arguments"])
        return deltas

    def _more(self, index: int, arguments: str) -> list[dict]:
        sent = self.sent[index]
        if not arguments.startswith(sent["arguments"]) or arguments == sent["arguments"]:
            return []
        piece, sent["arguments"] = arguments[len(sent["arguments"]):], arguments
        return [{"index": index, "function": {"arguments": piece}}]
