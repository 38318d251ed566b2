"""The whole pipeline on one suite task, wired in one place: task make → sft → train-rm →
export → `tribune serve` (a child process) → ppo. `tribune demo` and `tribune evaluate` run it.

Each stage's output directory is the next stage's input; the stage configs are the same
dataclasses the individual commands use, and ``StageOptions`` holds each stage's options as
a mapping (YAML ``sft: {epochs: 3}`` or ``--sft epochs=3``), validated against that stage's
config before anything runs, so every option of every stage can be set.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.config import build_config, field
from services.common.errors import UserError
from trainer.export import ExportConfig
from trainer.ppo_config import PPOConfig
from trainer.reward import RewardConfig
from trainer.sft import SFTConfig
from trainer.task.make import TaskConfig

log = logging.getLogger("tribune")

_PLACEHOLDER_URL = "127.0.0.1:1"   # replaced by the served address once `tribune serve` runs


# The pipeline's own defaults, on top of each command's; a stage's options given by the user
# are merged over these (``--sft epochs=5`` keeps the learning rate below).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "task": {},
    "sft": {"epochs": 3.0, "learning_rate": 3e-3},
    "rm": {},
    "export": {},
    "ppo": {"iterations": 60, "scoring_chunk": 32},
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

    def merged(self, stage: str) -> dict[str, Any]:
        return {**STAGE_DEFAULTS[stage], **getattr(self, stage)}


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

    def build(cls, wired: dict, overrides: dict):
        try:
            return build_config(cls, {**wired, **overrides})
        except UserError as e:
            raise ValueError(f"{cls.__name__}: {e}") from None

    task_cfg = build(TaskConfig, {"seed": seed, **({"task": task} if task else {})}, options.merged("task"))
    judge = {"judge": task_cfg.spec.judge}      # the task's gold judge, plugged in like any other
    sft = build(SFTConfig, {"model": t / "base", "train": t / "sft.jsonl", "output": out / "sft", **judge, **common},
                options.merged("sft"))
    rm = build(RewardConfig, {"model": out / "sft", "train": t / "prefs_train.jsonl", "eval": t / "prefs_eval.jsonl",
                              "output": out / "rm", **judge, **common}, options.merged("rm"))
    export = build(ExportConfig, {"reward": out / "rm", "reference": out / "sft", "output": out / "repository",
                                  "overwrite": True}, options.merged("export"))
    iterations = int(options.merged("ppo")["iterations"])
    ppo = build(PPOConfig, {"policy": out / "sft", "prompts": t / "prompts_train.jsonl",
                            "eval_prompts": t / "prompts_eval.jsonl", "reward_url": reward_url,
                            "reference_url": reward_url, "output": out / "ppo", "value_init": out / "rm",
                            "gold_every": max(1, iterations // 6), **judge, **common}, options.merged("ppo"))
    return Stages(task_cfg, sft, rm, export, ppo)


@dataclass
class PipelineResult:
    stages: Stages
    task: dict
    sft: dict
    rm: dict
    ppo: dict
    seconds: dict[str, float]


@contextmanager
def run_pipeline(out: Path, seed: int, max_steps: int | None, options: StageOptions, task: str | None = None,
                 *serve_args: str):
    """Runs every stage; yields (result, the running `tribune serve`) before the server stops,
    so a caller can still use the served models."""
    from services.launcher import start_serve
    from trainer.export import run_export
    from trainer.ppo import run_ppo
    from trainer.reward import run_train_rm
    from trainer.sft import run_sft
    from trainer.task.make import make_task

    stages = stage_configs(out, seed, max_steps, options, task)
    seconds: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        value = fn(*args)
        seconds[name] = round(time.perf_counter() - t0, 1)
        return value

    log.info("1/6 task make (%s) → %s", stages.task.task, Path(out) / "task")
    task_summary = timed("task", make_task, stages.task, Path(out) / "task")
    log.info("2/6 sft → %s", stages.sft.output)
    sft = timed("sft", run_sft, stages.sft)
    log.info("3/6 train-rm → %s", stages.rm.output)
    rm = timed("rm", run_train_rm, stages.rm)
    log.info("4/6 export → %s", stages.export.output)
    timed("export", run_export, stages.export)
    log.info("5/6 tribune serve %s(embedded Triton) in a child process", " ".join(serve_args) + " " if serve_args else "")
    with start_serve(stages.export.output, *serve_args) as server:
        log.info("6/6 ppo against %s", server.url)
        ppo_cfg = stage_configs(out, seed, max_steps, options, task, reward_url=server.url).ppo
        ppo = timed("ppo", run_ppo, ppo_cfg)
        yield PipelineResult(stages, task_summary, sft, rm, ppo, seconds), server
