"""A task outside the suite: count how often a word occurs in a list.

A plug-in example (README.md, "Two tasks outside the suite"): written after the suite's
defaults were set, run with ``PYTHONPATH=docs/task_plugins TRIBUNE_TASKS=translate_task:SPEC,count_task:SPEC``.

``how many pear in apple pear plum pear`` → ``two``. Gold: 1.0 for the right number word, 0.4 for
one off, 0 otherwise, minus 0.4 per word beyond the first; empty or a non-number −0.5.
Flaws: ``off`` (one off), ``far`` (two or more off), ``echo`` (the asked word instead of a number),
exploit ``stutter`` (the right number said twice).
"""
from __future__ import annotations

import random

from tribune.trainer.task.spec import BaseModelSpec, TaskSpec

FRUITS = ("apple", "pear", "plum", "fig", "lime", "kiwi")
NUMBERS = ("zero", "one", "two", "three", "four", "five")


def vocabulary() -> list[str]:
    return ["how", "many", "in", *FRUITS, *NUMBERS]


def _parse(prompt: str):
    w = prompt.split()
    if len(w) < 5 or w[:2] != ["how", "many"] or w[3] != "in" or w[2] not in FRUITS \
            or any(x not in FRUITS for x in w[4:]):
        return None
    return w[4:].count(w[2])


def gold_score(prompt: str, response: str) -> float:
    n = _parse(prompt)
    if n is None:
        raise ValueError(f"not a count prompt: {prompt!r}")
    words = response.split()
    if not words or words[0] not in NUMBERS:
        return -0.5
    got = NUMBERS.index(words[0])
    base = 1.0 if got == n else 0.4 if abs(got - n) == 1 else 0.0
    return base - 0.4 * (len(words) - 1)


def sample_prompt(rng: random.Random) -> str:
    target = rng.choice(FRUITS)
    k = rng.randint(3, 7)
    n = rng.randint(0, min(4, k))
    items = [target] * n + [rng.choice([f for f in FRUITS if f != target]) for _ in range(k - n)]
    rng.shuffle(items)
    return f"how many {target} in {' '.join(items)}"


FLAWS = {"off": 0.45, "far": 0.2, "echo": 0.2, "stutter": 0.15}
SFT_FLAWS = {k: v for k, v in FLAWS.items() if k != "stutter"}


def demonstrate(prompt, rng, p_correct, flaws=FLAWS):
    n = _parse(prompt)
    if rng.random() < p_correct:
        return NUMBERS[n]
    flaw = rng.choices(list(flaws), weights=list(flaws.values()))[0]
    if flaw == "off":
        return NUMBERS[n + 1] if n == 0 or (n < 5 and rng.random() < 0.5) else NUMBERS[n - 1]
    if flaw == "far":
        return rng.choice([x for i, x in enumerate(NUMBERS) if abs(i - n) >= 2])
    if flaw == "echo":
        return prompt.split()[2]
    return f"{NUMBERS[n]} {NUMBERS[n]}"


SPEC = TaskSpec(
    name="count", task_id="heldout-count-v1",
    description="count how often a word occurs in a list (held out)",
    judge="count_task:gold_score", vocabulary=vocabulary, sample_prompt=sample_prompt,
    gold_score=gold_score, demonstrate=demonstrate, flaws=FLAWS, sft_flaws=SFT_FLAWS, exploit="stutter",
    exploit_note="the right number said twice",
    model=BaseModelSpec(arch="llama", hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, tie_embeddings=False),
    p_correct=0.4, examples=(("how many pear in apple pear plum pear", "two"),),
)
