"""What `tribune evaluate` measures of a policy and a reward model, with the task's gold judge
(never used for training): gold scores on held-out prompts with their standard error, the reward
model's accuracy against the gold ordering of a policy's own samples, and best-of-n through the
gateway's ``ScoreBestOfN``; the suite's targets (issue 9) and whether a row meets them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tribune.services.judge import CallableJudge, Judge, JudgeConfig

if TYPE_CHECKING:
    from tribune.trainer.evaluate import EvaluateConfig

# targets of the suite (issue 9): reward-model accuracy against the gold ordering, and the
# share of the headroom (perfect − πSFT) that PPO must win at every sampling setting
TARGET_RM_GOLD_ACCURACY = 0.85
TARGET_HEADROOM_SHARE = 0.25
PERFECT = 1.0


@torch.no_grad()
def policy_gold(policy_dir: Path, judge: Judge, prompts: list[str], *, temperature: float, max_prompt_length: int,
                max_new_tokens: int, seed: int, samples: int = 1) -> dict[str, float]:
    """Mean gold score and response length (tokens) of a policy's responses; temperature 0 is greedy.

    ``samples`` responses per prompt (one when greedy); ``gold_se`` is the standard error of the
    mean over prompts (each prompt's mean over its samples), the spread a second draw would show.
    """
    from tribune.services.common.text import load_tokenizer
    from tribune.trainer.modeling import load_causal_lm, sample_responses

    policy, tok = load_causal_lm(policy_dir).eval(), load_tokenizer(policy_dir)
    k = samples if temperature > 0 else 1
    golds, lengths = [], []
    # the suite's models are tiny: 512 sequences per generate call take a third of the time of 64
    for s in sample_responses(policy, tok, [p for p in prompts for _ in range(k)], max_prompt_length=max_prompt_length,
                              max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, chunk=512):
        golds += judge.score(s.prompts, s.texts)
        lengths += s.mask[:, s.P:].sum(-1).tolist()
    return {"gold": sum(golds) / len(golds), "gold_se": prompt_mean_se(golds, k),
            "length": sum(lengths) / len(lengths)}


def prompt_mean_se(values: list[float], k: int) -> float:
    """Standard error of the mean of ``values`` (k consecutive values per prompt) over prompts."""
    per_prompt = torch.tensor(values, dtype=torch.float64).view(-1, k).mean(1)     # (prompts,)
    return float(per_prompt.std() / per_prompt.numel() ** 0.5) if per_prompt.numel() > 1 else 0.0


def fell_beyond_noise(before: float, before_se: float, after: float, after_se: float, z: float = 2.0) -> bool:
    """``after`` is below ``before`` by more than ``z`` standard errors of the difference (two independent
    means, e.g. the gold score of one sample per held-out prompt at two points of a run)."""
    return before - after > z * math.hypot(before_se, after_se)


def at_chance(accuracy: float, n: int, z: float = 2.0) -> bool:
    """A pairwise ``accuracy`` over ``n`` independent comparisons is not above chance (0.5) by more than
    ``z`` standard errors (√(0.25 / n)): one-sided, so below chance counts too; False when there are none
    to judge by. Pairs drawn from one ranking are not independent: give the number of rankings, not of pairs."""
    return n > 0 and accuracy - 0.5 <= z * math.sqrt(0.25 / n)


def sampling_settings(sampling_t: float) -> list[tuple[str, float]]:
    return [(f"T={sampling_t:g}", sampling_t), ("T=0.7", 0.7), ("greedy", 0.0)]


def onpolicy_candidates(cfg: EvaluateConfig, policy: Path, prompts_path: Path, ppo_cfg, out: Path) -> Path:
    """``best_of_n`` samples per held-out prompt from ``policy`` (at PPO's sampling settings)."""
    from tribune.trainer.collect import CollectConfig, run_collect

    out.unlink(missing_ok=True)
    run_collect(CollectConfig(policy=policy, prompts=prompts_path, output=out, k=cfg.best_of_n,
                              temperature=ppo_cfg.temperature, max_new_tokens=ppo_cfg.max_new_tokens,
                              max_prompt_length=ppo_cfg.max_prompt_length, seed=cfg.seed + 5,
                              max_prompts=cfg.eval_prompts))
    return out


def gold_ranking_path(candidates: Path) -> Path:
    """Where the gold ranking of a candidates file is kept for the next model measured on the same
    samples: a name holding their digest, so samples drawn again (another policy, seed or size) are
    ranked afresh; rankings of earlier samples beside it are removed."""
    from tribune.services.repository import sha256_file

    candidates = Path(candidates)
    stem = candidates.name.removesuffix(".jsonl")
    path = candidates.with_name(f"{stem}.gold-{sha256_file(candidates)[:12]}.jsonl")
    for stale in candidates.parent.glob(f"{stem}.gold-*"):      # rankings and their .meta.json
        if not stale.name.startswith(path.name):
            stale.unlink()
    return path


def onpolicy_accuracy(rm_dir: Path, candidates: Path, judge_ref: str, rm_cfg) -> dict:
    """The reward model's accuracy against the gold ordering of a policy's own samples, and its
    reward/length correlation there (the noise-free gold ranking of each prompt's candidates)."""
    from tribune.trainer.label import LabelConfig, run_label
    from tribune.trainer.reward import evaluate_rm_dir

    gold_ranked = gold_ranking_path(candidates)
    if not gold_ranked.is_file():
        run_label(LabelConfig(input=candidates, output=gold_ranked, rater=JudgeConfig(judge=judge_ref),
                              rater_temperature=0.0))
    m = evaluate_rm_dir(rm_dir, gold_ranked, rm_cfg, CallableJudge(judge_ref))
    return {"accuracy": m.get("eval_gold_accuracy"), "length_correlation": m.get("eval_length_correlation"),
            "gold_length_correlation": m.get("eval_gold_length_correlation")}


def best_of_n(gateway: str, candidates: Path, judge: Judge) -> dict:
    """Best-of-n through ``tribune.v1.RewardService/ScoreBestOfN``: the gold score of the reward
    model's pick, of a random candidate (the mean) and of the best candidate (the oracle)."""
    import grpc

    from tribune.services.common.jsonl import read_jsonl
    from tribune.v1 import reward_pb2, reward_pb2_grpc

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    picked, mean, oracle = [], [], []
    with grpc.insecure_channel(gateway) as channel:
        # the gateway listens before its Triton connection is up: wait until it says SERVING
        for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120,
                                                              wait_for_ready=True):
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for _, row in read_jsonl(candidates):
            cands = list(dict.fromkeys(row["candidates"]))      # an empty one is scored as prompt + EOS
            golds = judge.score([row["prompt"]] * len(cands), cands)
            reply = stub.ScoreBestOfN(reward_pb2.BestOfNRequest(prompt=row["prompt"], candidates=cands),
                                      timeout=60, wait_for_ready=True)
            picked.append(golds[reply.best_index])
            mean.append(sum(golds) / len(golds))
            oracle.append(max(golds))
    avg = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"n": len(cands), "picked_gold": avg(picked), "random_gold": avg(mean), "oracle_gold": avg(oracle),
            "gain_over_random": avg(picked) - avg(mean)}


def policy_row(cfg: EvaluateConfig, ppo_cfg, start_policy: Path, judge: Judge, prompts: list[str]) -> dict:
    """Gold of πSFT and of the PPO output at each sampling setting; headroom share against πSFT."""
    row: dict = {}
    for name, temp in sampling_settings(ppo_cfg.temperature):
        common = dict(temperature=temp, max_prompt_length=ppo_cfg.max_prompt_length,
                      max_new_tokens=ppo_cfg.max_new_tokens, seed=cfg.seed + 3, samples=cfg.eval_samples)
        sft = policy_gold(start_policy, judge, prompts, **common)
        ppo = policy_gold(ppo_cfg.output, judge, prompts, **common)
        headroom = PERFECT - sft["gold"]
        row[name] = {"sft_gold": sft["gold"], "ppo_gold": ppo["gold"], "sft_gold_se": sft["gold_se"],
                     "ppo_gold_se": ppo["gold_se"], "sft_length": sft["length"],
                     "ppo_length": ppo["length"], "gain": ppo["gold"] - sft["gold"],
                     "headroom_share": (ppo["gold"] - sft["gold"]) / headroom if headroom > 1e-9 else 0.0}
    return row


def targets(row: dict, sampling_t: float) -> dict:
    first_two = [name for name, _ in sampling_settings(sampling_t)][:2]
    return {"meets_rm_target": (row["rm_gold_accuracy"] or 0) >= TARGET_RM_GOLD_ACCURACY,
            "meets_ppo_target": all(row[n]["headroom_share"] >= TARGET_HEADROOM_SHARE for n in first_two)}
