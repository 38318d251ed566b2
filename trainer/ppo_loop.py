"""The PPO loop: one iteration reads top-down in numbered phases (CleanRL style).

`b_` tensors are the whole (per-rank) rollout batch, `mb_` tensors one minibatch.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from services.client import ScorerRequestError, ScorerServerError, ScorerUnavailable, TritonScorer
from services.contract import ContractError
from services.repository import tokenizer_fingerprint
from trainer.data import SkipCounter, load_prompts
from trainer.errors import UserError
from trainer.loop import (MetricsLog, StopRequested, check_ranks_agree, global_batch_indices, latest_checkpoint,
                          load_checkpoint, save_checkpoint, shard, start_run, truncate_log, write_json)
from trainer.losses import position_ids_from_mask
from trainer.modeling import load_causal_lm, load_reward_model, reward_head
from trainer.ppo import PPOConfig
from trainer.ppo_monitor import HackingDetector, gold_and_proxy, plot_metrics
from trainer.rl_math import (AdaptiveKLController, compute_gae, explained_variance, kl_penalty, masked_mean,
                             ppo_policy_loss, shaped_rewards, value_loss, whiten)
from trainer.rollout import response_logprobs_and_entropy, start_rollouts
from trainer.task.judge import is_task_prompt

log = logging.getLogger("tribune")


class ValueModel(nn.Module):
    """A scalar-head model giving V at every position; one forward call (through DDP). (B, T) -> (B, T)"""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
        return reward_head(self.model)(hidden).squeeze(-1).float()


class RemoteScorers:
    """The `reward` and `reference` services (possibly on different servers) behind one object."""

    def __init__(self, cfg: PPOConfig, fingerprint: str):
        self.reward = TritonScorer(cfg.client(cfg.reward_url), fingerprint, models=("reward",))
        self.reference = TritonScorer(cfg.client(cfg.reference_url), fingerprint, models=("reference",))

    def score_async(self, ids, mask):
        return self.reward.score_async(ids, mask)

    def score(self, ids, mask):
        return self.reward.score(ids, mask)

    def logprobs_async(self, ids, mask, temperature):
        return self.reference.logprobs_async(ids, mask, temperature)

    def close(self) -> None:
        self.reward.close()
        self.reference.close()


def _connect(cfg: PPOConfig, fingerprint: str) -> RemoteScorers:
    try:
        return RemoteScorers(cfg, fingerprint)
    except (ContractError, ScorerUnavailable) as e:
        raise UserError(f"cannot use the scoring services: {e}") from None


def train(cfg: PPOConfig) -> dict:
    acc, out, tokenizer = start_run(cfg.seed, cfg.output, cfg.policy)
    skipped = SkipCounter()
    prompts = load_prompts(cfg.prompts, skipped)
    eval_prompts = load_prompts(cfg.eval_prompts, SkipCounter())[:cfg.gold_eval_size] if cfg.eval_prompts else []
    use_gold = bool(eval_prompts) and all(is_task_prompt(p) for p in eval_prompts)
    world = acc.num_processes
    if cfg.rollout_batch_size % world or cfg.mini_batch_size % world:
        raise UserError(f"rollout_batch_size and mini_batch_size must be multiples of the {world} processes")
    scorers = _connect(cfg, tokenizer_fingerprint(tokenizer))
    facts = scorers.reward.facts
    log.info("ppo: %d prompts (skipped %s); reward model %s; %d process(es)", len(prompts), skipped.summary(),
             facts.get("reward_model_id"), world)

    policy = load_causal_lm(cfg.policy)
    value = ValueModel(load_reward_model(cfg.value_init or cfg.policy))
    opt_p = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, eps=1e-5)
    opt_v = torch.optim.AdamW(value.parameters(), lr=cfg.value_learning_rate or cfg.learning_rate, eps=1e-5)
    policy, value, opt_p, opt_v = acc.prepare(policy, value, opt_p, opt_v)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl if cfg.adaptive_kl else None, cfg.kl_horizon)
    start, hacking = 0, HackingDetector()
    if cfg.resume:
        start, state = load_checkpoint(acc, out)
        if state:
            kl_ctl.load_state_dict(state["kl_controller"])
            hacking.history = [tuple(h) for h in state.get("gold_history", [])]
    metrics_log = MetricsLog(out, acc.is_main_process)
    if acc.is_main_process:
        truncate_log(metrics_log.path, start)
        write_json(out / "config.resolved.json", {k: str(v) for k, v in vars(cfg).items()})

    def evaluate_gold(step: int) -> dict:
        if not (use_gold and acc.is_main_process):
            return {}
        m = gold_and_proxy(acc.unwrap_model(policy), tokenizer, scorers, eval_prompts,
                           max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, seed=cfg.seed + 1)
        m["gold/hacking_warning"] = float(hacking.observe(step, m["gold/proxy_score"], m["gold/score"]))
        return m

    from tqdm.auto import tqdm

    steps = cfg.total_iterations
    bar = tqdm(total=steps, initial=start, desc="ppo", disable=not acc.is_main_process, dynamic_ncols=True)
    last: dict = {}
    try:
        if start == 0:
            first = evaluate_gold(0)
            if first:
                metrics_log.write(0, first)
                last.update({"sft/" + k.split("/", 1)[1]: v for k, v in first.items() if k != "gold/hacking_warning"})
        with StopRequested() as stop:
            for it in range(start, steps):
                row = ppo_iteration(cfg, acc, it, policy, value, opt_p, opt_v, kl_ctl, tokenizer, scorers, prompts,
                                    facts)
                done = it + 1
                if done % cfg.gold_every == 0 or done == steps:
                    row.update(evaluate_gold(done))
                if done % cfg.log_every == 0 or done == steps or "gold/score" in row:
                    metrics_log.write(done, row)
                last.update(row)
                bar.update(1)
                bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['objective/kl']:.2f}")
                state = {"kl_controller": kl_ctl.state_dict(), "gold_history": hacking.history}
                if done % cfg.checkpoint_every == 0 and done != steps:
                    save_checkpoint(acc, out, done, state, cfg.keep_checkpoints)
                if done != steps and stop.agreed(acc):
                    path = save_checkpoint(acc, out, done, state, cfg.keep_checkpoints)
                    raise UserError(f"stopped by a signal after iteration {done}/{steps}; checkpoint {path}; "
                                    "run the same command with --resume to continue")
    except (ScorerUnavailable, ScorerRequestError, ScorerServerError) as e:
        ckpt = latest_checkpoint(out)
        raise UserError(f"{e}. The iteration in progress was not applied; last checkpoint: "
                        f"{ckpt or 'none yet'}; run the same command with --resume once the service is back") from None
    finally:
        bar.close()
        scorers.close()
        metrics_log.close()

    final = {k: v for k, v in last.items() if not isinstance(v, list)}
    final["rank_weight_sha256"] = check_ranks_agree(acc, acc.unwrap_model(policy))
    if acc.is_main_process:
        acc.unwrap_model(policy).save_pretrained(out)
        tokenizer.save_pretrained(out)
        acc.unwrap_model(value).model.save_pretrained(out / "value_model")
        plot = plot_metrics(metrics_log.path, out / "ppo.png")
        final["plot"] = str(plot) if plot else None
        write_json(out / "metrics.json", final)
    acc.wait_for_everyone()
    return final


def ppo_iteration(cfg: PPOConfig, acc, it: int, policy, value, opt_p, opt_v, kl_ctl, tokenizer, scorers,
                  prompts: list[str], facts: dict) -> dict[str, float]:
    """One PPO iteration; returns its metrics. Nothing is updated before phase 5."""
    t_start = time.perf_counter()
    rank_prompts = [prompts[i] for i in shard(global_batch_indices(len(prompts), cfg.rollout_batch_size, it, cfg.seed),
                                              acc.process_index, acc.num_processes)]
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + it * 31 + acc.process_index)
    # 1. generate, sending each chunk to the services as soon as it exists (chunk k+1 is
    #    generated while chunk k is scored)
    pending = start_rollouts(acc.unwrap_model(policy), tokenizer, scorers, rank_prompts,
                             chunk_size=cfg.scoring_chunk, max_prompt_length=cfg.max_prompt_length,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             overlap=cfg.overlap_scoring, generator=gen)
    device = acc.device
    b_qr, b_attn, P = pending.query_responses.to(device), pending.attention_mask.to(device), pending.P
    b_mask = pending.response_mask.to(device).float()                                # (B, R)
    with torch.no_grad():   # the policy's own log-probs and values, while the services still work
        b_logprobs, _ = response_logprobs_and_entropy(acc.unwrap_model(policy), b_qr, b_attn, P, cfg.temperature)
        b_logprobs = b_logprobs * b_mask                                              # (B, R)
        b_values = acc.unwrap_model(value)(b_qr, b_attn)[:, P - 1:-1] * b_mask        # (B, R)
    # 2. remote scores: rewards (B,) and reference log-probs of the response tokens (B, R)
    roll = pending.wait()
    times = pending.times
    b_ref = roll.ref_logprobs.to(device) * b_mask                                     # (B, R)

    # 3. KL-shaped rewards: per-token −β·KL, the normalised score at the last token (Ziegler et al. 2019)
    raw = roll.scores.to(device)                                                      # (B,)
    scores = (raw - facts["reward_mean"]) / facts["reward_std"] if cfg.normalize_reward else raw.clone()
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    eos = roll.eos.to(device)
    scores = scores + cfg.missing_eos_penalty * (~eos).float()
    b_kl = kl_penalty(b_logprobs, b_ref, cfg.kl_estimator) * b_mask                   # (B, R)
    beta = kl_ctl.value
    b_rewards = shaped_rewards(scores, b_kl, b_mask, beta)                            # (B, R)

    # 4. advantages: GAE over response tokens, whitened per batch
    b_adv, b_returns = compute_gae(b_rewards, b_values, b_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        b_adv = whiten(b_adv, b_mask)

    # 5. epochs × minibatches
    t_train = time.perf_counter()
    B = b_qr.shape[0]
    mb_size = cfg.mini_batch_size // acc.num_processes
    g = torch.Generator().manual_seed(cfg.seed * 104729 + it)
    stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clipfrac", "vf_clipfrac", "approxkl", "entropy")}
    policy.train(), value.train()
    opt_p.zero_grad(set_to_none=True), opt_v.zero_grad(set_to_none=True)
    n_minibatches = cfg.ppo_epochs * -(-B // mb_size)
    accum = 0
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(B, generator=g).split(mb_size):
            mb = mb.to(device)
            mb_mask = b_mask[mb]
            new_logp, entropy = response_logprobs_and_entropy(policy, b_qr[mb], b_attn[mb], P, cfg.temperature,
                                                              with_entropy=True)
            pg_loss, pg_stats = ppo_policy_loss(new_logp, b_logprobs[mb], b_adv[mb], mb_mask, cfg.cliprange)
            new_values = value(b_qr[mb], b_attn[mb])[:, P - 1:-1]
            vf_loss, vf_clipfrac = value_loss(new_values, b_values[mb], b_returns[mb], mb_mask, cfg.cliprange_value)
            acc.backward(pg_loss / cfg.gradient_accumulation_steps)
            acc.backward(cfg.vf_coef * vf_loss / cfg.gradient_accumulation_steps)
            accum += 1
            if accum % cfg.gradient_accumulation_steps == 0 or accum == n_minibatches:   # never carry gradients over
                for model, opt in ((policy, opt_p), (value, opt_v)):
                    acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            for k, v in (("pg", pg_loss), ("vf", vf_loss), ("clipfrac", pg_stats["clipfrac"]),
                         ("vf_clipfrac", vf_clipfrac), ("approxkl", pg_stats["approxkl"]),
                         ("entropy", masked_mean(entropy, mb_mask))):
                stats[k].append(float(v.detach()))
    policy.eval(), value.eval()
    train_s = time.perf_counter() - t_train

    # 6. log (means over ranks) and adapt β
    seq_kl = (b_kl.sum(-1)).mean()
    local = {
        "objective/scores": raw.mean(), "objective/scores_normalized": scores.mean(),
        "objective/kl": seq_kl, "objective/non_score_reward": (-beta * b_kl.sum(-1)).mean(),
        "objective/rlhf_reward": (scores - beta * b_kl.sum(-1)).mean(),
        "response/length": b_mask.sum(-1).mean(), "response/eos_rate": eos.float().mean(),
        "val/explained_variance": explained_variance(b_values, b_returns, b_mask),
    }
    row = {k: float(acc.reduce(v.detach().float().reshape(1), "mean")) for k, v in local.items()}
    row.update({f"losses/{k}" if k in ("pg", "vf", "clipfrac", "vf_clipfrac") else f"policy/{k}":
                sum(v) / len(v) for k, v in stats.items()})
    row.update({"objective/kl_coef": beta, "time/generation": times.generation_s,
                "time/scoring_wait": times.scoring_wait_s, "time/training": train_s,
                "time/step": time.perf_counter() - t_start})
    kl_ctl.update(row["objective/kl"], cfg.rollout_batch_size)
    return row
