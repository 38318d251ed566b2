"""Shared by the benchmarks: machine facts and JSON results."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(), "platform": platform.platform()}


# the bundled task's lengths, as the demo runs it (tribune.trainer.pipeline.STAGE_DEFAULTS), so results stay comparable
BUNDLED_LENGTHS = {"max_length": 64, "max_prompt_length": 48}


def task_and_sft(tmp: Path, sft_steps: int) -> tuple[Path, Path]:
    """The bundled task and a short SFT run on it, as the benchmarks' starting point: (task dir, SFT dir)."""
    from tribune.services.common.config import build_config
    from tribune.trainer.sft import SFTConfig, run_sft
    from tribune.trainer.task.make import TaskConfig, make_task

    task, sft = Path(tmp) / "task", Path(tmp) / "sft"
    make_task(TaskConfig(pretrain_steps=0), task)     # speed only: random base weights do as well
    run_sft(build_config(SFTConfig, {"model": task / "base", "train": task / "sft.jsonl", "output": sft,
                                     "max_steps": sft_steps, "learning_rate": 3e-3, "gold_eval_prompts": 8,
                                     **BUNDLED_LENGTHS}))
    return task, sft


def bundled_repository(tmp: Path, sft_steps: int = 150, rm_steps: int = 50) -> Path:
    """The bundled task, short SFT and RM runs and their exported repository (tmp/repo): the cost
    of a PPO step does not depend on how well they are trained."""
    from tribune.trainer.export import ExportConfig, run_export
    from tribune.trainer.reward import RewardConfig, run_train_rm

    tmp = Path(tmp)
    task_and_sft(tmp, sft_steps=sft_steps)
    run_train_rm(RewardConfig(model=tmp / "sft", train=tmp / "task" / "prefs_train.jsonl",
                              eval=tmp / "task" / "prefs_eval.jsonl", output=tmp / "rm", max_steps=rm_steps,
                              stats_samples=32, **BUNDLED_LENGTHS))
    run_export(ExportConfig(reward=tmp / "rm", reference=tmp / "sft", output=tmp / "repo"))
    return tmp / "repo"


def write_result(out_dir: Path, name: str, result: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "machine": machine(), **result}, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path
