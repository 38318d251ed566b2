"""The pipeline's wiring (no training): which files each stage reads and writes, the data step included."""
import json
from pathlib import Path

import pytest

from tribune.trainer.pipeline import (StageOptions, merge_preferences, round_configs, sft_collection_configs,
                                      stage_configs)


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


def test_the_given_weight_marks_the_given_rows_and_leaves_the_rest(tmp_path):
    given, collected, out = tmp_path / "given.jsonl", tmp_path / "collected.jsonl", tmp_path / "merged.jsonl"
    given.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                     '{"prompt": "q", "chosen": "a", "rejected": "b", "weight": 3}\n'
                     'not json\n')
    collected.write_text('{"prompt": "p", "ranking": ["a", "b", "c"]}\n')
    assert merge_preferences([given, collected], out, weights=[0.5, 1.0]) == 4
    lines = out.read_text().splitlines()
    assert [json.loads(l).get("weight") for l in (lines[0], lines[1], lines[3])] == [0.5, 1.5, None]
    assert lines[2] == "not json"               # kept as it is: train-rm skips and counts it
    # weight 1 (the default) concatenates the files byte for byte
    merge_preferences([given, collected], out)
    assert out.read_text() == given.read_text() + collected.read_text()
    for bad in ([-1.0], [], [1.0, 1.0]):
        with pytest.raises(ValueError, match="given_weights must be one or more distinct non-negative numbers"):
            StageOptions(given_weights=bad)


def test_a_round_warm_starts_each_ensemble_member_from_its_own_weights(tmp_path):
    stages = stage_configs(tmp_path, 0, None, StageOptions(rm={"ensemble": 2, "member_model": ["a", "b"]}), "sequence")
    single = tmp_path / "rm"
    rm = round_configs(stages, 1, tmp_path / "ppo", single, StageOptions()).rm
    assert (rm.model, rm.member_model) == (single, [])
    # once the first reward model is an ensemble (its directory holds no model of its own)
    members = [single / f"member-{i}" for i in range(2)]
    for m in members:
        m.mkdir(parents=True)
        (m / "config.json").write_text("{}")
    (single / "ensemble.json").write_text(json.dumps({"ensemble_size": 2, "members": ["member-0", "member-1"]}))
    rm = round_configs(stages, 1, tmp_path / "ppo", single, StageOptions()).rm
    assert (rm.model, rm.member_model, rm.stats_policy) == (members[0], members, tmp_path / "ppo")


def _fake_data_step(tmp_path):
    """The files train_reward_model reads: the task's given pairs and the data step's rankings."""
    stages = stage_configs(tmp_path, 0, None, StageOptions(), "sequence")
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "prefs_train.jsonl").write_text('{"prompt": "sort b a", "chosen": "a b", "rejected": "b a"}\n')
    (tmp_path / "collected").mkdir()
    (tmp_path / "collected" / "prefs.jsonl").write_text('{"prompt": "sort c a", "ranking": ["a c", "c a", "a"]}\n')
    return stages


# the held-out loss the protocol double of train-rm reports, by the weight of the given rows it was given
FAKE_LOSS_AT = {1.0: 0.52, 0.5: 0.49}


def fake_train_rm(cfg):
    """A protocol double of train-rm: reads its training file, writes what train-rm writes, reports the
    held-out loss of ``FAKE_LOSS_AT`` (or of ``$FAKE_LOSS_AT``, JSON, in a worker process) and its pid."""
    import os

    loss_at = {float(k): v for k, v in json.loads(os.environ["FAKE_LOSS_AT"]).items()} \
        if "FAKE_LOSS_AT" in os.environ else FAKE_LOSS_AT
    rows = [json.loads(line) for line in Path(cfg.train).read_text().splitlines()]
    w = rows[0].get("weight", 1.0)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    metrics = {"eval_loss": loss_at[w], "weight_seen": w, "pid": os.getpid()}
    (Path(cfg.output) / "metrics.json").write_text(json.dumps(metrics))
    (Path(cfg.output) / "config.resolved.json").write_text(json.dumps({"output": str(cfg.output),
                                                                       "train": str(cfg.train)}))
    return metrics


def test_the_reward_model_of_lowest_held_out_loss_is_kept_and_moved_whole(tmp_path, monkeypatch):
    """train_reward_model with a protocol double of train-rm: the kept candidate becomes rm/ with its
    record, its training file becomes the stage's, the other stays a candidate, and an earlier run's
    model, export and candidates are gone."""
    from tribune.trainer.pipeline import rm_candidate, train_reward_model

    stages = _fake_data_step(tmp_path)
    monkeypatch.setitem(FAKE_LOSS_AT, 1.0, 0.52)
    stale = [tmp_path / "rm" / "old", tmp_path / "repository" / "old", tmp_path / "rm_candidates" / "given_weight_2"]
    for d in stale:
        d.mkdir(parents=True)
    metrics = train_reward_model(stages, StageOptions(), workers=1, train=fake_train_rm)
    assert metrics["given_weight"] == 0.5 and metrics["given_weight_eval_losses"] == {"1": 0.52, "0.5": 0.49}
    rm = tmp_path / "rm"
    assert json.loads((rm / "metrics.json").read_text()) == metrics and metrics["weight_seen"] == 0.5
    assert json.loads((rm / "config.resolved.json").read_text()) == {"output": str(rm), "train": str(stages.rm.train)}
    assert json.loads(Path(stages.rm.train).read_text().splitlines()[0])["weight"] == 0.5
    assert not rm_candidate(stages, 0.5).exists() and (rm_candidate(stages, 1.0) / "metrics.json").is_file()
    assert not any(d.exists() for d in stale)
    # a NaN loss is never kept, and equal losses keep the first weight
    monkeypatch.setitem(FAKE_LOSS_AT, 1.0, float("nan"))
    assert train_reward_model(stages, StageOptions(), workers=1, train=fake_train_rm)["given_weight"] == 0.5
    monkeypatch.setitem(FAKE_LOSS_AT, 1.0, 0.49)
    assert train_reward_model(stages, StageOptions(), workers=1, train=fake_train_rm)["given_weight"] == 1.0
    # one weight: no candidates, the stage's own directory
    assert train_reward_model(stages, StageOptions(given_weights=[0.5]), train=fake_train_rm)["weight_seen"] == 0.5
    assert not (tmp_path / "rm_candidates").exists()


def test_the_candidates_train_at_once_in_worker_processes(tmp_path, monkeypatch):
    """With two workers each candidate trains in a process of its own, its console in its own log, and
    the choice is the same as one after the other; a failing candidate stops the stage with its error."""
    import os

    from tribune.trainer.pipeline import rm_candidate, train_reward_model

    stages = _fake_data_step(tmp_path)
    monkeypatch.setenv("FAKE_LOSS_AT", json.dumps({"1.0": 0.47, "0.5": 0.49, "0.25": 0.48}))
    options = StageOptions(given_weights=[1.0, 0.5, 0.25])
    metrics = train_reward_model(stages, options, workers=2, train=fake_train_rm)
    assert metrics["given_weight"] == 1.0
    assert metrics["given_weight_eval_losses"] == {"1": 0.47, "0.5": 0.49, "0.25": 0.48}   # in the weights' order
    pids = {json.loads((rm_candidate(stages, w) / "metrics.json").read_text())["pid"] for w in (0.5, 0.25)}
    assert os.getpid() not in pids | {metrics["pid"]}
    assert (rm_candidate(stages, 0.5).parent / "train-rm.log").is_file()
    assert json.loads(Path(stages.rm.train).read_text().splitlines()[0]).get("weight", 1.0) == 1.0
    monkeypatch.setenv("FAKE_LOSS_AT", json.dumps({"1.0": 0.47}))           # weight 0.5's candidate raises
    with pytest.raises(KeyError):
        train_reward_model(stages, options, workers=2, train=fake_train_rm)
    assert not (tmp_path / "rm").exists()


def test_the_study_runs_the_candidate_the_pipeline_did_not_keep(tmp_path):
    from tribune.trainer.overoptimisation import not_kept_candidate
    from tribune.trainer.pipeline import rm_candidate

    stages = stage_configs(tmp_path, 0, None, StageOptions(), "sequence")
    first = rm_candidate(stages, 1.0)
    assert first == tmp_path / "rm_candidates" / "given_weight_1" / "rm"
    assert rm_candidate(stages, 0.5) == tmp_path / "rm_candidates" / "given_weight_0.5" / "rm"
    first.mkdir(parents=True)
    (first / "metrics.json").write_text("{}")
    assert not_kept_candidate(stages, StageOptions()) is None       # rm/ does not say it trained that candidate
    (tmp_path / "rm").mkdir()
    kept = {"given_weight": 0.5, "given_weight_eval_losses": {"1": 0.52, "0.5": 0.49}}
    (tmp_path / "rm" / "metrics.json").write_text(json.dumps(kept))
    assert not_kept_candidate(stages, StageOptions()) == first
    # the first weight is the one kept; one weight, or no data step: the pipeline's reward model is the only one
    assert not_kept_candidate(stages, StageOptions(given_weights=[0.5, 1.0])) is None
    assert not_kept_candidate(stages, StageOptions(given_weights=[1.0])) is None
    assert not_kept_candidate(stages, StageOptions(collect_sft=False)) is None


def test_without_the_data_step_the_given_and_collected_file_weighs_every_row_alike(tmp_path):
    from tribune.trainer.pipeline import collected_on_sft, merge_data_step

    stages = _fake_data_step(tmp_path)
    merge_data_step(stages, StageOptions(), 0.5)                    # an earlier run's kept file, at half weight
    collected_on_sft(stages, StageOptions(collect_sft=False))
    assert all("weight" not in json.loads(line) for line in Path(stages.rm.train).read_text().splitlines())
    with pytest.raises(ValueError, match="member_train"):
        StageOptions(rm={"member_train": ["a.jsonl"]})
