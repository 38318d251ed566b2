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

from services.export import ExportConfig, run_export
from services.launcher import free_port, start_serve
from trainer.config import field
from trainer.ppo import PPOConfig, run_ppo
from trainer.reward import RewardConfig, run_train_rm
from trainer.sft import SFTConfig, run_sft
from trainer.task.make import TaskConfig, make_task

log = logging.getLogger("tribune")


@dataclass(kw_only=True)
class DemoConfig:
    """The bundled-task pipeline: task make → sft → train-rm → export → serve → ppo."""
    output: Path = field(Path("runs/demo"), help="directory for every stage's output")
    seed: int = field(0, help="seed of the task and of every stage")
    sft_epochs: float = field(3.0, help="SFT passes over the demonstrations")
    rm_epochs: float = field(4.0, help="reward-model passes over the preference rows")
    ppo_iterations: int = field(60, help="PPO iterations against the served models")
    ppo_learning_rate: float = field(1e-4, help="PPO policy learning rate")
    kl_coef: float = field(0.1, help="β of the KL penalty in PPO")
    max_steps: int | None = field(None, help="cap on optimiser steps of each training stage (for smoke runs)")


def stage_configs(cfg: DemoConfig) -> tuple[TaskConfig, SFTConfig, RewardConfig, ExportConfig]:
    """The one place where a stage's output becomes the next stage's input."""
    out = Path(cfg.output)
    task = TaskConfig(seed=cfg.seed)
    sft = SFTConfig(model=out / "task" / "base", train=out / "task" / "sft.jsonl", output=out / "sft",
                    seed=cfg.seed, epochs=cfg.sft_epochs, max_steps=cfg.max_steps, learning_rate=3e-3)
    rm = RewardConfig(model=out / "sft", train=out / "task" / "prefs_train.jsonl",
                      eval=out / "task" / "prefs_eval.jsonl", output=out / "rm", seed=cfg.seed,
                      epochs=cfg.rm_epochs, max_steps=cfg.max_steps, learning_rate=1e-3)
    export = ExportConfig(reward=out / "rm", reference=out / "sft", output=out / "repository", overwrite=True,
                          instance_kind="KIND_GPU")
    return task, sft, rm, export


def ppo_config(cfg: DemoConfig, url: str) -> PPOConfig:
    out = Path(cfg.output)
    return PPOConfig(policy=out / "sft", prompts=out / "task" / "prompts_train.jsonl",
                     eval_prompts=out / "task" / "prompts_eval.jsonl", reward_url=url, reference_url=url,
                     output=out / "ppo", value_init=out / "rm", seed=cfg.seed, iterations=cfg.ppo_iterations,
                     max_steps=cfg.max_steps, learning_rate=cfg.ppo_learning_rate, kl_coef=cfg.kl_coef,
                     scoring_chunk=32, gold_every=max(1, cfg.ppo_iterations // 6))


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
    task_cfg, sft_cfg, rm_cfg, export_cfg = stage_configs(cfg)
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
        ppo = run_ppo(ppo_config(cfg, server.url))
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
