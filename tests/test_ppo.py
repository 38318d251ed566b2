"""PPO end to end against a real `tribune serve`: learning, resume, 2 ranks, scorer faults."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import JUDGE, REPO, last_json, tribune
from tests.servers import start_serve

pytestmark = pytest.mark.slow


def ppo_args(served_url, sft_dir, rm_dir, task_dir, out, *extra):
    return ["ppo", "--policy", sft_dir, "--prompts", task_dir / "prompts_train.jsonl",
            "--eval-prompts", task_dir / "prompts_eval.jsonl", "--reward-url", served_url,
            "--reference-url", served_url, "--output", out, "--value-init", rm_dir, *JUDGE, *map(str, extra)]


def _rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _wait_for_step(out, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and any(r["step"] >= step and "objective/kl" in r for r in _rows(out)):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"PPO did not reach step {step}")


def _own_preferred_score(rm_dir, path, limit=256):
    """Mean score of the first-ranked responses by the PyTorch reward model, as it was trained to read them."""
    from transformers import AutoTokenizer

    from tribune.services.common.jsonl import SkipCounter
    from tribune.trainer.data import PreferenceGroup, load_preference_groups
    from tribune.trainer.modeling import load_reward_model
    from tribune.trainer.reward import RewardScorer, collate_groups

    tok = AutoTokenizer.from_pretrained(rm_dir)
    scorer = RewardScorer(load_reward_model(rm_dir)).eval()
    groups = load_preference_groups(path, SkipCounter())[:limit]
    batch = collate_groups(tok, [PreferenceGroup(g.prompt, [g.responses[0]]) for g in groups], 1 << 10, 1 << 10)
    with torch.no_grad():
        return float(scorer(batch.input_ids, batch.attention_mask).mean())


def test_ppo_raises_the_gold_score_with_a_bounded_kl(served, sft_dir, rm_dir, task_dir, tmp_path):
    out = tmp_path / "ppo"
    preferred = task_dir / "prefs_eval.jsonl"
    metrics = last_json(tribune(*ppo_args(served.url, sft_dir, rm_dir, task_dir, out, "--iterations", "30",
                                          "--gold-every", "10", "--preferred-eval", preferred)).stdout)
    assert metrics["gold/score"] > metrics["sft/score"] + 0.05, metrics
    # the monitor's height, measured through the service, is the reward model's own score of the
    # responses ranked first (laid out as rollouts are: left-padded prompt, response, EOS),
    # standardised with its statistics on πSFT samples as PPO's optimised score is
    stats = json.loads((rm_dir / "reward_stats.json").read_text())
    want = (_own_preferred_score(rm_dir, preferred) - stats["mean"]) / stats["std"]
    assert metrics["monitor/preferred_score"] == pytest.approx(want, abs=2e-3)
    assert metrics["objective/kl"] < 8.0
    assert (out / "ppo.png").stat().st_size > 10_000
    for f in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "value_model/config.json"):
        assert (out / f).is_file(), f
    rows = _rows(out)
    keys = set().union(*rows)
    assert all(r["monitor/proxy_past_preferred"] == r["monitor/proxy_past_preferred"] for r in rows
               if "objective/kl" in r)      # never NaN: the preferred responses score above πSFT's samples
    for k in ("objective/kl", "objective/kl_coef", "monitor/optimised_score", "objective/scores", "objective/scores_normalized",
              "policy/entropy_avg", "response/length", "response/eos_rate", "policy/clipfrac_avg",
              "policy/approxkl_avg", "loss/value_avg", "val/explained_variance", "time/generation", "time/scoring_wait", "time/training",
              "gold/score", "gold/proxy_score"):
        assert k in keys, k
    assert list((out / "tensorboard").iterdir())


def test_rloo_ppo_raises_the_gold_score_without_a_value_model(served, sft_dir, rm_dir, task_dir, tmp_path):
    """--advantage-estimator rloo end to end: k samples per prompt, leave-one-out baselines, no value model."""
    out = tmp_path / "rloo"
    metrics = last_json(tribune(*ppo_args(served.url, sft_dir, rm_dir, task_dir, out, "--iterations", "30",
                                          "--gold-every", "30", "--advantage-estimator", "rloo",
                                          "--samples-per-prompt", "4")).stdout)
    assert metrics["gold/score"] > metrics["sft/score"] + 0.05, metrics
    assert (out / "model.safetensors").is_file() and not (out / "value_model").exists()
    rows = [r for r in _rows(out) if "objective/kl" in r]
    assert len(rows) == 30 and all("loss/policy_avg" in r and "loss/value_avg" not in r for r in rows)
    log = (out / "tribune.log").read_text()
    assert "value model" in log
    # no --preferred-eval: the monitor's height is the one served with the reward model (train-rm scored the
    # responses ranked first in its --eval file), equal to measuring that file through the service
    stats = json.loads((rm_dir / "reward_stats.json").read_text())
    want = (_own_preferred_score(rm_dir, task_dir / "prefs_eval.jsonl") - stats["mean"]) / stats["std"]
    assert metrics["monitor/preferred_score"] == pytest.approx(want, abs=2e-3)
    assert "preferred held-out responses, served with it (" in log


def test_ppo_resumes_after_an_interruption_like_an_uninterrupted_run(served, sft_dir, rm_dir, task_dir, tmp_path):
    common = ["--iterations", "8", "--checkpoint-every", "2", "--gold-every", "100", "--rollout-batch-size", "32"]
    straight = tmp_path / "straight"
    tribune(*ppo_args(served.url, sft_dir, rm_dir, task_dir, straight, *common))

    broken = tmp_path / "broken"
    proc = subprocess.Popen([sys.executable, "-m", "tribune.trainer",
                             *map(str, ppo_args(served.url, sft_dir, rm_dir, task_dir, broken, *common))],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(broken, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "--resume" in err, err[-2000:]
    tribune(*ppo_args(served.url, sft_dir, rm_dir, task_dir, broken, *common, "--resume"))

    a = {r["step"]: r for r in _rows(straight) if "objective/kl" in r}
    b = {r["step"]: r for r in _rows(broken) if "objective/kl" in r}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        for k in ("objective/scores", "objective/kl", "loss/policy_avg"):
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-3, abs=1e-4), (step, k)
    from safetensors.torch import load_file

    wa, wb = load_file(straight / "model.safetensors"), load_file(broken / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)


def test_two_process_ppo(served, sft_dir, rm_dir, task_dir, tmp_path):
    out = tmp_path / "ppo2"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         "-m", "tribune.trainer", *map(str, ppo_args(served.url, sft_dir, rm_dir, task_dir, out, "--iterations", "3",
                                             "--gold-every", "100"))],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    hashes = json.loads((out / "metrics.json").read_text())["rank_weight_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]


def test_scorer_restarted_mid_run_and_scorer_gone_for_good(repo_dir, sft_dir, rm_dir, task_dir, tmp_path):
    server = start_serve(repo_dir)
    ports = (server.grpc_port, server.http_port, server.metrics_port)
    try:
        out = tmp_path / "restart"
        proc = subprocess.Popen([sys.executable, "-m", "tribune.trainer", *map(str, ppo_args(
            server.url, sft_dir, rm_dir, task_dir, out, "--iterations", "6", "--gold-every", "100",
            "--retry-budget-s", "120", "--rollout-batch-size", "32"))],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_step(out, 2, proc)
        assert server.stop() == 0
        time.sleep(2)
        server = start_serve(repo_dir, ports=ports)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "retry" in err
        steps = [r["step"] for r in _rows(out) if "objective/kl" in r]
        assert steps == list(range(1, 7)), "a step was skipped or applied twice"

        gone = tmp_path / "gone"
        proc = subprocess.Popen([sys.executable, "-m", "tribune.trainer", *map(str, ppo_args(
            server.url, sft_dir, rm_dir, task_dir, gone, "--iterations", "50", "--gold-every", "100",
            "--retry-budget-s", "3", "--checkpoint-every", "2", "--rollout-batch-size", "32"))],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_step(gone, 3, proc)
        server.stop()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        assert "retry budget" in err and "last checkpoint" in err and "Traceback" not in err
        ckpt = sorted((gone / "checkpoints").glob("step-*"))
        assert ckpt and all((c / "trainer_state.json").is_file() for c in ckpt)
        assert not (gone / "model.safetensors").exists()
    finally:
        server.stop()
