"""One PPO iteration in this process against served scorers: the trainer's own connector
(``tribune.trainer.scorers.connect``), learner and iteration, without a subprocess per model."""
from __future__ import annotations

from pathlib import Path


def ppo_config(policy: Path, prompts: Path, reward_url: str, reference_url: str, output: Path, **overrides):
    from tribune.services.common.config import build_config
    from tribune.trainer.ppo_config import PPOConfig

    return build_config(PPOConfig, {
        "policy": policy, "prompts": prompts, "reward_url": reward_url, "reference_url": reference_url,
        "output": output, "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "scoring_chunk": 4,
        "max_new_tokens": 4, "max_prompt_length": 48, "normalize_reward": False, "client": {"connect_timeout_s": 30, "retry_budget_s": 10},
        **overrides})


def one_iteration(cfg) -> tuple[dict, bool]:
    """(the iteration's metrics, whether the policy's weights moved)."""
    import torch

    from tribune.services.common.jsonl import SkipCounter
    from tribune.services.common.text import load_tokenizer
    from tribune.services.repository import tokenizer_fingerprint
    from tribune.trainer.data import load_prompts
    from tribune.trainer.ppo import make_learner
    from tribune.trainer.ppo_step import ppo_iteration
    from tribune.trainer.run import make_accelerator, seed_everything
    from tribune.trainer.scorers import connect

    seed_everything(0)
    tok = load_tokenizer(cfg.policy)
    scorers = connect(cfg, tok, tokenizer_fingerprint(tok))
    try:
        learner = make_learner(cfg, make_accelerator(), tok)
        before = [p.detach().clone() for p in learner.policy.parameters()]
        row = ppo_iteration(cfg, learner, scorers, load_prompts(cfg.prompts, SkipCounter()), it=0)
        moved = any(not torch.equal(a, b) for a, b in zip(before, learner.policy.parameters()))
    finally:
        scorers.close()
    return row, moved
