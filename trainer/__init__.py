"""Tribune's trainer: bundled task, SFT, reward-model training, PPO and export.

The bundled task's gold judge is part of the public API::

    from tribune.trainer import gold_score
    gold_score("name 3 fruits", "apple pear plum")  # -> 1.0
"""
from tribune.trainer.task.judge import gold_score, parse_prompt

__all__ = ["gold_score", "parse_prompt"]
