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
