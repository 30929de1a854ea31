"""Preference records (for DPO / ORPO) into `{"prompt" | "messages", "chosen", "rejected"}` rows.

Inputs, detected per record by their keys:
- `hh-rlhf`: Anthropic HH-RLHF, `chosen` and `rejected` full transcripts ("\\n\\nHuman: ...
  \\n\\nAssistant: ...") sharing every turn but the last assistant reply;
- `scored`: UltraFeedback-style, a prompt (`prompt` / `instruction`) and a list of scored answers
  (`completions` / `responses`, each `response` / `text` / `content` with `overall_score` /
  `score` / `rating`): the best answer is chosen, the worst rejected; a tie is skipped;
- `openai-preference`: OpenAI's preference fine-tuning JSONL, `input.messages` (and `input.tools`),
  `preferred_output` and `non_preferred_output` (lists of assistant messages);
- `preference`: rows already in the training shape (`prompt` or `messages`, `chosen`,
  `rejected`, as strings, messages or full conversations such as UltraFeedback-binarized's), or
  TRL's implicit-prompt pairs: `chosen` and `rejected` whole conversations whose shared first turns
  are the prompt.
Tools (`input.tools`, or a native row's `tools`) are kept with the row as OpenAI function specs,
and messages keep every key (`tool_calls`, `name`, ...), as for chat rows. Pairs whose answers
are identical raise `SkipRecord("identical")`, which the pipeline counts.
"""

from __future__ import annotations

import re
from typing import Any

from .readers import RawRecord, TransformError
from .tools import normalise_tools

FORMATS = ("hh-rlhf", "scored", "openai-preference", "preference")
PROMPT_KEYS = ("prompt", "instruction", "question")
ANSWER_LIST_KEYS = ("completions", "responses")
ANSWER_TEXT_KEYS = ("response", "text", "content", "completion")
SCORE_KEYS = ("overall_score", "score", "rating")
# Top-level fields each format reads (the converter names any other field it drops).
READS = {
    "hh-rlhf": ("chosen", "rejected"),
    "scored": PROMPT_KEYS + ANSWER_LIST_KEYS,
    "openai-preference": ("input", "preferred_output", "non_preferred_output"),
    "preference": ("messages", "chosen", "rejected", "tools", "system") + PROMPT_KEYS,
}
# The fields read inside OpenAI's `input` (`parallel_tool_calls` is a request setting with no
# place in a training row: it is named as dropped, like any other field left out).
OPENAI_INPUT_READS = ("messages", "tools")
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")  # HH-RLHF's speaker markers
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class SkipRecord(TransformError):
    """A record that is well-formed but carries no preference; counted under `reason`, never fatal."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def detect(value: Any) -> str | None:
    """The preference format of one raw record, or None when it is not a preference record."""
    if not isinstance(value, dict):
        return None
    if "preferred_output" in value or "non_preferred_output" in value:
        return "openai-preference"
    if "chosen" in value or "rejected" in value:
        has_prompt = any(k in value for k in ("messages", *PROMPT_KEYS))
        if not has_prompt and isinstance(value.get("chosen"), str) and HH_TURN.search(value["chosen"]):
            return "hh-rlhf"
        return "preference"
    if any(isinstance(value.get(k), list) for k in ANSWER_LIST_KEYS) and any(k in value for k in PROMPT_KEYS):
        return "scored"
    return None


def nested_objects(value: dict, fmt: str) -> list[tuple[str, dict, tuple[str, ...]]]:
    """(name, object, the keys read in it) of each object nested in a record of `fmt` whose other
    keys `formats.dropped_fields` names: OpenAI's `input`, each answer of a scored list."""
    if fmt == "openai-preference" and isinstance(value.get("input"), dict):
        return [("input", value["input"], OPENAI_INPUT_READS)]
    list_key = next((k for k in ANSWER_LIST_KEYS if isinstance(value.get(k), list)), None) if fmt == "scored" else None
    if list_key is None:
        return []
    return [(f"{list_key}[]", answer, _scored_keys(answer)) for answer in value[list_key] if isinstance(answer, dict)]


def _scored_keys(answer: dict) -> tuple:
    """(text key, score key) that a scored answer is read by; None for one it lacks."""
    return (next((k for k in ANSWER_TEXT_KEYS if isinstance(answer.get(k), str)), None),
            next((k for k in SCORE_KEYS if isinstance(answer.get(k), (int, float))), None))


def _did_you_mean(key: str, value: dict) -> str:
    from mlx_lora.data import _did_you_mean  # the training rows' hint; imported on error only: it loads numpy

    return _did_you_mean(key, value)


def _require(record: RawRecord, key: str) -> Any:
    if key not in record.value:
        raise TransformError(f"{record.where()}: missing '{key}'{_did_you_mean(key, record.value)}; a preference "
                             "record needs both answers")
    return record.value[key]


def _text(record: RawRecord, value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise TransformError(f"{record.where(key)}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _hh_turns(record: RawRecord, transcript: str, key: str) -> list[dict]:
    if transcript.lstrip().startswith(("Human: ", "Assistant: ")):  # copies that strip the leading blank lines
        transcript = "\n\n" + transcript.lstrip()
    parts = HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise TransformError(f"{record.where(key)}: '{key}' is not an HH-RLHF transcript (\\n\\nHuman: ... "
                             "\\n\\nAssistant: ...)")
    return [{"role": HH_ROLES[speaker], "content": text.strip()} for speaker, text in zip(parts[1::2], parts[2::2])]


def _from_hh(record: RawRecord) -> tuple:
    chosen = _hh_turns(record, _text(record, _require(record, "chosen"), "chosen"), "chosen")
    rejected = _hh_turns(record, _text(record, _require(record, "rejected"), "rejected"), "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise TransformError(f"{record.where()}: an HH-RLHF transcript must end with an Assistant reply")
    if chosen[:-1] != rejected[:-1]:
        raise TransformError(f"{record.where()}: 'chosen' and 'rejected' differ before their last reply, so they "
                             "answer different conversations; fix or drop the record (--skip-invalid)")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _from_scored(record: RawRecord) -> tuple:
    value = record.value
    prompt_key = next((k for k in PROMPT_KEYS if k in value), None)
    list_key = next((k for k in ANSWER_LIST_KEYS if isinstance(value.get(k), list)), None)
    if list_key is None or prompt_key is None:
        missing = "'completions' / 'responses' list" if list_key is None else "prompt (prompt, instruction, question)"
        raise TransformError(f"{record.where()}: --format scored reads a prompt and a 'completions' (or 'responses') "
                             f"list of answers with scores; this record has no {missing}: pass the format it has, or "
                             "leave --format out")
    scored = []
    for i, answer in enumerate(value[list_key]):
        where = f"{record.where(list_key)}: {list_key}[{i}]"
        if not isinstance(answer, dict):
            raise TransformError(f"{where} must be an object with a response and a score")
        text_key, score_key = _scored_keys(answer)
        if text_key is None or score_key is None:
            raise TransformError(f"{where} needs a text ({' / '.join(ANSWER_TEXT_KEYS)}) and a numeric score "
                                 f"({' / '.join(SCORE_KEYS)}); it has {sorted(answer)}")
        scored.append((float(answer[score_key]), answer[text_key]))
    if len(scored) < 2:
        raise SkipRecord("fewer_than_two_answers", f"{record.where(list_key)}: fewer than two scored answers")
    best, worst = max(scored, key=lambda s: s[0]), min(scored, key=lambda s: s[0])
    if best[0] == worst[0]:
        raise SkipRecord("tie", f"{record.where(list_key)}: every answer has the score {best[0]:g}")
    return _text(record, value[prompt_key], prompt_key), best[1], worst[1]


def _assistant_messages(record: RawRecord, value: Any, key: str) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "role" in m for m in value):
        raise TransformError(f"{record.where(key)}: '{key}' must be a list of messages with role and content")
    # Every key is kept (tool_calls, name, ...): the chat templates may read them.
    return [{**m, "content": m.get("content")} for m in value]


def _from_openai(record: RawRecord) -> tuple:
    source = record.value.get("input")
    messages = source.get("messages") if isinstance(source, dict) else None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise TransformError(f"{record.where('input')}: 'input' must hold a non-empty 'messages' list of objects")
    chosen = _assistant_messages(record, _require(record, "preferred_output"), "preferred_output")
    rejected = _assistant_messages(record, _require(record, "non_preferred_output"), "non_preferred_output")
    return [{**m, "role": m.get("role"), "content": m.get("content")} for m in messages], chosen, rejected


def _strip_shared(prompt: Any, answer: Any) -> Any:
    """UltraFeedback-binarized repeats the prompt inside each answer's conversation: keep the rest."""
    if isinstance(answer, list) and isinstance(prompt, str) and answer and answer[0].get("role") == "user" \
            and answer[0].get("content") == prompt:
        return answer[1:]
    if isinstance(answer, list) and isinstance(prompt, list) and answer[: len(prompt)] == prompt:
        return answer[len(prompt):]
    return answer


def _implicit_prompt(chosen: Any, rejected: Any) -> int:
    """TRL's implicit-prompt pairs (e.g. trl-lib/hh-rlhf): `chosen` and `rejected` are whole conversations
    sharing their first turns; the number of shared messages before the answers (which start at an
    assistant turn), or 0 when they are not such a pair."""
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected
            and all(isinstance(m, dict) for m in chosen + rejected)):
        return 0
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1].get("role") == "assistant":  # the answers start at an assistant turn
        shared -= 1
    return shared if shared < len(chosen) and shared < len(rejected) else 0


def _from_native(record: RawRecord) -> tuple:
    value = record.value
    chosen, rejected = _require(record, "chosen"), _require(record, "rejected")
    messages = value.get("messages")
    # UltraFeedback-binarized also carries `messages`, the whole chosen conversation (ending with the
    # answer): not the prompt when a prompt field is there
    whole = isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
        and messages[-1].get("role") == "assistant"
    if "messages" in value and not (whole and any(k in value for k in PROMPT_KEYS)):
        prompt = value["messages"]
    else:
        key = next((k for k in PROMPT_KEYS if k in value), None)
        if key is None and (shared := _implicit_prompt(chosen, rejected)):
            return chosen[:shared], chosen[shared:], rejected[shared:]
        if key is None:
            hint = next((h for h in (_did_you_mean(k, value) for k in ("prompt", "messages")) if h), "")
            raise TransformError(f"{record.where()}: missing 'prompt' (or 'messages'){hint}: the conversation the "
                                 "answers reply to")
        prompt = value[key]
    return prompt, _strip_shared(prompt, chosen), _strip_shared(prompt, rejected)


CONVERTERS = {"hh-rlhf": _from_hh, "scored": _from_scored, "openai-preference": _from_openai, "preference": _from_native}


def _tools(record: RawRecord, fmt: str) -> list[dict] | None:
    """The record's tool list as OpenAI function specs (`tools.normalise_tools`); None when it has none."""
    if fmt == "openai-preference":
        return normalise_tools(record, record.value["input"].get("tools"), "input.tools")
    if fmt == "preference":
        return normalise_tools(record, record.value.get("tools"))
    return None


def _one_answer(answer: Any) -> Any:
    """A single assistant message with nothing but its text is written as the text, the common form."""
    if isinstance(answer, list) and len(answer) == 1 and answer[0].get("role") == "assistant" \
            and isinstance(answer[0].get("content"), str) \
            and all(k in ("role", "content") or v in (None, "", [], {}) for k, v in answer[0].items()):
        return answer[0]["content"]
    return answer


def convert(record: RawRecord, fmt: str, system: str | None = None) -> dict:
    """The training row of one preference record read as `fmt`.

    Raises TransformError naming file:line for a malformed record, SkipRecord for identical
    answers (or no preference at all).
    """
    prompt, chosen, rejected = CONVERTERS[fmt](record)
    own = record.value.get("system") if fmt == "preference" else None
    if isinstance(own, str) and own.strip():  # the row's own system prompt (Intel/orca_dpo_pairs): --system is for rows without
        system = own
    chosen, rejected = _one_answer(chosen), _one_answer(rejected)
    if not chosen or not rejected:
        raise SkipRecord("empty", f"{record.where()}: an empty answer")
    if chosen == rejected:
        raise SkipRecord("identical", f"{record.where()}: 'chosen' and 'rejected' are the same answer")
    tools = _tools(record, fmt)
    rest = {"tools": tools} if tools is not None else {}  # what follows the prompt in the row
    rest.update(chosen=chosen, rejected=rejected)
    if isinstance(prompt, list):
        if system is not None and not any(m.get("role") == "system" for m in prompt):
            prompt = [{"role": "system", "content": system}] + prompt
        return {"messages": prompt, **rest}
    if not isinstance(prompt, str) or not prompt.strip():
        raise TransformError(f"{record.where()}: the prompt must be a non-empty string or a list of messages")
    if system is not None:
        return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}], **rest}
    return {"prompt": prompt, **rest}
