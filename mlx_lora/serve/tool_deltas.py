"""Streamed tool calls as OpenAI `delta.tool_calls`: the id and name first, then the arguments in pieces.

OpenAI's stream sends each call as `{"index", "id", "type", "function": {"name", "arguments": ""}}`
once, then `{"index", "function": {"arguments": piece}}` chunks whose concatenation is the
call's arguments; the `openai` SDK (and every client) joins them by `index`. The joined arguments
here are exactly what the non-streamed answer holds: `json.dumps` of the parsed arguments.

For the JSON tool-call format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, mlx-lm's
`json_tools`) and Qwen3-Coder's XML (`<function=NAME><parameter=KEY>value</parameter>...`) the
name is sent as soon as it is written and each argument as soon as its value is complete:
`{"city": "Paris"`, then `, "days": 3`, then `}`; every piece is a prefix of the final
`json.dumps`, because a completed key's value never changes. Other formats (pythonic, Mistral's,
GLM's, ...) are parsed by their mlx-lm parser when the call ends and sent as one name chunk and
one arguments chunk.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Optional

NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*\{')
FUNCTION = re.compile(r"<function=([^\s<>]+)>")
PARAMETER_END = "</parameter>"
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


def partial_xml_call(body: str, parser, tools) -> tuple[Optional[str], Optional[dict]]:
    """(name, the arguments whose `</parameter>` is written) of a Qwen3-Coder XML call still being written.

    The completed parameters are parsed by the format's own parser (so values convert exactly as
    in the final parse) on the text up to the last `</parameter>`, closed with `</function>`.
    """
    named = FUNCTION.search(body)
    if named is None:
        return None, None
    cut = body.rfind(PARAMETER_END)
    if cut < 0:
        return named.group(1), {}
    try:
        parsed = parser(body[: cut + len(PARAMETER_END)] + "\n</function>", tools)
    except (ValueError, KeyError, TypeError, IndexError):
        return named.group(1), None
    arguments = parsed.get("arguments") if isinstance(parsed, dict) else None
    return named.group(1), arguments if isinstance(arguments, dict) else None


class ToolCallDeltas:
    """One sequence's streamed tool calls: `update(text)` while the call is written, `complete(calls)` at the end."""

    def __init__(self, tokenizer, tools: Optional[list] = None):
        self.start = tokenizer.tool_call_start
        self.end = tokenizer.tool_call_end
        self.parser, self.tools = getattr(tokenizer, "tool_parser", None), tools
        family = self.parser.__module__.rsplit(".", 1)[-1] if self.parser is not None else None
        self.partial = {"json_tools": lambda body: partial_json_call(body),
                        "qwen3_coder": lambda body: partial_xml_call(body, self.parser, self.tools)}.get(family)
        self.incremental = self.partial is not None
        self.sent: list[dict] = []  # per call index: {"id", "name", "arguments" sent so far}

    def update(self, tool_text: str) -> list[dict]:
        """The delta.tool_calls entries that `tool_text` (from the first start marker on) adds."""
        if not self.incremental:
            return []
        deltas = []
        for index, region in enumerate(tool_text.split(self.start)[1:]):
            body = region.split(self.end)[0] if self.end else region
            name, arguments = self.partial(body)
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
