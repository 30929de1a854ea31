"""Evaluation on the test split: loss, perplexity and greedy exact match, base against tuned.

The base model is the same model with every adapter switched off (`adapters_disabled`), so
no second copy is loaded. Generation is batched through mlx-lm's `batch_generate` (greedy;
a sequence leaves the batch at its end token), with the frozen base's weights dequantized
once for the whole evaluation on the CPU (`float_weights_kept`) instead of at every decoding
step. Base and tuned share no prompt work: with adapters in every block (the demo's), their
hidden states differ from the first block on, so each prompt's KV cache is their own.

Most exact-match answers are settled without generating them (`settled_answer`): the loss pass
feeds each example's reference answer anyway, and where the model's greedy choice after every
reference token is that token (by a logit margin of at least `GREEDY_MARGIN`, so the decoding
path's last-digit differences cannot flip it) up to its end token, greedy generation would
write exactly the reference; where the greedy choice leaves the reference in a way no later
token can repair, the answer is a miss. Only the rest, and the misses among the first `SAMPLES`
examples (whose answers are shown), are generated. The score equals full generation's
(tests/test_evaluate.py). Exact match compares whitespace-normalised text (`normalize`).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .data import Example, collate
from .frozen_matmul import float_weights_kept
from .lora import adapters_disabled, adapters_folded, lora_layers  # noqa: F401 (adapters_disabled: re-exported)
from .loss import output_head, vocab_chunk_rows

EVAL_BATCH = 64  # prompts generated together; bounded so the KV cache stays small
SAMPLES = 10  # examples whose answers eval.json shows (misses among them are generated, for their text)
GREEDY_MARGIN = 0.01  # logits: top-1 over top-2 below this is not trusted to survive another decoding path
PLAIN_LOGITS_BYTES = 256 * 2**20  # a model whose own head must run whole: largest logits settled from


def normalize(text: str) -> str:
    """Whitespace-normalised form used for exact match."""
    return " ".join(text.split())


def prompt_tokens(tokenizer, example: Example) -> list[int] | None:
    if example.prompt_messages is not None:
        tools = {"tools": example.tools} if example.tools else {}
        return list(tokenizer.apply_chat_template(example.prompt_messages, add_generation_prompt=True, tokenize=True, **tools))
    if example.prompt_text is not None:
        return list(tokenizer.encode(example.prompt_text))
    return None


def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, progress=None) -> list[str]:
    """Greedy completions for token prompts, in order."""
    from mlx_lm.generate import batch_generate

    answers = []
    for start in range(0, len(prompts), EVAL_BATCH):
        chunk = prompts[start: start + EVAL_BATCH]
        answers += batch_generate(model, tokenizer, chunk, max_tokens=max_new_tokens).texts
        if progress is not None:
            progress.update(len(chunk))
    return answers


def exact_match_scores(answers: list[str | None], references: list[str]) -> dict:
    """exact_match, n_scored and the first samples for answers against references (both backends).

    None in `answers` is a miss settled without generating its text (`settled_answer`).
    """
    hits = [a is not None and normalize(a) == normalize(r) for a, r in zip(answers, references)]
    return {
        "exact_match": sum(hits) / len(hits), "n_scored": len(hits),
        "samples": [{"reference": r, "answer": a, "match": h} for a, r, h in list(zip(answers, references, hits))[:SAMPLES]],
    }


def _top2(logits: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(argmax, top-1 value, top-2 value) along the last axis of (K, C) logits."""
    top = mx.argmax(logits, axis=-1)
    best = mx.take_along_axis(logits, top[:, None], axis=-1)[:, 0]
    second = mx.where(mx.arange(logits.shape[-1])[None] == top[:, None], -mx.inf, logits).max(-1)
    return top, best, second


def _head_top2(hidden: mx.array, targets: mx.array, head) -> tuple[mx.array, ...]:
    """(cross-entropy, greedy token, top-1 minus top-2 logit), each (K,), of (K, D) hidden states
    through a `loss.OutputHead`, walking the vocabulary in chunks (no (K, vocab) array)."""
    size = min(vocab_chunk_rows(hidden.shape[0]), head.max_chunk_rows, head.rows)
    lse = best = second = index = None
    target_logit = mx.zeros(targets.shape, mx.float32)
    for start in range(0, head.rows, size):
        stop = min(start + size, head.rows)
        logits = head.logits(hidden, [a[start:stop] for a in head.arrays])
        chunk_lse = mx.logsumexp(logits, axis=-1)
        lse = chunk_lse if lse is None else mx.logaddexp(lse, chunk_lse)
        inside = (targets >= start) & (targets < stop)
        picked = mx.take_along_axis(logits, mx.where(inside, targets - start, 0)[:, None], axis=-1)[:, 0]
        target_logit = target_logit + mx.where(inside, picked, 0.0)
        top, v1, v2 = _top2(logits)
        if best is None:
            best, second, index = v1, v2, top + start
        else:  # the top two of two sorted pairs
            second = mx.maximum(mx.minimum(best, v1), mx.maximum(second, v2))
            index = mx.where(v1 > best, top + start, index)
            best = mx.maximum(best, v1)
    return lse - target_logit, index, best - second


def teacher_forced(model, examples: list[Example], batch_size: int, answer_starts: list[int | None]):
    """The loss over `examples` (token-weighted mean, as `train.evaluate_loss`) and, for each
    example with an answer start n, the greedy token (int) and its top-1 margin (float32 logits)
    after each of tokens[:n], tokens[:n+1], ... tokens[:-1]: (loss, [(tokens (A,), margins (A,)) | None]).
    """
    from .loss import enable_chunked_loss
    from .train import evaluate_loss

    if examples and not hasattr(model, "chunked_loss"):  # a model that was not trained here (mlx-lora eval)
        enable_chunked_loss(model, mx.array([examples[0].tokens]))
    head = output_head(model) if getattr(model, "chunked_loss", False) else None
    if head is None:  # a head the chunked path does not cover: the plain loss, then the model's logits
        return evaluate_loss(model, examples, batch_size), _greedy_from_logits(model, examples, answer_starts)
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    greedy: list = [None] * len(examples)
    total = count = 0.0
    for chunk in (order[i: i + batch_size] for i in range(0, len(order), batch_size)):
        tokens, mask, _ = collate(examples, chunk)
        width = tokens.shape[1] - 1
        wanted = mask > 0
        for row, i in enumerate(chunk):
            if answer_starts[i] is not None:
                wanted[row, answer_starts[i] - 1: len(examples[i].tokens) - 1] = True
        rows, cols = np.nonzero(wanted)
        tokens_mx = mx.array(tokens)
        hidden = model.model(tokens_mx[:, :-1])
        flat = mx.array((rows * width + cols).astype(np.int32))
        ce, top, margin = _head_top2(hidden.reshape(-1, hidden.shape[-1])[flat],
                                     tokens_mx[:, 1:].reshape(-1)[flat], head)
        weights = mx.array(mask[rows, cols])
        loss_sum, n = (ce * weights).sum(), weights.sum()
        mx.eval(loss_sum, n, top, margin)
        total, count = total + loss_sum.item(), count + n.item()
        top, margin = np.array(top), np.array(margin)
        for row, i in enumerate(chunk):
            if answer_starts[i] is not None:
                sel = (rows == row) & (cols >= answer_starts[i] - 1)
                greedy[i] = (top[sel], margin[sel])
    return total / max(count, 1), greedy


def _greedy_from_logits(model, examples: list[Example], answer_starts: list[int | None]) -> list:
    """`teacher_forced`'s greedy tokens through the model's own head, one example at a time; None
    (generate it) where that example's whole float32 logits would pass PLAIN_LOGITS_BYTES."""
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    greedy = []
    for example, start in zip(examples, answer_starts):
        if start is None or not vocab or len(example.tokens) * vocab * 4 > PLAIN_LOGITS_BYTES:
            greedy.append(None)
            continue
        logits = model(mx.array([example.tokens[:-1]]))[0, start - 1:].astype(mx.float32)
        top, best, second = _top2(logits)
        greedy.append((np.array(top), np.array(best - second)))
    return greedy


MISS = object()  # a settled answer that cannot match its reference, whose text was not generated


def settled_answer(tokenizer, example: Example, prompt: list[int], greedy, max_new_tokens: int):
    """What greedy generation from `prompt` would answer, where the teacher-forced pass settles it.

    Returns the answer's text, `MISS` (it cannot match the reference), or None (generate it).
    `greedy` is (tokens, margins) after each of the example's tokens from len(prompt) - 1 on;
    generation is mlx-lm's: it stops at an end token (not in its text) or after max_new_tokens.
    """
    n = len(prompt)
    if greedy is None or example.tokens[:n] != prompt or example.reference is None:
        return None
    reference, (choices, margins) = example.tokens[n:], greedy
    stops = set(tokenizer.eos_token_ids)
    for i, token in enumerate(reference[:max_new_tokens]):
        if margins[i] < GREEDY_MARGIN:
            return None
        choice = int(choices[i])
        if choice in stops:  # generation ends here, with reference[:i] as its text
            return tokenizer.decode(reference[:i])
        if choice != token:  # generation leaves the reference: a miss unless later text could still match
            written = tokenizer.decode(reference[:i] + [choice])
            if "\ufffd" not in written and not _squashed(example.reference).startswith(_squashed(written)):
                return MISS
            return None
    if len(reference) >= max_new_tokens:  # max_new_tokens reference tokens chosen, none an end token
        return tokenizer.decode(reference[:max_new_tokens])
    return None  # the reference ended without an end token: generation would go on past it


def _squashed(text: str) -> str:
    return "".join(text.split())  # equal normalize() implies equal squashed text


def score(model, tokenizer, examples: list[Example], batch_size: int, max_new_tokens: int,
          settle: bool = True) -> dict:
    """Loss, perplexity and exact match of `model` on `examples`; `n_generated` says how many
    answers were generated (the others settled by `settled_answer`; settle=False: none)."""
    from tqdm import tqdm

    model.eval()
    prompts = [prompt_tokens(tokenizer, e) if e.reference is not None else None for e in examples]
    starts = [len(p) if settle and p and len(p) < len(e.tokens) else None for p, e in zip(prompts, examples)]
    loss, greedy = teacher_forced(model, examples, batch_size, starts)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(examples)}
    scored = [i for i, p in enumerate(prompts) if p is not None]
    if not scored:
        return result
    answers: list = [None] * len(scored)
    todo = []
    for j, i in enumerate(scored):
        known = settled_answer(tokenizer, examples[i], prompts[i], greedy[i], max_new_tokens) if settle else None
        if known is None or (known is MISS and j < SAMPLES):
            todo.append(j)
        elif known is not MISS:
            answers[j] = known
    if todo:
        with tqdm(total=len(todo), desc="generate", unit="ex", leave=False) as bar:
            generated = generate_answers(model, tokenizer, [prompts[scored[j]] for j in todo], max_new_tokens, bar)
        for j, text in zip(todo, generated):
            answers[j] = text
    result.update(exact_match_scores(answers, [examples[i].reference for i in scored]))
    result["n_generated"] = len(todo)
    return result


def evaluate_model(model, tokenizer, examples: list[Example], batch_size: int, max_new_tokens: int,
                   compare_base: bool = True, cached_base: dict | None = None) -> dict:
    """{"base": {...}, "tuned": {...}} scores; `base` only when asked (adapters switched off).

    `cached_base`: the base's scores from an earlier run with the same base and settings
    (`eval_cache`), used instead of scoring it again.
    """
    results = {}
    with float_weights_kept(model):
        if compare_base and lora_layers(model):
            if cached_base is not None:
                results["base"] = cached_base
            else:
                with adapters_disabled(model):
                    results["base"] = score(model, tokenizer, examples, batch_size, max_new_tokens)
        with adapters_folded(model):  # one product per layer, as a fused model
            results["tuned"] = score(model, tokenizer, examples, batch_size, max_new_tokens)
    return results


def evaluate_preference_model(model, pairs: list, config, compare_base: bool = True) -> dict:
    """{"base": {...}, "tuned": {...}} preference scores (`objectives.evaluate_preferences`) on test pairs."""
    from .objectives import evaluate_preferences

    model.eval()
    results = {}
    if compare_base and lora_layers(model):
        with adapters_disabled(model):
            results["base"] = evaluate_preferences(model, pairs, config.batch_size, config)
    results["tuned"] = evaluate_preferences(model, pairs, config.batch_size, config)
    return results


def results_table(results: dict) -> list[tuple]:
    """Rows for a before/after table (SFT scores, or preference scores for dpo / orpo runs)."""
    names = list(results)
    rows = [("", *names)]
    if "preference_accuracy" in results[names[0]]:
        rows.append(("preference accuracy", *(f"{100 * results[n]['preference_accuracy']:.1f}%" for n in names)))
        rows.append(("chosen logp", *(f"{results[n]['chosen_logps']:.3f}" for n in names)))
        rows.append(("rejected logp", *(f"{results[n]['rejected_logps']:.3f}" for n in names)))
        rows.append(("loss", *(f"{results[n]['loss']:.4f}" for n in names)))
        rows.append(("pairs", *(str(results[n]["n"]) for n in names)))
        return rows
    rows.append(("exact match", *(f"{100 * results[n]['exact_match']:.1f}%" if "exact_match" in results[n] else "-" for n in names)))
    rows.append(("loss", *(f"{results[n]['loss']:.4f}" for n in names)))
    rows.append(("perplexity", *(f"{results[n]['perplexity']:.3f}" for n in names)))
    rows.append(("examples", *(str(results[n].get("n_scored", results[n]["n"])) for n in names)))
    if any("n_generated" in results[n] for n in names):  # the rest settled by the loss pass (settled_answer)
        rows.append(("answers generated", *(str(results[n].get("n_generated", "-")) for n in names)))
    return rows
