"""Request and response bodies of the OpenAI-compatible API (pydantic), as the OpenAPI schema shows them.

Only the fields we honour are declared. A request field that is neither declared nor in OpenAI's
API for that place is refused (400 `Unrecognized request argument supplied: NAME`, as OpenAI
answers), so a typo never passes silently, at the top level or inside a message, tool, tool call,
response format or stream options; an OpenAI field we do not act on (`user`, `store`, a tool's
`strict`, an echoed assistant message's `refusal`, ..., which real clients send) is accepted and
named by `ignored_fields()` with its path (`messages.2.refusal`). An explicit JSON `null` for any
optional field means "the default", as in OpenAI's API.
"""

from __future__ import annotations

import difflib
from typing import ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_SEED = 2**63 - 1
UNRECOGNIZED = "unrecognized_argument"  # the error type of a request field nobody defines

# Every request field of OpenAI's API, per endpoint, as in the API reference and the openai SDK's
# `CompletionCreateParams` (openai-python 3.57); tests/test_serve_openai.py checks the installed SDK
# sends nothing outside them. The declared fields below are the ones we act on.
OPENAI_CHAT_FIELDS = frozenset({
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs", "max_completion_tokens",
    "max_tokens", "messages", "metadata", "modalities", "model", "moderation", "n", "parallel_tool_calls",
    "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
    "web_search_options"})
OPENAI_COMPLETION_FIELDS = frozenset({
    "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "model", "n", "presence_penalty",
    "prompt", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user"})


class NullMeansDefault(BaseModel):
    """A body where `"field": null` for an optional field is the same as leaving the field out."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data):
        if not isinstance(data, dict):
            return data
        optional = {name for name, info in cls.model_fields.items() if not info.is_required()}
        return {key: value for key, value in data.items() if not (value is None and key in optional)}


class KnownFields(NullMeansDefault):
    """A request object whose fields are ours or OpenAI's (`openai_fields`, from the openai SDK's
    request types). OpenAI's that we do not declare are kept as extras (a `null` one is dropped: not
    given) and named by `ignored_fields()`; any other field is refused with the nearest known name."""

    # strict: "3" is not an integer nor "yes" a boolean, as OpenAI's API answers (an int is a float)
    # allow_inf_nan off: a NaN temperature is "not a finite number", not "should be <= 2"
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    openai_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def known_fields(cls) -> frozenset[str]:
        """Every field this object may carry: ours, and OpenAI's for this place."""
        return frozenset(info.alias or name for name, info in cls.model_fields.items()) | cls.openai_fields

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown(cls, data):
        if not isinstance(data, dict):
            return data
        known = cls.known_fields()
        for key in data:
            if key not in known:
                guess = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
                hint = f" (did you mean '{guess[0]}'?)" if guess else ""
                raise PydanticCustomError(UNRECOGNIZED, "Unrecognized request argument supplied: {param}{hint}",
                                          {"param": str(key), "hint": hint})
        ours = {info.alias or name for name, info in cls.model_fields.items()}
        return {key: value for key, value in data.items() if key in ours or value is not None}

    def ignored_fields(self) -> list[str]:
        """The OpenAI fields given here or in any nested object that the server does not act on, as
        dotted paths (`user`, `messages.2.refusal`, `tools.0.function.strict`), sorted."""
        found: list[str] = []

        def walk(value, path: str) -> None:
            if isinstance(value, KnownFields):
                found.extend(path + key for key in (value.model_extra or {}))
                for name in type(value).model_fields:
                    walk(getattr(value, name), f"{path}{name}.")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    walk(item, f"{path}{i}.")

        walk(self, "")
        return sorted(found)


class TextPart(KnownFields):
    """One part of a multi-part message content; only text parts (and an assistant's refusal, read as its text) are supported."""

    type: Literal["text"]
    text: str
    openai_fields: ClassVar[frozenset[str]] = frozenset({"prompt_cache_breakpoint"})

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        if isinstance(data, dict) and data.get("type") == "refusal" and isinstance(data.get("refusal"), str):
            return {"type": "text", "text": data["refusal"]}  # an assistant's refusal echoed back: its words
        if isinstance(data, dict) and data.get("type", "text") != "text":
            raise ValueError(f"only text content parts are supported (got type {data.get('type')!r}); send the "
                             "text as a string or a {\"type\": \"text\", \"text\": ...} part")
        return data


class ToolCallFunction(KnownFields):
    name: str
    arguments: str = Field(..., description="The arguments as a JSON string.")
    openai_fields: ClassVar[frozenset[str]] = frozenset({"parsed_arguments"})  # the SDK's parse() helpers add it


class ToolCall(KnownFields):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(KnownFields):
    # every message type's fields in the SDK's params, and what an assistant message echoed back from
    # a response carries: `annotations`, and `parsed` from the SDK's parse() and stream() helpers
    openai_fields: ClassVar[frozenset[str]] = frozenset({"audio", "function_call", "refusal", "annotations", "parsed"})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict:
        """The message as chat templates expect it (`developer` is `system`; tool calls with dict arguments)."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                                     for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def _json_or_text(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


class StreamOptions(KnownFields):
    include_usage: bool = False
    openai_fields: ClassVar[frozenset[str]] = frozenset({"include_obfuscation"})


class FunctionDefinition(KnownFields):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: Optional[str] = None
    # OpenAI: "Omitting parameters defines a function with an empty parameter list": a forced call's arguments are {}
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}, "additionalProperties": False})
    openai_fields: ClassVar[frozenset[str]] = frozenset({"strict"})


class Tool(KnownFields):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(KnownFields):
    name: str


class NamedToolChoice(KnownFields):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(KnownFields):
    name: str = "response"
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None
    model_config = ConfigDict(populate_by_name=True, extra="allow")
    openai_fields: ClassVar[frozenset[str]] = frozenset({"description"})


class ResponseFormat(KnownFields):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


class SamplingFields(KnownFields):
    """Fields shared by chat and text completions; `openai_fields` are OpenAI's for the endpoint."""

    model: Optional[str] = Field(None, description="A name from /v1/models (the base or an adapter); default: the first listed.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Most tokens to generate (capped by the server's limit).")
    temperature: Optional[float] = Field(0.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: Optional[float] = Field(1.0, ge=0.0, le=1.0, description="Nucleus sampling mass (0: the most likely token only).")
    top_k: Optional[int] = Field(0, ge=0, description="Keep the k most likely tokens (0: all). Not in OpenAI's API.")
    min_p: Optional[float] = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p x the top probability. Not in OpenAI's API.")
    repetition_penalty: Optional[float] = Field(1.0, gt=0.0, le=10.0,
                                                description="CTRL-style penalty on tokens already in prompt or answer (1: none).")
    frequency_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = Field(None, description="Token id -> bias in [-100, 100] added to its logit.")
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 strings that end the answer (not included).")
    seed: Optional[int] = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED, description="Any 64-bit signed integer, as OpenAI takes.")
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(1, ge=1, le=1, description="Only 1 is supported.")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Newer name of max_tokens; wins when both are set.")
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(0, ge=0, le=20)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    response_format: Optional[ResponseFormat] = None
    openai_fields: ClassVar[frozenset[str]] = OPENAI_CHAT_FIELDS


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str]] = Field(..., description="A string, or a list holding exactly one string.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, value):
        if isinstance(value, list) and any(not isinstance(item, str) for item in value):
            raise ValueError("token-id prompts are not supported; send the prompt as text")
        return value
    logprobs: Optional[int] = Field(None, ge=0, le=5, description="Return the log-probabilities of this many top tokens.")
    echo: Optional[bool] = Field(False, description="Only false is supported.")
    openai_fields: ClassVar[frozenset[str]] = OPENAI_COMPLETION_FIELDS


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens whose KV came from the prompt cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[list[ToolCall]] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: Optional[list[dict[str, float]]]
    text_offset: list[int]


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: Optional[CompletionLogprobs] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AdapterUpload(KnownFields):  # no OpenAI fields: anything else is refused
    name: str = Field(..., description="The model id the adapter will be served as.")
    path: str = Field(..., description="An adapter folder inside one of the server's `adapter_dirs`.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    """The server's state. With an API key set, a request without it gets `status` alone (load
    balancers probe without keys; model names and errors are for the key's holders)."""

    status: Literal["ok", "degraded"] = "ok"  # degraded: a generation step failed (last_error says how)
    models: Optional[list[str]] = None
    queued: Optional[int] = None
    running: Optional[int] = None
    failed_steps: Optional[int] = None
    last_error: Optional[str] = None
