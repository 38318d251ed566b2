"""`tribune ppo` with LoRA (and bf16) against full fp32 fine-tuning: trainable parameters, step
time and peak memory, on the bundled pipeline.

    python bench/ppo_lora.py --output bench/results [--iterations 8 --lora-r 8]

Builds the bundled pipeline quickly (``bench.common.bundled_repository``), serves it with
`tribune serve`, then runs `tribune ppo` once per setting, each in its own process (its
peak resident memory comes from ``os.wait4``), against the same server with the same seed.
Step times are medians over the iterations after the first two.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bundled_repository, write_result  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_ppo(tmp: Path, url: str, name: str, iterations: int, extra: list[str]) -> dict:
    out = tmp / name
    log = (tmp / f"{name}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tribune.trainer", "ppo", "--policy", str(tmp / "sft"), "--prompts",
                             str(tmp / "task" / "prompts_train.jsonl"), "--reward-url", url, "--reference-url", url,
                             "--value-init", str(tmp / "rm"), "--output", str(out), "--iterations", str(iterations),
                             "--gold-every", str(10 ** 6), "--checkpoint-every", str(10 ** 6), *extra],
                            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    text = (tmp / f"{name}.log").read_text()
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{text[-3000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "time/step" in r][2:]
    trainable = [tuple(map(int, m)) for m in re.findall(r"(\d+) of (\d+) parameters trainable", text)]
    return {"policy_trainable_total": trainable[0] if trainable else None,
            "value_trainable_total": trainable[1] if len(trainable) > 1 else None,
            "iterations_measured": len(rows),
            "step_s": statistics.median(r["time/step"] for r in rows),
            "training_s": statistics.median(r["time/training"] for r in rows),
            "generation_s": statistics.median(r["time/generation"] for r in rows),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "final_objective_scores": rows[-1]["objective/scores"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", type=Path, default=Path("bench/results"))
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--lora-r", type=int, default=8)
    args = ap.parse_args()

    from tribune.services.launcher import start_serve

    settings = {"full_fp32": [], f"lora_r{args.lora_r}_fp32": ["--lora-r", str(args.lora_r)],
                "full_bf16": ["--mixed-precision", "bf16"],
                f"lora_r{args.lora_r}_bf16": ["--lora-r", str(args.lora_r), "--mixed-precision", "bf16"]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundled_repository(tmp)
        results = {}
        with start_serve(tmp / "repo", "--intra-op-threads", "1") as server:
            for name, extra in settings.items():
                results[name] = run_ppo(tmp, server.url, name, args.iterations, extra)
                print(name, results[name]["step_s"], "s/iteration", flush=True)
    full = results["full_fp32"]
    write_result(args.output, "ppo_lora", {
        "command": f"python bench/ppo_lora.py --iterations {args.iterations} --lora-r {args.lora_r}",
        "settings": results,
        "relative_to_full_fp32": {k: {"step_time": round(r["step_s"] / full["step_s"], 3),
                                      "training_time": round(r["training_s"] / full["training_s"], 3),
                                      "peak_memory": round(r["peak_rss_mb"] / full["peak_rss_mb"], 3)}
                                  for k, r in results.items()}})


if __name__ == "__main__":
    main()
