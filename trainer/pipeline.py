"""The whole pipeline on one suite task, wired in one place: task make → sft → collect on πSFT
and label (the recipe's data step) → train-rm on the given pairs plus the collected preferences
→ export → `tribune serve` (a child process) → ppo. `tribune demo` and `tribune evaluate` run it.

The data step (``collect_sft``, on by default) samples k = 4 responses per training prompt from
πSFT, four times over (``rows_per_prompt``: four rating tasks per prompt, as many rated rows as the
suite's given pairs have), and has the task's simulated rater rank them at the task's own noise.
Reward models that saw only the given pairs ranked the policy's own samples worse and misled PPO
on some tasks; one ranking per prompt was too little data to fix it (its reward models stopped
early, unstable between seeds); four, with the given pairs, gave better reward models and PPO
policies on the suite (the README's evaluation has the figures).

With ``rounds`` R > 0, R rounds follow (Anthropic's iterated online RLHF): collect on the
current policy → label (the task's simulated rater, at its own noise) → a reward model on all
rounds' preferences plus the given pairs, warm-started from the previous one → export → serve →
PPO from the current policy (the reference stays πSFT).

Each stage's output directory is the next stage's input; the stage configs are the same
dataclasses the individual commands use, and ``StageOptions`` holds each stage's options as
a mapping (YAML ``sft: {epochs: 3}`` or ``--sft epochs=3``), validated against that stage's
config before anything runs, so every option of every stage can be set.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tribune.services.common.config import build_config, field
from tribune.services.common.errors import UserError
from tribune.services.common.jsonl import write_json
from tribune.trainer.collect import CollectConfig
from tribune.trainer.data import row_weight
from tribune.trainer.export import ExportConfig
from tribune.trainer.jobs import Job, JobPool, resolve_jobs
from tribune.trainer.label import LabelConfig
from tribune.trainer.ppo_config import PPOConfig
from tribune.trainer.reward import RewardConfig
from tribune.trainer.sft import SFTConfig
from tribune.trainer.task.make import TaskConfig

log = logging.getLogger("tribune")

_PLACEHOLDER_URL = "127.0.0.1:1"   # replaced by the served address once `tribune serve` runs


# The pipeline's own defaults, on top of each command's; a stage's options given by the user
# are merged over these (``--ppo iterations=30`` keeps the scoring chunk below).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "task": {},
    # the bundled task's small lengths, given explicitly (each command derives its own from the model and the data);
    # the epochs, learning rate and early stop are `tribune sft`'s own defaults
    "sft": {"max_length": 64, "max_prompt_length": 48},
    # a tenth of SFT's learning rate, chosen on the suite: at train-rm's 1e-3, fine-tuned from a πSFT that matches
    # a prompt's keyword in its response, the ranking learnt the length and lost the match (missing-keyword pairs
    # 0.49–0.61 against 0.91–0.96 at 3e-4). Three epochs, not train-rm's four: the data step's rankings double the
    # reward model's data; at 3e-4 two epochs ended with the held-out loss still falling on every task, and three
    # raised four of the five tasks' gold-order accuracy, keyword's past 0.85 (at 1e-3 four epochs had trained 2.5×
    # longer than two for a slightly worse PPO policy on sequence). train-rm alone keeps 1e-3: on the given pairs
    # alone (bundled, 4 epochs) 3e-4 ordered 0.837 of the held-out pairs right, 1e-3 0.909.
    "rm": {"max_length": 64, "max_prompt_length": 48, "epochs": 3.0, "learning_rate": 3e-4},
    "export": {},
    # a gold-free stop: the monitor's alarms (preferred_eval is wired below) end the run, chosen on the suite
    "ppo": {"iterations": 60, "scoring_chunk": 32, "max_new_tokens": 16, "max_prompt_length": 48,
            "stop_on_drift": True},
    # four rating tasks of fresh samples per prompt (chosen on the suite: one was too little data, eight cost the
    # reward model twice the time for a gain on sequence alone)
    "collect": {"k": 4, "max_prompts": 1000, "rows_per_prompt": 4},
    "label": {},
}


def _help(stage: str, command: str) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in STAGE_DEFAULTS[stage].items())
    return f"options of `tribune {command}`, over the pipeline's own defaults ({shown or 'none'})"


@dataclass(kw_only=True)
class StageOptions:
    """Each stage's options, as given to its own command (flags or YAML keys)."""
    task: dict[str, Any] = field({}, help=_help("task", "task make") + "; e.g. task=arithmetic")
    sft: dict[str, Any] = field({}, help=_help("sft", "sft"))
    rm: dict[str, Any] = field({}, help=_help("rm", "train-rm"))
    export: dict[str, Any] = field({}, help=_help("export", "export"))
    ppo: dict[str, Any] = field({}, help=_help("ppo", "ppo"))
    collect_sft: bool = field(True, help="the recipe's data step: before train-rm, collect rows_per_prompt × k "
                                         "samples per training prompt on πSFT, have the task's simulated rater rank "
                                         "each row of k (at its own "
                                         "noise), and train the reward model on the given pairs plus these (early "
                                         "stopping on the rater's ranking of held-out πSFT samples); "
                                         "--no-collect-sft trains on the given pairs alone")
    # chosen on the suite: the given pairs at half weight had the lower held-out loss on bundled and sequence and the
    # better PPO policy at T = 0.7 (sequence's then met its targets), full weight on arithmetic, likewise; on keyword
    # and style the losses were nearly equal and the policies within the noise
    given_weights: list[float] = field([1.0, 0.5], help="with the data step: the weights of the given pairs' rows in "
                                       "the reward model's loss (each collected ranking weighs 1) to try; one reward "
                                       "model per weight, and the one with the lowest held-out loss on the rater's "
                                       "rankings of held-out πSFT samples is kept (no gold judge needed); one weight: "
                                       "no choice. The rounds' reward models keep the chosen weight; without the "
                                       "data step (--no-collect-sft) it is not used")
    rounds: int = field(0, help="rounds of collect on the current policy → label → reward model on all "
                                "rounds' data (warm-started) → export → PPO from the current policy")
    collect: dict[str, Any] = field({}, help=_help("collect", "collect") + " (the data step on πSFT takes every "
                                    "training prompt unless max_prompts is given)")
    label: dict[str, Any] = field({}, help=_help("label", "label"))

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError("rounds must be non-negative")
        if not self.given_weights or not all(0 <= w < math.inf for w in self.given_weights) \
                or len({f"{w:g}" for w in self.given_weights}) != len(self.given_weights):
            raise ValueError("given_weights must be one or more distinct non-negative numbers")
        if len(self.given_weights) > 1 and self.rm.get("member_train"):
            raise ValueError("given_weights: with rm member_train the members train on their own files, not on the "
                             "weighted one; give one weight")

    def merged(self, stage: str) -> dict[str, Any]:
        return {**STAGE_DEFAULTS[stage], **getattr(self, stage)}


def _build(cls, wired: dict, overrides: dict):
    try:
        return build_config(cls, {**wired, **overrides})
    except UserError as e:
        raise ValueError(f"{cls.__name__}: {e}") from None


@dataclass(frozen=True)
class Stages:
    task: TaskConfig
    sft: SFTConfig
    rm: RewardConfig
    export: ExportConfig
    ppo: PPOConfig


def stage_configs(out: Path, seed: int, max_steps: int | None, options: StageOptions, task: str | None = None,
                  reward_url: str = _PLACEHOLDER_URL) -> Stages:
    """The one place where a stage's output becomes the next stage's input."""
    out, t = Path(out), Path(out) / "task"
    common = {"seed": seed, **({"max_steps": max_steps} if max_steps else {})}
    build = _build
    task_cfg = build(TaskConfig, {"seed": seed, **({"task": task} if task else {})}, options.merged("task"))
    if max_steps and task_cfg.pretrain_steps is None:      # the base model's pretraining is a training stage too
        task_cfg = dataclasses.replace(task_cfg, pretrain_steps=min(task_cfg.resolved().pretrain_steps, max_steps))
    judge = {"judge": task_cfg.spec.judge}      # the task's gold judge, plugged in like any other
    sft = build(SFTConfig, {"model": t / "base", "train": t / "sft.jsonl", "output": out / "sft", **judge, **common},
                options.merged("sft"))
    paths = sft_collection_paths(out) if options.collect_sft else {"train": t / "prefs_train.jsonl",
                                                                    "eval": t / "prefs_eval.jsonl"}
    data = {"train": paths["train"], "eval": paths["eval"]}
    rm = build(RewardConfig, {"model": out / "sft", **data, "output": out / "rm", **judge, **common},
               options.merged("rm"))
    export = build(ExportConfig, {"reward": out / "rm", "reference": out / "sft", "output": out / "repository",
                                  "overwrite": True}, options.merged("export"))
    iterations = int(options.merged("ppo")["iterations"])
    ppo = build(PPOConfig, {"policy": out / "sft", "prompts": t / "prompts_train.jsonl",
                            "eval_prompts": t / "prompts_eval.jsonl", "reward_url": reward_url,
                            "reference_url": reward_url, "output": out / "ppo", "value_init": out / "rm",
                            "preferred_eval": rm.eval,     # the monitor's height: the raters' favourites there
                            "gold_every": max(1, iterations // 6), **judge, **common}, options.merged("ppo"))
    stages = Stages(task_cfg, sft, rm, export, ppo)
    if options.collect_sft:
        sft_collection_configs(stages, options)                      # checked before anything runs
    if options.rounds:
        round_configs(stages, 1, ppo.output, rm.output, options)     # round options checked before anything runs
    return stages


@dataclass(frozen=True)
class RoundStages:
    """One round of the iterated loop: its own collect, label, reward model, export and PPO."""
    round: int
    collect: CollectConfig
    collect_eval: CollectConfig      # on held-out prompts: the reward model's early-stopping set
    label: LabelConfig
    label_eval: LabelConfig
    rm: RewardConfig
    export: ExportConfig
    ppo: PPOConfig


def round_configs(stages: Stages, r: int, previous_policy: Path, previous_rm: Path, options: StageOptions,
                  reward_url: str = _PLACEHOLDER_URL) -> RoundStages:
    """Round ``r`` (1-based) from the previous round's policy and reward model."""
    out = Path(stages.rm.output).parent / f"round-{r}"
    seed = stages.sft.seed + 101 * r
    collect_opts = options.merged("collect")
    collect = _build(CollectConfig, {"policy": previous_policy, "prompts": stages.ppo.prompts,
                                     "output": out / "candidates.jsonl", "seed": seed,
                                     "max_new_tokens": stages.ppo.max_new_tokens,
                                     "max_prompt_length": stages.ppo.max_prompt_length}, collect_opts)
    collect_eval = dataclasses.replace(collect, prompts=stages.ppo.eval_prompts, output=out / "candidates_eval.jsonl",
                                       seed=seed + 1, max_prompts=None)
    rater = {"judge": stages.task.spec.judge, "rater_temperature": stages.task.resolved().rater_temperature,
             "seed": seed}
    label = _build(LabelConfig, {"input": collect.output, "output": out / "prefs.jsonl", **rater},
                   options.merged("label"))
    label_eval = dataclasses.replace(label, input=collect_eval.output, output=out / "prefs_eval.jsonl")
    rm = dataclasses.replace(stages.rm, **warm_start(previous_rm), stats_policy=previous_policy,
                             train=out / "prefs_all.jsonl", eval=label_eval.output, output=out / "rm", seed=seed)
    export = dataclasses.replace(stages.export, reward=rm.output, output=out / "repository")
    ppo = dataclasses.replace(stages.ppo, policy=previous_policy, value_init=rm.output, output=out / "ppo",
                              preferred_eval=rm.eval, reward_url=reward_url, reference_url=reward_url, seed=seed)
    return RoundStages(r, collect, collect_eval, label, label_eval, rm, export, ppo)


def warm_start(previous_rm: Path) -> dict:
    """The reward-model options that warm-start a round from ``previous_rm``: from it, or when it is an
    ensemble (once trained), each member from its own weights (its directory holds no model itself)."""
    from tribune.trainer.reward import ENSEMBLE_FILE, reward_members

    if not (Path(previous_rm) / ENSEMBLE_FILE).is_file():
        return {"model": previous_rm, "member_model": []}
    members = reward_members(previous_rm)
    return {"model": members[0], "member_model": members}


def given_pairs(stages: Stages) -> Path:
    """The task's own preference pairs (what the reward model trains on without the data step)."""
    return Path(stages.sft.train).parent / "prefs_train.jsonl"      # beside sft.jsonl in the task directory


def sft_collection_paths(out: Path) -> dict[str, Path]:
    """Where the data step writes the reward model's training and early-stopping files."""
    d = Path(out) / "collected"
    return {"train": d / "prefs_given_and_collected.jsonl", "eval": d / "prefs_eval.jsonl",
            "collected": d / "prefs.jsonl"}      # the rater's rankings alone


@dataclass(frozen=True)
class SFTCollection:
    """The recipe's data step on πSFT: samples of the training prompts (and of held-out ones, for
    early stopping), ranked by the task's simulated rater; ``merged`` = the given pairs + these."""
    collect: CollectConfig
    collect_eval: CollectConfig
    label: LabelConfig
    label_eval: LabelConfig
    merged: Path


def sft_collection_configs(stages: Stages, options: StageOptions) -> SFTCollection:
    """``rows_per_prompt`` rankings of k πSFT samples per training prompt (every training prompt
    unless ``--collect max_prompts=N``), and as many per held-out prompt for early stopping."""
    options = dataclasses.replace(options, collect={"max_prompts": None, **options.collect})
    rs = round_configs(stages, 1, stages.sft.output, stages.rm.output, options)
    paths = sft_collection_paths(Path(stages.sft.output).parent)
    d, seed = paths["train"].parent, stages.sft.seed + 7
    collect = dataclasses.replace(rs.collect, output=d / "candidates.jsonl", seed=seed)
    label = dataclasses.replace(rs.label, input=collect.output, output=paths["collected"], seed=seed)
    collect_eval = dataclasses.replace(rs.collect_eval, output=d / "candidates_eval.jsonl")
    label_eval = dataclasses.replace(rs.label_eval, input=collect_eval.output, output=paths["eval"])
    return SFTCollection(collect, collect_eval, label, label_eval, paths["train"])


def collected_on_sft(stages: Stages, options: StageOptions) -> Path:
    """The data step's rankings of πSFT's samples, collected now if the pipeline did not
    (``--no-collect-sft``; its "given + collected" file then holds every row at weight 1, whatever an
    earlier run in the same directory left there)."""
    c = sft_collection_configs(stages, options)
    if not Path(c.label.output).is_file():
        collect_on_sft(stages, options)
    elif not options.collect_sft:
        merge_data_step(stages, options, 1.0)
    return Path(c.label.output)


def collect_on_sft(stages: Stages, options: StageOptions) -> dict:
    """Runs the data step; returns collect's counts. Redone whole, never half-resumed."""
    from tribune.trainer.collect import run_collect
    from tribune.trainer.label import run_label

    c = sft_collection_configs(stages, options)
    for cfg in (c.collect, c.collect_eval):
        Path(cfg.output).unlink(missing_ok=True)
    counts = run_collect(c.collect)
    run_collect(c.collect_eval)
    run_label(c.label)
    run_label(c.label_eval)
    merge_data_step(stages, options, options.given_weights[0] if options.collect_sft else 1.0)
    return counts


def merge_data_step(stages: Stages, options: StageOptions, given_weight: float, output: Path | None = None) -> Path:
    """The reward model's training file of the data step: the given pairs (their rows at ``given_weight``)
    + the rankings, written to ``output`` (default: the file the reward model stage reads)."""
    c = sft_collection_configs(stages, options)
    output = Path(output or c.merged)
    merge_preferences([given_pairs(stages), c.label.output], output, weights=[given_weight, 1.0])
    return output


def rm_candidate(stages: Stages, given_weight: float) -> Path:
    """Where ``train_reward_model`` trains the candidate with the given pairs at ``given_weight`` (the
    kept one is then moved to the stage's ``rm/``)."""
    return Path(stages.rm.output).parent / "rm_candidates" / f"given_weight_{given_weight:g}" / "rm"


def candidate_workers(candidates: int) -> int:
    """How many reward-model candidates train at once: one per core this process may use (the demo's
    two candidates on 2 cores: 108 s side by side, one thread each, against 124 s one after the other
    with two threads), one after the other on a GPU (each candidate would hold a copy of the model in
    its memory) or inside a job that has a single core (`tribune evaluate`'s tasks)."""
    import torch

    return 1 if torch.cuda.is_available() else resolve_jobs(0, candidates)


def train_candidate(cfg: RewardConfig) -> dict:
    """One candidate's train-rm (a job's function: importable, its argument picklable)."""
    from tribune.trainer.reward import run_train_rm

    return run_train_rm(cfg)


def train_reward_model(stages: Stages, options: StageOptions, workers: int | None = None,
                       train: Callable[[RewardConfig], dict] = train_candidate) -> dict:
    """The pipeline's reward model. With the data step and several ``given_weights``: one candidate per
    weight under ``rm_candidates/``, and the one with the lowest held-out loss on the rater's rankings of
    held-out πSFT samples (the stage's eval set; no gold judge) becomes ``rm/``, its training file the
    stage's; its metrics gain ``given_weight`` and every candidate's ``eval_loss``.

    The candidates train ``workers`` at a time, each in a worker process with an equal share of the
    cores (default: ``candidate_workers``); with one, one after the other in this process. ``train``
    (a module-level function) trains one candidate."""
    rm_dir = Path(stages.rm.output)
    shutil.rmtree(rm_dir.parent / "rm_candidates", ignore_errors=True)     # no earlier run's candidate is left
    weights = options.given_weights if options.collect_sft else []
    if len(weights) < 2:
        if weights:
            merge_data_step(stages, options, weights[0])
        return train(stages.rm)
    # an earlier run's model and its export go first: a crash from here on leaves nothing --reuse would accept
    for d in (rm_dir, Path(stages.export.output)):
        if d.exists():
            shutil.rmtree(d)
    configs = []
    for w in weights:
        d = rm_candidate(stages, w)
        data = merge_data_step(stages, options, w, d.parent / "prefs_given_and_collected.jsonl")
        configs.append(dataclasses.replace(stages.rm, train=data, output=d))
    workers = workers or candidate_workers(len(weights))
    trained: dict[int, dict] = {}
    if workers == 1:
        for i, (w, cfg) in enumerate(zip(weights, configs), 1):
            log.info("train-rm candidate %d/%d: the given pairs at weight %g → %s", i, len(weights), w,
                     Path(cfg.output).parent)
            trained[i] = train(cfg)
    else:
        log.info("train-rm: %d candidates (the given pairs at weight %s), %d at once", len(weights),
                 ", ".join(f"{w:g}" for w in weights), workers)
        with JobPool(min(workers, len(weights))) as pool:
            number = {}
            for i, (w, cfg) in enumerate(zip(weights, configs), 1):
                name = f"train-rm candidate {i}/{len(weights)} (the given pairs at weight {w:g})"
                number[name] = i
                pool.submit(Job(name, train, (cfg,), Path(cfg.output).parent / "train-rm.log"))
            for job, metrics in pool.completed():
                trained[number[job.name]] = metrics
    candidates = [(trained[i]["eval_loss"], i, w, Path(cfg.output), trained[i])
                  for i, (w, cfg) in enumerate(zip(weights, configs), 1)]
    # the lowest loss (a NaN never), the first weight on a tie
    loss, _, w, d, metrics = min(candidates, key=lambda c: (math.isnan(c[0]), c[0], c[1]))
    losses = {f"{cw:g}": round(cl, 6) for cl, _, cw, _, _ in candidates}
    log.info("train-rm: kept the given pairs at weight %g (held-out loss on the rater's rankings of πSFT samples: %s)",
             w, ", ".join(f"weight {k}: {v:.4f}" for k, v in losses.items()))
    # everything written while the model is still a candidate; the move into rm/ comes last
    metrics = {**metrics, "given_weight": w, "given_weight_eval_losses": losses}
    write_json(d / "metrics.json", metrics)
    resolved = d / "config.resolved.json"                # the kept model's own record names where it will lie
    if resolved.is_file():
        write_json(resolved, {**json.loads(resolved.read_text()), "output": str(rm_dir), "train": str(stages.rm.train)})
    shutil.copyfile(d.parent / "prefs_given_and_collected.jsonl", stages.rm.train)
    os.replace(d, rm_dir)
    return metrics


@dataclass
class RoundResult:
    stages: RoundStages
    collect: dict
    rm: dict
    ppo: dict
    seconds: dict[str, float]


@dataclass
class PipelineResult:
    stages: Stages
    task: dict
    sft: dict
    rm: dict
    ppo: dict
    seconds: dict[str, float]
    rounds: list[RoundResult] = dataclasses.field(default_factory=list)
    collected: dict | None = None        # the data step's counts (collect_sft)


@contextmanager
def run_pipeline(out: Path, seed: int, max_steps: int | None, options: StageOptions, task: str | None = None,
                 *serve_args: str, gateway: bool = False,
                 while_served: Callable[[int, Stages, Any], None] | None = None):
    """Runs every stage; yields (result, the running `tribune serve`) before the server stops,
    so a caller can still use the served models. ``gateway``: the server runs the text gateway too
    (on a port it picks: ``server.gateway_url``). ``while_served(round, stages, server)`` is
    called after each round's PPO (round 0: the first pipeline) while its models are served."""
    from tribune.services.launcher import start_serve
    from tribune.trainer.export import run_export
    from tribune.trainer.ppo import run_ppo
    from tribune.trainer.sft import run_sft
    from tribune.trainer.task.make import make_task

    stages = stage_configs(out, seed, max_steps, options, task)
    seconds: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        value = fn(*args)
        seconds[name] = round(time.perf_counter() - t0, 1)
        return value

    n = 7 if options.collect_sft else 6
    steps = iter(range(1, n + 1))
    log.info("%d/%d task make (%s) → %s", next(steps), n, stages.task.task, Path(out) / "task")
    task_summary = timed("task", make_task, stages.task, Path(out) / "task")
    log.info("%d/%d sft → %s", next(steps), n, stages.sft.output)
    sft = timed("sft", run_sft, stages.sft)
    collected = None
    if options.collect_sft:
        log.info("%d/%d collect on πSFT → label (the task's simulated rater) → given pairs + collected: %s",
                 next(steps), n, stages.rm.train)
        collected = timed("collect_label", collect_on_sft, stages, options)
    log.info("%d/%d train-rm → %s", next(steps), n, stages.rm.output)
    rm = timed("rm", train_reward_model, stages, options)
    log.info("%d/%d export → %s", next(steps), n, stages.export.output)
    timed("export", run_export, stages.export)
    shown = " ".join((["--with-gateway"] if gateway else []) + list(serve_args))
    log.info("%d/%d tribune serve %s(embedded Triton) in a child process", next(steps), n, shown + " " if shown else "")
    with start_serve(stages.export.output, *serve_args, gateway=gateway) as server:
        log.info("%d/%d ppo against %s", next(steps), n, server.url)
        ppo = timed("ppo", run_ppo, stage_configs(out, seed, max_steps, options, task, reward_url=server.url).ppo)
        result = PipelineResult(stages, task_summary, sft, rm, ppo, seconds, collected=collected)
        if while_served:
            while_served(0, stages, server)
        if not options.rounds:
            yield result, server
            return
    yield from _rounds(result, options, serve_args, gateway, while_served)


@contextmanager
def run_rounds(result: PipelineResult, options: StageOptions, *serve_args: str, gateway: bool = False,
               while_served: Callable[[int, Stages, Any], None] | None = None):
    """The iterated loop's rounds after a finished first pipeline (``result``, e.g. read back from
    its files); yields (result with its rounds, the last round's running `tribune serve`)."""
    yield from _rounds(result, options, serve_args, gateway, while_served)


def _rounds(result: PipelineResult, options: StageOptions, serve_args, gateway: bool, while_served):
    from tribune.services.launcher import start_serve
    from tribune.trainer.ppo import run_ppo

    stages = result.stages
    policy, rm_dir = stages.ppo.output, stages.rm.output
    for r in range(1, options.rounds + 1):
        rs, collected, round_rm, round_seconds = prepare_round(stages, r, policy, rm_dir, options)
        last = r == options.rounds
        with start_serve(rs.export.output, *serve_args, gateway=gateway) as server:
            log.info("round %d/%d: ppo from %s against %s", r, options.rounds, policy, server.url)
            t0 = time.perf_counter()
            ppo_cfg = dataclasses.replace(rs.ppo, reward_url=server.url, reference_url=server.url)
            round_ppo = run_ppo(ppo_cfg)
            round_seconds["ppo"] = round(time.perf_counter() - t0, 1)
            result.rounds.append(RoundResult(dataclasses.replace(rs, ppo=ppo_cfg), collected, round_rm, round_ppo,
                                             round_seconds))
            if while_served:
                while_served(r, stages, server)
            if last:
                yield result, server
        policy, rm_dir = rs.ppo.output, rs.rm.output


def prepare_round(stages: Stages, r: int, policy: Path, rm_dir: Path, options: StageOptions):
    """Round ``r`` up to its export: collect on ``policy`` → label → reward model warm-started from ``rm_dir``."""
    from tribune.trainer.collect import run_collect
    from tribune.trainer.export import run_export
    from tribune.trainer.label import run_label
    from tribune.trainer.reward import run_train_rm

    rs = round_configs(stages, r, policy, rm_dir, options)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    log.info("round %d/%d: collect %s × %d on %s; label (simulated rater, τ=%g)", r, options.rounds,
             rs.collect.max_prompts or "all", rs.collect.k, policy, rs.label.rater_temperature)
    for cfg in (rs.collect, rs.collect_eval):       # a round is redone whole, never half-resumed
        Path(cfg.output).unlink(missing_ok=True)
    collected = run_collect(rs.collect)
    run_collect(rs.collect_eval)
    run_label(rs.label)
    run_label(rs.label_eval)
    merge_preferences([stages.rm.train, *[Path(stages.rm.output).parent / f"round-{i}" / "prefs.jsonl"
                                          for i in range(1, r + 1)]], rs.rm.train)    # rm.train: given (+ data step)
    seconds["collect_label"] = round(time.perf_counter() - t0, 1)
    log.info("round %d/%d: train-rm on the given pairs and every round's, warm-started from %s → %s", r,
             options.rounds, rm_dir, rs.rm.output)
    t0 = time.perf_counter()
    rm = run_train_rm(rs.rm)
    run_export(rs.export)
    seconds["rm"] = round(time.perf_counter() - t0, 1)
    return rs, collected, rm, seconds


def _weighted(line: str, w: float) -> str:
    """A JSONL row with its weight multiplied by ``w``. A line that is not such a row is kept as it is:
    train-rm then skips and counts it (an invalid weight), or stops at it with its file and line."""
    try:
        row = json.loads(line)
    except ValueError:
        return line
    weight = row_weight(row) if isinstance(row, dict) else None
    if weight is None:
        return line
    return json.dumps({**row, "weight": w * weight}, ensure_ascii=False)


def merge_preferences(paths: list[Path], output: Path, weights: list[float] | None = None) -> int:
    """Concatenates preference files (the given pairs and every round's) into one; a file's
    ``weights`` entry other than 1 multiplies the ``weight`` of each of its rows (default 1)."""
    n = 0
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with Path(output).open("w", encoding="utf-8") as f:
        for p, w in zip(paths, weights or [1.0] * len(paths), strict=True):
            text = Path(p).read_text(encoding="utf-8")
            if w != 1.0:
                text = "".join(_weighted(line, w) + "\n" for line in text.split("\n") if line.strip())
            f.write(text if text.endswith("\n") or not text else text + "\n")
            n += text.count("\n")
    return n
