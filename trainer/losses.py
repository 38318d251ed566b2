"""The maths of RLHF as pure functions of tensors (imports only torch).

Shape vocabulary: B batch, T full sequence, P prompt, R response tokens, V vocab,
K pairs. Tests call these with hand-made tensors and compare against float64 loops.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- sequences

def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding on either side: cumsum(mask) − 1, clamped at 0. (B, T)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, for left or right padding. (B, T) -> (B,)"""
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(-1).values.clamp(min=0)


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values (B, T) at each row's last unmasked position -> (B,)"""
    return values.gather(-1, last_token_index(attention_mask)[:, None]).squeeze(-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float | torch.Tensor = 1.0
                   ) -> torch.Tensor:
    """log π(input_ids[t] | <t) from logits (B, T, V) -> (B, T−1); column t−1 is token t.

    Logits are divided by ``temperature`` first (a float or a (B, 1) tensor), so that the
    log-probs are those of the distribution that was actually sampled from.
    """
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.reshape(-1, 1, 1)
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)     # (B, T−1, V)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)                  # (B, T−1)


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
    weights: (K,) non-negative pair weights summing to 1; default uniform.
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
