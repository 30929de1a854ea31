"""Constrained decoding with llguidance: `response_format` json_object / json_schema, and forced tool calls.

llguidance (the maintained grammar engine behind Guidance, a Rust core with a CPU token mask)
compiles a JSON schema or a Lark grammar once per request; each
decode step asks it for the allowed next tokens (a bitmask) and tells it the sampled token.
The scheduler applies the mask per row (`Sequence.constraint`), so constrained and free
sequences share a batch. Its MLX helper is a Metal kernel, so the mask is unpacked with numpy here.

Errors: an invalid schema or an impossible tool grammar raises `ConstraintError` naming the
request field; the HTTP layer answers 400. JSON is written with fixed separators (`, ` and `: `)
and no other whitespace. A response cut by max_tokens is cut JSON (finish_reason "length"), as in OpenAI's API.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

JSON_OBJECT = {"type": "object"}
# Fixed separators and no free whitespace: a model cannot loop on whitespace (a random model does).
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """A request whose grammar cannot be built; `param` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class GrammarConstraint:
    """One request's grammar state: `mask()` before each step, `accept(token)` after it."""

    def __init__(self, lltokenizer, grammar: str, vocab_size: int):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(lltokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"grammar: {self.matcher.get_error()}", "response_format")
        self.vocab_size = vocab_size

    def mask(self) -> Optional[mx.array]:
        """(V,) bool: the tokens the grammar allows next."""
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        bits = allocate_token_bitmask(1, self.vocab_size)  # (1, ceil(V / 32)) int32
        fill_next_token_bitmask(self.matcher, bits, 0)
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
        return mx.array(allowed)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Per model: the llguidance tokenizer (built once, ~1 s) and grammar validation."""

    def __init__(self, tokenizer, vocab_size: int):
        from llguidance.hf import from_tokenizer

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self.lltokenizer = from_tokenizer(hf, n_vocab=vocab_size, eos_token=sorted(tokenizer.eos_token_ids)[0])
        self.vocab_size = vocab_size

    def factory(self, grammar: str, param: str) -> Callable[[], GrammarConstraint]:
        from llguidance import LLMatcher

        problem = LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if problem:
            raise ConstraintError(f"{param}: {problem}", param)
        return lambda: GrammarConstraint(self.lltokenizer, grammar, self.vocab_size)


def check_schema(schema: dict, param: str) -> None:
    """Raise ConstraintError unless `schema` is a valid JSON Schema (by the `jsonschema` metaschema)."""
    if not isinstance(schema, dict):
        raise ConstraintError(f"{param}: the schema must be a JSON object", param)
    try:
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for
    except ImportError:  # the grammar engine still rejects what it cannot compile
        return
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as err:
        raise ConstraintError(f"{param}: invalid JSON schema: {err.message}", param) from None
    except RecursionError:  # jsonschema walks the schema recursively: a schema nested ~100 deep
        raise ConstraintError(f"{param}: the schema nests too deeply to check; flatten it, or share "
                              "repeated parts through $defs and $ref", param) from None


def response_grammar(response_format) -> Optional[str]:
    """The llguidance grammar for a `response_format`, or None for plain text."""
    from llguidance import LLMatcher

    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return LLMatcher.grammar_from_json_schema(JSON_OBJECT, overrides=LAYOUT)
    if response_format.json_schema is None:
        raise ConstraintError("response_format: type json_schema needs a `json_schema` with a `schema`",
                              "response_format")
    schema = response_format.json_schema.schema_
    check_schema(schema, "response_format")
    return LLMatcher.grammar_from_json_schema(schema, overrides=LAYOUT)


FORCEABLE_FORMATS = ("json_tools", "mistral", "qwen3_coder")  # mlx-lm tool parsers we can write a grammar for


def _xml_value(schema: dict) -> str:
    """Lark for one Qwen3-Coder parameter value: raw text for strings (the parser keeps it as is), else JSON."""
    if schema.get("type") == "string" and not ({"enum", "const", "pattern", "format"} & set(schema)):
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        return f"/[^<\\n]{{{low},{'' if high is None else int(high)}}}/"  # no '<' or newline: the markup stays unambiguous
    return f"%json {json.dumps({**schema, 'x-guidance': LAYOUT})}"


def _qwen3_coder_call(tool: dict, rule: str) -> str:
    """Lark rules for one call in Qwen3-Coder's XML: <function=NAME> then <parameter=KEY> blocks, in schema order."""
    function = tool["function"]
    schema = function.get("parameters") or {}
    required = set(schema.get("required", []))
    parts, rules = [], []
    for i, (key, value_schema) in enumerate((schema.get("properties") or {}).items()):
        rules.append(f"{rule}_{i}: {json.dumps(f'<parameter={key}>' + chr(10))} {_xml_value(value_schema)} "
                     f"{json.dumps(chr(10) + '</parameter>' + chr(10))}")
        parts.append(f"{rule}_{i}" + ("" if key in required else "?"))
    head = json.dumps(f"<function={function['name']}>\n")
    return "\n".join([f"{rule}: {head} {' '.join(parts)} \"</function>\"", *rules])


def tool_grammar(tokenizer, tools: list[dict], tool_choice) -> Optional[str]:
    """A grammar forcing a tool call when `tool_choice` is "required" or names a function; else None.

    The call is written in the template's own format, with the arguments as JSON by the tool's schema:
    - `json_tools` (Qwen2.5, Hermes): `<tool_call>` + {"name", "arguments"} + `</tool_call>`;
    - `mistral`: `[TOOL_CALLS]` + [{"name", "arguments"}];
    - `qwen3_coder`: `<tool_call>` + `<function=NAME>` + one `<parameter=KEY>` block per argument
      (strings as raw text without `<` or newlines, other values as JSON) + `</tool_call>`.
    Other formats (XML-like parameters, pythonic calls, ...) are parsed when a model writes them, but
    a forced call is refused with a ConstraintError naming `tool_choice`.
    """
    from llguidance import LLMatcher

    if tool_choice in (None, "auto", "none"):
        return None
    if not tools:
        raise ConstraintError("tool_choice: needs `tools`", "tool_choice")
    wanted = [t for t in tools if tool_choice == "required" or t["function"]["name"] == tool_choice.function.name]
    if not wanted:
        raise ConstraintError(f"tool_choice: no tool named {tool_choice.function.name!r} in tools", "tool_choice")
    parser = getattr(tokenizer, "tool_parser", None)
    family = parser.__module__.rsplit(".", 1)[-1] if parser is not None else None
    if family not in FORCEABLE_FORMATS:
        raise ConstraintError(f"tool_choice: forcing a call works with the {' and '.join(FORCEABLE_FORMATS)} tool-call "
                              f"formats; this template's is {family}; use tool_choice auto (the model may still "
                              "call a tool, and the call is parsed)", "tool_choice")
    for tool in wanted:
        check_schema(tool["function"]["parameters"], "tools")
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "arguments": t["function"]["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False} for t in wanted]
    schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), "x-guidance": LAYOUT}
    start = json.dumps(tokenizer.tool_call_start)
    if family == "mistral":  # no end marker: the call is a JSON list, then end of sequence
        lark = f'start: {start} "[" call "]"\ncall: %json {json.dumps(schema)}\n'
    elif family == "qwen3_coder":
        names = [f"call{i}" for i in range(len(wanted))]
        lark = (f'start: {start} "\\n" ({" | ".join(names)}) "\\n" {json.dumps(tokenizer.tool_call_end)}\n'
                + "\n".join(_qwen3_coder_call(t, n) for t, n in zip(wanted, names)) + "\n")
    else:
        lark = f'start: {start} "\\n" call "\\n" {json.dumps(tokenizer.tool_call_end)}\ncall: %json {json.dumps(schema)}\n'
    return LLMatcher.grammar_from_lark(lark)


def constraint_for(compiler: Optional[GrammarCompiler], tokenizer, response_format, tools, tool_choice):
    """A factory of fresh per-request constraints, or None when the request needs none.

    Raises ConstraintError (a 400 naming the field) for invalid schemas or impossible choices.
    """
    grammar = tool_grammar(tokenizer, tools, tool_choice)
    param = "tool_choice"
    if grammar is None:
        grammar, param = response_grammar(response_format), "response_format"
    if grammar is None:
        return None
    if compiler is None:
        raise ConstraintError(f"{param}: constrained decoding needs a fast Hugging Face tokenizer", param)
    return compiler.factory(grammar, param)
