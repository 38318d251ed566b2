"""`tribune demo`: the whole pipeline on the bundled task, wired in one place.

Each stage's output directory is the next stage's input; the stage configs are the same
dataclasses the individual commands use, and ``DemoConfig`` holds each stage's options as
a mapping (YAML ``sft: {epochs: 3}`` or ``--sft epochs=3``), validated against that stage's
config, so every option of every stage can be set here.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.config import build_config, field
from services.common.errors import UserError
from services.launcher import free_port, start_serve
from trainer.export import ExportConfig, run_export
from trainer.ppo import run_ppo
from trainer.ppo_config import PPOConfig
from trainer.reward import RewardConfig, run_train_rm
from trainer.sft import SFTConfig, run_sft
from trainer.task.make import TaskConfig, make_task

log = logging.getLogger("tribune")

_PLACEHOLDER_URL = "127.0.0.1:1"   # replaced by the served address once `tribune serve` runs


@dataclass(kw_only=True)
class DemoConfig:
    """The bundled-task pipeline: task make → sft → train-rm → export → serve → ppo."""
    output: Path = field(Path("runs/demo"), help="directory for every stage's output")
    seed: int = field(0, help="seed of the task and of every stage")
    max_steps: int | None = field(None, help="cap on optimiser steps of each training stage (for smoke runs)")
    task: dict[str, Any] = field({}, help="options of `tribune task make`")
    sft: dict[str, Any] = field({"epochs": 3.0, "learning_rate": 3e-3}, help="options of `tribune sft`")
    rm: dict[str, Any] = field({"epochs": 4.0, "learning_rate": 1e-3}, help="options of `tribune train-rm`")
    export: dict[str, Any] = field({"instance_kind": "KIND_GPU"}, help="options of `tribune export`")
    ppo: dict[str, Any] = field({"iterations": 60, "learning_rate": 1e-4, "kl_coef": 0.1, "scoring_chunk": 32},
                                help="options of `tribune ppo`")

    def __post_init__(self) -> None:
        stage_configs(self)       # every stage's options are checked before anything runs


@dataclass(frozen=True)
class Stages:
    task: TaskConfig
    sft: SFTConfig
    rm: RewardConfig
    export: ExportConfig
    ppo: PPOConfig


def stage_configs(cfg: DemoConfig, reward_url: str = _PLACEHOLDER_URL) -> Stages:
    """The one place where a stage's output becomes the next stage's input."""
    out = Path(cfg.output)
    t = out / "task"
    common = {"seed": cfg.seed, **({"max_steps": cfg.max_steps} if cfg.max_steps else {})}

    def build(cls, wired: dict, overrides: dict):
        try:
            return build_config(cls, {**wired, **overrides})
        except UserError as e:
            raise ValueError(f"{cls.__name__}: {e}") from None

    task = build(TaskConfig, {"seed": cfg.seed}, cfg.task)
    judge = {"judge": task.spec.judge}      # the task's gold judge, plugged in like any other
    sft = build(SFTConfig, {"model": t / "base", "train": t / "sft.jsonl", "output": out / "sft", **judge, **common},
                cfg.sft)
    rm = build(RewardConfig, {"model": out / "sft", "train": t / "prefs_train.jsonl", "eval": t / "prefs_eval.jsonl",
                              "output": out / "rm", **judge, **common}, cfg.rm)
    export = build(ExportConfig, {"reward": out / "rm", "reference": out / "sft", "output": out / "repository",
                                  "overwrite": True}, cfg.export)
    iterations = int(cfg.ppo.get("iterations", 60))
    ppo = build(PPOConfig, {"policy": out / "sft", "prompts": t / "prompts_train.jsonl",
                            "eval_prompts": t / "prompts_eval.jsonl", "reward_url": reward_url,
                            "reference_url": reward_url, "output": out / "ppo", "value_init": out / "rm",
                            "gold_every": max(1, iterations // 6), **judge, **common}, cfg.ppo)
    return Stages(task, sft, rm, export, ppo)


def gateway_score_call(target: str) -> dict:
    """What another system does: one Score call with the generated stubs."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tribune.v1 import reward_pb2, reward_pb2_grpc

    items = [{"prompt": "name three fruits", "response": "apple pear plum"},
             {"prompt": "name three fruits", "response": "apple red"}]
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.time() + 30
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != \
                health_pb2.HealthCheckResponse.SERVING and time.time() < deadline:
            time.sleep(0.2)
        reply = reward_pb2_grpc.RewardServiceStub(channel).Score(
            reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(**i) for i in items]), timeout=30)
    return {"items": items, "rewards": list(reply.rewards), "normalized_rewards": list(reply.normalized_rewards),
            "model_id": reply.model_id}


def run_demo(cfg: DemoConfig) -> dict:
    stages = stage_configs(cfg)
    task_cfg, sft_cfg, rm_cfg, export_cfg = stages.task, stages.sft, stages.rm, stages.export
    t0 = time.perf_counter()
    log.info("1/6 task make → %s", Path(cfg.output) / "task")
    task = make_task(task_cfg, Path(cfg.output) / "task")
    log.info("2/6 sft → %s", sft_cfg.output)
    sft = run_sft(sft_cfg)
    log.info("3/6 train-rm → %s", rm_cfg.output)
    rm = run_train_rm(rm_cfg)
    log.info("4/6 export → %s", export_cfg.output)
    run_export(export_cfg)
    log.info("5/6 tribune serve --with-gateway (embedded Triton + text gateway) in a child process")
    gateway_port = free_port()
    with start_serve(export_cfg.output, "--with-gateway", "--gateway-port", str(gateway_port),
                     "--gateway-metrics-port", "0") as server:
        log.info("6/6 ppo against %s", server.url)
        ppo = run_ppo(stage_configs(cfg, server.url).ppo)
        score_call = gateway_score_call(f"127.0.0.1:{gateway_port}")
    report = {
        "demonstrator_gold_score": task["demonstrator_gold_score"],
        "sft_gold_score": sft.get("gold_score"),
        "sft_eval_loss": sft["eval_loss"],
        "rm_eval_accuracy": rm["eval_accuracy"],
        "rm_eval_gold_accuracy": rm.get("eval_gold_accuracy"),
        "rm_reward_mean": rm["reward_mean"],
        "rm_reward_std": rm["reward_std"],
        "sft_policy": {"gold_score": ppo.get("sft/score"), "proxy_reward": ppo.get("sft/proxy_score")},
        "ppo_policy": {"gold_score": ppo.get("gold/score"), "proxy_reward": ppo.get("gold/proxy_score")},
        "ppo_final_kl": ppo.get("objective/kl"),
        "gateway_score_call": score_call,
        "ppo_scoring_wait_share": ppo.get("time/scoring_wait", 0) / max(ppo.get("time/step", 1), 1e-9),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "outputs": {"task": str(Path(cfg.output) / "task"), "sft": str(sft_cfg.output), "rm": str(rm_cfg.output),
                    "repository": str(export_cfg.output), "ppo": str(Path(cfg.output) / "ppo"),
                    "plot": ppo.get("plot"), "metrics": str(Path(cfg.output) / "ppo" / "metrics.jsonl")},
    }
    (Path(cfg.output) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\nTribune demo")
    print(f"  SFT policy gold score (held-out, sampled): {report['sft_gold_score']:.3f}"
          f"   (demonstrator: {report['demonstrator_gold_score']:.3f}, perfect: 1.0)")
    print(f"  reward model held-out accuracy: {report['rm_eval_accuracy']:.3f} on rater labels, "
          f"{report['rm_eval_gold_accuracy']:.3f} on the gold ordering")
    print("  held-out prompts, sampled responses:      gold score   proxy reward (raw)")
    for name in ("sft_policy", "ppo_policy"):
        r = report[name]
        print(f"    {name:10s}                             {r['gold_score']:+.3f}        {r['proxy_reward']:+.3f}")
    print(f"  PPO final KL(πθ ‖ πSFT): {report['ppo_final_kl']:.3f} nats per response")
    print(f"  plot: {report['outputs']['plot']}; metrics: {report['outputs']['metrics']}")
    print(f"  one tribune.v1.RewardService/Score call through the gateway ({score_call['model_id']}):")
    for item, r, n in zip(score_call["items"], score_call["rewards"], score_call["normalized_rewards"]):
        print(f"    {item['prompt']!r:24s} → {item['response']!r:22s} reward {r:+.3f} (normalised {n:+.3f})")
    print(f"  finished in {report['elapsed_s']:.0f} s; report: {Path(cfg.output) / 'report.json'}")
    return report
