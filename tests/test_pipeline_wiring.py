"""The pipeline's wiring (no training): which files each stage reads and writes, the data step included."""
from pathlib import Path

import pytest

from tribune.trainer.pipeline import StageOptions, sft_collection_configs, stage_configs


def test_the_data_step_feeds_the_reward_model_the_given_pairs_and_the_collected_rankings(tmp_path):
    stages = stage_configs(tmp_path, 0, None, StageOptions(), "sequence")
    t, col = tmp_path / "task", tmp_path / "collected"
    assert Path(stages.rm.train) == col / "prefs_given_and_collected.jsonl"
    assert Path(stages.rm.eval) == col / "prefs_eval.jsonl"
    c = sft_collection_configs(stages, StageOptions())
    # every training prompt once (k samples of πSFT), and held-out prompts for early stopping
    assert Path(c.collect.policy) == tmp_path / "sft" and Path(c.collect.prompts) == t / "prompts_train.jsonl"
    assert c.collect.max_prompts is None and c.collect.k == 4
    assert Path(c.collect_eval.policy) == tmp_path / "sft" and Path(c.collect_eval.prompts) == t / "prompts_eval.jsonl"
    assert c.collect.seed != c.collect_eval.seed
    # the task's own rater, at the task's own noise
    assert c.label.rater.judge == stages.task.spec.judge and c.label.rater_temperature == stages.task.resolved().rater_temperature
    assert Path(c.label.input) == Path(c.collect.output) and Path(c.label_eval.output) == Path(stages.rm.eval)
    assert c.merged == Path(stages.rm.train)
    # --collect options reach it; the rounds keep their own default of 1,000 prompts
    assert sft_collection_configs(stages, StageOptions(collect={"max_prompts": 50})).collect.max_prompts == 50


def test_without_the_data_step_the_reward_model_trains_on_the_given_pairs(tmp_path):
    stages = stage_configs(tmp_path, 0, None, StageOptions(collect_sft=False), "bundled")
    assert Path(stages.rm.train) == tmp_path / "task" / "prefs_train.jsonl"
    assert Path(stages.rm.eval) == tmp_path / "task" / "prefs_eval.jsonl"


def test_bad_collect_options_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="CollectConfig"):
        stage_configs(tmp_path, 0, None, StageOptions(collect={"k": 1}), "bundled")
