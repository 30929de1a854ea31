"""Preference objectives (DPO with sigmoid / IPO / hinge losses, ORPO) beside the SFT loss.

The losses are pure functions of per-sequence log-probabilities (TRL's shape: policy chosen,
policy rejected, reference chosen, reference rejected, each (B,)), so they can be checked
against TRL's on the same tensors. `preference_loss` is what the training step differentiates:
one forward over the (2B, T) batch of chosen-then-rejected rows, whose completion
log-probabilities come from the chunked output-head cross-entropy of `loss.py` (the
vocabulary-sized logits never exist whole). DPO's reference is the same model with every
adapter switched off (`reference_logps`), computed before the step, outside the gradient.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .config import TrainingConfig
from .loss import token_losses
from .data import iterate_eval
from .preference_data import METRICS, collate_pairs  # METRICS: the order of `preference_loss`'s metrics vector
LOG_HALF = -math.log(2.0)  # log1mexp switches formula here (Maechler 2012), as TRL's ORPO


def sequence_logps(model: nn.Module, tokens: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """(sum of log p(target) over masked positions (N,), masked count (N,)), float32.

    tokens (N, T) int; mask (N, T-1) float, 1 on the completion tokens (as `masked_loss`).
    """
    logps = -token_losses(model, tokens)  # (N, T-1)
    return (logps * mask).sum(axis=-1), mask.sum(axis=-1)


def reference_logps(model: nn.Module, tokens: mx.array, mask: mx.array) -> mx.array:
    """(N,) completion log-probabilities of the base model: `model` with its adapters switched off."""
    from .lora import adapters_disabled

    with adapters_disabled(model):
        logps, _ = sequence_logps(model, tokens, mask)
    return mx.stop_gradient(logps)


def dpo_loss(policy_chosen: mx.array, policy_rejected: mx.array, reference_chosen: mx.array,
             reference_rejected: mx.array, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_counts: mx.array | None = None, rejected_counts: mx.array | None = None):
    """Per-pair DPO losses and implicit rewards from summed completion log-probabilities, all (B,).

    delta = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
      sigmoid: -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)
               (Rafailov et al. 2023, eq. 7; eps > 0 is conservative DPO, Mitchell 2023)
      hinge:   max(0, 1 - beta delta)                   (SLiC, Zhao et al. 2023)
      ipo:     (delta' - 1 / (2 beta))^2 with delta' from per-token averages
               (Azar et al. 2023, eq. 17; averaged as TRL does, hence the counts)
    rewards = beta * (policy - reference), per answer.
    Returns (losses, chosen_rewards, rejected_rewards).
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * nn.log_sigmoid(beta * delta) - label_smoothing * nn.log_sigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = nn.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_counts is None or rejected_counts is None:
            raise ValueError("loss_type ipo averages per token: pass chosen_counts and rejected_counts")
        averaged = chosen_ratio / mx.maximum(chosen_counts, 1) - rejected_ratio / mx.maximum(rejected_counts, 1)
        losses = (averaged - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be sigmoid, ipo or hinge, got {loss_type!r}")
    return losses, beta * mx.stop_gradient(chosen_ratio), beta * mx.stop_gradient(rejected_ratio)


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return mx.where(x < LOG_HALF, mx.log1p(-mx.exp(mx.minimum(x, LOG_HALF))), mx.log(-mx.expm1(mx.maximum(x, LOG_HALF))))


def orpo_loss(policy_chosen_mean: mx.array, policy_rejected_mean: mx.array, beta: float):
    """Per-pair ORPO odds-ratio penalties and rewards from per-token mean log-probabilities, all (B,).

    log odds(y) = log p - log(1 - p) with log p the answer's mean token log-probability;
    penalty = -beta * log sigmoid(log odds(chosen) - log odds(rejected))  (Hong et al. 2024, eqs. 4-7;
    TRL's `odds_ratio_loss` returns its negative). The full ORPO loss adds the chosen answers' NLL.
    rewards = beta * mean log p. Returns (penalties, chosen_rewards, rejected_rewards).
    """
    log_odds = (policy_chosen_mean - policy_rejected_mean) - (log1mexp(policy_chosen_mean) - log1mexp(policy_rejected_mean))
    penalties = -beta * nn.log_sigmoid(log_odds)
    return penalties, beta * mx.stop_gradient(policy_chosen_mean), beta * mx.stop_gradient(policy_rejected_mean)


def preference_loss(model: nn.Module, tokens: mx.array, masks: mx.array, reference: mx.array | None,
                    config: TrainingConfig, totals: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """(loss, metrics (len(METRICS),)) of one batch of B pairs under `config.objective`.

    tokens (2B, T): chosen rows, then rejected; masks (2, 2B, T-1) from `collate_pairs`;
    reference (2B,): the reference model's completion log-probabilities (dpo; None for orpo).
    totals (2,) float32: when this batch is one group of a larger one (pairs split over CPU streams),
    the whole batch's pair count and chosen-answer NLL target count; every mean then divides by the
    whole batch's, so the groups' losses, metrics and gradients add up to the whole batch's.
    """
    loss, metrics, _ = _scores(model, tokens, masks, reference, config, totals)
    return loss, metrics


def _scores(model, tokens, masks, reference, config, totals=None):
    """`preference_loss` plus the (2B,) summed completion log-probabilities (no gradient)."""
    completion, nll_mask = masks[0], masks[1]
    pairs = tokens.shape[0] // 2
    if totals is None:
        all_pairs, nll_targets = pairs, mx.maximum(nll_mask[:pairs].sum(), 1)
    else:
        all_pairs, nll_targets = totals[0], mx.maximum(totals[1], 1)
    token_logps = -token_losses(model, tokens)  # (2B, T-1)
    logps = (token_logps * completion).sum(axis=-1)
    counts = completion.sum(axis=-1)
    if config.objective == "dpo":
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:pairs], logps[pairs:], reference[:pairs], reference[pairs:], config.beta, config.loss_type,
            config.label_smoothing, counts[:pairs], counts[pairs:])
        loss = losses.sum() / all_pairs
    elif config.objective == "orpo":
        means = logps / mx.maximum(counts, 1)
        penalties, chosen_rewards, rejected_rewards = orpo_loss(means[:pairs], means[pairs:], config.beta)
        chosen_nll = -(token_logps[:pairs] * nll_mask[:pairs]).sum() / nll_targets
        loss = chosen_nll + penalties.sum() / all_pairs
    else:
        raise ValueError(f"preference_loss: objective must be dpo or orpo, got {config.objective!r}")
    margins = chosen_rewards - rejected_rewards
    logps = mx.stop_gradient(logps)
    metrics = mx.stack([margins.sum(), (margins > 0).astype(mx.float32).sum(), chosen_rewards.sum(),
                        rejected_rewards.sum(), logps[:pairs].sum(), logps[pairs:].sum()]) / all_pairs
    return loss, metrics, logps


def evaluate_preferences(model: nn.Module, pairs: list, batch_size: int, config: TrainingConfig,
                         max_batches: int = -1) -> dict:
    """Held-out preference scores of `model` on `pairs` (PreferencePair list), pair-weighted means.

    preference_accuracy: how often the chosen answer's summed completion log-probability is above
    the rejected one's; loss and reward_* are `config.objective`'s (for dpo the reference is the
    model with adapters off, so the base scores loss log 2 and rewards 0 for sigmoid DPO).
    """
    from .loss import enable_chunked_loss

    if pairs and not hasattr(model, "chunked_loss"):  # a model that was not trained here (mlx-lora eval)
        enable_chunked_loss(model, mx.array([pairs[0].chosen.tokens]))
    totals = dict.fromkeys(("loss", "preference_accuracy", *METRICS), 0.0)
    count = 0
    for tokens, masks, _ in iterate_eval(pairs, batch_size, max_batches, collate_fn=collate_pairs):
        tokens, masks = mx.array(tokens), mx.array(masks)
        n = tokens.shape[0] // 2
        reference = reference_logps(model, tokens, masks[0]) if config.objective == "dpo" else None
        loss, metrics, logps = _scores(model, tokens, masks, reference, config)
        accuracy = (logps[:n] > logps[n:]).astype(mx.float32).mean()
        mx.eval(loss, metrics, accuracy)
        values = {"loss": loss.item(), "preference_accuracy": accuracy.item(), **dict(zip(METRICS, metrics.tolist()))}
        for key, value in values.items():
            totals[key] += value * n
        count += n
    return {**{key: value / max(count, 1) for key, value in totals.items()}, "n": count}
