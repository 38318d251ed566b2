"""End to end through the real command line: task make → sft → train-rm, resume, 2 ranks."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, tribune

pytestmark = pytest.mark.slow


def test_sft_learns_the_task(sft_dir, task_dir):
    metrics = json.loads((sft_dir / "metrics.json").read_text())
    base_gold_floor = 0.3
    assert metrics["eval_loss"] < 2.5
    # the tiny base model samples noise (gold ≈ -1); πSFT follows the demonstrator
    assert metrics["gold_score"] > base_gold_floor
    for f in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"):
        assert (sft_dir / f).is_file(), f
    assert list((sft_dir / "tensorboard").iterdir())


def test_reward_model_ranks_held_out_pairs_like_the_gold_judge(rm_dir):
    metrics = json.loads((rm_dir / "metrics.json").read_text())
    assert metrics["eval_gold_accuracy"] >= 0.85, metrics
    assert metrics["eval_accuracy"] > 0.65 and metrics["eval_margin"] > 0
    assert {"eval_accuracy", "eval_loss"} <= set(metrics)
    stats = json.loads((rm_dir / "reward_stats.json").read_text())
    assert stats["std"] > 0 and stats["samples"] > 100
    # measured on responses as long as PPO samples by default: the SFT run's response room
    sft = json.loads((rm_dir / "config.resolved.json").read_text())["model"]
    sft_cfg = json.loads((Path(sft) / "config.resolved.json").read_text())
    assert stats["max_new_tokens"] == sft_cfg["max_length"] - sft_cfg["max_prompt_length"]
    config = json.loads((rm_dir / "config.json").read_text())
    assert "tribune_reward_mean" not in config, "reward_stats.json is the one home of the statistics"


def test_reward_statistics_sample_responses_as_long_as_ppo_would(task_dir, tmp_path):
    """The default of --stats-max-new-tokens is PPO's default for the same policy: its SFT run's
    response room, else what its context leaves after the longest prompt (at most 256)."""
    import shutil

    from tribune.services.common.text import load_tokenizer
    from tribune.trainer.reward import RewardConfig, stats_response_length

    cfg = RewardConfig(model=task_dir / "base", train=tmp_path, eval=tmp_path, output=tmp_path)
    tok = load_tokenizer(task_dir / "tokenizer")
    prompts = ["name two fruits", "name three red fruits"]
    context = json.loads((task_dir / "base" / "config.json").read_text())["max_position_embeddings"]
    assert stats_response_length(cfg, task_dir / "base", tok, prompts) == context - len(tok(prompts[1])["input_ids"])
    policy = tmp_path / "sft"
    shutil.copytree(task_dir / "base", policy)
    (policy / "config.resolved.json").write_text(json.dumps({"max_length": 40, "max_prompt_length": 30}))
    assert stats_response_length(cfg, policy, tok, prompts) == 10
    assert stats_response_length(dataclasses.replace(cfg, stats_max_new_tokens=7), policy, tok, prompts) == 7


def test_saved_reward_model_reloads_with_auto_class_and_same_scores(rm_dir, task_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tribune.services.common.text import encode_pair
    from tribune.trainer.data import pad_left, pad_right
    from tribune.trainer.modeling import load_reward_model, score_sequences

    hf = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    assert hf.config.num_labels == 1
    tok = AutoTokenizer.from_pretrained(rm_dir)
    rows = [json.loads(l) for l in (task_dir / "prefs_eval.jsonl").read_text().splitlines()[:16]]
    seqs = [encode_pair(tok, r["prompt"], r.get("chosen") or r["ranking"][0], 48, 64)[0] for r in rows]
    ids, mask = pad_right(seqs, tok.pad_token_id)
    with torch.no_grad():
        plain = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)      # HF's own pooling
        ours = score_sequences(load_reward_model(rm_dir).eval(), ids, mask)
        left = score_sequences(hf, *pad_left(seqs, tok.pad_token_id))
    torch.testing.assert_close(plain, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, ours, atol=1e-5, rtol=0)
    assert plain.std() > 0


def test_interrupted_training_resumes_to_the_same_weights(task_dir, tmp_path):
    from safetensors.torch import load_file

    common = ["sft", "--model", task_dir / "base", "--train", task_dir / "sft.jsonl", "--max-steps", "300",
              "--checkpoint-every", "25", "--log-every", "5", "--batch-size", "16", "--gold-eval-prompts", "8"]
    straight = tmp_path / "straight"
    tribune(*common, "--output", straight)

    broken = tmp_path / "broken"
    # an earlier, unrelated run's newer checkpoint in the same output: a fresh run removes it, so
    # it neither outranks the new run's checkpoints nor is what --resume continues
    (broken / "checkpoints" / "step-1000").mkdir(parents=True)
    (broken / "checkpoints" / "step-1000" / "trainer_state.json").write_text('{"step": 1000}')
    proc = subprocess.Popen([sys.executable, "-m", "tribune.trainer", *map(str, common), "--output", str(broken)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = broken / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert "--resume" in err and "Traceback" not in err and "holds an earlier, unfinished run's checkpoints" in err
    assert not (broken / "model.safetensors").exists()
    assert not (broken / "checkpoints" / "step-1000").exists() and list((broken / "checkpoints").glob("step-*"))
    tribune(*common, "--output", broken, "--resume")

    a, b = load_file(straight / "model.safetensors"), load_file(broken / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    steps = [json.loads(l)["step"] for l in log.read_text().splitlines() if "train/loss" in l]
    assert steps == sorted(set(steps)), "a step was logged twice after resume"


def test_two_process_accelerate_launch_trains_identical_ranks(task_dir, sft_dir, tmp_path):
    """Two real ranks (gloo on CPU). `accelerate launch --cpu --num_processes 2` starts a single
    process unless MPI is installed (accelerate's simple launcher); `--multi_gpu` goes through
    torchrun, which on a machine without CUDA gives CPU ranks."""
    out = tmp_path / "rm2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "tribune.trainer", "train-rm",
         "--model", str(sft_dir), "--train", str(task_dir / "prefs_train.jsonl"),
         "--eval", str(task_dir / "prefs_eval.jsonl"), "--output", str(out), "--max-steps", "30",
         "--stats-samples", "32"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    hashes = metrics["rank_weight_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    # the two ranks really trained: the backbone moved away from the SFT initialisation
    from safetensors.torch import load_file

    rm, sft = load_file(out / "model.safetensors"), load_file(sft_dir / "model.safetensors")
    shared = [k for k in rm if k in sft and rm[k].shape == sft[k].shape]
    assert shared and any(not torch.equal(rm[k], sft[k]) for k in shared)
