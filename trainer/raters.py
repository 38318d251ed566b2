"""Simulated raters: how a noisy person orders candidates whose true scores are known.

Bradley–Terry for two candidates, P(a ≻ b) = σ((s_a − s_b) / τ), and its generalisation to k
candidates, Plackett–Luce: the best is drawn with weights exp(s / τ), then the best of the
rest, and so on. τ = 0 is a noise-free rater (a stable sort by score). Pure functions of the
scores and a ``random.Random``, so a seed gives the same labels.
"""
from __future__ import annotations

import math
import random


def bradley_terry_probability(delta: float, tau: float) -> float:
    """P(a ≻ b) for score difference ``delta = s_a − s_b`` at temperature ``tau`` (τ = 0: 1, ½ or 0)."""
    if tau == 0:
        return 1.0 if delta > 0 else 0.5 if delta == 0 else 0.0
    return 1.0 / (1.0 + math.exp(-delta / tau))


def plackett_luce_order(scores: list[float], rng: random.Random, tau: float) -> list[int]:
    """Indices of ``scores``, best first, drawn from the Plackett–Luce model at temperature ``tau``."""
    if tau < 0:
        raise ValueError("rater temperature must be non-negative")
    if tau == 0:
        return sorted(range(len(scores)), key=lambda i: -scores[i])
    pool, order = list(range(len(scores))), []
    while pool:
        top = max(scores[i] for i in pool)          # shifted for stability; the draw is unchanged
        weights = [math.exp((scores[i] - top) / tau) for i in pool]
        order.append(pool.pop(rng.choices(range(len(pool)), weights=weights)[0]))
    return order
