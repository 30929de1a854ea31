"""Engine events -> OpenAI response bodies: one JSON completion, or server-sent event chunks.

Events are the `Engine`'s (see its docstring). Waiting on them notices a client that went away
and cancels its job, so the scheduler frees the batch slot at its next step.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Optional

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there
# A stream with nothing to send for this long (its prompt queued or being read: a long one takes
# seconds to minutes on a CPU) sends an SSE comment line, which SSE clients skip (the SSE spec; the
# openai SDK's decoder), so a client's read timeout counts from the last byte, not the first token.
KEEPALIVE_S = 2.0
KEEPALIVE = ": keep-alive\n\n"


@dataclass
class Reply:
    """What one request asked for in its answer."""

    ident: str
    created: int
    model: str
    chat: bool
    logprobs: bool = False  # chat: logprobs.content; completions: logprobs.tokens...
    include_usage: bool = False
    prompt_tokens: int = 0


@dataclass
class Collected:
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # (token, logprob, [(token, logprob)])
    tool_calls: Optional[list] = None


async def wait_event(events: asyncio.Queue, job, request):
    """The next worker event, or None (and the job cancelled) when the client has disconnected.
    The client is looked for at least every DISCONNECT_POLL_S, also while tokens keep coming."""
    loop = asyncio.get_running_loop()
    while True:
        if loop.time() >= job.disconnect_check:
            job.disconnect_check = loop.time() + DISCONNECT_POLL_S
            if await request.is_disconnected():
                job.cancel()
                return None
        try:
            return await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            continue
        except asyncio.CancelledError:
            job.cancel()
            raise


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _bytes(token: str) -> list[int]:
    return list(getattr(token, "raw", None) or token.encode("utf-8"))  # a TokenText's own bytes (text.py)


def chat_logprobs(entries: list) -> dict:
    return {"content": [{"token": token, "logprob": logprob, "bytes": _bytes(token),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": _bytes(t)} for t, lp in top]}
                        for token, logprob, top in entries]}


def completion_logprobs(entries: list, offset: int = 0) -> dict:
    # Each token's first character in the text: the tokens holding parts of one character share its offset.
    import codecs

    decoder, offsets, position = codecs.getincrementaldecoder("utf-8")(errors="ignore"), [], offset
    for token, _, _ in entries:
        offsets.append(position)
        position += len(decoder.decode(bytes(_bytes(token))))  # a character counts once its last byte is in
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [dict(e[2]) for e in entries], "text_offset": offsets}


def final_body(reply: Reply, got: Collected, finish: str, completion_tokens: int, cached_tokens: int) -> dict:
    usage = usage_body(reply.prompt_tokens, completion_tokens, cached_tokens)
    text = "".join(got.text)
    if reply.chat:
        message = {"role": "assistant", "content": text if text or not got.tool_calls else None}
        if got.tool_calls:
            message["tool_calls"] = got.tool_calls
        choice = {"index": 0, "message": message, "finish_reason": finish,
                  "logprobs": chat_logprobs(got.logprobs) if reply.logprobs else None}
        return {"id": reply.ident, "object": "chat.completion", "created": reply.created, "model": reply.model,
                "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": text, "finish_reason": finish,
              "logprobs": completion_logprobs(got.logprobs) if reply.logprobs else None}
    return {"id": reply.ident, "object": "text_completion", "created": reply.created, "model": reply.model,
            "choices": [choice], "usage": usage}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def stream_events(events: asyncio.Queue, job, reply: Reply, error_type):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`, with a comment line every
    KEEPALIVE_S while nothing else is sent; cancels on disconnect."""
    kind = "chat.completion.chunk" if reply.chat else "text_completion"
    offset = 0

    def chunk(choice: dict) -> dict:
        body = {"id": reply.ident, "object": kind, "created": reply.created, "model": reply.model,
                "choices": [{"index": 0, "logprobs": None, "finish_reason": None, **choice}]}
        return body | ({"usage": None} if reply.include_usage else {})

    try:
        if reply.chat:
            yield sse(chunk({"delta": {"role": "assistant", "content": ""}}))
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield KEEPALIVE
                continue
            if event[0] == "delta":
                _, text, logprobs = event
                if reply.chat:
                    choice = {"delta": {"content": text} if text else {}}
                    if reply.logprobs and logprobs:
                        choice["logprobs"] = chat_logprobs(logprobs)
                else:
                    choice = {"text": text}
                    if reply.logprobs and logprobs:
                        choice["logprobs"] = completion_logprobs(logprobs, offset)
                    offset += len(text)
                yield sse(chunk(choice))
            elif event[0] == "tool_delta":  # the id and name first, then the arguments in pieces
                yield sse(chunk({"delta": {"tool_calls": event[1]}}))
            elif event[0] == "error":
                _, status, message, param, *code = event
                yield sse({"error": {"message": message, "type": error_type(status), "param": param,
                                     "code": code[0] if code else None}})
                break
            elif event[0] == "done":
                _, finish, prompt_tokens, completion_tokens, cached_tokens = event
                yield sse(chunk({"delta": {}, "finish_reason": finish} if reply.chat
                                else {"text": "", "finish_reason": finish}))
                if reply.include_usage:
                    yield sse({"id": reply.ident, "object": kind, "created": reply.created, "model": reply.model,
                               "choices": [], "usage": usage_body(prompt_tokens, completion_tokens, cached_tokens)})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op when finished; stops generation when the client went away
