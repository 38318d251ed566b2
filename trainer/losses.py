"""Reward-model losses as pure functions of tensors (imports only torch).

Shape vocabulary: K pairs. Tests call these with hand-made tensors and compare against
float64 loops.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- reward model

def ranking_to_pairs(k: int) -> list[tuple[int, int]]:
    """All C(k, 2) (better, worse) index pairs of a ranking listed best first (InstructGPT)."""
    return list(itertools.combinations(range(k), 2))


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center_coef: float = 0.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """−log σ(r_w − r_l − margin), averaged (optionally weighted), plus centering.

    chosen, rejected: (K,) rewards of preferred and dispreferred responses.
    margin: (K,) or float; TRL / Llama 2's margin on the difference.
    center_coef: adds center_coef · mean((r_w + r_l)²), TRL's reward centering
    (Eisenstein et al. 2023), which keeps rewards near zero mean.
    weights: (K,) non-negative pair weights (summing to 1 when every row weighs 1); default uniform.
    """
    per_pair = -F.logsigmoid(chosen - rejected - margin)                        # (K,)
    if weights is None:
        loss = per_pair.mean()
    else:
        loss = (per_pair * weights).sum()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs where the chosen response scores strictly higher. (K,) -> ()"""
    return (chosen > rejected).float().mean()
