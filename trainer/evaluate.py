"""`tribune evaluate` (and `make eval`): the whole pipeline with default settings on every suite task.

Per task it runs ``tribune.trainer.pipeline`` (task make → sft → train-rm → export → serve → ppo)
and then measures, on held-out prompts and with the task's gold judge (never used for
training): the reward model's accuracy against the gold ordering, πSFT's and the PPO
policy's gold score at PPO's sampling temperature, at T = 0.7 and greedy, the final KL,
the response length and the wall time. It writes ``evaluation.json`` (one row per task)
and ``evaluation.png``, and prints the table.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import torch

from tribune.services.common.config import field, group
from tribune.services.common.errors import UserError
from tribune.services.common.jsonl import SkipCounter, write_json
from tribune.services.judge import CallableJudge, Judge, JudgeConfig
from tribune.trainer.pipeline import StageOptions, run_pipeline, run_rounds
from tribune.trainer.task.registry import TASKS

log = logging.getLogger("tribune")

# targets of the suite (issue 9): reward-model accuracy against the gold ordering, and the
# share of the headroom (perfect − πSFT) that PPO must win at every sampling setting
TARGET_RM_GOLD_ACCURACY = 0.85
TARGET_HEADROOM_SHARE = 0.25
PERFECT = 1.0


@dataclass(kw_only=True)
class EvaluateConfig:
    """The whole pipeline with its default settings on every suite task; a JSON table and a PNG."""
    output: Path = field(Path("runs/evaluate"), help="directory for every task's run and the table")
    tasks: list[str] = field(list(TASKS), help="suite tasks to run (default: every one)")
    seed: int = field(0, help="seed of every task and stage")
    max_steps: int | None = field(None, help="cap on optimiser steps of each training stage (for smoke runs)")
    stages: StageOptions = group(StageOptions(), help="options of each stage, the same for every task")
    eval_prompts: int = field(200, help="held-out prompts per task for the gold scores")
    eval_samples: int = field(4, help="sampled responses per held-out prompt for the gold scores at each temperature "
                                      "(greedy: one); more samples, a smaller standard error")
    overoptimisation_task: str | None = field("sequence", help="also run PPO with an aggressive setting on this task, "
                                              "against the single reward model and against an ensemble with the "
                                              "uncertainty penalty (none: skip)")
    aggressive: dict = field({"learning_rate": 3e-4, "kl_coef": 0.05},
                             help="the aggressive PPO options of the over-optimisation study")
    ensemble_size: int = field(3, help="members of the study's ensemble")
    study_members: Literal["seeds", "mixed"] = field("mixed", help="the study ensemble's members: seeds of the "
                                                     "given pairs, or mixed: member 0 on the given pairs, the others "
                                                     "on preferences collected on πSFT's samples (the task's rater)")
    reuse: bool = field(False, help="measure tasks whose pipeline outputs already exist under OUTPUT/TASK (from an "
                                    "earlier run with the same options) instead of training them again; --rounds "
                                    "then runs the iterated loop's rounds on them")
    compare_collected: bool = field(False, help="per task, also reward models trained on preferences collected on "
                                                "πSFT's samples (one ranking of k per training prompt, the task's rater) "
                                                "instead of the given pairs, and on both together: their accuracy on "
                                                "the policy's own samples, best-of-n and PPO gold, next to the given "
                                                "pairs' model")
    collected_rows_per_prompt: int | None = field(None, help="with --compare-collected: rows of k πSFT samples per "
                                                  "training prompt in the 'collected, as many rows as given' variant "
                                                  "(default: enough for as many rated rows as the given pairs have; "
                                                  "0: leave that variant out)")
    best_of_n: int = field(8, help="candidates sampled per held-out prompt for the reward model's accuracy on the "
                                   "policy's own samples and for best-of-n through the gateway's ScoreBestOfN")

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks: unknown {', '.join(unknown)}; the suite has {', '.join(TASKS)}")
        if self.eval_prompts < 1:
            raise ValueError("eval_prompts must be at least 1")
        if self.eval_samples < 1:
            raise ValueError("eval_samples must be at least 1")
        if self.collected_rows_per_prompt is not None and self.collected_rows_per_prompt < 0:
            raise ValueError("collected_rows_per_prompt must be non-negative (0: leave that variant out)")
        if self.best_of_n < 2:
            raise ValueError("best_of_n must be at least 2")
        if self.overoptimisation_task is not None and self.overoptimisation_task not in TASKS:
            raise ValueError(f"overoptimisation_task: unknown task {self.overoptimisation_task!r}")


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


def _settings(sampling_t: float) -> list[tuple[str, float]]:
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


def onpolicy_accuracy(rm_dir: Path, candidates: Path, judge_ref: str, rm_cfg) -> dict:
    """The reward model's accuracy against the gold ordering of a policy's own samples, and its
    reward/length correlation there (the noise-free gold ranking of each prompt's candidates)."""
    from tribune.trainer.label import LabelConfig, run_label
    from tribune.trainer.reward import evaluate_rm_dir

    gold_ranked = Path(str(candidates).removesuffix(".jsonl") + ".gold.jsonl")
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


def _policy_row(cfg: EvaluateConfig, ppo_cfg, start_policy: Path, judge: Judge, prompts: list[str]) -> dict:
    """Gold of πSFT and of the PPO output at each sampling setting; headroom share against πSFT."""
    row: dict = {}
    for name, temp in _settings(ppo_cfg.temperature):
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


def _targets(row: dict, sampling_t: float) -> dict:
    first_two = [name for name, _ in _settings(sampling_t)][:2]
    return {"meets_rm_target": (row["rm_gold_accuracy"] or 0) >= TARGET_RM_GOLD_ACCURACY,
            "meets_ppo_target": all(row[n]["headroom_share"] >= TARGET_HEADROOM_SHARE for n in first_two)}


def evaluate_task(cfg: EvaluateConfig, task: str) -> list[dict]:
    """One row for the pipeline on ``task`` and one per round of the iterated loop."""
    from tribune.services.launcher import free_port, start_serve
    from tribune.trainer.data import load_prompts

    t0 = time.perf_counter()
    out = Path(cfg.output) / task
    port = free_port()
    bon: dict[int, dict] = {}
    cands: dict[int, Path] = {}

    def while_served(r: int, stages, server) -> None:
        """With round ``r``'s reward model served: best-of-n on πSFT's samples through the gateway."""
        judge_ = CallableJudge(stages.task.spec.judge)
        if 0 not in cands:
            cands[0] = onpolicy_candidates(cfg, stages.sft.output, stages.ppo.eval_prompts, stages.ppo,
                                           out / "eval_candidates_sft.jsonl")
        bon[r] = best_of_n(f"127.0.0.1:{port}", cands[0], judge_)

    gateway = ("--with-gateway", "--gateway-port", str(port), "--gateway-metrics-port", "0")
    if cfg.reuse:
        result = reused_result(cfg, task)
        with start_serve(result.stages.export.output, *gateway) as server:
            while_served(0, result.stages, server)
        if cfg.stages.rounds:             # the rounds run on the finished first pipeline
            with run_rounds(result, cfg.stages, *gateway, while_served=while_served):
                pass
    else:
        with run_pipeline(out, cfg.seed, cfg.max_steps, cfg.stages, task, *gateway,
                          while_served=while_served) as (result, _server):
            pass
    stages = result.stages
    ppo_cfg, judge_ref = stages.ppo, stages.task.spec.judge
    judge = CallableJudge(judge_ref)
    prompts = load_prompts(ppo_cfg.eval_prompts, SkipCounter())[:cfg.eval_prompts]
    onpolicy = onpolicy_accuracy(stages.rm.output, cands[0], judge_ref, stages.rm)
    # gold-order accuracy on the task's held-out pairs, whichever set the reward model stopped on
    # (the data step's is the rater's ranking of held-out πSFT samples): one yardstick for every variant
    held_out = _held_out_accuracy(stages, stages.rm, result.rm)
    row: dict = {"task": task, "round": 0, "rm_data": pipeline_variant(cfg.stages),
                 "rm_eval_accuracy": result.rm.get("eval_accuracy"),
                 "rm_gold_accuracy": held_out.get("eval_gold_accuracy"),
                 "rm_length_correlation": held_out.get("eval_length_correlation"),
                 "rm_onpolicy_accuracy": onpolicy["accuracy"], "rm_onpolicy_length_correlation":
                 onpolicy["length_correlation"], "gold_onpolicy_length_correlation": onpolicy["gold_length_correlation"],
                 "best_of_n": bon.get(0), "ppo_final_kl": result.ppo.get("objective/kl"),
                 "ppo_iterations": ppo_cfg.total_iterations, "ppo_stopped_at": result.ppo.get("stopped_early_at"),
                 **_policy_row(cfg, ppo_cfg, stages.sft.output, judge, prompts)}
    row.update(_targets(row, ppo_cfg.temperature))
    row["stage_seconds"] = result.seconds
    if cfg.compare_collected:
        row["compared"] = compare_collected(cfg, stages, cands[0], prompts, gateway, port)
    rows = [row]
    for rr in result.rounds:
        rs = rr.stages
        # on the samples of the policy this round's PPO starts from
        onpolicy_r = onpolicy_accuracy(rs.rm.output, rs.collect_eval.output, judge_ref, rs.rm)
        held_out_r = _held_out_accuracy(stages, rs.rm, rr.rm)
        # the rounds' policies are compared with πSFT, like round 0's: gain is over the whole recipe
        r_row = {"task": task, "round": rs.round, "rm_eval_accuracy": rr.rm.get("eval_accuracy"),
                 "rm_gold_accuracy": held_out_r.get("eval_gold_accuracy"),
                 "rm_length_correlation": held_out_r.get("eval_length_correlation"),
                 "rm_onpolicy_accuracy": onpolicy_r["accuracy"],
                 "rm_onpolicy_length_correlation": onpolicy_r["length_correlation"],
                 "gold_onpolicy_length_correlation": onpolicy_r["gold_length_correlation"],
                 "best_of_n": bon.get(rs.round), "collected": rr.collect, "ppo_final_kl": rr.ppo.get("objective/kl"),
                 "ppo_iterations": rs.ppo.total_iterations, "ppo_stopped_at": rr.ppo.get("stopped_early_at"),
                 "stage_seconds": rr.seconds,
                 **_policy_row(cfg, rs.ppo, stages.sft.output, judge, prompts)}
        r_row.update(_targets(r_row, rs.ppo.temperature))
        rows.append(r_row)
    wall = round(time.perf_counter() - t0, 1)
    for r in rows:
        r["wall_s"] = wall
    return rows


def _held_out_accuracy(stages, rm_cfg, metrics: dict) -> dict:
    """A reward model's figures on the task's held-out pairs (``metrics``, its own, when it stopped on them)."""
    from tribune.trainer.reward import evaluate_rm_dir

    given_eval = variant_data(stages, "given")[1]
    if Path(rm_cfg.eval) == given_eval:
        return metrics
    return evaluate_rm_dir(rm_cfg.output, given_eval, rm_cfg, CallableJudge(stages.task.spec.judge))


def reused_result(cfg: EvaluateConfig, task: str):
    """The pipeline's result read back from an earlier run's files (``--reuse``)."""
    from tribune.trainer.pipeline import PipelineResult, stage_configs

    out = Path(cfg.output) / task
    stages = stage_configs(out, cfg.seed, cfg.max_steps, cfg.stages, task)
    need = [stages.sft.output / "metrics.json", stages.rm.output / "metrics.json", stages.ppo.output / "metrics.json",
            stages.export.output / "tribune.json", out / "task" / "task.json"]
    missing = [str(p) for p in need if not Path(p).is_file()]
    if missing:
        raise UserError(f"--reuse: {task} has no finished run under {out} (missing {', '.join(missing)})")
    read = lambda p: json.loads(Path(p).read_text())  # noqa: E731
    return PipelineResult(stages, read(need[4]), read(need[0]), read(need[1]), read(need[2]), {})


VARIANTS = ("given", "collected", "given_and_collected", "collected_equal_rows")


def variant_data(stages, name: str) -> tuple[Path, Path]:
    """(training file, early-stopping file) of a reward-model data variant: the task's given pairs
    (and its held-out pairs), the data step's collected rankings, or both (the rater's ranking of
    held-out πSFT samples)."""
    from tribune.trainer.pipeline import given_pairs, sft_collection_paths

    paths = sft_collection_paths(Path(stages.sft.output).parent)
    return {"given": (given_pairs(stages), given_pairs(stages).with_name("prefs_eval.jsonl")),
            "collected": (paths["collected"], paths["eval"]),
            "given_and_collected": (paths["train"], paths["eval"]),
            "collected_equal_rows": (paths["collected"].parent / "equal_rows" / "prefs.jsonl", paths["eval"])}[name]


def collected_equal_rows(cfg: EvaluateConfig, stages) -> Path:
    """The rater's rankings of R rows of k πSFT samples per training prompt, R chosen so that there
    are as many rated rows as the given pairs have (the same labelling budget in rows); collected
    now unless an earlier run left them with the same R."""
    from tribune.trainer.collect import run_collect
    from tribune.trainer.data import load_preference_groups, load_prompts
    from tribune.trainer.label import run_label
    from tribune.trainer.pipeline import given_pairs, sft_collection_configs

    out = variant_data(stages, "collected_equal_rows")[0]
    c = sft_collection_configs(stages, cfg.stages)
    rows = sum(1 for _ in load_preference_groups(given_pairs(stages), SkipCounter()))
    prompts = len(load_prompts(Path(c.collect.prompts), SkipCounter())[:c.collect.max_prompts])
    r = cfg.collected_rows_per_prompt or max(1, math.ceil(rows / prompts))
    collect = dataclasses.replace(c.collect, rows_per_prompt=r, output=out.with_name("candidates.jsonl"))
    meta = Path(str(collect.output) + ".meta.json")
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()).get("settings", {}).get("rows_per_prompt") == r:
        return out          # an earlier run's, with the same number of rows per prompt
    Path(collect.output).unlink(missing_ok=True)
    # a reward model trained on other rows is not reused (--reuse): it trains again on these
    (Path(stages.rm.output).parent / "rm_collected_equal_rows" / "metrics.json").unlink(missing_ok=True)
    log.info("compare: %d row(s) of %d πSFT samples per training prompt (the given pairs have %d rows)", r,
             collect.k, rows)
    run_collect(collect)
    run_label(dataclasses.replace(c.label, input=collect.output, output=out))
    return out


def pipeline_variant(options: StageOptions) -> str:
    return "given_and_collected" if options.collect_sft else "given"


def compare_collected(cfg: EvaluateConfig, stages, candidates: Path, prompts: list[str], gateway: tuple,
                      port: int) -> dict:
    """Reward models on the other data variants than the pipeline's (the given pairs alone, the
    preferences collected on πSFT's samples alone, both together), same start and training
    settings, each measured like the pipeline's. Under ``--reuse`` a variant whose reward model
    and PPO run are finished is measured again, not retrained."""
    from tribune.trainer.pipeline import collected_on_sft

    t0 = time.perf_counter()
    collected_on_sft(stages, cfg.stages)
    left_out = {pipeline_variant(cfg.stages)}
    if cfg.collected_rows_per_prompt == 0:
        left_out.add("collected_equal_rows")
    else:
        collected_equal_rows(cfg, stages)
    result = {name: _measure_variant(cfg, stages, name, *variant_data(stages, name), candidates, prompts, gateway, port)
              for name in VARIANTS if name not in left_out}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _measure_variant(cfg: EvaluateConfig, stages, name: str, train: Path, eval_file: Path, candidates: Path,
                     prompts: list[str], gateway: tuple, port: int) -> dict:
    """One reward model of the comparison (``rm_NAME``), trained on ``train`` like the pipeline's:
    held-out gold accuracy, accuracy on πSFT's own samples, best-of-n and PPO gold (``ppo_NAME``)."""
    from tribune.services.launcher import start_serve
    from tribune.trainer.data import load_preference_groups
    from tribune.trainer.export import run_export
    from tribune.trainer.losses import ranking_to_pairs
    from tribune.trainer.ppo import run_ppo
    from tribune.trainer.reward import evaluate_rm_dir, run_train_rm

    out = Path(stages.rm.output).parent
    rm_cfg = dataclasses.replace(stages.rm, train=train, eval=eval_file, output=out / f"rm_{name}")
    export = dataclasses.replace(stages.export, reward=rm_cfg.output, output=out / f"repository_{name}")
    ppo_dir = out / f"ppo_{name}"
    judge = CallableJudge(stages.task.spec.judge)
    done = all((d / "metrics.json").is_file() for d in (rm_cfg.output, ppo_dir)) and \
        (Path(export.output) / "tribune.json").is_file()
    if cfg.reuse and done:
        log.info("compare: reusing %s and %s", rm_cfg.output, ppo_dir)
        metrics = json.loads((rm_cfg.output / "metrics.json").read_text())
    else:
        log.info("compare: reward model on %s → %s", train, rm_cfg.output)
        metrics = run_train_rm(rm_cfg)
        run_export(export)
    given_eval = evaluate_rm_dir(rm_cfg.output, variant_data(stages, "given")[1], stages.rm, judge)
    onpolicy = onpolicy_accuracy(rm_cfg.output, candidates, stages.task.spec.judge, stages.rm)
    with start_serve(export.output, *gateway) as server:
        bon = best_of_n(f"127.0.0.1:{port}", candidates, judge)
        ppo_cfg = dataclasses.replace(stages.ppo, reward_url=server.url, reference_url=server.url,
                                      value_init=rm_cfg.output, preferred_eval=rm_cfg.eval, output=ppo_dir)
        if cfg.reuse and done:
            ppo = json.loads((ppo_dir / "metrics.json").read_text())
        else:
            log.info("compare: ppo against it → %s", ppo_dir)
            ppo = run_ppo(ppo_cfg)

    pairs = lambda p: sum(len(ranking_to_pairs(len(g.responses))) for g in load_preference_groups(p, SkipCounter()))  # noqa: E731
    return {"train_pairs": pairs(train), "pipeline_train_pairs": pairs(stages.rm.train),
            "rm_gold_accuracy": given_eval.get("eval_gold_accuracy"),
            "rm_onpolicy_accuracy": onpolicy["accuracy"], "rm_onpolicy_length_correlation":
            onpolicy["length_correlation"], "rm_collected_eval_gold_accuracy": metrics.get("eval_gold_accuracy"),
            "best_of_n": bon, "ppo_final_kl": ppo.get("objective/kl"),
            **_policy_row(cfg, ppo_cfg, stages.sft.output, judge, prompts)}


def _trajectory(ppo_dir: Path) -> dict:
    """Gold and proxy on held-out prompts at each gold evaluation, and the gold-free alarms, from metrics.jsonl."""
    rows = [json.loads(l) for l in (Path(ppo_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    gold = [(r["step"], r["gold/score"], r["gold/proxy_score"]) for r in rows if "gold/score" in r]
    warned = [r["step"] for r in rows if r.get("monitor/overoptimisation_warning")]
    # the gold score when the monitor first warned: at the last gold evaluation up to that iteration
    before = [g for st, g, _ in gold if warned and st <= warned[0]]
    return {"gold_trajectory": gold, "first_warning_at": warned[0] if warned else None,
            "gold_at_warning": before[-1] if before else None,
            "final_proxy_past_preferred": next((r["monitor/proxy_past_preferred"] for r in reversed(rows)
                                                if "monitor/proxy_past_preferred" in r), None),
            "gold_hacking_warnings": sum(int(r.get("gold/hacking_warning", 0)) for r in rows),
            "final_kl": next((r["objective/kl"] for r in reversed(rows) if "objective/kl" in r), None),
            "final_length_ratio": next((r["monitor/length_ratio"] for r in reversed(rows)
                                        if "monitor/length_ratio" in r), None)}


def overoptimisation_study(cfg: EvaluateConfig, task: str) -> dict:
    """Aggressive PPO against the single reward model and against an ensemble with the uncertainty
    penalty, from the same πSFT: does the gold score fall while the proxy rises, and does the
    gold-free monitor warn first?"""

    from tribune.services.common.config import build_config
    from tribune.services.launcher import start_serve
    from tribune.trainer.export import run_export
    from tribune.trainer.ppo import run_ppo
    from tribune.trainer.ppo_config import PPOConfig
    from tribune.trainer.reward import run_train_rm
    from tribune.trainer.pipeline import stage_configs

    out = Path(cfg.output) / task
    stages = stage_configs(out, cfg.seed, cfg.max_steps, cfg.stages, task)
    member_train = []
    if cfg.study_members == "mixed":
        from tribune.trainer.pipeline import collected_on_sft

        member_train = [variant_data(stages, "given")[0], collected_on_sft(stages, cfg.stages)]
    ensemble_rm = dataclasses.replace(stages.rm, output=out / "rm_ensemble", ensemble=cfg.ensemble_size,
                                      member_train=member_train)
    log.info("over-optimisation study on %s: %d-member ensemble (%s) → %s", task, cfg.ensemble_size,
             cfg.study_members, ensemble_rm.output)
    run_train_rm(ensemble_rm)
    run_export(dataclasses.replace(stages.export, reward=ensemble_rm.output, output=out / "repository_ensemble"))
    runs = {}
    for name, repo, extra in (("single_rm", stages.export.output, {}),
                              ("ensemble_uncertainty", out / "repository_ensemble",
                               {"ensemble_reward": "uncertainty", "value_init": ensemble_rm.output / "member-0"})):
        with start_serve(repo) as server:
            base = {k: getattr(stages.ppo, k) for k in ("policy", "prompts", "eval_prompts", "value_init",
                                                        "preferred_eval")}
            ppo_cfg = build_config(PPOConfig, {**{k: v for k, v in vars(stages.ppo).items()
                                                  if k in ("seed", "iterations", "scoring_chunk", "gold_every",
                                                           "max_steps") and v is not None},
                                               **base, "judge": stages.ppo.gold.judge, "reward_url": server.url,
                                               "reference_url": server.url, "output": out / f"ppo_{name}",
                                               # the whole trajectory, past the monitor's first warning
                                               "stop_on_drift": False, **cfg.aggressive, **extra})
            log.info("over-optimisation study: ppo (%s, %s) → %s", name, cfg.aggressive, ppo_cfg.output)
            metrics = run_ppo(ppo_cfg)
        runs[name] = {"sft_gold": metrics.get("sft/score"), "final_gold": metrics.get("gold/score"),
                      "sft_proxy": metrics.get("sft/proxy_score"), "final_proxy": metrics.get("gold/proxy_score"),
                      **_trajectory(ppo_cfg.output)}
        r = runs[name]
        r["overoptimised"] = bool(r["final_gold"] is not None and r["final_gold"] < r["sft_gold"]
                                  and r["final_proxy"] > r["sft_proxy"])
    return {"task": task, "aggressive": cfg.aggressive, "ensemble_size": cfg.ensemble_size,
            "members": cfg.study_members, "runs": runs}


def row_name(r: dict) -> str:
    """``task`` for the pipeline's row, ``task·rN`` for round N of the iterated loop."""
    return r["task"] + (f"·r{r['round']}" if r.get("round") else "")


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [k for k in rows[0] if isinstance(rows[0][k], dict) and "ppo_gold" in rows[0][k]]
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(4.5 * (len(settings) + 1), 4))
    x = range(len(rows))
    for ax, name in zip(axes, settings):
        for shift, who, label in ((-0.2, "sft", "πSFT"), (0.2, "ppo", "PPO")):     # error bars: ± one standard error
            ax.bar([i + shift for i in x], [r[name][f"{who}_gold"] for r in rows], 0.4, label=label,
                   yerr=[r[name][f"{who}_gold_se"] for r in rows], capsize=3)
        ax.axhline(PERFECT, color="grey", lw=0.8, ls="--")
        ax.set_xticks(list(x), [row_name(r) for r in rows], rotation=30)
        ax.set_title(f"held-out gold score, {name}")
        ax.legend(fontsize=8)
    ax = axes[-1]
    ax.bar(list(x), [r["rm_gold_accuracy"] or 0 for r in rows])
    ax.axhline(TARGET_RM_GOLD_ACCURACY, color="red", lw=0.8, ls="--")
    ax.set_ylim(0.5, 1.0)
    ax.set_xticks(list(x), [row_name(r) for r in rows], rotation=30)
    ax.set_title("reward model: gold-order accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(rows: list[dict]) -> list[str]:
    settings = [k for k in rows[0] if isinstance(rows[0][k], dict) and "ppo_gold" in rows[0][k]]
    head = ("task        RM gold-acc  own-samples  best-of-n  " + "  ".join(f"{s:>22s}" for s in settings)
            + "   KL    len SFT→PPO  stop   wall")
    lines = [head, " " * 22 + "(acc, gain)  " + " " * 12 + "  ".join(f"{'SFT → PPO ± se':>22s}" for _ in settings)]
    for r in rows:
        first, bon = r[settings[0]], r.get("best_of_n") or {}
        lines.append(f"{row_name(r):<11s} {r['rm_gold_accuracy'] or 0:>10.3f}  {r.get('rm_onpolicy_accuracy') or 0:>11.3f}"
                     f"  {bon.get('gain_over_random', 0):>+9.3f}  "
                     + "  ".join(f"{r[s]['sft_gold']:+.3f} → {r[s]['ppo_gold']:+.3f} ± {r[s]['ppo_gold_se']:.3f}"
                                 for s in settings)
                     + f"  {r['ppo_final_kl'] or 0:5.2f}  {first['sft_length']:4.1f} → {first['ppo_length']:4.1f}"
                     + f"  {r.get('ppo_stopped_at') or '-':>4}  {r['wall_s']:5.0f}s")
    return lines


DATA_LABELS = {"given": "given pairs", "collected": "collected on πSFT's samples",
               "given_and_collected": "given + collected", "collected_equal_rows": "collected, as many rows as given"}


def comparison_lines(rows: list[dict]) -> list[str]:
    """The pipeline's reward model next to those of ``--compare-collected``, per task."""
    rows = [r for r in rows if r.get("compared")]
    if not rows:
        return []
    settings = [k for k in rows[0] if isinstance(rows[0][k], dict) and "ppo_gold" in rows[0][k]][:2]
    lines = ["reward models on other preference data than the pipeline's (same start and settings):",
             "task        data: pipeline's → other                                pairs  own-samples acc  held-out gold acc  "
             "best-of-n gain  " + "  ".join(f"PPO gold {s} (SFT → pipeline | other)" for s in settings)]
    for r in rows:
        for key, c in r["compared"].items():
            if not isinstance(c, dict):
                continue
            label = f"{DATA_LABELS[r.get('rm_data', 'given')]} → {DATA_LABELS[key]}"
            lines.append(f"{r['task']:<11s} {label:<55s} {c['pipeline_train_pairs']:>6d} → {c['train_pairs']:<6d}  "
                         f"{r['rm_onpolicy_accuracy'] or 0:.3f} → {c['rm_onpolicy_accuracy'] or 0:.3f}    "
                         f"{r['rm_gold_accuracy'] or 0:.3f} → {c['rm_gold_accuracy'] or 0:.3f}     "
                         f"{(r['best_of_n'] or {}).get('gain_over_random', 0):+.3f} → "
                         f"{c['best_of_n']['gain_over_random']:+.3f}  "
                         + "  ".join(f"{r[s]['sft_gold']:+.3f} → {r[s]['ppo_gold']:+.3f} | {c[s]['ppo_gold']:+.3f}"
                                     for s in settings))
    return lines


def study_lines(study: dict | None) -> list[str]:
    if not study:
        return []
    lines = [f"over-optimisation study ({study['task']}, PPO {study['aggressive']}, {study['ensemble_size']}-member "
             f"ensemble of {study.get('members', 'seeds')}):"]
    for name, r in study["runs"].items():
        lines.append(f"  {name:<21s} gold {r['sft_gold']:+.3f} → {r['final_gold']:+.3f}, proxy {r['sft_proxy']:+.3f} → "
                     f"{r['final_proxy']:+.3f}, KL {r['final_kl'] or 0:.2f}, length ×{r['final_length_ratio'] or 0:.2f}; "
                     f"over-optimised: {r['overoptimised']}; gold-free warning at iteration {r['first_warning_at']}"
                     + (f" (gold then {r['gold_at_warning']:+.3f})" if r.get("gold_at_warning") is not None else ""))
    return lines


def run_evaluate(cfg: EvaluateConfig) -> dict:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for i, task in enumerate(cfg.tasks, 1):
        log.info("evaluate: task %d/%d: %s", i, len(cfg.tasks), task)
        rows += evaluate_task(cfg, task)
        write_json(out / "evaluation.json", {"rows": rows, "complete": False})
    if not rows:
        raise UserError("no task to evaluate")
    study = overoptimisation_study(cfg, cfg.overoptimisation_task) if cfg.overoptimisation_task else None
    summary = {"rows": rows, "overoptimisation": study, "complete": True, "wall_s": round(time.perf_counter() - t0, 1),
               "targets": {"rm_gold_accuracy": TARGET_RM_GOLD_ACCURACY, "headroom_share": TARGET_HEADROOM_SHARE},
               "all_targets_met": all(r["meets_rm_target"] and r["meets_ppo_target"] for r in rows)}
    write_json(out / "evaluation.json", summary)
    png = plot(rows, out / "evaluation.png")
    print("\n".join(["", "Tribune evaluation (held-out prompts, gold judge)", *table(rows), *comparison_lines(rows), *study_lines(study),
                     f"targets: RM gold accuracy ≥ {TARGET_RM_GOLD_ACCURACY}, PPO gain ≥ {TARGET_HEADROOM_SHARE:.0%} "
                     f"of the headroom at the sampling T and T=0.7; all met: {summary['all_targets_met']}",
                     f"finished in {summary['wall_s']:.0f} s; {out / 'evaluation.json'}; {png}"]))
    return {"evaluation": str(out / "evaluation.json"), "plot": str(png), "all_targets_met": summary["all_targets_met"]}
