"""Reward-model training without per-task tuning: periodic evaluation, the best weights kept by
held-out loss, early stopping, and the reward/length correlation — through the real CLI."""
import dataclasses
import json
import shutil

import pytest
import torch

from tests.conftest import JUDGE, tribune, with_other_token_ids

pytestmark = pytest.mark.slow


def _rm(task_dir, sft_dir, out, *extra):
    tribune("train-rm", "--model", sft_dir, "--train", task_dir / "prefs_train.jsonl", "--eval",
            task_dir / "prefs_eval.jsonl", "--output", out, "--stats-samples", "16", *JUDGE, *map(str, extra))
    log = out / "metrics.jsonl"            # an ensemble's rows are in its members' directories
    rows = [json.loads(l) for l in log.read_text().splitlines()] if log.is_file() else []
    return json.loads((out / "metrics.json").read_text()), rows


def test_best_weights_are_kept_and_training_stops_when_held_out_loss_stalls(task_dir, sft_dir, tmp_path):
    # a far too large learning rate: held-out loss gets worse after a while, so the best
    # evaluation is not the last one and the run must end with its weights
    metrics, rows = _rm(task_dir, sft_dir, tmp_path / "rm", "--max-steps", "60", "--eval-every", "5",
                        "--learning-rate", "0.03", "--warmup-ratio", "0", "--early-stopping-patience", "3")
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and r["step"] < 60]
    assert len(evals) >= 3
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert metrics["eval_loss"] <= min(l for _, l in evals) + 1e-6          # the final weights are the best seen
    if metrics.get("stopped_early_at"):
        assert metrics["stopped_early_at"] < 60
        assert metrics["stopped_early_at"] - best_step == 3 * 5            # patience evaluations after the best
    assert metrics["best_step"] == best_step or metrics["eval_loss"] < best_loss
    assert -1.0 <= metrics["eval_length_correlation"] <= 1.0
    assert -1.0 <= metrics["eval_gold_length_correlation"] <= 1.0


def test_at_chance_against_a_float64_reference():
    import math

    from tribune.trainer.measures import at_chance

    for acc, n, z in ((0.517, 755, 2.0), (0.638, 644, 2.0), (0.55, 100, 2.0), (0.56, 100, 2.0), (0.4, 10, 2.0),
                      (0.55, 100, 1.0)):
        want = acc - 0.5 <= z * math.sqrt(0.25 / n)
        assert at_chance(acc, n, z) == want
    assert at_chance(0.517, 755) and not at_chance(0.638, 644)       # keyword's reward model, bundled's
    assert not at_chance(0.5, 0)                                     # nothing to judge by


def test_equal_length_accuracy_counts_only_the_pairs_length_cannot_decide_and_warns_at_chance(task_dir, caplog):
    """A protocol double of a reward model that scores by length alone: right on every pair that differs in
    length, at chance (ties) on the pairs of equal length, and train-rm's warning says so."""
    import logging

    from tribune.services.common.text import load_tokenizer
    from tribune.trainer.data import PreferenceGroup
    from tribune.trainer.reward import RewardConfig, evaluate_rm, warn_if_length_only

    tok = load_tokenizer(task_dir / "tokenizer")
    cfg = RewardConfig(model=task_dir, train=task_dir, eval=task_dir, output=task_dir, max_length=32,
                       max_prompt_length=16)
    by_length = lambda ids, mask: mask.sum(-1).float()               # noqa: E731  (B,)
    groups = [PreferenceGroup("name three fruits", ["apple pear plum", "apple pear fig", "apple"]),   # 1 equal pair
              PreferenceGroup("name two colours", ["red blue", "red green"])] * 20                   # 1 equal pair
    m = evaluate_rm(by_length, tok, groups, cfg, "cpu", None)
    assert m["eval_pairs"] == 20 * 4 and m["eval_equal_length_pairs"] == 20 * 2
    assert m["eval_equal_length_groups"] == 40 and m["eval_equal_length_accuracy"] == 0.0
    assert m["eval_accuracy"] == pytest.approx(0.5)                  # both unequal pairs right, both equal ones tied
    with caplog.at_level(logging.WARNING, logger="tribune"):
        assert warn_if_length_only(m)
    assert "on held-out pairs of equal length the reward model is at chance" in caplog.text
    # one that also tells equal-length responses apart does not warn, nor one judged on too few rows
    assert not warn_if_length_only({**m, "eval_equal_length_accuracy": 0.7})
    assert not warn_if_length_only({**m, "eval_equal_length_groups": 29})
    # no pair of equal length: nothing reported, nothing to warn about
    alone = evaluate_rm(by_length, tok, [PreferenceGroup("p", ["a b", "c"])], cfg, "cpu", None)
    assert "eval_equal_length_pairs" not in alone and not warn_if_length_only(alone)


def test_ensemble_members_differ_and_are_laid_out_for_export(task_dir, sft_dir, tmp_path):
    out = tmp_path / "ens"
    # member 1 on its own training and early-stopping files (members of different data sources)
    half_train, half_eval = tmp_path / "half_train.jsonl", tmp_path / "half_eval.jsonl"
    for src, dst in ((task_dir / "prefs_train.jsonl", half_train), (task_dir / "prefs_eval.jsonl", half_eval)):
        lines = src.read_text().splitlines(keepends=True)
        dst.write_text("".join(lines[:len(lines) // 2]))
    # member 1 starts from another model with the same tokenizer (here the task's base)
    metrics, _ = _rm(task_dir, sft_dir, out, "--ensemble", "2", "--bootstrap", "--max-steps", "20",
                     "--member-train", task_dir / "prefs_train.jsonl", half_train,
                     "--member-eval", task_dir / "prefs_eval.jsonl", half_eval,
                     "--member-model", sft_dir, task_dir / "base")
    layout = json.loads((out / "ensemble.json").read_text())
    assert layout["member_model"] == [str(sft_dir), str(task_dir / "base")]
    assert layout["ensemble_size"] == 2 and layout["members"] == ["member-0", "member-1"]
    assert layout["member_train"] == [str(task_dir / "prefs_train.jsonl"), str(half_train)]
    assert layout["member_eval"] == [str(task_dir / "prefs_eval.jsonl"), str(half_eval)]
    resolved = json.loads((out / "member-1" / "config.resolved.json").read_text())
    assert (resolved["train"], resolved["eval"]) == (str(half_train), str(half_eval))
    # it trains from its own start, and its statistics still sample πSFT (--model), as PPO will
    assert (resolved["model"], resolved["stats_policy"]) == (str(task_dir / "base"), str(sft_dir))
    stats = [json.loads((out / m / "reward_stats.json").read_text()) for m in layout["members"]]
    assert stats[0]["mean"] != stats[1]["mean"]                              # different seeds, data, heads
    # the height of the raters' favourites, served for PPO's monitor: each member on its own eval file, and the
    # ensemble's both members on the ensemble's, row by row (rows, K)
    evals = [len(f.read_text().splitlines()) for f in (task_dir / "prefs_eval.jsonl", half_eval)]
    assert [len(s["preferred_member_scores"]) for s in stats] == [min(256, n) for n in evals]
    assert all(len(row) == 1 for s in stats for row in s["preferred_member_scores"])
    both = json.loads((out / "reward_stats.json").read_text())["preferred_member_scores"]
    assert len(both) == min(256, evals[0]) and all(len(row) == 2 for row in both)
    assert [row[0] for row in both] == pytest.approx([row[0] for row in stats[0]["preferred_member_scores"]], abs=1e-5)
    assert (out / "tokenizer.json").is_file() and metrics["ensemble_size"] == 2
    assert len(metrics["member_eval_accuracy"]) == 2


def test_a_member_start_with_another_tokenizer_is_refused_before_training(task_dir, sft_dir, tmp_path):
    other = with_other_token_ids(sft_dir, tmp_path / "other")
    proc = tribune("train-rm", "--model", sft_dir, "--train", task_dir / "prefs_train.jsonl", "--eval",
                   task_dir / "prefs_eval.jsonl", "--output", tmp_path / "ens", "--ensemble", "2",
                   "--member-model", sft_dir, other, check=False)
    assert proc.returncode == 2 and f"member_model {other}: its tokenizer differs" in proc.stderr
    assert not (tmp_path / "ens" / "member-0" / "model.safetensors").exists()
    proc = tribune("train-rm", "--model", sft_dir, "--train", task_dir / "prefs_train.jsonl", "--eval",
                   task_dir / "prefs_eval.jsonl", "--output", tmp_path / "one", "--member-model", other, check=False)
    assert proc.returncode == 2 and "member_model needs --ensemble K with K >= 2" in proc.stderr
    # a start with the same tokenizer but a context shorter than the lengths fitted to --model's
    short = tmp_path / "short"
    shutil.copytree(sft_dir, short, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4}))
    proc = tribune("train-rm", "--model", sft_dir, "--train", task_dir / "prefs_train.jsonl", "--eval",
                   task_dir / "prefs_eval.jsonl", "--output", tmp_path / "ens", "--ensemble", "2",
                   "--member-model", sft_dir, short, check=False)
    assert proc.returncode == 2 and f"member_model {short}: its context (4 tokens) is shorter than" in proc.stderr


def test_ensemble_metrics_average_what_every_member_reports_and_list_what_only_some_do():
    from tribune.trainer.reward import ensemble_metrics

    members = [{"eval_loss": 0.5, "eval_accuracy": 0.8, "best_step": 100, "stopped_early_at": 300, "plot": "a.png"},
               {"eval_loss": 0.7, "eval_accuracy": 0.6, "best_step": 400}]          # ran to the end
    m = ensemble_metrics(members)
    assert m["eval_loss"] == pytest.approx(0.6) and m["eval_accuracy"] == pytest.approx(0.7)
    assert "stopped_early_at" not in m and "plot" not in m
    assert m["member_stopped_early_at"] == [300, None] and m["member_best_step"] == [100, 400]
    assert m["member_eval_accuracy"] == [0.8, 0.6] and "member_eval_gold_accuracy" not in m


def test_member_eval_needs_one_file_per_member_train_file(tmp_path):
    from tribune.services.common.config import build_config
    from tribune.trainer.reward import RewardConfig

    from tribune.services.common.errors import UserError

    with pytest.raises(UserError, match="member_eval needs one file per member_train file"):
        build_config(RewardConfig, {"model": tmp_path, "train": tmp_path / "t.jsonl", "eval": tmp_path / "e.jsonl",
                                    "output": tmp_path / "o",
                                    "ensemble": 2, "member_train": [tmp_path / "a", tmp_path / "b"],
                                    "member_eval": [tmp_path / "c"]})


def test_a_rows_weight_scales_its_share_of_the_loss_and_bad_weights_are_skipped(task_dir, tmp_path):
    """A row of weight 2 counts as two copies of it, weight 0 as none; each row of weight 1 counts once,
    whatever its number of pairs (the loss through collate_groups, against hand sums)."""
    from tribune.services.common.jsonl import SkipCounter
    from tribune.services.common.text import load_tokenizer
    from tribune.trainer.data import load_preference_groups
    from tribune.trainer.losses import bradley_terry_loss
    from tribune.trainer.reward import collate_groups

    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "name two colours", "chosen": "red blue", "rejected": "red", "weight": 2},
        {"prompt": "name three fruits", "ranking": ["apple pear plum", "apple", "pear"]},
        {"prompt": "name two colours", "chosen": "red blue", "rejected": "blue", "weight": 0},
        *({"prompt": "p", "chosen": "a", "rejected": "b", "weight": w} for w in (-1, "2", True, float("nan"))),
        # a margin must be finite too: a NaN one would make the whole loss NaN
        *({"prompt": "p", "chosen": "a", "rejected": "b", "margin": m} for m in (float("nan"), float("inf"), True))]))
    skipped = SkipCounter()
    a, b, zero = load_preference_groups(path, skipped)
    assert (a.weight, b.weight, zero.weight) == (2.0, 1.0, 0.0) and skipped.total == 7
    assert "invalid weight" in skipped.summary() and "margin not a finite number" in skipped.summary()
    tok = load_tokenizer(task_dir / "tokenizer")
    scores = {}

    def loss(groups):                     # a protocol double of a reward model: a fixed score per sequence
        batch = collate_groups(tok, groups, 16, 32)
        r = torch.tensor([scores.setdefault(tuple(row[mask.bool()].tolist()), len(scores) * 0.7 - 1.0)
                          for row, mask in zip(batch.input_ids, batch.attention_mask)], dtype=torch.float64)  # (S,)
        return float(bradley_terry_loss(r[batch.chosen_idx], r[batch.rejected_idx], weights=batch.weight.double()))

    one = dataclasses.replace(a, weight=1.0)
    assert loss([a, b]) * 2 == pytest.approx(loss([one, one, b]) * 3, rel=1e-6)
    assert loss([zero, b]) * 2 == pytest.approx(loss([b]), rel=1e-6)
