"""Reward-model training throughput (pairs/s) on the bundled task, single process on CPU.

    python bench/rm_training.py --output bench/results [--steps 200]

Trains through the real `train_rm` code path (same collation, one forward pass per batch
of groups, Bradley–Terry loss, AdamW) and reports optimiser steps/s and preference
pairs/s, excluding start-up and the final evaluation.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BUNDLED_LENGTHS, task_and_sft, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", type=Path, default=Path("bench/results"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    from tribune.trainer.reward import RewardConfig, run_train_rm

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        task_and_sft(tmp, sft_steps=50)
        cfg = RewardConfig(model=tmp / "sft", train=tmp / "task" / "prefs_train.jsonl",
                           eval=tmp / "task" / "prefs_eval.jsonl", output=tmp / "rm", max_steps=args.steps,
                           batch_size=args.batch_size, log_every=args.steps, stats_samples=8,
                           checkpoint_every=10 ** 9, **BUNDLED_LENGTHS)
        t0 = time.perf_counter()
        run_train_rm(cfg)
        rows = [json.loads(l) for l in (tmp / "rm" / "metrics.jsonl").read_text().splitlines()]
        train_s = next(r["time/elapsed_s"] for r in rows if "time/elapsed_s" in r)
        total_s = time.perf_counter() - t0
        groups = [json.loads(l) for l in (tmp / "task" / "prefs_train.jsonl").read_text().splitlines()]
        pairs_per_row = sum(math.comb(len(g["ranking"]), 2) if "ranking" in g else 1 for g in groups) / len(groups)
    pairs = args.steps * args.batch_size * pairs_per_row
    write_result(args.output, "rm_training", {
        "command": "python bench/rm_training.py --steps %d" % args.steps,
        "steps": args.steps, "batch_rows": args.batch_size, "mean_pairs_per_row": round(pairs_per_row, 3),
        "train_seconds": round(train_s, 3), "steps_per_s": round(args.steps / train_s, 2),
        "pairs_per_s": round(pairs / train_s, 1), "wall_seconds_including_eval_and_stats": round(total_s, 2)})


if __name__ == "__main__":
    main()
