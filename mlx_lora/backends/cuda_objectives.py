"""DPO and ORPO for the CUDA backend, in torch: `objectives.py`'s formulas on a PEFT model.

The batch is `preference_data.collate_pairs`'s (chosen rows, then rejected); DPO's reference is
the same PEFT model under `disable_adapter()` (no second copy), computed without gradients.
The per-pair losses mirror `mlx_lora.objectives` line for line; tests check both against TRL.
"""

from __future__ import annotations

import math

from ..config import TrainingConfig
from ..preference_data import METRICS

LOG_HALF = -math.log(2.0)


def sequence_logps(model, tokens, mask):
    """(summed log p of the masked targets (N,), masked count (N,)); tokens (N, T), mask (N, T-1)."""
    import torch.nn.functional as F

    logits = model(input_ids=tokens[:, :-1]).logits  # (N, T-1, V)
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (N, T-1)
    return token_logps, (token_logps * mask).sum(-1), mask.sum(-1)


def adapters_off(model):
    """`model.disable_adapter()`, or nothing when they are off already (PEFT's context re-enables on exit)."""
    from contextlib import nullcontext

    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]
    return nullcontext() if layers and all(m.disable_adapters for m in layers) else model.disable_adapter()


def reference_logps(model, tokens, mask):
    """(N,) completion log-probabilities of the PEFT `model` with every adapter off, without gradients."""
    import torch

    with torch.no_grad(), adapters_off(model):
        return sequence_logps(model, tokens, mask)[1]


def _log1mexp(x):
    import torch

    return torch.where(x < LOG_HALF, torch.log1p(-torch.exp(x.clamp(max=LOG_HALF))), torch.log(-torch.expm1(x.clamp(min=LOG_HALF))))


def preference_loss(model, tokens, masks, config: TrainingConfig, reference=None):
    """(loss, metrics (len(METRICS),)) of one pair batch: `mlx_lora.objectives.preference_loss` in torch.

    `reference` (2B,) for dpo; computed here from `model` (a PEFT model) when not given.
    """
    loss, metrics, _ = _scores(model, tokens, masks, config, reference)
    return loss, metrics


def _scores(model, tokens, masks, config, reference):
    """`preference_loss` plus the (2B,) summed completion log-probabilities (detached)."""
    import torch
    import torch.nn.functional as F

    completion, nll_mask = masks[0], masks[1]
    pairs = tokens.shape[0] // 2
    token_logps, logps, counts = sequence_logps(model, tokens, completion)
    beta = config.beta
    if config.objective == "dpo":
        reference = reference_logps(model, tokens, completion) if reference is None else reference
        chosen_ratio = logps[:pairs] - reference[:pairs]
        rejected_ratio = logps[pairs:] - reference[pairs:]
        delta = chosen_ratio - rejected_ratio
        if config.loss_type == "sigmoid":
            eps = config.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
        elif config.loss_type == "hinge":
            losses = torch.relu(1 - beta * delta)
        else:  # ipo, per-token averaged as TRL
            averaged = chosen_ratio / counts[:pairs].clamp(min=1) - rejected_ratio / counts[pairs:].clamp(min=1)
            losses = (averaged - 1 / (2 * beta)) ** 2
        loss = losses.mean()
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    elif config.objective == "orpo":
        means = logps / counts.clamp(min=1)
        chosen, rejected = means[:pairs], means[pairs:]
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        nll = -(token_logps[:pairs] * nll_mask[:pairs]).sum() / nll_mask[:pairs].sum().clamp(min=1)
        loss = nll - beta * F.logsigmoid(log_odds).mean()
        chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
    else:
        raise ValueError(f"preference_loss: objective must be dpo or orpo, got {config.objective!r}")
    margins = chosen_rewards - rejected_rewards
    logps = logps.detach()
    metrics = torch.stack([margins.mean(), (margins > 0).float().mean(), chosen_rewards.mean(), rejected_rewards.mean(),
                           logps[:pairs].mean(), logps[pairs:].mean()])
    return loss, metrics, logps


def evaluate_preferences(model, pairs: list, batch_size: int, config: TrainingConfig, device, max_batches: int = -1) -> dict:
    """`objectives.evaluate_preferences` in torch: preference accuracy, loss and reward means."""
    import torch

    from ..data import iterate_eval
    from ..preference_data import collate_pairs

    totals = dict.fromkeys(("loss", "preference_accuracy", *METRICS), 0.0)
    count = 0
    with torch.no_grad():
        for tokens, masks, _ in iterate_eval(pairs, batch_size, max_batches, collate_fn=collate_pairs):
            tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
            masks = torch.as_tensor(masks, device=device)
            n = tokens.shape[0] // 2
            loss, metrics, logps = _scores(model, tokens, masks, config, None)
            values = {"loss": loss.item(), "preference_accuracy": (logps[:n] > logps[n:]).float().mean().item(),
                      **dict(zip(METRICS, metrics.tolist()))}
            for key, value in values.items():
                totals[key] += value * n
            count += n
    return {**{key: value / max(count, 1) for key, value in totals.items()}, "n": count}
