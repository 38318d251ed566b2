"""The task base models' generic pretraining: a rule-free copying corpus that teaches in-context copying."""
import json
import random

import pytest
import torch

from tribune.trainer.pipeline import StageOptions, stage_configs
from tribune.trainer.task.make import TaskConfig, _model_config, build_tokenizer, make_task
from tribune.trainer.task.pretrain import copy_text, pretrain_base_model
from tribune.trainer.task.registry import TASKS


def _split(words: list[str]) -> tuple[int, int, int] | None:
    """(run, gap, repeat) lengths with words == run + gap + run[:repeat], or None."""
    for n in range(4, 11):
        for g in range(0, 5):
            j = len(words) - n - g
            if 2 <= j <= n and words[n + g:] == words[:j]:
                return n, g, j
    return None


def test_copy_text_is_a_run_a_gap_and_the_runs_start_again_in_the_task_words_only():
    vocab = TASKS["keyword"].vocabulary()
    rng = random.Random(0)
    lines = [copy_text(vocab, rng).split() for _ in range(500)]
    assert all(set(w) <= set(vocab) for w in lines)
    shapes = [_split(w) for w in lines]
    assert None not in shapes
    assert {s[1] for s in shapes} == {0, 1, 2, 3, 4} and min(s[0] for s in shapes) == 4 and max(s[0] for s in shapes) == 10
    assert copy_text(vocab, random.Random(1)) == copy_text(vocab, random.Random(1))


def _next_token_losses(model, tok, vocab, n=100) -> tuple[float, float]:
    """Mean loss on the random run and on its exact repeat (`run run`, run of 6 words)."""
    rng, run_l, tail_l = random.Random(99), [], []
    for _ in range(n):
        run = [rng.choice(vocab) for _ in range(6)]
        ids = tok(" ".join(run + run), return_tensors="pt").input_ids                  # (1, 12)
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]   # (11,)
        run_l.append(-logp[:5].mean().item())
        tail_l.append(-logp[6:].mean().item())
    return sum(run_l) / n, sum(tail_l) / n


def test_pretraining_teaches_the_base_model_to_copy_what_it_saw(tmp_path):
    cfg = TaskConfig(task="keyword").resolved()
    vocab = cfg.spec.vocabulary()
    tok = build_tokenizer(tmp_path / "tok", vocab)
    torch.manual_seed(0)
    cls, mcfg = _model_config(cfg.spec.model.arch, cfg.spec.model, cfg, tok)
    model = cls(mcfg).eval()
    run0, tail0 = _next_token_losses(model, tok, vocab)
    assert abs(run0 - tail0) < 0.1                       # random weights: the repeat is no easier
    losses = pretrain_base_model(model, tok, vocab, 200, seed=0)
    assert len(losses) == 200 and not model.training
    run, tail = _next_token_losses(model, tok, vocab)
    assert tail < run - 0.3                              # the repeat is predicted from the context


def test_task_make_records_the_pretraining_and_zero_keeps_random_weights(tmp_path):
    small = dict(task="keyword", sft_size=20, prefs_train_size=20, prefs_eval_size=10, prompts_train_size=10,
                 prompts_eval_size=10)
    a = make_task(TaskConfig(**small, pretrain_steps=5), tmp_path / "a")
    b = make_task(TaskConfig(**small, pretrain_steps=0), tmp_path / "b")
    assert a["base_pretrain_steps"] == 5 and a["base_pretrain_loss"] > 0
    assert b["base_pretrain_steps"] == 0 and b["base_pretrain_loss"] is None
    assert json.loads((tmp_path / "a" / "task.json").read_text())["config"]["pretrain_steps"] == 5
    assert (tmp_path / "a" / "base" / "model.safetensors").read_bytes() != \
        (tmp_path / "b" / "base" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / "sft.jsonl").read_bytes() == (tmp_path / "b" / "sft.jsonl").read_bytes()
    with pytest.raises(ValueError, match="pretrain_steps"):
        TaskConfig(pretrain_steps=-1)


def test_every_suite_task_pretrains_its_base_and_max_steps_caps_it(tmp_path):
    assert {spec.model.pretrain_steps for spec in TASKS.values()} == {1000}
    assert TaskConfig(task="style").resolved().pretrain_steps == 1000
    assert stage_configs(tmp_path, 0, None, StageOptions()).task.resolved().pretrain_steps == 1000
    assert stage_configs(tmp_path, 0, 3, StageOptions()).task.pretrain_steps == 3       # a smoke run
    told = StageOptions(task={"pretrain_steps": 7})
    assert stage_configs(tmp_path, 0, 3, told).task.pretrain_steps == 7                 # a given value wins
