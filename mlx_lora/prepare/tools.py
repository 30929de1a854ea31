"""Tool use in raw records: tool lists and tool calls, in the shapes chat templates read.

Templates (and `apply_chat_template(tools=...)`) take tools as OpenAI function specs,
`{"type": "function", "function": {"name", "description", "parameters"}}`, and assistant tool
calls as `{"type": "function", "function": {"name", "arguments": {...}}}`. Datasets from other
tools (LLaMA-Factory's ShareGPT, Alpaca with `tools`) store both as JSON strings and bare specs;
this module turns them into those shapes, and says which field is wrong when it cannot.
"""

from __future__ import annotations

import json
from typing import Any

from .readers import RawRecord, TransformError


def _error(record: RawRecord, field: str, problem: str, fix: str) -> TransformError:
    return TransformError(f"{record.where(field.split('[', 1)[0])}: field '{field}' {problem}; {fix}")


def _parse(record: RawRecord, value: Any, field: str, what: str) -> Any:
    """`value`, or the JSON it holds when it is a string."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise _error(record, field, f"is not valid JSON ({err.msg} at character {err.pos})",
                     f"write {what} as JSON") from None


def normalise_tools(record: RawRecord, value: Any, field: str = "tools") -> list[dict] | None:
    """A record's tool list as OpenAI function specs; None when it has none.

    Accepts a list (or a JSON string of one) of OpenAI specs or bare `{"name", "parameters"}`
    function specs (wrapped as `{"type": "function", "function": spec}`).
    """
    if value is None or value == "" or value == []:
        return None
    tools = _parse(record, value, field, "the tool list")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise _error(record, field, f"is a {type(tools).__name__}", "make it a list of function specs")
    out = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict) and tool.get("type", "function") == "function":
            out.append({**tool, "type": "function"})
        elif isinstance(tool, dict) and isinstance(tool.get("name"), str):
            out.append({"type": "function", "function": tool})
        else:
            raise _error(record, f"{field}[{i}]", "is not a function spec",
                         'give {"name", "description", "parameters"} or {"type": "function", "function": {...}}')
    return out


def tool_calls_from_text(record: RawRecord, value: Any, field: str) -> list[dict]:
    """The tool calls of a ShareGPT `function_call` turn: `{"name", "arguments"}` or a list of them.

    JSON-string arguments are parsed into objects, as chat templates expect.
    """
    calls = _parse(record, value, field, 'the call, e.g. {"name": "get_weather", "arguments": {"city": "Lyon"}}')
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise _error(record, field, "holds no tool call", 'write {"name": ..., "arguments": {...}} (or a list of them)')
    out = []
    for i, call in enumerate(calls):
        call = call.get("function", call) if isinstance(call, dict) else call
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            raise _error(record, f"{field}[{i}]", "has no function name", 'write {"name": ..., "arguments": {...}}')
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass  # free-text arguments stay a string; some tools take them so
        out.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})
    return out
