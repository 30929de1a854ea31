"""Record formats: detect each raw record's format and convert it to one of mlx-lm's rows.

Inputs: Alpaca, ShareGPT, OpenAI chat, prompt/completion (any two keys) and plain text.
Outputs: `{"messages": [...]}` (chat), `{"prompt", "completion"}` and `{"text"}`. Reading the
files is `readers.py`'s job; counting, dedupe and splitting are `pipeline.py`'s.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Any

from . import preference
from .readers import RawRecord, TransformError
from .tables import TableRow
from .tools import normalise_tools, tool_calls_from_text

INPUT_FORMATS = ("alpaca", "sharegpt", "chat", "completions", "text") + preference.FORMATS
OUTPUT_FORMATS = ("chat", "completions", "text")
ROLES = ("system", "user", "assistant", "tool")
# OpenAI's newer and older names for roles the chat templates know under another name.
CHAT_ROLE_ALIASES = {"developer": "system", "function": "tool"}
# ShareGPT `from` values seen in the wild, mapped to chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "function_response": "tool",
}
# ShareGPT speakers whose value is a tool call (LLaMA-Factory's format): an assistant turn.
SHAREGPT_CALLS = ("function_call", "tool_call", "tool_calls")


# Top-level fields each input format reads (the prompt/completion/text keys come from `Keys`).
# Any other field of a record is not carried into the output: it is counted and named.
READS = {
    "chat": ("messages", "tools", "system"),
    "sharegpt": ("conversations", "tools", "system"),
    "alpaca": ("instruction", "input", "output", "system", "history", "tools"),
    "completions": ("system",),
    "text": (),
    **preference.READS,
}
SHAREGPT_TURN_READS = ("from", "value")


@dataclass(frozen=True)
class Keys:
    """Field names of the prompt/completion and text formats (`--prompt-key` and friends)."""

    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"
    chosen: str = "chosen"  # preference pairs (`--chosen-key`, `--rejected-key`)
    rejected: str = "rejected"


def with_pair_keys(record: RawRecord, keys: Keys) -> RawRecord:
    """The record with the user's preference-pair field names (`--chosen-key good --rejected-key bad`,
    and `--prompt-key` when the record holds a pair) under the names the pair formats read: chosen,
    rejected, prompt. Records without those fields, and default names, are returned as they are."""
    value = record.value
    renames = {name: target for name, target in ((keys.chosen, "chosen"), (keys.rejected, "rejected")) if name != target}
    if not renames or not isinstance(value, dict) or not any(name in value for name in renames):
        return record
    missing = [(name, flag) for name, flag in ((keys.chosen, "--chosen-key"), (keys.rejected, "--rejected-key"))
               if name not in value]
    if missing:  # one of the pair's fields is there, the other is not: name the one the user gave
        name, flag = missing[0]
        raise TransformError(f"{record.where()}: no field {name!r} ({flag}) in this record, which has "
                             f"{', '.join(map(repr, map(str, value)))}; give {flag} the column that holds that answer")
    if keys.prompt not in preference.PROMPT_KEYS and "prompt" not in value:
        renames[keys.prompt] = "prompt"
    table = isinstance(value, TableRow)
    spelled = {(value.header(name) if table else name): target for name, target in renames.items()
               if name in value and target not in value}
    cells = {spelled.get(name, name): cell for name, cell in dict.items(value)}
    if table:
        cells = TableRow(cells, {name: name for name in cells}, {name.casefold(): name for name in reversed(cells)})
    return replace(record, value=cells)


def detect(value: Any, keys: Keys = Keys()) -> str | None:
    """The input format of one raw record by its keys, or None when it matches none."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, dict):
        return None
    pairs = preference.detect(value)  # chosen/rejected records (DPO, ORPO) first: they may hold messages too
    if pairs is not None:
        return pairs
    if "messages" in value:
        return "chat"
    if "conversations" in value:
        return "sharegpt"
    if "instruction" in value:
        return "alpaca"
    if keys.prompt in value or keys.completion in value:
        return "completions"
    if keys.text in value:
        return "text"
    return None


def field_names(keys: Keys) -> tuple[str, ...]:
    """Every top-level field name some input format reads (CSV headers are matched to these)."""
    names = ({name for reads in READS.values() for name in reads}
             | {keys.prompt, keys.completion, keys.text, keys.chosen, keys.rejected})
    return tuple(sorted(names))


def _holds_data(value: Any, table: bool = False) -> bool:
    """Whether a field's value carries anything worth naming when it is left out.

    null, "" and empty lists / objects carry nothing; every other JSON value does, 0, false and
    " " included. A table has a cell for every column, so a blank or whitespace-only cell there
    is just an unfilled one.
    """
    if table and isinstance(value, str):
        return bool(value.strip())
    return not (value is None or (isinstance(value, (str, list, dict)) and not value))


def dropped_fields(value: Any, fmt: str, keys: Keys, output_format: str = "chat") -> list[str]:
    """Names of the fields of a raw record that its conversion leaves out (`conversations[].weight`,
    `input.parallel_tool_calls`), counting only fields that hold data (`_holds_data`).

    Chat messages keep every key in chat output (templates may read `name`, `tool_call_id`, ...);
    a completions row has room for role and content only.
    """
    if not isinstance(value, dict):
        return []
    reads = set(READS[fmt])
    reads |= {"completions": {keys.prompt, keys.completion}, "text": {keys.text}}.get(fmt, set())
    table = isinstance(value, TableRow)
    if table:  # a column is read under any case of its name: compare the headers as written
        reads = {value.header(name) for name in reads} - {None}
    dropped = [str(name) for name, item in value.items() if name not in reads and _holds_data(item, table)]
    if fmt == "sharegpt" and isinstance(value.get("conversations"), list):
        dropped += [f"conversations[].{k}" for k in _nested_data_keys(value["conversations"], SHAREGPT_TURN_READS)]
    if fmt == "chat" and output_format == "completions" and isinstance(value.get("messages"), list):
        dropped += [f"messages[].{k}" for k in _nested_data_keys(value["messages"], ("role", "content"))]
    dropped += sorted({f"{name}.{k}" for name, item, item_reads in preference.nested_objects(value, fmt)
                       for k, v in item.items() if k not in item_reads and _holds_data(v)})
    return dropped


def _nested_data_keys(items: list, reads: tuple[str, ...]) -> list[str]:
    """Sorted keys, other than `reads`, that hold data in at least one object of `items`."""
    return sorted({k for item in items if isinstance(item, dict) for k, v in item.items()
                   if k not in reads and _holds_data(v)})


def unknown_format_error(record: RawRecord, keys: Keys) -> TransformError:
    """The error for a record of no known format, listing what it has and what was expected."""
    value = record.value
    found = f"keys {sorted(map(str, value))[:12]}" if isinstance(value, dict) else f"a JSON {_type_name(value)}"
    hint = ""
    if isinstance(value, dict) and not isinstance(value, TableRow):  # table headers already match in any case
        near = [(str(name), key) for key in (keys.prompt, keys.completion, keys.text) for name in value
                if str(name) != key and str(name).casefold() == key.casefold()]
        if near:
            hint = f"; JSON field names match exactly: the record has {near[0][0]!r}, not {near[0][1]!r}"
    return TransformError(
        f"{record.where()}: no known record format in {found}; expected 'messages' (OpenAI chat), "
        f"'conversations' (ShareGPT), 'instruction'+'output' (Alpaca), '{keys.prompt}'+'{keys.completion}' "
        f"or '{keys.text}'; for other names pass --prompt-key NAME --completion-key NAME (or --text-key NAME){hint}"
    )


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def _field_error(record: RawRecord, field: str, problem: str, fix: str) -> TransformError:
    top = field.split("[", 1)[0].split(".", 1)[0]
    return TransformError(f"{record.where(top)}: field '{field}' {problem}; {fix}")


def _string(record: RawRecord, value: Any, field: str, required: bool = True) -> str:
    """`value` if it is a string ('' for an allowed missing/null one), else an error naming the field."""
    if isinstance(value, str):
        return value
    if value is None and not required:
        return ""
    if value is None:
        misspelled = ""
        if isinstance(record.value, dict) and "." not in field and "[" not in field:
            near = difflib.get_close_matches(field, [str(k) for k in record.value if k != field], n=1, cutoff=0.75)
            misspelled = f" (the record has '{near[0]}': a misspelling?)" if near else ""
        raise _field_error(record, field, "is missing", f"every record of this format needs '{field}'{misspelled}")
    raise _field_error(record, field, f"is a {_type_name(value)}, expected text",
                       "make it a string (quote numbers; join lists)")


def _object(record: RawRecord) -> dict:
    if not isinstance(record.value, dict):
        raise TransformError(f"{record.where()}: expected a JSON object, got a {_type_name(record.value)}; "
                             "put one record object per line / array element")
    return record.value


def _chat_content(record: RawRecord, content: Any, field: str, has_tool_calls: bool) -> str | None:
    if isinstance(content, str):
        return content
    if content is None and has_tool_calls:
        return None  # an assistant turn that only calls tools
    if isinstance(content, list):  # OpenAI content parts: keep the text ones, refuse images and audio
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise _field_error(record, f"{field}[{i}]", f"is a {kind!r} part; only text parts can be trained on",
                                   "drop non-text parts or the record")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        raise _field_error(record, field, "is missing", "give every message a string 'content'")
    raise _field_error(record, field, f"is a {_type_name(content)}, expected text", "make it a string")


# --- input formats to a common shape ----------------------------------------------------------
# Chat-like inputs become ("chat", messages, tools); pair-like ones ("completions", system, prompt,
# completion); text ("text", text). Rendering to the output format happens after.

def _from_chat(record: RawRecord) -> tuple:
    row = _object(record)
    messages = row.get("messages")
    if not isinstance(messages, list):
        raise _field_error(record, "messages", f"is a {_type_name(messages)}",
                           "make it a list of {\"role\", \"content\"} objects")
    out = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _field_error(record, field, f"is a {_type_name(message)}", "make it a {\"role\", \"content\"} object")
        role = message.get("role")
        role = CHAT_ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise _field_error(record, f"{field}.role", f"is {message.get('role')!r}, an unknown role",
                               f"use one of {', '.join(ROLES)}")
        has_tool_calls = bool(message.get("tool_calls"))
        content = _chat_content(record, message.get("content"), f"{field}.content", has_tool_calls)
        # Keep tool calls, tool_call_id, name and anything else the templates may read.
        out.append({**message, "role": role, "content": content})
    system = row.get("system")
    if system is not None:
        system = _string(record, system, "system")
        given = [m["content"] for m in out if m["role"] == "system"]
        if given and given != [system]:
            raise _field_error(record, "system", "differs from the conversation's own system message",
                               "keep one of the two")
        if not given:
            out.insert(0, {"role": "system", "content": system})
    return "chat", out, normalise_tools(record, row.get("tools"))


def _from_sharegpt(record: RawRecord) -> tuple:
    row = _object(record)
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise _field_error(record, "conversations", f"is a {_type_name(turns)}",
                           "make it a list of {\"from\", \"value\"} objects")
    messages = []
    system = row.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _string(record, system, "system")})
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise _field_error(record, field, f"is a {_type_name(turn)}", "make it a {\"from\", \"value\"} object")
        speaker = turn.get("from")
        if isinstance(speaker, str) and speaker.lower() in SHAREGPT_CALLS:
            calls = tool_calls_from_text(record, turn.get("value"), f"{field}.value")
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise _field_error(record, f"{field}.from", f"is {speaker!r}, an unknown speaker",
                               "use human, gpt, system, function_call or observation")
        messages.append({"role": role, "content": _string(record, turn.get("value"), f"{field}.value")})
    return "chat", messages, normalise_tools(record, row.get("tools"))


def _from_alpaca(record: RawRecord) -> tuple:
    row = _object(record)
    instruction = _string(record, row.get("instruction"), "instruction")
    extra = _string(record, row.get("input"), "input", required=False)
    output = _string(record, row.get("output"), "output")
    system = _string(record, row.get("system"), "system", required=False)
    # Alpaca's own template puts the input after the instruction; a blank line keeps them apart.
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    history = _alpaca_history(record, row.get("history"))
    tools = normalise_tools(record, row.get("tools"))
    if not history and tools is None:
        return "completions", system, prompt, output
    # Earlier turns (LLaMA-Factory's `history`: [[user, assistant], ...]) or tools make it a conversation.
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + history + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return "chat", messages, tools


def _alpaca_history(record: RawRecord, history: Any) -> list[dict]:
    """Alpaca `history` ([[user, assistant], ...], oldest first) as chat messages."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise _field_error(record, "history", f"is a {_type_name(history)}",
                           "make it a list of [user, assistant] pairs, oldest first")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _field_error(record, f"history[{i}]", "is not a [user, assistant] pair",
                               "give each earlier turn as a list of two strings")
        messages.append({"role": "user", "content": _string(record, pair[0], f"history[{i}][0]")})
        messages.append({"role": "assistant", "content": _string(record, pair[1], f"history[{i}][1]")})
    return messages


def _from_completions(record: RawRecord, keys: Keys) -> tuple:
    row = _object(record)
    prompt = _string(record, row.get(keys.prompt), keys.prompt)
    completion = _string(record, row.get(keys.completion), keys.completion)
    system = _string(record, row.get("system"), "system", required=False)
    return "completions", system, prompt, completion


def _from_text(record: RawRecord, keys: Keys) -> tuple:
    if isinstance(record.value, str):
        return "text", record.value
    row = _object(record)
    return "text", _string(record, row.get(keys.text), keys.text)


# --- the common shape to an output row --------------------------------------------------------

def _is_empty(shape: tuple) -> bool:
    """No target text: nothing to learn from (the record is dropped and counted as empty)."""
    if shape[0] == "text":
        return not shape[1].strip()
    if shape[0] == "completions":
        return not shape[3].strip()
    return not any(m["role"] == "assistant" and ((m["content"] or "").strip() or m.get("tool_calls"))
                   for m in shape[1])


class Converter:
    """Turns raw records into output rows: `convert(record, fmt)` returns a row, or None if empty."""

    def __init__(self, output_format: str = "chat", system: str | None = None, keys: Keys = Keys()):
        if output_format not in OUTPUT_FORMATS:
            raise TransformError(f"--output-format {output_format!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
        self.output_format = output_format
        self.system = system
        self.keys = keys

    def convert(self, record: RawRecord, fmt: str) -> dict | None:
        """The output row for `record` read as input format `fmt`; None when it has no content."""
        if fmt in preference.FORMATS:  # written in the preference shape whatever --output-format says
            return preference.convert(record, fmt, self.system)
        if fmt == "chat":
            shape = _from_chat(record)
        elif fmt == "sharegpt":
            shape = _from_sharegpt(record)
        elif fmt == "alpaca":
            shape = _from_alpaca(record)
        elif fmt == "completions":
            shape = _from_completions(record, self.keys)
        elif fmt == "text":
            shape = _from_text(record, self.keys)
        else:
            raise TransformError(f"--format {fmt!r}: expected auto or one of {', '.join(INPUT_FORMATS)}")
        if _is_empty(shape):
            return None
        if shape[0] == "chat" and not any(m["role"] == "assistant" for m in shape[1]):
            raise TransformError(f"{record.where()}: the conversation has no assistant message, so there is "
                                 "nothing to learn; add the reply or drop the record (--skip-invalid)")
        return self._render(record, fmt, shape)

    def _render(self, record: RawRecord, fmt: str, shape: tuple) -> dict:
        out = self.output_format
        if out == "text":
            if shape[0] != "text":
                raise TransformError(f"{record.where()}: a {fmt} record cannot be written as text without a prompt "
                                     "template; use --output-format chat or completions")
            return {"text": shape[1]}
        if shape[0] == "text":
            raise TransformError(f"{record.where()}: a text record has no prompt and reply to make a {out} row; "
                                 "use --output-format text")
        if out == "chat":
            if shape[0] == "chat":
                messages, tools = shape[1], shape[2]
            else:
                _, system, prompt, completion = shape
                messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
                    {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
                tools = None
            if self.system is not None and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": self.system}] + messages
            row: dict = {"messages": messages}
            if tools is not None:
                row["tools"] = tools
            return row
        # completions
        if shape[0] == "chat":
            system, prompt, completion = self._pair_from_chat(record, shape[1], shape[2])
        else:
            _, system, prompt, completion = shape
        if not system.strip() and self.system is not None:
            system = self.system
        # Completions rows have no system slot: the system text leads the prompt.
        return {"prompt": f"{system}\n\n{prompt}" if system.strip() else prompt, "completion": completion}

    @staticmethod
    def _pair_from_chat(record: RawRecord, messages: list[dict], tools: Any) -> tuple[str, str, str]:
        system = [m for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        simple = (len(system) <= 1 and (not system or messages[0]["role"] == "system") and len(rest) == 2
                  and [m["role"] for m in rest] == ["user", "assistant"]
                  and all(isinstance(m["content"], str) and not m.get("tool_calls") for m in messages) and not tools)
        if not simple:
            raise TransformError(f"{record.where()}: a conversation of {len(messages)} messages "
                                 f"({', '.join(m['role'] for m in messages)}) is not one prompt and one reply; "
                                 "use --output-format chat")
        return (system[0]["content"] if system else ""), rest[0]["content"], rest[1]["content"]
