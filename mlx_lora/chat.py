"""Chat rows to tokens and loss masks through the tokenizer's chat template.

Every assistant turn is trained on exactly the text the template renders for it when that turn
is the one being generated: the prompt is `render(messages[:i], add_generation_prompt=True)` and
the target is what `render(messages[:i + 1])` adds to it. Most templates render a conversation
prefix by prefix, so one example holds every turn. Templates that rewrite history (reasoning
models that strip earlier `<think>` blocks, templates that re-date or re-merge the system part)
render earlier turns differently once later turns follow; each such turn then ends its own
example, and the next turn starts a new one in the context the template gives it. The turns
rewritten are reported. Errors raised inside the template or tokenizer become `ChatTemplateError`
naming the template's file and line. `data.py` reads the rows; this module only renders them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class ChatTemplateError(ValueError):
    """The chat template or tokenizer failed or cannot be trained through; names file:line and the fix."""


@dataclass
class ChatTokens:
    """One conversation as training examples: `examples[k]` is (tokens, mask), mask True on targets.

    `rewritten` lists the message indices of assistant turns that the template renders
    differently once later turns follow (each ends its own example).
    """

    examples: list[tuple[list[int], list[bool]]] = field(default_factory=list)
    rewritten: list[int] = field(default_factory=list)
    tools_ignored: bool = False  # the row has tools but the template renders nothing of them


def use_template_file(tokenizer, path: str | Path) -> None:
    """Make the Jinja file at `path` the tokenizer's chat template (data.chat_template)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.chat_template: {path} is not a file; give a Jinja chat template file")
    tokenizer.chat_template = path.read_text(encoding="utf-8")
    # Remembered on the tokenizer itself (mlx-lm's wrapper passes attributes to the HF one).
    tokenizer.mlx_lora_template_file = str(path)


def template_file(tokenizer) -> str:
    """Where the tokenizer's chat template comes from, for error messages."""
    chosen = getattr(tokenizer, "mlx_lora_template_file", None)
    if chosen:
        return chosen
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).is_file():
            return str(folder / name) + ("" if name.endswith(".jinja") else " (chat_template)")
    return f"{folder or 'the tokenizer'} (chat_template)"


def _template_line(err: BaseException) -> int | None:
    """The template line an exception was raised at: Jinja rewrites tracebacks so that frames of
    compiled templates carry the template's own line numbers (filename '<template>')."""
    line = getattr(err, "lineno", None)
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename in ("<template>", "<unknown>"):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools=None) -> str:
    """The template's text for `messages`; ChatTemplateError naming file:line when it fails."""
    try:
        kwargs = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except Exception as err:  # noqa: BLE001 - third-party template code: one line naming where it failed
        line = _template_line(err)
        where = template_file(tokenizer) + (f":{line}" if line else "")
        message = str(err).replace("\n", " ") or type(err).__name__
        fix = ("fix the template's syntax" if type(err).__name__ == "TemplateSyntaxError" else
               "make the row fit the template (e.g. a template without a system role needs the system text in "
               "the first user turn)")
        raise ChatTemplateError(f"the chat template failed ({where}: {type(err).__name__}: {message}); {fix}, or "
                                "give another template with data.chat_template") from None


def _encode(tokenizer, text: str) -> list[int]:
    # The template writes any BOS itself, so no special tokens are added on top (no double BOS).
    try:
        return list(tokenizer.encode(text, add_special_tokens=False)) if text else []
    except Exception as err:  # noqa: BLE001 - third-party tokenizer code
        raise ChatTemplateError(f"the tokenizer could not encode the rendered text ({type(err).__name__}: {err})") from None


def tokenize_conversation(tokenizer, messages: list[dict], tools=None) -> ChatTokens:
    """Examples of a conversation with the mask on every assistant turn (content and end-of-turn).

    Pieces (prompt up to a turn, the turn) are tokenized alone, as at inference time.
    Raises ChatTemplateError when the template fails, or renders a turn in a way that does not
    continue its own generation prompt (then no text can be called that turn's target).
    """
    out = ChatTokens()
    tokens: list[int] = []
    mask: list[bool] = []
    rendered = ""
    chain: list[tuple[int, str]] = []  # (message index, target text) of the turns in the current example
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], True, tools)
        full = render(tokenizer, messages[: i + 1], False, tools)
        if tools and not chain and not out.examples:
            out.tools_ignored = prompt == render(tokenizer, messages[:i], True, None)
        if not full.startswith(prompt):
            raise ChatTemplateError(
                f"the chat template renders assistant turn messages[{i}] differently from the generation prompt it "
                "gives for it, so no text is that turn's target; use a template whose generation prompt the turn "
                "continues (data.chat_template) or data.train_on_prompt: true")
        if not prompt.startswith(rendered):
            # The template re-rendered what came before: close this example, start one in the new context.
            changed = [j for j, text in chain if text not in prompt] or [chain[-1][0]]
            out.rewritten += changed
            out.examples.append((tokens, mask))
            tokens, mask, rendered, chain = [], [], "", []
        for piece, is_target in ((prompt[len(rendered):], False), (full[len(prompt):], True)):
            ids = _encode(tokenizer, piece)
            tokens += ids
            mask += [is_target] * len(ids)
        rendered = full
        chain.append((i, full[len(prompt):]))
    tail = render(tokenizer, messages, False, tools)
    if tail.startswith(rendered):  # turns after the last assistant one (context only)
        ids = _encode(tokenizer, tail[len(rendered):])
        tokens += ids
        mask += [False] * len(ids)
    out.examples.append((tokens, mask))
    return out
