"""A task of one's own, not in Tribune: plugged in by `tests/test_task_plugins.py` through
``$TRIBUNE_TASKS=tests.task_plugin_echo:SPEC`` or a ``tribune.tasks`` entry point.

Prompts ``echo N WORD`` (``echo three red`` → ``red red red``). Gold: 1.0 minus 0.4 per word of
length error and 0.5 per word that is not WORD; empty −0.5. Exploitable flaw ``long`` (too many
copies), absent from the demonstrations.
"""
from __future__ import annotations

import random

from tribune.trainer.task.spec import BaseModelSpec, TaskSpec

WORDS = ("red", "blue", "green", "gold", "grey")
COUNTS = ("one", "two", "three", "four")


def vocabulary() -> list[str]:
    return ["echo", *COUNTS, *WORDS]


def _parse(prompt: str) -> tuple[int, str] | None:
    w = prompt.split()
    if len(w) != 3 or w[0] != "echo" or w[1] not in COUNTS or w[2] not in WORDS:
        return None
    return COUNTS.index(w[1]) + 1, w[2]


def gold_score(prompt: str, response: str) -> float:
    parsed = _parse(prompt)
    if parsed is None:
        raise ValueError(f"not an echo-task prompt: {prompt!r}")
    n, word = parsed
    words = response.split()
    if not words:
        return -0.5
    return 1.0 - 0.4 * abs(len(words) - n) - 0.5 * sum(x != word for x in words)


def sample_prompt(rng: random.Random) -> str:
    return f"echo {rng.choice(COUNTS)} {rng.choice(WORDS)}"


FLAWS = {"short": 0.4, "wrong": 0.4, "long": 0.2}
SFT_FLAWS = {"short": 0.5, "wrong": 0.5}


def demonstrate(prompt: str, rng: random.Random, p_correct: float, flaws: dict[str, float] = FLAWS) -> str:
    n, word = _parse(prompt)
    answer = [word] * n
    if rng.random() < p_correct:
        return " ".join(answer)
    flaw = rng.choices(list(flaws), weights=list(flaws.values()))[0]
    if flaw == "short":
        answer = answer[:-1] or [rng.choice([w for w in WORDS if w != word])]
    elif flaw == "wrong":
        answer[rng.randrange(n)] = rng.choice([w for w in WORDS if w != word])
    else:
        answer += [word] * rng.randint(1, 2)
    return " ".join(answer)


SPEC = TaskSpec(
    name="echo",
    task_id="tests-echo-v1",
    description="repeat a word N times (a task plugged in from outside Tribune)",
    judge="tests.task_plugin_echo:gold_score",
    vocabulary=vocabulary,
    sample_prompt=sample_prompt,
    gold_score=gold_score,
    demonstrate=demonstrate,
    flaws=FLAWS,
    sft_flaws=SFT_FLAWS,
    exploit="long",
    exploit_note="too many copies of the word",
    model=BaseModelSpec(arch="gpt2", hidden_size=32, num_layers=1, num_heads=2),
    p_correct=0.4,
    examples=(("echo two red", "red red"),),
)

NOT_A_SPEC = "echo"
