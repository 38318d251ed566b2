"""One PPO iteration, top-down in numbered phases (CleanRL style).

``b`` is the whole (per-rank) rollout batch, ``mb`` one minibatch, both ``Rollout``s.
Nothing is updated before phase 5, so an iteration interrupted earlier (a scorer outage)
leaves the models as they were.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from tribune.trainer.defences import ensemble_reward, member_disagreement
from tribune.trainer.modeling import response_logprobs
from tribune.trainer.ppo_config import PPOConfig
from tribune.trainer.rl_math import (AdaptiveKLController, compute_gae, explained_variance, kl_penalty,
                                     leave_one_out_advantages, masked_mean, ppo_policy_loss, shaped_rewards,
                                     value_loss, whiten)
from tribune.trainer.rollout import Scorer, start_rollouts
from tribune.trainer.run import global_batch_indices, shard


def optimised_score(cfg: PPOConfig, facts, member_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The score PPO optimises, from the members' raw scores (B, K): standardised with each
    member's statistics (--normalize-reward), combined (--ensemble-reward: mean, mean − λ·std or
    min), clipped (--reward-clip); and the members' disagreement. -> (B,), (B,)"""
    z = facts.standardise_members(member_scores) if cfg.normalize_reward else member_scores   # (B, K)
    scores = ensemble_reward(z, cfg.ensemble_reward, cfg.uncertainty_coef)                   # (B,)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    return scores, member_disagreement(z)


@dataclass
class Learner:
    """What PPO trains: the policy and value model (prepared by accelerate; no value model with
    rloo advantages), their optimisers and schedulers, and the KL controller."""
    acc: Any
    policy: torch.nn.Module
    value: torch.nn.Module | None
    opt_policy: torch.optim.Optimizer
    opt_value: torch.optim.Optimizer | None
    sched_policy: Any
    sched_value: Any
    kl_ctl: AdaptiveKLController
    tokenizer: Any


def ppo_iteration(cfg: PPOConfig, learner: Learner, scorer: Scorer, prompts: list[str], it: int) -> dict[str, float]:
    """One PPO iteration on this rank's share of the prompts; returns its metrics (means over ranks)."""
    acc, policy, value = learner.acc, learner.policy, learner.value
    t_start = time.perf_counter()
    device = acc.device
    k = cfg.samples_per_prompt      # each prompt's k samples are consecutive rows (rloo's groups)
    chosen = global_batch_indices(len(prompts), cfg.prompts_per_iteration, it, cfg.seed)
    rank_prompts = [prompts[i] for i in shard(chosen, acc.process_index, acc.num_processes) for _ in range(k)]

    # 1. generate: chunks go to the services as soon as they exist (overlapped scoring)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + it * 31 + acc.process_index)
    pending = start_rollouts(acc.unwrap_model(policy), learner.tokenizer, scorer, rank_prompts,
                             chunk_size=cfg.scoring_chunk, max_prompt_length=cfg.max_prompt_length,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             overlap=cfg.overlap_scoring, generator=g)
    b = pending.rollout = pending.rollout.to(device)
    mask, P = b.response_mask, b.P                                                   # (B, R)
    with torch.no_grad():   # the policy's own log-probs and values, while the services still work
        b.logprobs = response_logprobs(acc.unwrap_model(policy), b.query_responses, b.attention_mask, P,
                                       cfg.temperature)[0] * mask                    # (B, R)
        if value is not None:
            b.values = acc.unwrap_model(value)(b.query_responses, b.attention_mask)[:, P - 1:-1] * mask   # (B, R)

    # 2. score remotely: raw member scores (B, K) and reference log-probs of the response tokens (B, R)
    pending.wait()

    # 3. KL-shaped rewards: per-token −β·KL, the score at the last token (Ziegler et al. 2019). The
    #    score comes from the members standardised with their own statistics: their mean, or the
    #    mean less λ·their spread, or their minimum (Coste et al. 2023); one member: its score
    optimised, disagreement = optimised_score(cfg, scorer.facts, b.member_scores)      # (B,), (B,)
    scores = optimised + cfg.missing_eos_penalty * (~b.eos).float()
    b.kl = kl_penalty(b.logprobs, b.ref_logprobs, cfg.kl_estimator) * mask          # (B, R)
    beta = learner.kl_ctl.value
    b.rewards = shaped_rewards(scores, b.kl, mask, beta)                              # (B, R)

    # 4. advantages, whitened per batch: GAE over response tokens with the value model, or (rloo) each
    #    response's return less the mean return of its prompt's other samples, on every response token.
    #    rloo's are whitened per response: they sum to zero in each prompt's group, so this only scales
    #    them (a mean over tokens would shift them: a group of equal returns would get a nonzero advantage)
    if value is not None:
        b.advantages, b.returns = compute_gae(b.rewards, b.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            b.advantages = whiten(b.advantages, mask)
    else:
        seq_adv = leave_one_out_advantages(b.rewards.sum(-1), k)                      # (B,) of score − β·Σ KL
        if cfg.whiten_advantages:
            seq_adv = whiten(seq_adv, torch.ones_like(seq_adv))
        b.advantages = seq_adv[:, None] * mask                                        # (B, R)

    # 5. epochs × minibatches; gradients accumulate over --gradient-accumulation-steps minibatches
    t_train = time.perf_counter()
    B = b.query_responses.shape[0]
    mb_size = cfg.mini_batch_size // acc.num_processes
    g = torch.Generator().manual_seed(cfg.seed * 104729 + it)
    stats: dict[str, list[float]] = defaultdict(list)     # means over epochs × minibatches, TRL PPOTrainer's names
    models = [(policy, learner.opt_policy, learner.sched_policy)]
    if value is not None:
        models.append((value, learner.opt_value, learner.sched_value))
    for model, opt, _ in models:
        model.train()
        opt.zero_grad(set_to_none=True)
    n_minibatches = cfg.ppo_epochs * -(-B // mb_size)
    accum = 0
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(B, generator=g).split(mb_size):
            mb = b[idx.to(device)]
            mb_mask = mb.response_mask
            new_logp, entropy = response_logprobs(policy, mb.query_responses, mb.attention_mask, P, cfg.temperature,
                                                  with_entropy=True)
            pg_loss, pg_stats = ppo_policy_loss(new_logp, mb.logprobs, mb.advantages, mb_mask, cfg.cliprange)
            acc.backward(pg_loss / cfg.gradient_accumulation_steps)
            step_stats = {"loss/policy_avg": pg_loss, "policy/clipfrac_avg": pg_stats["clipfrac"],
                          "policy/approxkl_avg": pg_stats["approxkl"], "val/ratio": pg_stats["ratio"],
                          "policy/entropy_avg": masked_mean(entropy, mb_mask)}
            if value is not None:
                new_values = value(mb.query_responses, mb.attention_mask)[:, P - 1:-1]
                vf_loss, vf_clipfrac = value_loss(new_values, mb.values, mb.returns, mb_mask, cfg.cliprange_value)
                acc.backward(cfg.vf_coef * vf_loss / cfg.gradient_accumulation_steps)
                step_stats.update({"loss/value_avg": vf_loss, "val/clipfrac_avg": vf_clipfrac})
            accum += 1
            if accum % cfg.gradient_accumulation_steps == 0 or accum == n_minibatches:   # never carry gradients over
                for model, opt, sched in models:
                    acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
            for name, v in step_stats.items():
                stats[name].append(float(v.detach()))
    for model, _, _ in models:
        model.eval()
    train_s = time.perf_counter() - t_train

    # 6. log (means over ranks) and adapt β
    seq_kl = b.kl.sum(-1)                                                             # (B,)
    lengths = mask.sum(-1)                                                            # (B,)
    local = {
        "objective/scores": b.scores.mean(), "objective/scores_normalized": scores.mean(),
        "objective/ensemble_disagreement": disagreement.mean(), "monitor/optimised_score": optimised.mean(),
        "objective/reward_per_token": (b.scores / lengths.clamp(min=1)).mean(),
        "objective/kl": seq_kl.mean(), "objective/non_score_reward": (-beta * seq_kl).mean(),
        "objective/entropy": (-b.logprobs * mask).sum(-1).mean(),   # TRL's: −Σ log π of the sampled tokens
        "objective/rlhf_reward": (scores - beta * seq_kl).mean(),
        "response/length": lengths.mean(), "response/eos_rate": b.eos.float().mean(),
    }
    if value is not None:
        local["val/explained_variance"] = explained_variance(b.values, b.returns, mask)
    row = {name: float(acc.reduce(v.detach().float().reshape(1), "mean")) for name, v in local.items()}
    row.update({name: sum(v) / len(v) for name, v in stats.items()})
    row.update({"objective/kl_coef": beta, "lr": learner.sched_policy.get_last_lr()[0],
                "episode": (it + 1) * cfg.rollout_batch_size,
                "eps": cfg.rollout_batch_size / (time.perf_counter() - t_start),
                "time/generation": pending.times.generation_s,
                "time/scoring_wait": pending.times.scoring_wait_s, "time/training": train_s,
                "time/step": time.perf_counter() - t_start})
    learner.kl_ctl.update(row["objective/kl"], cfg.rollout_batch_size)
    return row
