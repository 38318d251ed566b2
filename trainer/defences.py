"""Over-optimisation defences that need no gold judge, as pure functions and small monitors.

Shapes: B rollouts, K ensemble members. Member scores are standardised first, each with its
own statistics on πSFT samples (members differ by offset and scale, so raw spread means
nothing): z_k = (r_k − μ_k) / σ_k.

* ``ensemble_reward``: the mean over members (plain), the mean minus λ·std (uncertainty-
  weighted optimisation) or the minimum (worst-case optimisation), after Coste et al. 2023
  (whose UWO penalises λ·variance; the std keeps λ in the standardised reward's units).
* ``KLBudget``: the KL per response held under a target by raising β (or stopping), which a
  short run's adaptive controller does not do (Ziegler et al.'s horizon is 10,000 rollouts).
* ``DriftMonitor``: the gold-free alarms of OVEROPTIMISATION.md — the proxy rising while the
  ensemble's disagreement rises, the responses' length drifting away from πSFT's, or the proxy
  climbing far past the score of the responses raters preferred (``proxy_past_preferred``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

log = logging.getLogger("tribune")

EnsembleMode = Literal["mean", "uncertainty", "worst"]


def standardise_members(member_scores: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """(r_k − μ_k) / σ_k per member. member_scores (B, K), means and stds (K,) -> (B, K)"""
    return (member_scores - means) / stds


def member_disagreement(z: torch.Tensor) -> torch.Tensor:
    """Standard deviation across members of standardised scores (0 for one member). (B, K) -> (B,)"""
    if z.shape[-1] < 2:
        return torch.zeros_like(z[..., 0])
    return z.std(-1, unbiased=False)


def ensemble_reward(z: torch.Tensor, mode: EnsembleMode, coef: float = 1.0) -> torch.Tensor:
    """The reward PPO optimises from standardised member scores z (B, K) -> (B,).

    mean: (1/K)·Σ z_k; uncertainty: mean − coef·std (UWO); worst: min_k z_k (WCO).
    With one member every mode is that member's score.
    """
    mean = z.mean(-1)
    if mode == "mean":
        return mean
    if mode == "uncertainty":
        return mean - coef * member_disagreement(z)
    if mode == "worst":
        return z.min(-1).values
    raise ValueError(f"ensemble mode must be mean, uncertainty or worst, got {mode!r}")


def proxy_past_preferred(proxy: float, start: float, preferred: float) -> float:
    """How far the proxy has risen above πSFT's samples, as a multiple of how far the responses
    raters ranked first (held-out preferences) sit above them: (proxy − start) / (preferred − start).

    1 means the policy now scores, on average, what the raters' favourites score. Well past 1,
    the reward model rates the policy above anything it saw preferred: it is extrapolating,
    which is where gold falls while the proxy rises (Gao et al. 2022). NaN when the preferred
    responses do not score above πSFT's samples (the ratio says nothing then).
    """
    gap = preferred - start
    return (proxy - start) / gap if gap > 0 else float("nan")


@dataclass
class KLBudget:
    """Keeps the KL per response under ``target`` nats: above it, β is multiplied by ``factor``
    (``action="raise_beta"``) or the run stops (``action="stop"``). None: no budget."""
    target: float | None
    action: Literal["raise_beta", "stop"] = "raise_beta"
    factor: float = 1.5
    exceeded: int = 0

    def check(self, kl: float, beta: float) -> tuple[float, bool]:
        """(β for the next iteration, whether to stop) after an iteration whose mean KL was ``kl``."""
        if self.target is None or kl <= self.target:
            return beta, False
        self.exceeded += 1
        if self.action == "stop":
            return beta, True
        return max(beta, 1e-3) * self.factor, False


@dataclass
class DriftMonitor:
    """Warns (and can stop) when the proxy (the score PPO optimises) rises while the ensemble
    disagrees more, while the response length drifts from πSFT's, or while it climbs past
    ``preferred_tolerance`` times the height of the raters' preferred responses (``preferred``:
    the same score's mean over the responses ranked first in held-out preferences; None: that
    alarm is off). Call ``observe`` once per iteration.

    The reference point is the first iteration (πSFT's own samples). ``window`` iterations are
    averaged on each side so one noisy batch does not trigger it.
    """
    length_tolerance: float = 0.3        # |length / πSFT length − 1| above this is drift
    disagreement_tolerance: float = 0.25  # relative rise of the disagreement that counts
    window: int = 3
    preferred: float | None = None       # the proxy of the raters' preferred held-out responses
    preferred_tolerance: float = 1.75    # proxy_past_preferred above this is extrapolation
    history: list[tuple[float, float, float]] = field(default_factory=list)   # (proxy, disagreement, length)

    def observe(self, proxy: float, disagreement: float, length: float) -> dict[str, float]:
        self.history.append((proxy, disagreement, length))
        first = self._mean(self.history[:self.window])
        now = self._mean(self.history[-self.window:])
        length_ratio = now[2] / max(first[2], 1e-6)
        proxy_up = now[0] > first[0]
        disagree_up = first[1] > 0 and now[1] > first[1] * (1 + self.disagreement_tolerance)
        drift = abs(length_ratio - 1) > self.length_tolerance
        past = proxy_past_preferred(now[0], first[0], self.preferred) if self.preferred is not None else float("nan")
        beyond = past > self.preferred_tolerance          # False for NaN
        warn = len(self.history) > self.window and proxy_up and (disagree_up or drift or beyond)
        row = {"monitor/length_ratio": length_ratio, "monitor/disagreement_ratio": now[1] / first[1] if first[1] else 1.0,
               "monitor/overoptimisation_warning": float(warn)}
        if self.preferred is not None:
            row["monitor/proxy_past_preferred"] = past
        return row

    @staticmethod
    def _mean(rows: list[tuple[float, float, float]]) -> tuple[float, float, float]:
        n = len(rows)
        return tuple(sum(r[i] for r in rows) / n for i in range(3))   # type: ignore[return-value]

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(h) for h in state.get("history", [])]
