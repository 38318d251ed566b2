"""`--report-to` through accelerate's trackers: the names (the runs themselves are checked in
tests/test_console.py, on the same small runs)."""
import pytest

from tribune.trainer.tracking import hparams, parse_report_to, tracker_name, tracker_row


def test_report_to_names_and_tracker_metric_names():
    assert parse_report_to("tensorboard") == ["tensorboard"]
    assert parse_report_to("tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    assert parse_report_to("none") == []
    for bad in ("tensorbored", "none,wandb", ""):
        with pytest.raises(ValueError, match="report_to"):
            parse_report_to(bad)
    # the Hugging Face Trainer's names in trackers; PPO's are TRL's already
    assert tracker_name("eval_loss") == "eval/loss" and tracker_name("train/loss") == "train/loss"
    assert tracker_row({"eval_accuracy": 0.5, "objective/kl": 1, "flag": True, "names": ["a"]}) == \
        {"eval/accuracy": 0.5, "objective/kl": 1.0}
    assert hparams({"a": 1, "optim": {"learning_rate": 0.1}, "p": None, "l": [1]}) == \
        {"a": 1, "optim/learning_rate": 0.1, "p": "None", "l": "[1]"}


def test_metrics_log_starts_afresh_unless_the_run_resumes(task_dir, tmp_path):
    """metrics.jsonl left by an earlier run in the same --output: a fresh run drops every row of it (no
    step twice, no stale row), a resumed run keeps the rows up to its checkpoint."""
    import json

    from tribune.trainer.run import MetricsLog, Run, RunConfig, log_to_file

    old = "".join(json.dumps({"step": s, "x": s}) + "\n" for s in (0, 1, 2, 3))
    log = MetricsLog(tmp_path, enabled=True)
    log.path.write_text(old)
    log.truncate(1)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [0, 1]
    log.path.write_text(old)
    try:
        Run(RunConfig(output=tmp_path, report_to="none"), task_dir / "base", desc="fresh").begin()
    finally:
        log_to_file(None)           # the run's file handler, which finish() would remove
    assert log.path.read_text() == ""
