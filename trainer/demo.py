"""`tribune demo`: the whole pipeline on the bundled task (``tribune.trainer.pipeline``), then one call of
the text gateway as another system would make it, and a short summary.

``--sft``, ``--rm``, ``--export``, ``--ppo`` (or the same keys in YAML) set any option of
any stage.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tribune.services.common.config import field, group
from tribune.trainer.pipeline import StageOptions, run_pipeline, stage_configs

log = logging.getLogger("tribune")
DEMO_DATA_PROMPTS = 1000
# bundled's gold plateaus by then (0.716 at iteration 40, 0.708 at 60 in one `make demo`)
DEMO_PPO_ITERATIONS = 40


@dataclass(kw_only=True)
class DemoConfig:
    """The bundled-task pipeline: task make → sft → train-rm → export → serve → ppo."""
    output: Path = field(Path("runs/demo"), help="directory for every stage's output")
    seed: int = field(0, help="seed of the task and of every stage")
    max_steps: int | None = field(None, help="cap on optimiser steps of each training stage (for smoke runs)")
    stages: StageOptions = group(StageOptions(), help="each stage's options")

    def __post_init__(self) -> None:
        # unless told otherwise, the data step on half the training prompts and 40 PPO iterations: four
        # rankings per prompt on all 2,000 took the demo to about 6 minutes on 2 CPU cores, 60 iterations
        # to 5 min 16 s (`tribune evaluate` measures the pipeline's own defaults)
        self.stages = dataclasses.replace(
            self.stages, collect={"max_prompts": DEMO_DATA_PROMPTS, **self.stages.collect},
            ppo={"iterations": DEMO_PPO_ITERATIONS, **self.stages.ppo})
        stage_configs(self.output, self.seed, self.max_steps, self.stages)   # checked before anything runs


def gateway_score_call(target: str) -> dict:
    """What another system does: wait until the gateway serves, then one Score call (``RewardClient``)."""
    from tribune.services.client import ClientOptions
    from tribune.services.reward_client import RewardClient

    items = [{"prompt": "name three fruits", "response": "apple pear plum"},
             {"prompt": "name three fruits", "response": "apple red"}]
    with RewardClient(ClientOptions(timeout_s=30.0, connect_timeout_s=30.0).at(target)) as client:
        client.wait_for_ready()
        reply = client.score(items)
    return {"items": items, "rewards": reply.rewards.tolist(), "normalized_rewards": reply.normalized.tolist(),
            "model_id": reply.model_id}


def _per_prompt(counts: dict) -> int:
    """Samples per prompt of a collect run's counts."""
    return counts["candidates"] // max(1, counts["rows"])


def run_demo(cfg: DemoConfig) -> dict:
    t0 = time.perf_counter()
    with run_pipeline(cfg.output, cfg.seed, cfg.max_steps, cfg.stages, None, gateway=True) as (result, server):
        score_call = gateway_score_call(server.gateway_url)
    task, sft, rm, ppo = result.task, result.sft, result.rm, result.ppo
    sft_cfg, rm_cfg, export_cfg = result.stages.sft, result.stages.rm, result.stages.export
    report = {
        "demonstrator_gold_score": task["demonstrator_gold_score"],
        "sft_gold_score": sft.get("gold_score"),
        "sft_eval_loss": sft["eval_loss"],
        "rm_train": str(rm_cfg.train), "rm_eval": str(rm_cfg.eval),
        "collected_on_sft": result.collected,       # the data step's counts (None: --no-collect-sft)
        "rm_eval_accuracy": rm["eval_accuracy"],
        # the given pairs' weight kept among --given-weights, and each candidate's held-out loss (None: no choice)
        "rm_given_weight": rm.get("given_weight"), "rm_given_weight_eval_losses": rm.get("given_weight_eval_losses"),
        "rm_eval_gold_accuracy": rm.get("eval_gold_accuracy"),
        "rm_eval_equal_length_accuracy": rm.get("eval_equal_length_accuracy"),   # gold-free: 0.5 is length only
        "rm_reward_mean": rm["reward_mean"],
        "rm_reward_std": rm["reward_std"],
        "sft_policy": {"gold_score": ppo.get("sft/score"), "proxy_reward": ppo.get("sft/proxy_score")},
        "ppo_policy": {"gold_score": ppo.get("gold/score"), "proxy_reward": ppo.get("gold/proxy_score")},
        "ppo_final_kl": ppo.get("objective/kl"),
        "ppo_stopped_at": ppo.get("stopped_early_at"),     # the gold-free monitor's stop (stop_on_drift)
        "rounds": [{"round": rr.stages.round, "rm_eval_accuracy": rr.rm.get("eval_accuracy"),
                    "rm_eval_gold_accuracy": rr.rm.get("eval_gold_accuracy"), "collected": rr.collect,
                    "start_gold_score": rr.ppo.get("sft/score"), "gold_score": rr.ppo.get("gold/score"),
                    "proxy_reward": rr.ppo.get("gold/proxy_score"), "final_kl": rr.ppo.get("objective/kl"),
                    "outputs": {"rm": str(rr.stages.rm.output), "ppo": str(rr.stages.ppo.output)}}
                   for rr in result.rounds],
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
    c = report["collected_on_sft"]
    if c:
        w = report["rm_given_weight"]
        print(f"  reward model data: the given pairs{'' if w is None else f' (at weight {w:g}, kept on held-out loss)'}"
              f" + {c['rows']} rankings of {_per_prompt(c)} "
              f"πSFT samples each (the simulated rater); held-out set: the rater's rankings of πSFT samples")
    eq = report["rm_eval_equal_length_accuracy"]
    print(f"  reward model held-out accuracy: {report['rm_eval_accuracy']:.3f} on rater labels"
          + ("" if eq is None else f" ({eq:.3f} on pairs of equal length)")
          + f", {report['rm_eval_gold_accuracy']:.3f} on the gold ordering")
    print("  held-out prompts, sampled responses:      gold score   proxy reward (raw)")
    for name in ("sft_policy", "ppo_policy"):
        r = report[name]
        print(f"    {name:10s}                             {r['gold_score']:+.3f}        {r['proxy_reward']:+.3f}")
    print(f"  PPO final KL(πθ ‖ πSFT): {report['ppo_final_kl']:.3f} nats per response"
          + (f"; stopped at iteration {report['ppo_stopped_at']} by the gold-free over-optimisation monitor"
             if report["ppo_stopped_at"] else ""))
    for r in report["rounds"]:
        print(f"  round {r['round']}: reward model on {r['collected']['rows']} × {_per_prompt(r['collected'])} "
              f"collected samples + earlier data, gold-order accuracy {r['rm_eval_gold_accuracy'] or 0:.3f} on the "
              f"policy's own samples; PPO gold {r['start_gold_score'] or 0:+.3f} → {r['gold_score'] or 0:+.3f}, "
              f"KL {r['final_kl'] or 0:.3f}")
    print(f"  plot: {report['outputs']['plot']}; metrics: {report['outputs']['metrics']}")
    print(f"  one tribune.v1.RewardService/Score call through the gateway ({score_call['model_id']}):")
    for item, r, n in zip(score_call["items"], score_call["rewards"], score_call["normalized_rewards"]):
        print(f"    {item['prompt']!r:24s} → {item['response']!r:22s} reward {r:+.3f} (normalised {n:+.3f})")
    print(f"  finished in {report['elapsed_s']:.0f} s; report: {Path(cfg.output) / 'report.json'}")
    return report
