"""`ppo_iteration` through a small scorer protocol double: fast, no server.

The double answers the two services' calls at once from local computations (a reward
function of the tokens, the frozen SFT weights as the reference), so the numbered phases
can be checked in seconds; the end-to-end PPO tests in test_ppo.py use real Triton.
"""
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from tribune.services.contract import ServedFacts
from tribune.trainer.modeling import load_causal_lm, sequence_logprobs


class LocalScorers:
    """The ``tribune.trainer.rollout.Scorer`` protocol over a reward function and a local reference model."""

    def __init__(self, reference, reward_fn, members: int = 1):
        self.reference, self.reward_fn = reference.eval(), reward_fn
        self.facts = ServedFacts(contract_version=1, tokenizer_fingerprint="local", reward_mean=0.0, reward_std=1.0,
                                 max_sequence_length=64, vocab_size=reference.config.vocab_size, max_batch_size=64,
                                 reward_model_id="rm-local", max_length=64, max_prompt_length=48,
                                 ensemble_size=members, member_reward_mean=(0.0,) * members,
                                 member_reward_std=(1.0,) * members)
        self.calls = 0
        self.prompts: list[str] = []          # every scored chunk's prompts, in order

    @staticmethod
    def _done(value) -> Future:
        f = Future()
        f.set_result(value)
        return f

    def score_members_async(self, chunk) -> Future:
        self.calls += 1
        self.prompts += chunk.prompts
        scores = np.asarray(self.reward_fn(chunk.query_responses, chunk.attention_mask), dtype=np.float32)
        return self._done(scores if scores.ndim == 2 else scores[:, None])            # (B, K)

    def score(self, chunk) -> np.ndarray:
        return self.score_members_async(chunk).result().mean(-1)

    def logprobs_async(self, ids: np.ndarray, mask: np.ndarray, temperature: float) -> Future:
        with torch.no_grad():
            lp = sequence_logprobs(self.reference, torch.from_numpy(ids), torch.from_numpy(mask), temperature)
        return self._done(lp.numpy())


def _learner(task_dir, tmp_path, **overrides):
    from tribune.services.common.config import build_config
    from tribune.services.common.text import load_tokenizer
    from tribune.trainer.ppo import make_learner
    from tribune.trainer.ppo_config import PPOConfig
    from tribune.trainer.run import make_accelerator, seed_everything

    cfg = build_config(PPOConfig, {
        "policy": task_dir / "base", "prompts": task_dir / "prompts_train.jsonl", "reward_url": "local:1",
        "reference_url": "local:1", "output": tmp_path, "rollout_batch_size": 16, "mini_batch_size": 8,
        "ppo_epochs": 2, "scoring_chunk": 8, "max_new_tokens": 6, "max_prompt_length": 48, "normalize_reward": False, **overrides})
    seed_everything(0)
    tok = load_tokenizer(task_dir / "base")
    return cfg, make_learner(cfg, make_accelerator(), tok)


def _prompts(task_dir):
    from tribune.services.common.jsonl import SkipCounter
    from tribune.trainer.data import load_prompts

    return load_prompts(task_dir / "prompts_train.jsonl", SkipCounter())


def test_first_iteration_has_zero_kl_and_updates_both_models(task_dir, tmp_path):
    from tribune.trainer.ppo_step import ppo_iteration

    cfg, learner = _learner(task_dir, tmp_path)
    scorer = LocalScorers(load_causal_lm(task_dir / "base"), lambda ids, mask: -mask.sum(-1).astype(float))
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    value_before = {k: v.clone() for k, v in learner.value.state_dict().items()}
    row = ppo_iteration(cfg, learner, scorer, _prompts(task_dir), it=0)
    # the policy starts as the reference, and nothing moved before phase 5
    assert abs(row["objective/kl"]) < 1e-4, row
    assert all(np.isfinite(v) for v in row.values())
    assert scorer.calls == 2                        # 16 rollouts in chunks of 8
    prompt_tokens = row["objective/scores"] * -1 - row["response/length"]      # reward = −(prompt + response)
    assert 2 <= prompt_tokens <= 7, row
    changed = [k for k, v in learner.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the policy did not move"
    assert any(not torch.equal(v, value_before[k]) for k, v in learner.value.state_dict().items())
    assert 0 <= row["policy/clipfrac_avg"] <= 1 and row["objective/kl_coef"] == cfg.kl_coef


@pytest.fixture(scope="module")
def random_base_task(tmp_path_factory):
    """The bundled task with its base at random weights: a pretrained base (copying text that has no EOS)
    almost never ends a response, so a reward for ending early would have nothing to reinforce."""
    from tribune.trainer.task.make import TaskConfig, make_task

    out = tmp_path_factory.mktemp("random-base") / "task"
    make_task(TaskConfig(pretrain_steps=0), out)
    return out


@pytest.mark.parametrize("estimator", ["gae", "rloo"])
def test_iterations_follow_the_reward(random_base_task, tmp_path, estimator):
    """A reward for ending early: a few iterations shorten the responses (the maths points the right way)."""
    from tribune.trainer.ppo_step import ppo_iteration

    task_dir = random_base_task
    cfg, learner = _learner(task_dir, tmp_path, learning_rate=1e-2, kl_coef=0.0, advantage_estimator=estimator,
                            samples_per_prompt=4 if estimator == "rloo" else 1)
    scorer = LocalScorers(load_causal_lm(task_dir / "base"), lambda ids, mask: -mask.sum(-1).astype(float))
    prompts = _prompts(task_dir)
    lengths = [ppo_iteration(cfg, learner, scorer, prompts, it)["response/length"] for it in range(8)]
    assert np.mean(lengths[-2:]) < np.mean(lengths[:2]) - 0.5, lengths


def test_ensemble_members_penalise_disagreement(task_dir, tmp_path):
    """Two members that disagree on long responses: the uncertainty penalty and the worst case
    score a batch lower than the members' mean, and the disagreement is logged."""
    from tribune.trainer.ppo_step import ppo_iteration

    def members(ids, mask):
        n = mask.sum(-1).astype(float)
        return np.stack([n, -n], 1)                  # they agree on nothing but the sign

    rows = {}
    for mode in ("mean", "uncertainty", "worst"):
        cfg, learner = _learner(task_dir, tmp_path / mode, ensemble_reward=mode, normalize_reward=True,
                                missing_eos_penalty=0.0)
        scorer = LocalScorers(load_causal_lm(task_dir / "base"), members, members=2)
        rows[mode] = ppo_iteration(cfg, learner, scorer, _prompts(task_dir), it=0)
    assert rows["mean"]["objective/ensemble_disagreement"] > 1
    assert rows["mean"]["objective/scores_normalized"] == pytest.approx(0.0, abs=1e-6)    # n and −n cancel
    assert rows["uncertainty"]["objective/scores_normalized"] < -1
    assert rows["worst"]["objective/scores_normalized"] < -1


def test_rloo_samples_each_prompt_k_times_and_trains_no_value_model(task_dir, tmp_path):
    """rloo: 16 rollouts are 4 prompts × 4 consecutive samples; no value model is built, the policy
    still moves, and the value model's statistics are absent rather than made up."""
    from tribune.trainer.ppo_step import ppo_iteration

    cfg, learner = _learner(task_dir, tmp_path, advantage_estimator="rloo", samples_per_prompt=4)
    assert learner.value is None and learner.opt_value is None
    scorer = LocalScorers(load_causal_lm(task_dir / "base"), lambda ids, mask: -mask.sum(-1).astype(float))
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    row = ppo_iteration(cfg, learner, scorer, _prompts(task_dir), it=0)
    groups = [scorer.prompts[i:i + 4] for i in range(0, 16, 4)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 4, scorer.prompts
    assert any(not torch.equal(v, before[k]) for k, v in learner.policy.state_dict().items())
    assert all(np.isfinite(v) for v in row.values())
    assert not {"loss/value_avg", "val/clipfrac_avg", "val/explained_variance"} & set(row), sorted(row)
    assert {"loss/policy_avg", "policy/clipfrac_avg", "objective/kl"} <= set(row)


@pytest.mark.parametrize("overrides, message", [
    ({"advantage_estimator": "rloo"}, "needs samples_per_prompt of at least 2"),
    ({"samples_per_prompt": 3}, "multiple of samples_per_prompt"),
    ({"samples_per_prompt": 0}, "samples_per_prompt must be at least 1"),
])
def test_rloo_options_are_checked(task_dir, tmp_path, overrides, message):
    from tribune.services.common.errors import UserError

    with pytest.raises(UserError, match=message):
        _learner(task_dir, tmp_path, **overrides)


def test_resume_with_another_advantage_estimator_is_refused(task_dir, tmp_path):
    """A checkpoint's state has a value model (gae) or none (rloo): resuming with the other is a clear error."""
    import json

    from tribune.services.common.config import build_config
    from tribune.services.common.errors import UserError
    from tribune.trainer.ppo import _check_resume_estimator
    from tribune.trainer.ppo_config import PPOConfig

    (tmp_path / "config.resolved.json").write_text(json.dumps({"advantage_estimator": "gae"}))
    common = {"policy": task_dir / "base", "prompts": task_dir / "prompts_train.jsonl", "reward_url": "local:1",
              "reference_url": "local:1", "output": tmp_path, "advantage_estimator": "rloo", "samples_per_prompt": 4}
    with pytest.raises(UserError, match="used --advantage-estimator gae, not rloo"):
        _check_resume_estimator(build_config(PPOConfig, {**common, "resume": True}))
    _check_resume_estimator(build_config(PPOConfig, common))                            # a fresh run: no check
    _check_resume_estimator(build_config(PPOConfig, {**common, "resume": True, "advantage_estimator": "gae",
                                                      "samples_per_prompt": 1}))         # the same estimator


@pytest.mark.parametrize("overrides, message", [
    ({"reward_clip": 0.0}, "reward_clip must be positive"),           # would zero every reward
    ({"reward_clip": -1.0}, "reward_clip must be positive"),          # would make every reward −1
    ({"target_kl": 0.0}, "target_kl must be positive"),               # the adaptive controller divides by it
    ({"kl_horizon": 0}, "kl_horizon must be at least 1"),
    ({"cliprange": -0.2}, "cliprange must be positive"),
    ({"cliprange_value": 0.0}, "cliprange_value must be positive"),
    ({"value_learning_rate": 0.0}, "value_learning_rate must be positive"),
    ({"vf_coef": -0.5}, "vf_coef must be non-negative"),
    ({"missing_eos_penalty": 5.0}, "missing_eos_penalty must be zero or negative"),
])
def test_ppo_options_that_break_training_are_refused(tmp_path, overrides, message):
    from tribune.services.common.config import build_config
    from tribune.services.common.errors import UserError
    from tribune.trainer.ppo_config import PPOConfig

    common = {"policy": tmp_path, "prompts": tmp_path / "p.jsonl", "reward_url": "local:1", "reference_url": "local:1",
              "output": tmp_path / "out"}
    build_config(PPOConfig, common)                                     # the defaults pass
    with pytest.raises(UserError, match=message):
        build_config(PPOConfig, {**common, **overrides})


def test_an_explicit_value_learning_rate_is_used_as_given():
    from tribune.trainer.run import OptimizerConfig

    opt, _ = OptimizerConfig(learning_rate=1e-3).build([torch.nn.Parameter(torch.zeros(2))], 10, learning_rate=1e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
    opt, _ = OptimizerConfig(learning_rate=1e-3).build([torch.nn.Parameter(torch.zeros(2))], 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
