"""What a synthetic task is: the small interface that ``tribune.trainer.task.make`` builds files from.

A task is a word-level instruction language (whitespace tokens) with

* a prompt sampler and a noisy demonstrator (perfect with probability ``p_correct``,
  otherwise one flaw drawn from a weighted table),
* a deterministic gold judge ``gold_score(prompt, response) -> float`` (1.0 for a perfect
  answer, partial credit below; ``ValueError`` only for a prompt that is not the task's),
  importable as ``judge`` = ``"module:function"`` so other stages can load it by name,
* one *exploitable* flaw: rare in the preference data, absent from the demonstrations, and
  worse than perfect under the gold judge — what an over-optimised policy finds,
* the shape of its tiny base model.

Every task's prompts are disjoint from every other task's, so a prompt names its task.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

Arch = Literal["llama", "gpt2", "qwen3"]


@dataclass(frozen=True)
class BaseModelSpec:
    """The default shape of a task's tiny base model, randomly initialised and then pretrained for
    ``pretrain_steps`` steps on a generic copying corpus (``tribune.trainer.task.pretrain``)."""
    arch: Arch
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None     # grouped-query attention (llama, qwen3); None: = num_heads
    mlp_ratio: int = 3                  # intermediate size = mlp_ratio · hidden_size
    tie_embeddings: bool = True
    pretrain_steps: int = 1000          # steps of generic in-context-copy pretraining (0: random weights)


@dataclass(frozen=True)
class TaskSpec:
    """One synthetic task of the suite (see the module docstring)."""
    name: str                                        # short name for `--task`
    task_id: str                                     # versioned id, written as task.json "task"
    description: str                                 # one line, for `tribune task list`
    judge: str                                       # "module:function" of gold_score
    vocabulary: Callable[[], list[str]]              # every word, fixed order (the tokenizer)
    sample_prompt: Callable[[random.Random], str]
    gold_score: Callable[[str, str], float]
    demonstrate: Callable[..., str]                  # (prompt, rng, p_correct, flaws) -> response
    flaws: Mapping[str, float]                       # flaw weights of the preference candidates
    sft_flaws: Mapping[str, float]                   # flaw weights of the demonstrations
    exploit: str                                     # the rare flaw an over-optimised policy exploits
    exploit_note: str                                # what it is and why a proxy misses it
    model: BaseModelSpec
    p_correct: float = 0.45                          # default share of perfect demonstrations
    rater_temperature: float = 0.1                   # default τ of the Bradley–Terry raters
    examples: tuple[tuple[str, str], ...] = field(default=())   # (prompt, perfect answer)

    def __post_init__(self) -> None:
        if self.exploit not in self.flaws:
            raise ValueError(f"task {self.name}: exploit {self.exploit!r} is not one of its flaws")
        if self.exploit in self.sft_flaws:
            raise ValueError(f"task {self.name}: exploit {self.exploit!r} must not be in the demonstrations")
        words = self.vocabulary()
        if len(set(words)) != len(words):
            raise ValueError(f"task {self.name}: vocabulary has duplicate words")

    def accepts(self, prompt: str) -> bool:
        """True when ``prompt`` is one of this task's prompts (its judge can score it)."""
        try:
            self.gold_score(prompt, "")
        except ValueError:
            return False
        return True

    def load_judge(self) -> Callable[[str, str], float]:
        """Imports ``judge`` ("module:function") the way other stages do."""
        return load_judge(self.judge)


def load_judge(ref: str) -> Callable[[str, str], float]:
    """Imports a gold judge given as ``"module:function"``, exactly as ``--judge`` does."""
    from tribune.services.judge import CallableJudge

    return CallableJudge(ref).fn


def apply_flaw_weights(rng: random.Random, flaws: Mapping[str, float]) -> str:
    """Draws one flaw name from a weight table (one rng.choices call)."""
    return rng.choices(list(flaws), weights=list(flaws.values()))[0]
