"""PPO maths for RLHF as pure functions of tensors (imports only torch and the sequence helpers).

Shapes: B batch, R response tokens. ``mask`` (B, R) is 1 on real response tokens (up to
and including the first EOS) and 0 after. References: Ziegler et al. 2019 (per-token KL,
reward at the last token, adaptive β); Schulman et al. 2016 (GAE); Schulman et al. 2017
(clipped objectives); Huang et al. 2024, "The N+ implementation details of RLHF with PPO";
Kool et al. 2019 and Ahmadian et al. 2024, "Back to Basics" (REINFORCE leave-one-out baselines).
"""
from __future__ import annotations

from typing import Literal

import torch

from tribune.trainer.sequences import last_token_index


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries; masked-out entries become 0. (B, R) -> (B, R)"""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Literal["k1", "k3"] = "k1"
               ) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π. (B, R) -> (B, R)

    k1 = log π − log π_ref (unbiased, can be negative); k3 = (r − 1) − log r with
    r = π_ref / π (unbiased, always ≥ 0, lower variance; Schulman 2020, "Approximating KL").
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards: −β·KL on every response token, the score added at the last one.

    scores (B,), kl (B, R), mask (B, R) -> (B, R). (Ziegler et al. 2019)
    """
    rewards = -beta * kl * mask
    idx = last_token_index(mask)
    return rewards.scatter_add(1, idx[:, None], scores[:, None].to(rewards.dtype))


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; (advantages, returns), each (B, R).

    The value after a row's last real token is 0 (the episode ends there).
    """
    values = values * mask
    rewards = rewards * mask
    R = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < R else 0.0)
        last = last * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def leave_one_out_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO: each sample's return minus the mean return of the other k − 1 samples of its prompt.

    returns (B,) with B = G·k, the k samples of each prompt consecutive -> (B,). Unbiased (the
    baseline does not depend on the sample it is subtracted from) and needs no value model.
    """
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 samples per prompt, got {k}")
    if returns.shape[0] % k:
        raise ValueError(f"{returns.shape[0]} returns do not split into groups of {k}")
    groups = returns.reshape(-1, k)                                                   # (G, k)
    others = (groups.sum(-1, keepdim=True) - groups) / (k - 1)                        # (G, k)
    return (groups - others).reshape(-1)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over tokens of max(−A·ρ, −A·clip(ρ, 1±ε)). Inputs (B, R)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    stats = {"clipfrac": masked_mean((pg2 > pg1).float(), mask),
             "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
             "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5·max((V − G)², (V_clip − G)²); returns (loss, clip fraction). Inputs (B, R)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(l1, l2), mask), masked_mean((l2 > l1).float(), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position. (B, R, V) -> (B, R)"""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(G − V) / Var(G) over the masked entries (1 is perfect, ≤ 0 is useless)."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


class AdaptiveKLController:
    """β that tracks a KL target (Ziegler et al. 2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)."""

    def __init__(self, init_beta: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init_beta, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:       # fixed β
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
