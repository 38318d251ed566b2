"""The reward model's data variants that `tribune evaluate --compare-collected` measures side by
side: the task's given pairs, the data step's rankings of πSFT's samples, both together (the
pipeline's default) and "collected, as many rows as given" (the same labelling budget in rows).
Each is trained from πSFT with the pipeline's settings and measured like the pipeline's own.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tribune.services.common.jsonl import SkipCounter
from tribune.services.judge import CallableJudge
from tribune.trainer.measures import best_of_n, onpolicy_accuracy, policy_row
from tribune.trainer.pipeline import StageOptions

if TYPE_CHECKING:
    from tribune.trainer.evaluate import EvaluateConfig

log = logging.getLogger("tribune")


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


def equal_rows_per_prompt(cfg: EvaluateConfig, stages) -> tuple[int, int]:
    """(R, the given pairs' rows): ``--collected-rows-per-prompt``, or the fewest rows of k πSFT
    samples per training prompt that make as many rated rows as the given pairs have."""
    from tribune.trainer.data import load_preference_groups, load_prompts
    from tribune.trainer.pipeline import given_pairs, sft_collection_configs

    c = sft_collection_configs(stages, cfg.stages)
    rows = sum(1 for _ in load_preference_groups(given_pairs(stages), SkipCounter()))
    prompts = len(load_prompts(Path(c.collect.prompts), SkipCounter())[:c.collect.max_prompts])
    return cfg.collected_rows_per_prompt or max(1, math.ceil(rows / prompts)), rows


def collected_equal_rows(cfg: EvaluateConfig, stages) -> Path:
    """The rater's rankings of R rows of k πSFT samples per training prompt, R chosen so that there
    are as many rated rows as the given pairs have (the same labelling budget in rows); collected
    now unless an earlier run left them with the same R."""
    from tribune.trainer.collect import run_collect
    from tribune.trainer.label import run_label
    from tribune.trainer.pipeline import sft_collection_configs

    out = variant_data(stages, "collected_equal_rows")[0]
    c = sft_collection_configs(stages, cfg.stages)
    r, rows = equal_rows_per_prompt(cfg, stages)
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


def compare_collected(cfg: EvaluateConfig, stages, candidates: Path, prompts: list[str]) -> dict:
    """Reward models on the other data variants than the pipeline's (the given pairs alone, the
    preferences collected on πSFT's samples alone, both together), same start and training
    settings, each measured like the pipeline's. Under ``--reuse`` a variant whose reward model
    and PPO run are finished is measured again, not retrained."""
    from tribune.trainer.pipeline import collected_on_sft

    from tribune.trainer.pipeline import sft_collection_configs

    t0 = time.perf_counter()
    collected_on_sft(stages, cfg.stages)
    left_out = {pipeline_variant(cfg.stages)}
    # left out when asked (0), or when the data step already collects that many rows ("collected" is it)
    if cfg.collected_rows_per_prompt == 0 or \
            equal_rows_per_prompt(cfg, stages)[0] == sft_collection_configs(stages, cfg.stages).collect.rows_per_prompt:
        left_out.add("collected_equal_rows")
    else:
        collected_equal_rows(cfg, stages)
    result = {name: _measure_variant(cfg, stages, name, *variant_data(stages, name), candidates, prompts)
              for name in VARIANTS if name not in left_out}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _measure_variant(cfg: EvaluateConfig, stages, name: str, train: Path, eval_file: Path, candidates: Path,
                     prompts: list[str]) -> dict:
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
    with start_serve(export.output, gateway=True) as server:
        bon = best_of_n(server.gateway_url, candidates, judge)
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
            **policy_row(cfg, ppo_cfg, stages.sft.output, judge, prompts)}
