"""Stage 3, `tribune ppo`: PPO against the remote reward and reference services.

The trainer holds only the policy πθ (from πSFT) and, for GAE, a value model; rewards and reference
log-probs come from the remote services (``tribune.trainer.scorers``: token ids to Triton, or text to
a RewardService with the reward model's own tokenizer). The run itself (resume,
logs, checkpoints, final save) is the shared ``tribune.trainer.run.Run``; one iteration is
``tribune.trainer.ppo_step.ppo_iteration``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from tribune.services.client import ScorerRequestError, ScorerServerError, ScorerUnavailable
from tribune.services.common.errors import UserError
from tribune.services.common.jsonl import SkipCounter
from tribune.services.common.text import encode_prompt
from tribune.services.judge import load_judge
from tribune.services.repository import tokenizer_fingerprint
from tribune.trainer.adapters import prepare_model
from tribune.trainer.checkpoints import latest_checkpoint
from tribune.trainer.data import load_prompts
from tribune.trainer.defences import DriftMonitor, KLBudget
from tribune.trainer.lengths import fit_generation, model_context, trained_lengths
from tribune.trainer.modeling import ValueModel, load_causal_lm, load_reward_model, reward_head_name
from tribune.trainer.ppo_config import PPOConfig
from tribune.trainer.ppo_monitor import HackingDetector, gold_and_proxy, plot_metrics, preferred_score, \
    served_preferred_score
from tribune.trainer.ppo_step import Learner, optimised_score, ppo_iteration
from tribune.trainer.rl_math import AdaptiveKLController
from tribune.trainer.run import Run, StopTraining
from tribune.trainer.scorers import connect

log = logging.getLogger("tribune")


def with_fitted_generation(cfg: PPOConfig, lengths: list[int]) -> PPOConfig:
    """``cfg`` with max_new_tokens / max_prompt_length from the policy and the prompts' token counts when unset."""
    if cfg.max_new_tokens is not None and cfg.max_prompt_length is not None:
        return cfg
    new, prompt = fit_generation(lengths, model_context(cfg.policy), trained_lengths(cfg.policy),
                                 cfg.max_new_tokens, cfg.max_prompt_length)
    return dataclasses.replace(cfg, max_new_tokens=new, max_prompt_length=prompt)


def make_learner(cfg: PPOConfig, acc, tokenizer) -> Learner:
    """Policy (and, for GAE, the value model) with optimisers and schedulers, prepared by accelerate."""
    policy = prepare_model(load_causal_lm(cfg.policy), cfg.memory, name="ppo policy")
    steps = cfg.total_iterations * cfg.optimizer_steps_per_iteration()
    opt_p, sched_p = cfg.optim.build(policy.parameters(), steps)
    value = opt_v = sched_v = None
    if cfg.uses_value_model:
        critic = load_reward_model(cfg.value_init or cfg.policy)
        value = ValueModel(prepare_model(critic, cfg.memory, head=reward_head_name(critic), name="ppo value model"))
        opt_v, sched_v = cfg.optim.build(value.parameters(), steps, learning_rate=cfg.value_learning_rate)
        policy, value, opt_p, opt_v = acc.prepare(policy, value, opt_p, opt_v)
    else:
        log.info("ppo: rloo advantages: no value model (value_init and the value options are not used)")
        policy, opt_p = acc.prepare(policy, opt_p)
    for sched in (sched_p, sched_v):    # stepped once per optimiser step on every rank (not wrapped)
        if sched is not None:
            acc.register_for_checkpointing(sched)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl if cfg.adaptive_kl else None, cfg.kl_horizon)
    return Learner(acc, policy, value, opt_p, opt_v, sched_p, sched_v, kl_ctl, tokenizer)


def _check_resume_estimator(cfg: PPOConfig) -> None:
    """--resume with another advantage estimator than the checkpoint's is a user error (its state has
    a value model and its optimiser, or has none)."""
    earlier = Path(cfg.output) / "config.resolved.json"
    if not (cfg.resume and earlier.is_file()):
        return
    was = json.loads(earlier.read_text()).get("advantage_estimator", "gae")
    if was != cfg.advantage_estimator:
        raise UserError(f"--resume: the run in {cfg.output} used --advantage-estimator {was}, not "
                        f"{cfg.advantage_estimator}; resume it with {was}, or start a new run in another --output")


def run_ppo(cfg: PPOConfig) -> dict:
    t0 = time.perf_counter()
    run = Run(cfg, cfg.policy, desc="ppo", unit="iteration")
    acc, tokenizer = run.acc, run.tokenizer
    skipped = SkipCounter()
    prompts = load_prompts(cfg.prompts, skipped, tokenizer)
    eval_prompts = (load_prompts(cfg.eval_prompts, SkipCounter(), tokenizer)[:cfg.gold_eval_size]
                    if cfg.eval_prompts else [])
    judge = load_judge(cfg.gold, eval_prompts)          # tried on one of them before training
    lengths = [len(encode_prompt(tokenizer, p, 1 << 30)) for p in prompts]
    cfg = run.cfg = with_fitted_generation(cfg, lengths)
    cut = sum(n > cfg.max_prompt_length for n in lengths)
    world = acc.num_processes
    _check_resume_estimator(cfg)
    if cfg.prompts_per_iteration % world or cfg.mini_batch_size % world:
        raise UserError(f"rollout_batch_size / samples_per_prompt ({cfg.prompts_per_iteration} prompts) and "
                        f"mini_batch_size must be multiples of the {world} processes")
    scorers = connect(cfg, tokenizer, tokenizer_fingerprint(tokenizer))
    log.info("ppo: %d prompts (skipped %s); max_prompt_length %d (%d prompts cut), max_new_tokens %d; reward model "
             "%s (%s); %d process(es)", len(prompts), skipped.summary(), cfg.max_prompt_length, cut,
             cfg.max_new_tokens, scorers.facts.reward_model_id, "text" if cfg.reward_gateway else "token ids", world)
    learner = make_learner(cfg, acc, tokenizer)
    hacking = HackingDetector()
    budget = KLBudget(cfg.kl_budget, cfg.kl_budget_action)
    preferred, optimised = None, (lambda m: optimised_score(cfg, scorers.facts, m)[0])
    if cfg.preferred_eval is not None:
        preferred, n = preferred_score(scorers, tokenizer, cfg.preferred_eval, optimised,
                                       max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_new_tokens)
        source = f"the responses ranked first in {cfg.preferred_eval} ({n})"
    elif scorers.facts.preferred_member_scores:
        preferred, n = served_preferred_score(scorers.facts, optimised)
        source = f"the reward model's preferred held-out responses, served with it ({n})"
    if preferred is not None:
        log.info("ppo: %s score %.3f (the optimised score): the monitor warns past %.2f× their height above the "
                 "start policy's samples", source, preferred, cfg.preferred_tolerance)
    drift = DriftMonitor(length_tolerance=cfg.drift_tolerance, preferred=preferred,
                         preferred_tolerance=cfg.preferred_tolerance)
    state = run.begin()
    if state:
        learner.kl_ctl.load_state_dict(state["kl_controller"])
        hacking.load_history(state.get("gold_history", []))
        drift.load_state_dict(state.get("drift", {}))

    def evaluate_gold(step: int) -> dict:
        if judge is None or not eval_prompts or not run.is_main:
            return {}
        m = gold_and_proxy(acc.unwrap_model(learner.policy), tokenizer, judge, scorers, eval_prompts,
                           max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, seed=cfg.seed + 1)
        m["gold/hacking_warning"] = float(hacking.observe(step, m["gold/proxy_score"], m["gold/score"],
                                                          m["gold/score_se"]))
        return m

    steps = cfg.total_iterations

    warned = [False]

    def defences(row: dict, done: int) -> str | None:
        """The gold-free alarms and the KL budget after an iteration; returns why to stop, if so."""
        row.update(drift.observe(row["monitor/optimised_score"], row["objective/ensemble_disagreement"],
                                 row["response/length"]))
        warning = bool(row["monitor/overoptimisation_warning"])
        if warning and not warned[0]:
            past = row.get("monitor/proxy_past_preferred")
            log.warning("over-optimisation? iteration %d: the proxy rose while the response length moved to %.2f× "
                        "πSFT's, the members' disagreement to %.2f× its start%s; consider a larger β, a KL budget "
                        "(--kl-budget) or stopping here", done, row["monitor/length_ratio"],
                        row["monitor/disagreement_ratio"],
                        "" if past is None else f" and the proxy to {past:.2f}× the preferred responses' height")
        warned[0] = warning
        learner.kl_ctl.value, over_budget = budget.check(row["objective/kl"], learner.kl_ctl.value)
        row["objective/kl_budget_exceeded"] = float(budget.exceeded)
        if over_budget:
            return "the KL budget"
        return "an over-optimisation warning" if warning and cfg.stop_on_drift else None

    def step(it: int) -> dict:
        row = ppo_iteration(cfg, learner, scorers, prompts, it)
        done = it + 1
        why = defences(row, done)
        if run.due(done, steps, cfg.gold_every) or why:
            row.update(evaluate_gold(done))
        if why:
            raise StopTraining(f"{why} (KL {row['objective/kl']:.2f} nats per response, "
                               f"length {row['monitor/length_ratio']:.2f}× πSFT's)", row)
        return row if run.due(done, steps, cfg.log_every) or "gold/score" in row else {}

    baseline: dict = {}
    try:
        if run.start == 0:
            first = evaluate_gold(0)
            if first:
                run.log(0, first)
                baseline = {"sft/" + k.split("/", 1)[1]: v for k, v in first.items() if k != "gold/hacking_warning"}
        last = run.loop(steps, step, state=lambda: {"kl_controller": learner.kl_ctl.state_dict(),
                                                    "gold_history": hacking.history, "drift": drift.state_dict()},
                        postfix=lambda r: {"score": f"{r['objective/scores']:.3f}", "kl": f"{r['objective/kl']:.2f}"})
    except (ScorerUnavailable, ScorerRequestError, ScorerServerError) as e:
        ckpt = latest_checkpoint(run.out)
        raise UserError(f"{e}. The iteration in progress was not applied; last checkpoint: "
                        f"{ckpt or 'none yet'}; run the same command with --resume once the service is back") from None
    finally:
        scorers.close()

    final = {**baseline, **{k: v for k, v in last.items() if not isinstance(v, list)}}
    if preferred is not None:
        final["monitor/preferred_score"] = preferred
    if run.is_main:
        plot = plot_metrics(run.metrics_log.path, run.out / "ppo.png")
        final["plot"] = str(plot) if plot else None
    policy = acc.unwrap_model(learner.policy)
    extra = {"value_model": acc.unwrap_model(learner.value).model} if learner.value is not None else {}
    final = run.finish(policy, final, extra=extra)
    final["time/total_s"] = round(time.perf_counter() - t0, 2)
    return final
