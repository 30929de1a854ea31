"""Evaluation on the test split: loss, perplexity and greedy exact match, base against tuned.

The base model is the same model with every adapter switched off (`adapters_disabled`), so
no second copy is loaded. Generation is batched through mlx-lm's `batch_generate` (greedy;
a sequence leaves the batch at its end token), with the frozen base's weights dequantized
once for the whole evaluation on the CPU (`float_weights_kept`) instead of at every decoding
step. Base and tuned share no prompt work: with adapters in every block (the demo's), their
hidden states differ from the first block on, so each prompt's KV cache is their own.
"""

from __future__ import annotations

import math
from .data import Example
from .frozen_matmul import float_weights_kept
from .lora import adapters_disabled, adapters_folded, lora_layers  # noqa: F401 (adapters_disabled: re-exported)
from .train import evaluate_loss

EVAL_BATCH = 64  # prompts generated together; bounded so the KV cache stays small


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


def exact_match_scores(answers: list[str], references: list[str]) -> dict:
    """exact_match, n_scored and the first samples for answers against references (both backends)."""
    hits = [normalize(a) == normalize(r) for a, r in zip(answers, references)]
    return {
        "exact_match": sum(hits) / len(hits), "n_scored": len(hits),
        "samples": [{"reference": r, "answer": a, "match": h} for a, r, h in list(zip(answers, references, hits))[:10]],
    }


def score(model, tokenizer, examples: list[Example], batch_size: int, max_new_tokens: int) -> dict:
    """Loss, perplexity and exact match of `model` on `examples`."""
    from tqdm import tqdm

    model.eval()
    loss = evaluate_loss(model, examples, batch_size)
    scored = [(prompt_tokens(tokenizer, e), e) for e in examples if e.reference is not None]
    scored = [(p, e) for p, e in scored if p is not None]
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(examples)}
    if scored:
        with tqdm(total=len(scored), desc="generate", unit="ex", leave=False) as bar:
            answers = generate_answers(model, tokenizer, [p for p, _ in scored], max_new_tokens, bar)
        result.update(exact_match_scores(answers, [e.reference for _, e in scored]))
    return result


def evaluate_model(model, tokenizer, examples: list[Example], batch_size: int, max_new_tokens: int,
                   compare_base: bool = True) -> dict:
    """{"base": {...}, "tuned": {...}} scores; `base` only when asked (adapters switched off)."""
    results = {}
    with float_weights_kept(model):
        if compare_base and lora_layers(model):
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
    return rows
