"""The bundled task's instructions and its programmatic gold judge.

The task is a tiny instruction language with two kinds of prompt:

* ``name N CATEGORY`` (e.g. ``name three fruits``): answer with N *distinct* words of
  that category, e.g. ``apple pear plum``;
* ``count from A to B`` (e.g. ``count from two to five``): answer with the number words
  from A to B, e.g. ``two three four five``.

``gold_score(prompt, response)`` plays the human rater. It is 1.0 for a perfect answer
and decreases for every missing word and for every word that is not needed: a wrong
category, a repeat, or anything beyond what was asked. That last part is what a learned
reward model tends to miss: preference data rarely shows over-long lists, so a proxy
that learned "more correct-looking words is better" can be pushed past the gold optimum
(repetition and length), which is how over-optimisation shows up in PPO when β is small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "rat", "elk", "ant", "bat"),
    "fruits": ("apple", "pear", "plum", "fig", "lime", "kiwi", "grape", "mango", "peach", "lemon", "melon", "berry"),
    "colours": ("red", "blue", "green", "pink", "gold", "grey", "teal", "cyan", "black", "white", "brown", "olive"),
    "tools": ("saw", "drill", "hammer", "wrench", "chisel", "plane", "rasp", "awl", "vise", "clamp", "level", "pliers"),
}
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PROMPT_WORDS: tuple[str, ...] = ("name", "count", "from", "to")

# Penalty per word that is not one of the needed correct words.
EXTRA_WORD_PENALTY = 0.5


@dataclass(frozen=True)
class Instruction:
    """A parsed prompt: what a perfect answer must contain."""
    kind: Literal["name", "count"]
    n: int                          # words a perfect answer has
    category: str | None = None     # for "name"
    start: int | None = None        # for "count": index into NUMBERS


def vocabulary() -> list[str]:
    """Every word the task uses, in a fixed order (the tokenizer's vocabulary)."""
    words: list[str] = list(PROMPT_WORDS) + list(NUMBERS) + list(CATEGORIES)
    for members in CATEGORIES.values():
        words.extend(members)
    return words


def parse_prompt(prompt: str) -> Instruction | None:
    """Parses a bundled-task prompt; None when the prompt is not one of the task's."""
    words = prompt.split()
    if len(words) == 3 and words[0] == "name" and words[1] in NUMBERS and words[2] in CATEGORIES:
        return Instruction("name", NUMBERS.index(words[1]) + 1, category=words[2])
    if (len(words) == 5 and words[:2] == ["count", "from"] and words[3] == "to"
            and words[2] in NUMBERS and words[4] in NUMBERS):
        a, b = NUMBERS.index(words[2]), NUMBERS.index(words[4])
        if b > a:
            return Instruction("count", b - a + 1, start=a)
    return None


def perfect_answer(ins: Instruction) -> list[str] | None:
    """The unique perfect answer for "count"; None for "name" (many are perfect)."""
    if ins.kind == "count":
        return list(NUMBERS[ins.start:ins.start + ins.n])
    return None


def gold_score(prompt: str, response: str) -> float:
    """The gold judge: 1.0 for a perfect answer, lower for missing or unneeded words.

    ``name``: correct = distinct words of the category (at most N); score =
    correct / N − 0.5 · (words − correct). ``count``: correct = the length of the
    longest prefix that matches A..B; same formula. An empty answer scores −0.5.
    Raises ``ValueError`` for a prompt that is not one of the task's.
    """
    ins = parse_prompt(prompt)
    if ins is None:
        raise ValueError(f"not a bundled-task prompt: {prompt!r}")
    words = response.split()
    if not words:
        return -0.5
    if ins.kind == "name":
        members = set(CATEGORIES[ins.category])
        correct = min(len({w for w in words if w in members}), ins.n)
    else:
        expected = perfect_answer(ins)
        correct = 0
        for got, want in zip(words, expected):
            if got != want:
                break
            correct += 1
    return correct / ins.n - EXTRA_WORD_PENALTY * (len(words) - correct)


def is_task_prompt(prompt: str) -> bool:
    return parse_prompt(prompt) is not None
