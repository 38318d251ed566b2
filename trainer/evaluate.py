"""`tribune evaluate` (and `make eval`): the whole pipeline with default settings on every suite task.

Per task it runs ``trainer.pipeline`` (task make → sft → train-rm → export → serve → ppo)
and then measures, on held-out prompts and with the task's gold judge (never used for
training): the reward model's accuracy against the gold ordering, πSFT's and the PPO
policy's gold score at PPO's sampling temperature, at T = 0.7 and greedy, the final KL,
the response length and the wall time. It writes ``evaluation.json`` (one row per task)
and ``evaluation.png``, and prints the table.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.config import field, group
from services.common.errors import UserError
from services.common.jsonl import SkipCounter, write_json
from services.judge import CallableJudge, Judge
from trainer.pipeline import StageOptions, run_pipeline
from trainer.task.registry import TASKS

log = logging.getLogger("tribune")

# targets of the suite (issue 9): reward-model accuracy against the gold ordering, and the
# share of the headroom (perfect − πSFT) that PPO must win at every sampling setting
TARGET_RM_GOLD_ACCURACY = 0.85
TARGET_HEADROOM_SHARE = 0.25
PERFECT = 1.0


@dataclass(kw_only=True)
class EvaluateConfig:
    """The whole pipeline with its default settings on every suite task; a JSON table and a PNG."""
    output: Path = field(Path("runs/evaluate"), help="directory for every task's run and the table")
    tasks: list[str] = field(list(TASKS), help="suite tasks to run (default: every one)")
    seed: int = field(0, help="seed of every task and stage")
    max_steps: int | None = field(None, help="cap on optimiser steps of each training stage (for smoke runs)")
    stages: StageOptions = group(StageOptions(), help="options of each stage, the same for every task")
    eval_prompts: int = field(200, help="held-out prompts per task for the gold scores")
    overoptimisation_task: str | None = field("bundled", help="also run PPO with an aggressive setting on this task, "
                                              "against the single reward model and against an ensemble with the "
                                              "uncertainty penalty (none: skip)")
    aggressive: dict = field({"learning_rate": 3e-4, "kl_coef": 0.05},
                             help="the aggressive PPO options of the over-optimisation study")
    ensemble_size: int = field(3, help="members of the study's ensemble")

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks: unknown {', '.join(unknown)}; the suite has {', '.join(TASKS)}")
        if self.eval_prompts < 1:
            raise ValueError("eval_prompts must be at least 1")
        if self.overoptimisation_task is not None and self.overoptimisation_task not in TASKS:
            raise ValueError(f"overoptimisation_task: unknown task {self.overoptimisation_task!r}")


@torch.no_grad()
def policy_gold(policy_dir: Path, judge: Judge, prompts: list[str], *, temperature: float, max_prompt_length: int,
                max_new_tokens: int, seed: int) -> dict[str, float]:
    """Mean gold score and response length (tokens) of a policy's responses; temperature 0 is greedy."""
    from services.common.text import load_tokenizer
    from trainer.modeling import load_causal_lm, sample_responses

    policy, tok = load_causal_lm(policy_dir).eval(), load_tokenizer(policy_dir)
    golds, lengths = [], []
    for s in sample_responses(policy, tok, prompts, max_prompt_length=max_prompt_length,
                              max_new_tokens=max_new_tokens, seed=seed, temperature=temperature):
        golds += judge.score(s.prompts, s.texts)
        lengths += s.mask[:, s.P:].sum(-1).tolist()
    return {"gold": sum(golds) / len(golds), "length": sum(lengths) / len(lengths)}


def _settings(sampling_t: float) -> list[tuple[str, float]]:
    return [(f"T={sampling_t:g}", sampling_t), ("T=0.7", 0.7), ("greedy", 0.0)]


def evaluate_task(cfg: EvaluateConfig, task: str) -> dict:
    from trainer.data import load_prompts

    t0 = time.perf_counter()
    out = Path(cfg.output) / task
    with run_pipeline(out, cfg.seed, cfg.max_steps, cfg.stages, task) as (result, _server):
        pass
    ppo_cfg = result.stages.ppo
    judge = CallableJudge(result.stages.task.spec.judge)
    prompts = load_prompts(ppo_cfg.eval_prompts, SkipCounter())[:cfg.eval_prompts]
    row: dict = {"task": task, "rm_eval_accuracy": result.rm.get("eval_accuracy"),
                 "rm_gold_accuracy": result.rm.get("eval_gold_accuracy"),
                 "rm_length_correlation": result.rm.get("eval_length_correlation"),
                 "ppo_final_kl": result.ppo.get("objective/kl"), "ppo_iterations": ppo_cfg.total_iterations}
    for name, temp in _settings(ppo_cfg.temperature):
        common = dict(temperature=temp, max_prompt_length=ppo_cfg.max_prompt_length,
                      max_new_tokens=ppo_cfg.max_new_tokens, seed=cfg.seed + 3)
        sft = policy_gold(result.stages.sft.output, judge, prompts, **common)
        ppo = policy_gold(ppo_cfg.output, judge, prompts, **common)
        headroom = PERFECT - sft["gold"]
        row[name] = {"sft_gold": sft["gold"], "ppo_gold": ppo["gold"], "sft_length": sft["length"],
                     "ppo_length": ppo["length"], "gain": ppo["gold"] - sft["gold"],
                     "headroom_share": (ppo["gold"] - sft["gold"]) / headroom if headroom > 1e-9 else 0.0}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["stage_seconds"] = result.seconds
    row["meets_rm_target"] = (row["rm_gold_accuracy"] or 0) >= TARGET_RM_GOLD_ACCURACY
    first_two = [name for name, _ in _settings(ppo_cfg.temperature)][:2]
    row["meets_ppo_target"] = all(row[n]["headroom_share"] >= TARGET_HEADROOM_SHARE for n in first_two)
    return row


def _trajectory(ppo_dir: Path) -> dict:
    """Gold and proxy on held-out prompts at each gold evaluation, and the gold-free alarms, from metrics.jsonl."""
    rows = [json.loads(l) for l in (Path(ppo_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    gold = [(r["step"], r["gold/score"], r["gold/proxy_score"]) for r in rows if "gold/score" in r]
    warned = [r["step"] for r in rows if r.get("monitor/overoptimisation_warning")]
    return {"gold_trajectory": gold, "first_warning_at": warned[0] if warned else None,
            "gold_hacking_warnings": sum(int(r.get("gold/hacking_warning", 0)) for r in rows),
            "final_kl": next((r["objective/kl"] for r in reversed(rows) if "objective/kl" in r), None),
            "final_length_ratio": next((r["monitor/length_ratio"] for r in reversed(rows)
                                        if "monitor/length_ratio" in r), None)}


def overoptimisation_study(cfg: EvaluateConfig, task: str) -> dict:
    """Aggressive PPO against the single reward model and against an ensemble with the uncertainty
    penalty, from the same πSFT: does the gold score fall while the proxy rises, and does the
    gold-free monitor warn first?"""
    import dataclasses

    from services.common.config import build_config
    from services.launcher import start_serve
    from trainer.export import run_export
    from trainer.ppo import run_ppo
    from trainer.ppo_config import PPOConfig
    from trainer.reward import run_train_rm
    from trainer.pipeline import stage_configs

    out = Path(cfg.output) / task
    stages = stage_configs(out, cfg.seed, cfg.max_steps, cfg.stages, task)
    ensemble_rm = dataclasses.replace(stages.rm, output=out / "rm_ensemble", ensemble=cfg.ensemble_size)
    log.info("over-optimisation study on %s: %d-member ensemble → %s", task, cfg.ensemble_size, ensemble_rm.output)
    run_train_rm(ensemble_rm)
    run_export(dataclasses.replace(stages.export, reward=ensemble_rm.output, output=out / "repository_ensemble"))
    runs = {}
    for name, repo, extra in (("single_rm", stages.export.output, {}),
                              ("ensemble_uncertainty", out / "repository_ensemble",
                               {"ensemble_reward": "uncertainty", "value_init": ensemble_rm.output / "member-0"})):
        with start_serve(repo) as server:
            base = {k: getattr(stages.ppo, k) for k in ("policy", "prompts", "eval_prompts", "value_init")}
            ppo_cfg = build_config(PPOConfig, {**{k: v for k, v in vars(stages.ppo).items()
                                                  if k in ("seed", "iterations", "scoring_chunk", "gold_every",
                                                           "max_steps") and v is not None},
                                               **base, "judge": stages.ppo.gold.judge, "reward_url": server.url,
                                               "reference_url": server.url, "output": out / f"ppo_{name}",
                                               **cfg.aggressive, **extra})
            log.info("over-optimisation study: ppo (%s, %s) → %s", name, cfg.aggressive, ppo_cfg.output)
            metrics = run_ppo(ppo_cfg)
        runs[name] = {"sft_gold": metrics.get("sft/score"), "final_gold": metrics.get("gold/score"),
                      "sft_proxy": metrics.get("sft/proxy_score"), "final_proxy": metrics.get("gold/proxy_score"),
                      **_trajectory(ppo_cfg.output)}
        r = runs[name]
        r["overoptimised"] = bool(r["final_gold"] is not None and r["final_gold"] < r["sft_gold"]
                                  and r["final_proxy"] > r["sft_proxy"])
    return {"task": task, "aggressive": cfg.aggressive, "ensemble_size": cfg.ensemble_size, "runs": runs}


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [k for k in rows[0] if isinstance(rows[0][k], dict) and "ppo_gold" in rows[0][k]]
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(4.5 * (len(settings) + 1), 4))
    x = range(len(rows))
    for ax, name in zip(axes, settings):
        ax.bar([i - 0.2 for i in x], [r[name]["sft_gold"] for r in rows], 0.4, label="πSFT")
        ax.bar([i + 0.2 for i in x], [r[name]["ppo_gold"] for r in rows], 0.4, label="PPO")
        ax.axhline(PERFECT, color="grey", lw=0.8, ls="--")
        ax.set_xticks(list(x), [r["task"] for r in rows], rotation=30)
        ax.set_title(f"held-out gold score, {name}")
        ax.legend(fontsize=8)
    ax = axes[-1]
    ax.bar(list(x), [r["rm_gold_accuracy"] or 0 for r in rows])
    ax.axhline(TARGET_RM_GOLD_ACCURACY, color="red", lw=0.8, ls="--")
    ax.set_ylim(0.5, 1.0)
    ax.set_xticks(list(x), [r["task"] for r in rows], rotation=30)
    ax.set_title("reward model: gold-order accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(rows: list[dict]) -> list[str]:
    settings = [k for k in rows[0] if isinstance(rows[0][k], dict) and "ppo_gold" in rows[0][k]]
    head = "task        RM gold-acc  " + "  ".join(f"{s:>17s}" for s in settings) + "   KL    len SFT→PPO   wall"
    lines = [head, " " * 25 + "  ".join(f"{'SFT → PPO':>17s}" for _ in settings)]
    for r in rows:
        first = r[settings[0]]
        lines.append(f"{r['task']:<11s} {r['rm_gold_accuracy'] or 0:>10.3f}  "
                     + "  ".join(f"{r[s]['sft_gold']:+.3f} → {r[s]['ppo_gold']:+.3f}" for s in settings)
                     + f"  {r['ppo_final_kl'] or 0:5.2f}  {first['sft_length']:4.1f} → {first['ppo_length']:4.1f}"
                     + f"  {r['wall_s']:5.0f}s")
    return lines


def study_lines(study: dict | None) -> list[str]:
    if not study:
        return []
    lines = [f"over-optimisation study ({study['task']}, PPO {study['aggressive']}):"]
    for name, r in study["runs"].items():
        lines.append(f"  {name:<21s} gold {r['sft_gold']:+.3f} → {r['final_gold']:+.3f}, proxy {r['sft_proxy']:+.3f} → "
                     f"{r['final_proxy']:+.3f}, KL {r['final_kl'] or 0:.2f}, length ×{r['final_length_ratio'] or 0:.2f}; "
                     f"over-optimised: {r['overoptimised']}; gold-free warning at iteration {r['first_warning_at']}")
    return lines


def run_evaluate(cfg: EvaluateConfig) -> dict:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for i, task in enumerate(cfg.tasks, 1):
        log.info("evaluate: task %d/%d: %s", i, len(cfg.tasks), task)
        rows.append(evaluate_task(cfg, task))
        write_json(out / "evaluation.json", {"rows": rows, "complete": False})
    if not rows:
        raise UserError("no task to evaluate")
    study = overoptimisation_study(cfg, cfg.overoptimisation_task) if cfg.overoptimisation_task else None
    summary = {"rows": rows, "overoptimisation": study, "complete": True, "wall_s": round(time.perf_counter() - t0, 1),
               "targets": {"rm_gold_accuracy": TARGET_RM_GOLD_ACCURACY, "headroom_share": TARGET_HEADROOM_SHARE},
               "all_targets_met": all(r["meets_rm_target"] and r["meets_ppo_target"] for r in rows)}
    write_json(out / "evaluation.json", summary)
    png = plot(rows, out / "evaluation.png")
    print("\n".join(["", "Tribune evaluation (held-out prompts, gold judge)", *table(rows), *study_lines(study),
                     f"targets: RM gold accuracy ≥ {TARGET_RM_GOLD_ACCURACY}, PPO gain ≥ {TARGET_HEADROOM_SHARE:.0%} "
                     f"of the headroom at the sampling T and T=0.7; all met: {summary['all_targets_met']}",
                     f"finished in {summary['wall_s']:.0f} s; {out / 'evaluation.json'}; {png}"]))
    return {"evaluation": str(out / "evaluation.json"), "plot": str(png), "all_targets_met": summary["all_targets_met"]}
