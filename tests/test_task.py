"""The bundled task: determinism, the gold judge and the rater model."""
import filecmp
import json
import random

import pytest

from tests.conftest import tribune
from tribune.trainer import gold_score, parse_prompt
from tribune.trainer.task.make import TaskConfig, demonstrate, rater_ranking, sample_prompt


def test_gold_judge_examples():
    assert gold_score("name three fruits", "apple pear plum") == 1.0
    assert gold_score("name three fruits", "apple pear") == pytest.approx(2 / 3)
    assert gold_score("name three fruits", "apple apple plum") == pytest.approx(2 / 3 - 0.5)
    assert gold_score("name three fruits", "apple pear plum fig") == pytest.approx(1 - 0.5)
    assert gold_score("name two animals", "cat red") == pytest.approx(0.5 - 0.5)
    assert gold_score("count from two to four", "two three four") == 1.0
    assert gold_score("count from two to four", "two four three") == pytest.approx(1 / 3 - 1.0)
    assert gold_score("count from two to four", "") == -0.5


def test_gold_judge_punishes_length_and_repetition_past_the_optimum():
    """What a proxy can be pushed past: more category words beyond N lower the gold score."""
    p = "name two colours"
    scores = [gold_score(p, " ".join(["red", "blue", "green", "pink", "gold"][:k])) for k in range(1, 6)]
    assert scores.index(max(scores)) == 1
    assert scores[1:] == sorted(scores[1:], reverse=True)     # strictly worse with every extra word
    assert scores[1] == 1.0 and all(s < 1.0 for i, s in enumerate(scores) if i != 1)
    assert gold_score(p, "red red red red") < gold_score(p, "red")


def test_parse_prompt_rejects_foreign_prompts():
    assert parse_prompt("name three fruits").n == 3
    assert parse_prompt("count from one to four").n == 4
    assert parse_prompt("write a poem") is None
    assert parse_prompt("count from four to one") is None
    with pytest.raises(ValueError):
        gold_score("write a poem", "roses")


def test_demonstrator_leaves_headroom():
    rng = random.Random(0)
    scores = [gold_score(p, demonstrate(p, rng, 0.45)) for p in (sample_prompt(rng) for _ in range(2000))]
    mean = sum(scores) / len(scores)
    assert 0.4 < mean < 0.85, mean


def test_rater_prefers_higher_gold_mostly_but_not_always():
    rng = random.Random(1)
    p, good, bad = "name three tools", "saw drill awl", "saw drill"
    wins = sum(rater_ranking(p, [bad, good], rng, 0.15)[0] == good for _ in range(2000))
    assert 0.85 < wins / 2000 < 0.995


def test_task_make_is_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tribune("task", "make", a, "--prefs-train-size", "300", "--sft-size", "300", "--pretrain-steps", "20")
    tribune("task", "make", b, "--prefs-train-size", "300", "--sft-size", "300", "--pretrain-steps", "20")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert {"sft.jsonl", "prefs_train.jsonl", "prefs_eval.jsonl", "prompts_train.jsonl", "prompts_eval.jsonl",
            "tokenizer/tokenizer.json", "base/config.json", "base/model.safetensors"} <= {str(f) for f in files}
    for f in files:
        assert filecmp.cmp(a / f, b / f, shallow=False), f
    c = tmp_path / "c"
    tribune("task", "make", c, "--prefs-train-size", "300", "--sft-size", "300", "--pretrain-steps", "20", "--seed", "1")
    assert (a / "sft.jsonl").read_bytes() != (c / "sft.jsonl").read_bytes()


def test_task_files_have_pairs_and_rankings_and_a_distinct_pad(task_dir):
    rows = [json.loads(l) for l in (task_dir / "prefs_train.jsonl").read_text().splitlines()]
    kinds = {len(r["ranking"]) if "ranking" in r else 2 for r in rows}
    assert kinds == {2, 3, 4}
    tok = json.loads((task_dir / "tokenizer" / "tokenizer_config.json").read_text())
    assert tok["pad_token"] != tok["eos_token"]
    cfg = json.loads((task_dir / "base" / "config.json").read_text())
    assert cfg["model_type"] in ("llama", "gpt2")
    summary = json.loads((task_dir / "task.json").read_text())
    assert summary["base_parameters"] < 5_000_000
    assert TaskConfig().seed == summary["config"]["seed"]
