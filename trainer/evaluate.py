"""`tribune evaluate` (and `make eval`): the whole pipeline with default settings on every suite task.

Per task it runs ``tribune.trainer.pipeline`` (task make → sft → train-rm → export → serve → ppo)
and then measures, on held-out prompts and with the task's gold judge (never used for
training): the reward model's accuracy against the gold ordering, πSFT's and the PPO
policy's gold score at PPO's sampling temperature, at T = 0.7 and greedy, the final KL,
the response length and the wall time. It writes ``evaluation.json`` (one row per task)
and ``evaluation.png``, and prints the table.

The tasks (and the over-optimisation study, once its task is done) run as independent jobs,
``--jobs`` at once, each in its own process with an equal share of the cores
(``tribune.trainer.jobs``); with ``--jobs 1`` they run one after the other in this process.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tribune.services.common.config import field, group
from tribune.services.common.errors import UserError
from tribune.services.common.jsonl import SkipCounter, write_json
from tribune.services.judge import CallableJudge
from tribune.trainer.data_variants import compare_collected, pipeline_variant, variant_data
from tribune.trainer.evaluate_report import comparison_lines, plot, study_lines, table
from tribune.trainer.jobs import Job, JobPool, resolve_jobs
from tribune.trainer.measures import (TARGET_HEADROOM_SHARE, TARGET_RM_GOLD_ACCURACY, best_of_n, onpolicy_accuracy,
                                      onpolicy_candidates, policy_row, targets)
from tribune.trainer.overoptimisation import STUDY_ARMS, merge_study_arms, overoptimisation_study, study_ppo_config
from tribune.trainer.pipeline import StageOptions, run_pipeline, run_rounds, train_reward_model
from tribune.trainer.task.registry import PLUGIN_ENV, PLUGIN_GROUP, TASKS

log = logging.getLogger("tribune")


@dataclass(kw_only=True)
class EvaluateConfig:
    """The whole pipeline with its default settings on every suite task; a JSON table and a PNG."""
    output: Path = field(Path("runs/evaluate"), help="directory for every task's run and the table")
    tasks: list[str] = field(list(TASKS), help="tasks to run (default: every one, plugged-in tasks included)")
    seed: int = field(0, help="seed of every task and stage")
    max_steps: int | None = field(None, help="cap on optimiser steps of each training stage (for smoke runs)")
    stages: StageOptions = group(StageOptions(), help="options of each stage, the same for every task")
    eval_prompts: int = field(200, help="held-out prompts per task for the gold scores")
    eval_samples: int = field(4, help="sampled responses per held-out prompt for the gold scores at each temperature "
                                      "(greedy: one); more samples, a smaller standard error")
    overoptimisation_task: str | None = field("sequence", help="also run PPO with an aggressive setting on this task, "
                                              "against the single reward model and against an ensemble with the "
                                              "uncertainty penalty (none: skip)")
    # no KL penalty, 3× PPO's learning rate: chosen where the single reward model over-optimised on sequence
    # (with β 0.05 it no longer did, once the data step gave it four rankings per prompt)
    aggressive: dict = field({"learning_rate": 3e-4, "kl_coef": 0.0},
                             help="the aggressive PPO options of the over-optimisation study")
    ensemble_size: int = field(3, help="members of the study's ensemble")
    study_members: Literal["seeds", "mixed"] = field("seeds", help="the study ensemble's members: seeds: each "
                                                     "trained on the reward model's data (given pairs and the data "
                                                     "step's rankings, the kept weight) with a seed of its own, or "
                                                     "mixed: members alternate between preferences collected on "
                                                     "πSFT's samples (the task's rater) and the given pairs, each "
                                                     "early-stopping on held-out data of its own kind")
    study_member_starts: Literal["sft", "sft_seeds"] = field("sft_seeds", help="where the study ensemble's members "
                                                             "start: every one from πSFT, or sft_seeds: member i from "
                                                             "an SFT run of πSFT's seed + i with its options (member 0 "
                                                             "from πSFT itself; the others in OUTPUT/TASK/sft_seed-N, "
                                                             "trained again on every run, --reuse too): members that "
                                                             "start apart err less alike")
    reuse: bool = field(False, help="measure tasks whose pipeline outputs already exist under OUTPUT/TASK (from an "
                                    "earlier run with the same options) instead of training them again; --rounds "
                                    "then runs the iterated loop's rounds on them")
    redo_ppo: bool = field(False, help="with --reuse: run PPO again, with this run's --ppo options, on the reused "
                                       "task, πSFT and reward model (replacing OUTPUT/TASK/ppo), then measure it: "
                                       "PPO settings compared against the same reward models (the over-optimisation "
                                       "study, with its own PPO options, is not run)")
    redo_rm: bool = field(False, help="with --reuse: train the reward model again, with this run's --rm options "
                                      "and --given-weights, on the reused task, πSFT and data step (replacing "
                                      "OUTPUT/TASK/rm and its export), then PPO again as --redo-ppo does: reward-"
                                      "model settings compared on the same data")
    compare_collected: bool = field(False, help="per task, also reward models trained on preferences collected on "
                                                "πSFT's samples (the data step's rankings, the task's rater) "
                                                "instead of the given pairs, and on both together: their accuracy on "
                                                "the policy's own samples, best-of-n and PPO gold, next to the given "
                                                "pairs' model")
    collected_rows_per_prompt: int | None = field(None, help="with --compare-collected: rows of k πSFT samples per "
                                                  "training prompt in the 'collected, as many rows as given' variant "
                                                  "(default: enough for as many rated rows as the given pairs have; "
                                                  "0: leave that variant out, as when the data step already "
                                                  "collects that many)")
    best_of_n: int = field(8, help="candidates sampled per held-out prompt for the reward model's accuracy on the "
                                   "policy's own samples and for best-of-n through the gateway's ScoreBestOfN")
    jobs: int = field(0, help="tasks run at once, each in its own process with an equal share of the cores and its "
                              "console output in OUTPUT/TASK/evaluate.log (0: one per core; 1: one after the other, "
                              "in this process)")

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks: unknown {', '.join(unknown)}; the tasks are {', '.join(TASKS)} (a task of "
                             f"one's own plugs in through ${PLUGIN_ENV} or a {PLUGIN_GROUP} entry point)")
        if self.eval_prompts < 1:
            raise ValueError("eval_prompts must be at least 1")
        if self.eval_samples < 1:
            raise ValueError("eval_samples must be at least 1")
        if self.collected_rows_per_prompt is not None and self.collected_rows_per_prompt < 0:
            raise ValueError("collected_rows_per_prompt must be non-negative (0: leave that variant out)")
        if self.best_of_n < 2:
            raise ValueError("best_of_n must be at least 2")
        if self.jobs < 0:
            raise ValueError("jobs must be non-negative (0: one per core)")
        for name in ("redo_rm", "redo_ppo"):
            if getattr(self, name) and not self.reuse:
                raise ValueError(f"{name} trains again on an earlier run's stages: it needs reuse")
            if getattr(self, name) and self.compare_collected:
                raise ValueError(f"{name} with compare_collected would mix the variants' earlier runs with the new "
                                 "one; run them apart")
        if self.redo_rm:
            self.redo_ppo = True                    # a new reward model, so PPO against it
        if self.redo_ppo:
            self.overoptimisation_task = None       # the study has PPO options of its own (see the help)
        if self.overoptimisation_task is not None and self.overoptimisation_task not in TASKS:
            raise ValueError(f"overoptimisation_task: unknown task {self.overoptimisation_task!r}")
        if self.ensemble_size < (2 if self.study_members == "mixed" else 1):
            raise ValueError("ensemble_size must be at least 2 with study_members mixed (one member per data "
                             "source), 1 otherwise")
        from tribune.trainer.pipeline import stage_configs

        # every task's stage options, and the study's PPO options, checked before any worker starts
        study = self.overoptimisation_task
        stages = {t: stage_configs(self.output / t, self.seed, self.max_steps, self.stages, t)
                  for t in dict.fromkeys([*self.tasks, *([study] if study else [])])}
        if study is not None:
            try:        # with the placeholder address that stage_configs gives before anything is served
                study_ppo_config(self, stages[study], STUDY_ARMS[0], stages[study].ppo.reward_url, {})
            except UserError as e:
                raise ValueError(f"aggressive: {e}") from None


def evaluate_task(cfg: EvaluateConfig, task: str) -> list[dict]:
    """One row for the pipeline on ``task`` and one per round of the iterated loop."""
    from tribune.services.launcher import start_serve
    from tribune.trainer.data import load_prompts

    t0 = time.perf_counter()
    out = Path(cfg.output) / task
    bon: dict[int, dict] = {}
    cands: dict[int, Path] = {}

    def while_served(r: int, stages, server) -> None:
        """With round ``r``'s reward model served: best-of-n on πSFT's samples through the gateway."""
        judge_ = CallableJudge(stages.task.spec.judge)
        if 0 not in cands:
            cands[0] = onpolicy_candidates(cfg, stages.sft.output, stages.ppo.eval_prompts, stages.ppo,
                                           out / "eval_candidates_sft.jsonl")
        bon[r] = best_of_n(server.gateway_url, cands[0], judge_)

    if cfg.reuse:
        result = reused_result(cfg, task)
        if cfg.redo_rm:
            result = redo_rm(cfg, task, result)
        with start_serve(result.stages.export.output, gateway=True) as server:
            if cfg.redo_ppo:
                result = redo_ppo(cfg, task, result, server.url)
            while_served(0, result.stages, server)
        if cfg.stages.rounds:             # the rounds run on the finished first pipeline
            with run_rounds(result, cfg.stages, gateway=True, while_served=while_served):
                pass
    else:
        with run_pipeline(out, cfg.seed, cfg.max_steps, cfg.stages, task, gateway=True,
                          while_served=while_served) as (result, _server):
            pass
    stages = result.stages
    ppo_cfg, judge_ref = stages.ppo, stages.task.spec.judge
    judge = CallableJudge(judge_ref)
    prompts = load_prompts(ppo_cfg.eval_prompts, SkipCounter())[:cfg.eval_prompts]
    onpolicy = onpolicy_accuracy(stages.rm.output, cands[0], judge_ref, stages.rm)
    # gold-order accuracy on the task's held-out pairs, whichever set the reward model stopped on
    # (the data step's is the rater's ranking of held-out πSFT samples): one yardstick for every variant
    held_out = _held_out_accuracy(stages, stages.rm, result.rm)
    row: dict = {"task": task, "round": 0, "rm_data": pipeline_variant(cfg.stages),
                 "rm_eval_accuracy": result.rm.get("eval_accuracy"),
                 "rm_equal_length_accuracy": result.rm.get("eval_equal_length_accuracy"),
                 "rm_gold_accuracy": held_out.get("eval_gold_accuracy"),
                 "rm_length_correlation": held_out.get("eval_length_correlation"),
                 "rm_given_weight": result.rm.get("given_weight"),
                 "rm_given_weight_eval_losses": result.rm.get("given_weight_eval_losses"),
                 "rm_onpolicy_accuracy": onpolicy["accuracy"], "rm_onpolicy_length_correlation":
                 onpolicy["length_correlation"], "gold_onpolicy_length_correlation": onpolicy["gold_length_correlation"],
                 "best_of_n": bon.get(0), "ppo_final_kl": result.ppo.get("objective/kl"),
                 "ppo_iterations": ppo_cfg.total_iterations, "ppo_stopped_at": result.ppo.get("stopped_early_at"),
                 **policy_row(cfg, ppo_cfg, stages.sft.output, judge, prompts)}
    row.update(targets(row, ppo_cfg.temperature))
    row["stage_seconds"] = result.seconds
    if cfg.compare_collected:
        row["compared"] = compare_collected(cfg, stages, cands[0], prompts)
    rows = [row]
    for rr in result.rounds:
        rs = rr.stages
        # on the samples of the policy this round's PPO starts from
        onpolicy_r = onpolicy_accuracy(rs.rm.output, rs.collect_eval.output, judge_ref, rs.rm)
        held_out_r = _held_out_accuracy(stages, rs.rm, rr.rm)
        # the rounds' policies are compared with πSFT, like round 0's: gain is over the whole recipe
        r_row = {"task": task, "round": rs.round, "rm_eval_accuracy": rr.rm.get("eval_accuracy"),
                 "rm_equal_length_accuracy": rr.rm.get("eval_equal_length_accuracy"),
                 "rm_gold_accuracy": held_out_r.get("eval_gold_accuracy"),
                 "rm_length_correlation": held_out_r.get("eval_length_correlation"),
                 "rm_onpolicy_accuracy": onpolicy_r["accuracy"],
                 "rm_onpolicy_length_correlation": onpolicy_r["length_correlation"],
                 "gold_onpolicy_length_correlation": onpolicy_r["gold_length_correlation"],
                 "best_of_n": bon.get(rs.round), "collected": rr.collect, "ppo_final_kl": rr.ppo.get("objective/kl"),
                 "ppo_iterations": rs.ppo.total_iterations, "ppo_stopped_at": rr.ppo.get("stopped_early_at"),
                 "stage_seconds": rr.seconds,
                 **policy_row(cfg, rs.ppo, stages.sft.output, judge, prompts)}
        r_row.update(targets(r_row, rs.ppo.temperature))
        rows.append(r_row)
    wall = round(time.perf_counter() - t0, 1)
    for r in rows:
        r["wall_s"] = wall
    return rows


def _held_out_accuracy(stages, rm_cfg, metrics: dict) -> dict:
    """A reward model's figures on the task's held-out pairs (``metrics``, its own, when it stopped on them)."""
    from tribune.trainer.reward import evaluate_rm_dir

    given_eval = variant_data(stages, "given")[1]
    if Path(rm_cfg.eval) == given_eval:
        return metrics
    return evaluate_rm_dir(rm_cfg.output, given_eval, rm_cfg, CallableJudge(stages.task.spec.judge))


def reused_result(cfg: EvaluateConfig, task: str):
    """The pipeline's result read back from an earlier run's files (``--reuse``)."""
    from tribune.trainer.pipeline import PipelineResult, given_pairs, sft_collection_paths, stage_configs

    out = Path(cfg.output) / task
    stages = stage_configs(out, cfg.seed, cfg.max_steps, cfg.stages, task)
    need = {"task": out / "task" / "task.json", "sft": stages.sft.output / "metrics.json"}
    if cfg.redo_rm:       # what the reward model trains and stops on, checked before the earlier one is removed
        need.update({"given": given_pairs(stages), "rm_eval": stages.rm.eval})
        if cfg.stages.collect_sft:
            need["collected"] = sft_collection_paths(out)["collected"]
    else:
        need.update({"rm": stages.rm.output / "metrics.json", "export": stages.export.output / "tribune.json"})
    if not cfg.redo_ppo:
        need["ppo"] = stages.ppo.output / "metrics.json"
    missing = [str(p) for p in need.values() if not Path(p).is_file()]
    if missing:
        raise UserError(f"--reuse: {task} has no finished run under {out} (missing {', '.join(missing)})")
    read = {name: json.loads(Path(p).read_text()) for name, p in need.items() if Path(p).suffix == ".json"}
    return PipelineResult(stages, read["task"], read["sft"], read.get("rm", {}), read.get("ppo", {}), {})


def redo_rm(cfg: EvaluateConfig, task: str, result):
    """``result`` with its reward model trained again (``--redo-rm``) on the reused data, and exported."""
    from tribune.trainer.export import run_export

    stages = result.stages
    for d in (stages.rm.output, stages.export.output):
        shutil.rmtree(d, ignore_errors=True)
    log.info("evaluate %s: train-rm again on the reused data → %s", task, stages.rm.output)
    t0 = time.perf_counter()
    rm = train_reward_model(stages, cfg.stages)
    run_export(stages.export)
    return dataclasses.replace(result, rm=rm, seconds={**result.seconds, "rm": round(time.perf_counter() - t0, 1)})


def redo_ppo(cfg: EvaluateConfig, task: str, result, reward_url: str):
    """``result`` with its PPO run again (``--redo-ppo``) against the reused reward model served at ``reward_url``."""
    from tribune.trainer.pipeline import stage_configs
    from tribune.trainer.ppo import run_ppo

    ppo_cfg = stage_configs(Path(cfg.output) / task, cfg.seed, cfg.max_steps, cfg.stages, task,
                            reward_url=reward_url).ppo
    shutil.rmtree(ppo_cfg.output, ignore_errors=True)        # nothing of the earlier PPO run is left to mix in
    log.info("evaluate %s: PPO again on the reused stages → %s", task, ppo_cfg.output)
    t0 = time.perf_counter()
    ppo = run_ppo(ppo_cfg)
    return dataclasses.replace(result, ppo=ppo, seconds={**result.seconds, "ppo": round(time.perf_counter() - t0, 1)})


def run_evaluate(cfg: EvaluateConfig) -> dict:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    by_task, study = _run_jobs(cfg, out)
    rows = [row for task in cfg.tasks for row in by_task.get(task, [])]
    if not rows:
        raise UserError("no task to evaluate")
    summary = {"rows": rows, "overoptimisation": study, "complete": True, "wall_s": round(time.perf_counter() - t0, 1),
               "targets": {"rm_gold_accuracy": TARGET_RM_GOLD_ACCURACY, "headroom_share": TARGET_HEADROOM_SHARE},
               "all_targets_met": all(r["meets_rm_target"] and r["meets_ppo_target"] for r in rows)}
    write_json(out / "evaluation.json", summary)
    png = plot(rows, out / "evaluation.png")
    print("\n".join(["", "Tribune evaluation (held-out prompts, gold judge)", *table(rows), *comparison_lines(rows), *study_lines(study),
                     f"targets: RM gold accuracy ≥ {TARGET_RM_GOLD_ACCURACY}, PPO gain ≥ {TARGET_HEADROOM_SHARE:.0%} "
                     f"of the headroom at the sampling T and T=0.7; all met: {summary['all_targets_met']}",
                     f"finished in {summary['wall_s']:.0f} s; {out / 'evaluation.json'}; {png}"]))
    return {"evaluation": str(out / "evaluation.json"), "plot": str(png), "all_targets_met": summary["all_targets_met"]}


def _run_jobs(cfg: EvaluateConfig, out: Path) -> tuple[dict[str, list[dict]], dict | None]:
    """Every task's rows, and the study's result. The study's runs are jobs of their own, the longest
    of all: once their task's pipeline is done, the ensemble's takes the worker it freed and the single
    models' lead the queue (when their task is not among the tasks run now, they need its earlier run
    and are queued first)."""
    study_task = cfg.overoptimisation_task
    study_waits = study_task in cfg.tasks
    # the most that can run at once: the study's runs that wait for their task take its place
    at_once = len(cfg.tasks) + (len(STUDY_ARMS) - study_waits if study_task is not None else 0)
    jobs = resolve_jobs(cfg.jobs, at_once)
    by_task: dict[str, list[dict]] = {}
    study_parts: list[dict] = []

    def finished(task: str, rows: list[dict]) -> None:
        by_task[task] = rows
        done = [row for t in cfg.tasks for row in by_task.get(t, [])]
        write_json(out / "evaluation.json", {"rows": done, "complete": False})

    if jobs == 1:
        for i, task in enumerate(cfg.tasks, 1):
            log.info("evaluate: task %d/%d: %s", i, len(cfg.tasks), task)
            finished(task, evaluate_task(cfg, task))
        return by_task, overoptimisation_study(cfg, study_task) if study_task else None

    # the ensemble's run (it trains and exports the ensemble first) is the longer one: it starts first
    study_jobs = [Job(f"over-optimisation study ({study_task}, {arm})", overoptimisation_study,
                      (cfg, study_task, (arm,)), out / f"{study_task}-study-{arm}.log")
                  for arm in reversed(STUDY_ARMS)] if study_task else []
    log.info("evaluate: %d task(s)%s, %d at once", len(cfg.tasks), " and the over-optimisation study" if study_task
             else "", jobs)
    # the study's task first, so that the study (which needs its pipeline) overlaps the other tasks
    order = sorted(cfg.tasks, key=lambda t: t != study_task)
    with JobPool(min(jobs, at_once)) as pool:
        if not study_waits:             # its task's earlier run is there: the longest jobs start first
            for job in study_jobs:
                pool.submit(job)
        for task in order:
            pool.submit(Job(f"evaluate {task}", evaluate_task, (cfg, task), out / task / "evaluate.log"))
        for job, result in pool.completed():
            if job in study_jobs:
                study_parts.append(result)
                log.info("%s: done", job.name)
                continue
            task = job.args[1]
            finished(task, result)
            log.info("%s: done (%d/%d tasks)", job.name, len(by_task), len(cfg.tasks))
            if study_waits and task == study_task:
                pool.submit(study_jobs[0])            # takes the worker its task freed
                for job in reversed(study_jobs[1:]):  # the others lead the queue, in their order
                    pool.submit(job, first=True)
    return by_task, merge_study_arms(study_parts) if study_parts else None
