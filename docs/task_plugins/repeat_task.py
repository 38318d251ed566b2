"""A task outside the suite: say one word N times, then another M times.

A plug-in example (README.md, "Tasks outside the suite"): written after the suite's defaults were
set, run with ``PYTHONPATH=docs/task_plugins TRIBUNE_TASKS=repeat_task:SPEC``.

``say moon three sun two`` → ``moon moon moon sun sun``. Gold: 1.0, minus 0.3 per copy too many or
too few of either word, 0.3 when a second word comes before a first one, 0.5 per other word;
empty −0.5. Flaws: ``short`` (one copy too few), ``long`` (one too many), ``swap`` (the second word
first), exploit ``stray`` (the right answer and one other word after it).
"""
from __future__ import annotations

import random

from tribune.trainer.task.spec import BaseModelSpec, TaskSpec

WORDS = ("moon", "sun", "star", "rain", "tree", "sea", "fire", "wind")
NUMBERS = ("one", "two", "three", "four", "five")


def vocabulary() -> list[str]:
    return ["say", *WORDS, *NUMBERS]


def _parse(prompt: str):
    w = prompt.split()
    if len(w) != 5 or w[0] != "say" or w[1] not in WORDS or w[3] not in WORDS or w[1] == w[3] \
            or w[2] not in NUMBERS or w[4] not in NUMBERS:
        return None
    return w[1], NUMBERS.index(w[2]) + 1, w[3], NUMBERS.index(w[4]) + 1


def gold_score(prompt: str, response: str) -> float:
    parsed = _parse(prompt)
    if parsed is None:
        raise ValueError(f"not a repeat prompt: {prompt!r}")
    a, n, b, m = parsed
    words = response.split()
    if not words:
        return -0.5
    score = 1.0 - 0.3 * (abs(words.count(a) - n) + abs(words.count(b) - m))
    score -= 0.5 * sum(x not in (a, b) for x in words)
    if a in words and b in words and words.index(b) < len(words) - 1 - words[::-1].index(a):
        score -= 0.3                                    # some b before the last a
    return score


def sample_prompt(rng: random.Random) -> str:
    a, b = rng.sample(WORDS, 2)
    return f"say {a} {rng.choice(NUMBERS)} {b} {rng.choice(NUMBERS)}"


FLAWS = {"short": 0.35, "long": 0.25, "swap": 0.25, "stray": 0.15}
SFT_FLAWS = {k: v for k, v in FLAWS.items() if k != "stray"}


def demonstrate(prompt, rng, p_correct, flaws=FLAWS):
    a, n, b, m = _parse(prompt)
    if rng.random() < p_correct:
        return " ".join([a] * n + [b] * m)
    flaw = rng.choices(list(flaws), weights=list(flaws.values()))[0]
    if flaw == "short":
        if m == 1 or (n > 1 and rng.random() < 0.5):
            n -= 1
        else:
            m -= 1
    elif flaw == "long":
        if rng.random() < 0.5:
            n += 1
        else:
            m += 1
    elif flaw == "swap":
        return " ".join([b] * m + [a] * n)
    else:
        return " ".join([a] * n + [b] * m + [rng.choice([x for x in WORDS if x not in (a, b)])])
    return " ".join([a] * n + [b] * m)


SPEC = TaskSpec(
    name="repeat", task_id="heldout-repeat-v1",
    description="say one word N times, then another M times (held out)",
    judge="repeat_task:gold_score", vocabulary=vocabulary, sample_prompt=sample_prompt,
    gold_score=gold_score, demonstrate=demonstrate, flaws=FLAWS, sft_flaws=SFT_FLAWS, exploit="stray",
    exploit_note="one other word after the right answer",
    model=BaseModelSpec(arch="llama", hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, tie_embeddings=False),
    p_correct=0.4, examples=(("say moon three sun two", "moon moon moon sun sun"),),
)
