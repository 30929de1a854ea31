"""Constrained decoding for `response_format` (json_object, json_schema): placeholder until a grammar engine is wired."""

from __future__ import annotations


def constraint_for(tokenizer, response_format, tools, tool_choice):
    """A factory of per-request grammar constraints, or None when the request needs none."""
    if response_format is None or response_format.type == "text":
        return None
    from .app import APIError

    raise APIError(400, "response_format: json output is not supported by this server yet", "response_format",
                   "unsupported")
