"""Sequence helpers that the trainer and the exported graphs must compute identically.

Pure functions of tensors (imports only torch). Shapes: B batch, T sequence, V vocab.
Position ids always come from the mask, so a padded row (either side) gives exactly the
values of the unpadded one; the ONNX graphs are traced from these same functions.
"""
from __future__ import annotations

import torch


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
