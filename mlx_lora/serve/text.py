"""From generated token ids to what a client sees: streamed text cut at stop strings, tool calls, logprobs.

One `TextStream` per request, fed by the scheduler's worker thread. Detokenizers are mlx-lm's
streaming ones; tool-call markers and parsers are the ones mlx-lm infers from the chat template
(`tokenizer.tool_call_start`, `tokenizer.tool_parser`).
"""

from __future__ import annotations

import json
import uuid
from typing import Callable, Optional

from .scheduler import TokenEvent
from .tool_deltas import ToolCallDeltas


class TokenText(str):
    """A token as logprobs show it, with its own bytes in `raw`: the text when the bytes are whole
    UTF-8, else OpenAI's form for part of a character, "bytes:\\xf0\\x9f" (so two such tokens never
    share a name, and `bytes` can be joined back into the text)."""

    raw: bytes

    @classmethod
    def of(cls, raw: bytes) -> "TokenText":
        try:
            text = cls(raw.decode("utf-8"))
        except UnicodeDecodeError:
            text = cls("bytes:" + "".join(f"\\x{b:02x}" for b in raw))
        text.raw = raw
        return text


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes token `token` stands for, as mlx-lm's streaming detokenizers read them: byte-level BPE
    through GPT-2's byte alphabet, SentencePiece's <0xNN> byte fallback and its "\u2581" space; other
    tokenizers by decoding the token alone (whole characters only)."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, _byte_decoder

    detokenizer = getattr(tokenizer, "detokenizer", None)
    if isinstance(detokenizer, BPEStreamingDetokenizer):
        decoder = _byte_decoder()
        piece = detokenizer.tokenmap[token]
        return b"".join(bytes([decoder[c]]) if c in decoder else c.encode("utf-8") for c in piece)
    if isinstance(detokenizer, SPMStreamingDetokenizer):
        piece = tokenizer.convert_ids_to_tokens(token)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")
    return tokenizer.decode([token]).encode("utf-8")


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a tail that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:  # the longest suffix of pending that is a proper prefix of a stop
            for k in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:k]):
                    hold = k
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """Turns one sequence's tokens into events for its HTTP handler (see `Engine` for the event list).

    With `tools`, text from the template's tool-call start marker on is held back: streamed as
    ("tool_delta", entries) while it is written (`tool_deltas.py`), and parsed into tool calls
    when the sequence ends; the finish reason then becomes "tool_calls".
    """

    def __init__(self, tokenizer, sink: Callable[[tuple], None], stops: list[str], tools: Optional[list] = None):
        self.tokenizer, self.sink = tokenizer, sink
        self.detokenizer = tokenizer.detokenizer
        self.matcher = StopMatcher(stops)
        self.tools = tools
        self.tool_start = getattr(tokenizer, "tool_call_start", None) if tools else None
        self.tool_text: Optional[str] = None  # text from the tool-call marker on, once seen
        self.held = ""  # a tail that may be the start of the tool-call marker
        self.deltas = ToolCallDeltas(tokenizer, tools) if self.tool_start else None
        # A token's log-probabilities go out with its text: held while the stop matcher holds the
        # text back, dropped with it when a stop string cuts it. (offset of the token's first
        # character in the text fed to the matcher, entry)
        self.fed = self.emitted = 0
        self.logprobs: list[tuple[int, tuple]] = []

    def on_token(self, event: TokenEvent) -> bool:
        self.detokenizer.add_token(event.token)
        if event.logprob is not None:
            self.logprobs.append((self.fed, (self._piece(event.token), event.logprob,
                                             [(self._piece(t), lp) for t, lp in event.top])))
        text, stopped = self._feed(self.detokenizer.last_segment)
        self._emit(text, self._released(stopped))
        return stopped

    def _feed(self, segment: str) -> tuple[str, bool]:
        self.fed += len(segment)
        text, stopped = self.matcher.feed(segment)
        self.emitted += len(text)
        return text, stopped

    def _released(self, stopped: bool, everything: bool = False) -> Optional[list]:
        """The held log-probability entries whose token's text has gone out (all with `everything`);
        after a stop, the rest are dropped: their text was cut."""
        out = [entry for start, entry in self.logprobs if everything or start < self.emitted]
        self.logprobs = [] if stopped or everything else [(s, e) for s, e in self.logprobs if s >= self.emitted]
        return out or None

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> None:
        if reason == "cancelled":  # the client went away, or the server is shutting down
            self.sink(("error", 503, "the request was cancelled (client disconnected or server shutting down)", None))
            return
        self.detokenizer.finalize()
        tail, stopped = self._feed(self.detokenizer.last_segment)
        self._emit(tail + ("" if stopped else self.matcher.flush()), self._released(stopped, everything=not stopped))
        if self.held:
            self.sink(("delta", self.held, None))
        if self.tool_text is not None:
            calls = self._parse_tools(self.tool_text)
            if not calls and reason == "length" and self.deltas.sent:
                calls = self._cut_tools(self.tool_text)
            if calls:
                self.sink(("tool_delta", self.deltas.complete(calls)))
                self.sink(("tool_calls", calls))
                reason = "tool_calls" if reason != "length" else reason
            else:  # not a parsable call after all: show it as text
                self.sink(("delta", self.tool_text, None))
        self.sink(("done", reason, prompt_tokens, completion_tokens, cached_tokens))

    def _emit(self, text: str, logprobs) -> None:
        if self.tool_text is not None:
            self.tool_text += text
            deltas = self.deltas.update(self.tool_text) if text else []
            if deltas:
                self.sink(("tool_delta", deltas))
            return
        if self.tool_start:
            self.held += text
            at = self.held.find(self.tool_start)
            if at >= 0:
                text, self.tool_text, self.held = self.held[:at], self.held[at:], ""
                deltas = self.deltas.update(self.tool_text)
                if text or logprobs:
                    self.sink(("delta", text, logprobs))
                if deltas:
                    self.sink(("tool_delta", deltas))
                return
            else:  # hold back a tail that may be the start of the marker
                keep = next((k for k in range(min(len(self.tool_start) - 1, len(self.held)), 0, -1)
                             if self.held.endswith(self.tool_start[:k])), 0)
                text, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        if text or logprobs:
            self.sink(("delta", text, logprobs))

    def _piece(self, token: int) -> TokenText:
        return TokenText.of(token_bytes(self.tokenizer, token))

    def _cut_tools(self, text: str) -> list[dict]:
        """Tool calls cut by max_tokens, as OpenAI returns them (finish_reason "length"): each call whose
        name was written, with its arguments as far as they were streamed (a JSON prefix, not parsable);
        the calls complete before the cut, parsed whole."""
        start, end = self.tokenizer.tool_call_start, self.tokenizer.tool_call_end
        calls = []
        for index, part in enumerate(text.split(start)[1:]):
            whole = self._parse_tools(start + part) if end and end in part else []
            if whole:
                calls += whole
            elif index < len(self.deltas.sent):
                sent = self.deltas.sent[index]
                calls.append({"id": sent["id"], "type": "function",
                              "function": {"name": sent["name"], "arguments": sent["arguments"]}})
        return calls

    def _parse_tools(self, text: str) -> list[dict]:
        """OpenAI tool_calls from the held-back text (each start..end marker pair is one call)."""
        start, end = self.tokenizer.tool_call_start, self.tokenizer.tool_call_end
        calls = []
        for part in text.split(start)[1:]:
            body = part.split(end)[0] if end else part
            try:
                parsed = self.tokenizer.tool_parser(body, self.tools)
            except (ValueError, KeyError, TypeError, IndexError):
                return []
            for call in parsed if isinstance(parsed, list) else [parsed]:
                if not isinstance(call, dict) or "name" not in call:
                    return []
                arguments = call.get("arguments", call.get("parameters", {}))
                calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                              "function": {"name": call["name"],
                                           "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
        return calls
