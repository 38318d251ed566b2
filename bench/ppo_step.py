"""PPO step time split into generation / scorer wait / training, scoring overlapped vs not, GAE vs RLOO.

    python bench/ppo_step.py --output bench/results [--iterations 20]

Builds the bundled pipeline quickly (short SFT and RM runs: the cost of a step does not
depend on how well they are trained), serves it with `tribune serve` in a child process,
then runs PPO three times in one run against the same server: with scoring overlapped with
generation and the policy's own forward passes, with each chunk awaited (sequential), and
overlapped with leave-one-out advantages (`--advantage-estimator rloo --samples-per-prompt 4`:
no value model to run or train). Target: scorer wait ≤ 10% of step time with overlap.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bundled_repository, write_result  # noqa: E402


def summarise(metrics_jsonl: Path, skip: int) -> dict:
    rows = [json.loads(l) for l in metrics_jsonl.read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r][skip:]
    med = {k: statistics.median(r[k] for r in rows) for k in ("time/generation", "time/scoring_wait",
                                                              "time/training", "time/step")}
    return {"iterations_measured": len(rows), **{k.split("/")[1] + "_s": v for k, v in med.items()},
            "scoring_wait_share": med["time/scoring_wait"] / med["time/step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", type=Path, default=Path("bench/results"))
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--rollout-batch-size", type=int, default=64)
    args = ap.parse_args()

    from tribune.services.launcher import start_serve
    from tribune.trainer.ppo import run_ppo
    from tribune.trainer.ppo_config import PPOConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundled_repository(tmp)
        results = {}
        with start_serve(tmp / "repo") as server:
            for mode, overlap, estimator in (("overlapped", True, "gae"), ("sequential", False, "gae"),
                                             ("rloo", True, "rloo")):
                cfg = PPOConfig(policy=tmp / "sft", prompts=tmp / "task" / "prompts_train.jsonl",
                                reward_url=server.url, reference_url=server.url, output=tmp / f"ppo_{mode}",
                                iterations=args.iterations, rollout_batch_size=args.rollout_batch_size,
                                overlap_scoring=overlap, checkpoint_every=10 ** 6, gold_every=10 ** 6,
                                advantage_estimator=estimator, samples_per_prompt=4 if estimator == "rloo" else 1)
                run_ppo(cfg)
                results[mode] = summarise(tmp / f"ppo_{mode}" / "metrics.jsonl", skip=2)
    write_result(args.output, "ppo_step", {
        "command": f"python bench/ppo_step.py --iterations {args.iterations}",
        "rollout_batch_size": args.rollout_batch_size, **results,
        "step_speedup_overlapped_vs_sequential": results["sequential"]["step_s"] / results["overlapped"]["step_s"],
        "training_speedup_rloo_vs_gae": results["overlapped"]["training_s"] / results["rloo"]["training_s"],
        "step_speedup_rloo_vs_gae": results["overlapped"]["step_s"] / results["rloo"]["step_s"],
        "target_scoring_wait_share": 0.10})


if __name__ == "__main__":
    main()
