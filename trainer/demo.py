"""`tribune demo`: the whole pipeline on the bundled task, wired in one place.

Each stage's output directory is the next stage's input; the stage configs are the same
dataclasses the individual commands use, so ``--config`` YAML can tune any of them.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.config import field
from trainer.reward import RewardConfig, run_train_rm
from trainer.sft import SFTConfig, run_sft
from trainer.task.make import TaskConfig, make_task

log = logging.getLogger("tribune")


@dataclass(kw_only=True)
class DemoConfig:
    """The bundled-task pipeline: task make → sft → train-rm."""
    output: Path = field(Path("runs/demo"), help="directory for every stage's output")
    seed: int = field(0, help="seed of the task and of every stage")
    sft_epochs: float = field(3.0, help="SFT passes over the demonstrations")
    rm_epochs: float = field(4.0, help="reward-model passes over the preference rows")
    max_steps: int | None = field(None, help="cap on optimiser steps of each training stage (for smoke runs)")


def stage_configs(cfg: DemoConfig) -> tuple[TaskConfig, SFTConfig, RewardConfig]:
    """The one place where a stage's output becomes the next stage's input."""
    out = Path(cfg.output)
    task = TaskConfig(seed=cfg.seed)
    sft = SFTConfig(model=out / "task" / "base", train=out / "task" / "sft.jsonl", output=out / "sft",
                    seed=cfg.seed, epochs=cfg.sft_epochs, max_steps=cfg.max_steps, learning_rate=3e-3)
    rm = RewardConfig(model=out / "sft", train=out / "task" / "prefs_train.jsonl",
                      eval=out / "task" / "prefs_eval.jsonl", output=out / "rm", seed=cfg.seed,
                      epochs=cfg.rm_epochs, max_steps=cfg.max_steps, learning_rate=1e-3)
    return task, sft, rm


def run_demo(cfg: DemoConfig) -> dict:
    task_cfg, sft_cfg, rm_cfg = stage_configs(cfg)
    t0 = time.perf_counter()
    log.info("1/3 task make → %s", Path(cfg.output) / "task")
    task = make_task(task_cfg, Path(cfg.output) / "task")
    log.info("2/3 sft → %s", sft_cfg.output)
    sft = run_sft(sft_cfg)
    log.info("3/3 train-rm → %s", rm_cfg.output)
    rm = run_train_rm(rm_cfg)
    report = {
        "demonstrator_gold_score": task["demonstrator_gold_score"],
        "sft_gold_score": sft.get("gold_score"),
        "sft_eval_loss": sft["eval_loss"],
        "rm_eval_accuracy": rm["eval_accuracy"],
        "rm_eval_gold_accuracy": rm.get("eval_gold_accuracy"),
        "rm_reward_mean": rm["reward_mean"],
        "rm_reward_std": rm["reward_std"],
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "outputs": {"task": str(Path(cfg.output) / "task"), "sft": str(sft_cfg.output), "rm": str(rm_cfg.output)},
    }
    (Path(cfg.output) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\nTribune demo")
    print(f"  SFT policy gold score (held-out, sampled): {report['sft_gold_score']:.3f}"
          f"   (demonstrator: {report['demonstrator_gold_score']:.3f}, perfect: 1.0)")
    print(f"  reward model held-out accuracy: {report['rm_eval_accuracy']:.3f} on rater labels, "
          f"{report['rm_eval_gold_accuracy']:.3f} on the gold ordering")
    print(f"  finished in {report['elapsed_s']:.0f} s; report: {Path(cfg.output) / 'report.json'}")
    return report
