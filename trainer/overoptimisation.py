"""The over-optimisation study of `tribune evaluate`: aggressive PPO from the same πSFT against the
single reward model, against the data step's candidate at the first of ``--given-weights`` when the
pipeline kept another (``single_rm_not_kept``), and against an ensemble with the uncertainty
penalty. Does the gold score fall while the proxy rises, and does the gold-free monitor warn first?
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tribune.trainer.data_variants import variant_data
from tribune.trainer.measures import fell_beyond_noise

if TYPE_CHECKING:
    from tribune.trainer.evaluate import EvaluateConfig
    from tribune.trainer.pipeline import Stages
    from tribune.trainer.ppo_config import PPOConfig

log = logging.getLogger("tribune")


def _trajectory(ppo_dir: Path) -> dict:
    """Gold and proxy on held-out prompts at each gold evaluation, and the gold-free alarms, from metrics.jsonl."""
    rows = [json.loads(l) for l in (Path(ppo_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    # (step, gold, proxy, gold's standard error) at each gold evaluation
    gold = [(r["step"], r["gold/score"], r["gold/proxy_score"], r.get("gold/score_se")) for r in rows
            if "gold/score" in r]
    warned = [r["step"] for r in rows if r.get("monitor/overoptimisation_warning")]
    # the gold score when the monitor first warned: at the last gold evaluation up to that iteration
    before = [g for st, g, _, _ in gold if warned and st <= warned[0]]
    return {"gold_trajectory": gold, "first_warning_at": warned[0] if warned else None,
            "gold_at_warning": before[-1] if before else None,
            "final_proxy_past_preferred": next((r["monitor/proxy_past_preferred"] for r in reversed(rows)
                                                if "monitor/proxy_past_preferred" in r), None),
            "gold_hacking_warnings": sum(int(r.get("gold/hacking_warning", 0)) for r in rows),
            "final_kl": next((r["objective/kl"] for r in reversed(rows) if "objective/kl" in r), None),
            "final_length_ratio": next((r["monitor/length_ratio"] for r in reversed(rows)
                                        if "monitor/length_ratio" in r), None)}


# the study's PPO runs; each can run as a job of its own (the ensemble's also trains and exports it).
# single_rm_not_kept: the data step's candidate with the given pairs at the first of --given-weights (default 1: a
# given pair's row weighs as much as a ranking), when the pipeline kept another
STUDY_ARMS: tuple[str, ...] = ("single_rm", "single_rm_not_kept", "ensemble_uncertainty")


def not_kept_candidate(stages: Stages, options) -> Path | None:
    """The data step's reward model at the first of ``options.given_weights``, when this run's pipeline
    trained it as a candidate and kept another (its ``rm/metrics.json`` says so)."""
    from tribune.trainer.pipeline import rm_candidate

    if not options.collect_sft or len(options.given_weights) < 2:
        return None
    w = options.given_weights[0]
    metrics = Path(stages.rm.output) / "metrics.json"
    kept = json.loads(metrics.read_text()) if metrics.is_file() else {}
    d = rm_candidate(stages, w)
    if f"{w:g}" not in kept.get("given_weight_eval_losses", {}) or kept.get("given_weight") == w:
        return None
    return d if (d / "metrics.json").is_file() else None


def overoptimisation_study(cfg: EvaluateConfig, task: str, arms: tuple[str, ...] = STUDY_ARMS) -> dict:
    """Aggressive PPO against the single reward model (and the candidate the pipeline did not keep) and
    against an ensemble with the uncertainty penalty, from the same πSFT: does the gold score fall while
    the proxy rises, and does the gold-free monitor warn first? ``arms``: which runs (``STUDY_ARMS``) to do
    here."""

    from tribune.services.launcher import start_serve
    from tribune.trainer.export import run_export
    from tribune.trainer.ppo import run_ppo
    from tribune.trainer.reward import run_train_rm
    from tribune.trainer.pipeline import stage_configs

    unknown = set(arms) - set(STUDY_ARMS)
    if unknown:
        raise ValueError(f"unknown study runs {sorted(unknown)}; the study has {', '.join(STUDY_ARMS)}")
    out = Path(cfg.output) / task
    stages = stage_configs(out, cfg.seed, cfg.max_steps, cfg.stages, task)
    setups = {"single_rm": (stages.export.output, {})}
    if "single_rm_not_kept" in arms:
        candidate = not_kept_candidate(stages, cfg.stages)
        if candidate is None:
            log.info("over-optimisation study: no single_rm_not_kept run (the pipeline kept that reward model, "
                     "or trained one only): single_rm is it")
        else:
            repo = out / "repository_not_kept"
            log.info("over-optimisation study: single_rm_not_kept is the candidate the pipeline did not keep, %s",
                     candidate)
            run_export(dataclasses.replace(stages.export, reward=candidate, output=repo))
            setups["single_rm_not_kept"] = (repo, {"value_init": candidate})
    if "ensemble_uncertainty" in arms:
        ensemble_rm = _train_study_ensemble(cfg, task, stages, run_train_rm)
        run_export(dataclasses.replace(stages.export, reward=ensemble_rm.output, output=out / "repository_ensemble"))
        setups["ensemble_uncertainty"] = (out / "repository_ensemble", {
            "ensemble_reward": "uncertainty", "value_init": ensemble_rm.output / "member-0"})
    runs = {}
    for name in (a for a in STUDY_ARMS if a in arms and a in setups):
        repo, extra = setups[name]
        with start_serve(repo) as server:
            ppo_cfg = study_ppo_config(cfg, stages, name, server.url, extra)
            log.info("over-optimisation study: ppo (%s, %s) → %s", name, cfg.aggressive, ppo_cfg.output)
            metrics = run_ppo(ppo_cfg)
        runs[name] = {"sft_gold": metrics.get("sft/score"), "final_gold": metrics.get("gold/score"),
                      "sft_gold_se": metrics.get("sft/score_se"), "final_gold_se": metrics.get("gold/score_se"),
                      "sft_proxy": metrics.get("sft/proxy_score"), "final_proxy": metrics.get("gold/proxy_score"),
                      **_trajectory(ppo_cfg.output)}
        runs[name].update(overoptimised=overoptimised(runs[name]), fell_below_sft=fell_below_sft(runs[name]),
                          warned_before_fall=warned_before_fall(runs[name]))
    return {"task": task, "aggressive": cfg.aggressive, "ensemble_size": cfg.ensemble_size,
            "members": cfg.study_members, "member_starts": cfg.study_member_starts, "runs": runs,
            "verdict": study_verdict(runs)}


def _train_study_ensemble(cfg: EvaluateConfig, task: str, stages, run_train_rm):
    """The study's K-member reward ensemble, trained into OUTPUT/TASK/rm_ensemble; its RewardConfig."""
    out = Path(cfg.output) / task
    member_train, member_eval = [], []
    if cfg.study_members == "mixed":
        from tribune.trainer.pipeline import collected_on_sft

        # each member early-stops on held-out data of its own kind: scored on πSFT's samples, a member of the
        # given pairs got worse from its first evaluation on (sequence) and kept nearly untrained weights
        collected_on_sft(stages, cfg.stages)
        member_train, member_eval = map(list, zip(variant_data(stages, "collected"), variant_data(stages, "given")))
    ensemble_rm = dataclasses.replace(stages.rm, output=out / "rm_ensemble", ensemble=cfg.ensemble_size,
                                      member_train=member_train, member_eval=member_eval,
                                      member_model=member_starts(cfg, stages, out))
    log.info("over-optimisation study on %s: %d-member ensemble (%s, starting from %s) → %s", task, cfg.ensemble_size,
             cfg.study_members, cfg.study_member_starts, ensemble_rm.output)
    run_train_rm(ensemble_rm)
    return ensemble_rm


def member_starts(cfg: EvaluateConfig, stages: Stages, out: Path) -> list[Path]:
    """The models the study ensemble's members start from: [] (every one from πSFT), or with ``sft_seeds``
    πSFT and SFT runs of the next K − 1 seeds, trained here with πSFT's options. Members fine-tuned from one
    start share its errors where the policy goes (Eisenstein et al. 2023); from SFT runs of other seeds they
    disagreed more on the study's task and lost less gold under the penalty (README)."""
    if cfg.study_member_starts == "sft" or cfg.ensemble_size < 2:
        return []
    from tribune.trainer.sft import run_sft

    starts = [Path(stages.sft.output)]
    for i in range(1, cfg.ensemble_size):
        sft = dataclasses.replace(stages.sft, seed=stages.sft.seed + i, output=out / f"sft_seed-{stages.sft.seed + i}")
        log.info("over-optimisation study: a start for ensemble member %d/%d: sft (seed %d) → %s", i + 1,
                 cfg.ensemble_size, sft.seed, sft.output)
        run_sft(sft)
        starts.append(Path(sft.output))
    return starts


def merge_study_arms(parts: list[dict]) -> dict:
    """One study result from the results of jobs that each ran some of its runs (in ``STUDY_ARMS`` order)."""
    runs = {name: part["runs"][name] for name in STUDY_ARMS for part in parts if name in part["runs"]}
    return {**parts[0], "runs": runs, "verdict": study_verdict(runs)}


def gold_peak(run: dict) -> tuple[int, float, float, float | None] | None:
    """The run's best gold evaluation (step, gold, proxy, gold's standard error): the top of its gold
    curve; None without a trajectory (no gold judge)."""
    trajectory = run.get("gold_trajectory") or []
    return max(trajectory, key=lambda g: g[1]) if trajectory else None


def overoptimised(run: dict, z: float = 2.5) -> bool:
    """Gold fell while the proxy rose, as Gao et al. 2022 define over-optimisation (the gold curve turns
    down while the proxy still climbs): from the run's best gold evaluation to its last, gold fell by
    more than ``z`` standard errors of the difference (one sample per held-out prompt at each point) and
    the proxy ended higher than it stood there. ``z`` is 2.5, not 2: the best of several noisy
    evaluations sits above the curve by chance (of flat runs with seven evaluations, 9.6 % pass z = 2
    and 2.9 % pass z = 2.5, by simulation)."""
    peak = gold_peak(run)
    if peak is None or run["final_gold"] is None:
        return False
    _, gold, proxy, se = peak
    return run["final_proxy"] > proxy and fell_beyond_noise(gold, se or 0.0, run["final_gold"],
                                                            run.get("final_gold_se") or 0.0, z)


def fell_below_sft(run: dict, z: float = 2.0) -> bool:
    """The run ended worse than πSFT: gold below πSFT's by more than ``z`` standard errors of the
    difference while the proxy rose (PPO made the policy worse, not only past its best)."""
    if run["final_gold"] is None or run["final_proxy"] <= run["sft_proxy"]:
        return False
    return fell_beyond_noise(run["sft_gold"], run.get("sft_gold_se") or 0.0, run["final_gold"],
                             run.get("final_gold_se") or 0.0, z)


def warned_before_fall(run: dict) -> bool:
    """The gold-free monitor warned no later than the run's best gold evaluation: a run stopped at the
    warning (``--stop-on-drift``) keeps weights from before gold fell."""
    peak = gold_peak(run)
    return peak is not None and run["first_warning_at"] is not None and run["first_warning_at"] <= peak[0]


def study_verdict(runs: dict) -> dict:
    """The issue's test of the defences on one study: a single reward model's aggressive run over-optimised,
    and the ensemble with the uncertainty penalty did not, or its gold-free monitor warned before gold fell."""
    singles = [name for name in runs if name.startswith("single_rm") and runs[name]["overoptimised"]]
    ensemble = runs.get("ensemble_uncertainty")
    defended = ensemble is not None and (not ensemble["overoptimised"] or ensemble["warned_before_fall"])
    return {"single_overoptimised": singles, "ensemble_defended": defended, "shown": bool(singles) and defended}


def study_ppo_config(cfg: EvaluateConfig, stages: Stages, name: str, reward_url: str, extra: dict) -> PPOConfig:
    """The PPO options of the study's run ``name``: the task's PPO run's data and schedule, the
    aggressive options over them, and the run's own (``extra``) last; the whole trajectory is kept."""
    from tribune.services.common.config import build_config
    from tribune.trainer.ppo_config import PPOConfig

    base = {k: getattr(stages.ppo, k) for k in ("policy", "prompts", "eval_prompts", "value_init", "preferred_eval")}
    schedule = {k: v for k, v in vars(stages.ppo).items()
                if k in ("seed", "iterations", "scoring_chunk", "gold_every", "max_steps") and v is not None}
    return build_config(PPOConfig, {**schedule, **base, "judge": stages.ppo.gold.judge, "reward_url": reward_url,
                                    "reference_url": reward_url, "output": stages.ppo.output.parent / f"ppo_{name}",
                                    # the whole trajectory, past the monitor's first warning
                                    "stop_on_drift": False, **cfg.aggressive, **extra})
