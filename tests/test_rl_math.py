"""PPO maths against slow, obviously-correct float64 loops on hand-made tensors."""
import math

import pytest
import torch

from tribune.trainer.rl_math import (AdaptiveKLController, compute_gae, explained_variance, kl_penalty,
                                     leave_one_out_advantages, ppo_policy_loss, shaped_rewards, value_loss, whiten)

torch.manual_seed(0)
B, R = 3, 6
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float64)


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_gae_matches_a_loop():
    rewards, values = _rand(B, R), _rand(B, R)
    gamma, lam = 0.9, 0.8
    adv, ret = compute_gae(rewards, values, MASK, gamma, lam)
    for b in range(B):
        n = int(MASK[b].sum())
        expected = [0.0] * R
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            running = delta + gamma * lam * running
            expected[t] = running
        assert adv[b].tolist() == pytest.approx(expected, abs=1e-12)
        assert ret[b, :n].tolist() == pytest.approx([expected[t] + values[b, t].item() for t in range(n)], abs=1e-12)
        assert ret[b, n:].abs().sum() == 0


def test_leave_one_out_advantages_match_a_loop():
    k, returns = 3, _rand(12)                     # 4 prompts × 3 samples, consecutive
    adv = leave_one_out_advantages(returns, k)
    for i in range(12):
        g = i // k
        others = [returns[j].item() for j in range(g * k, g * k + k) if j != i]
        assert adv[i].item() == pytest.approx(returns[i].item() - sum(others) / (k - 1), abs=1e-12)
    # a group whose samples all score the same learns nothing; adding a constant per prompt changes nothing
    assert leave_one_out_advantages(torch.full((4,), 2.5, dtype=torch.float64), 2).abs().max() == 0
    shift = torch.arange(4, dtype=torch.float64).repeat_interleave(k) * 10
    torch.testing.assert_close(leave_one_out_advantages(returns + shift, k), adv)
    assert adv.reshape(-1, k).sum(-1).abs().max() < 1e-12        # zero-sum within each prompt
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(returns, 1)
    with pytest.raises(ValueError, match="groups of 5"):
        leave_one_out_advantages(returns, 5)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards, values = _rand(1, 4), _rand(1, 4)
    adv, _ = compute_gae(rewards, values, torch.ones(1, 4, dtype=torch.float64), 1.0, 1.0)
    togo = rewards.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(adv, togo - values)


def test_whiten_masked_entries():
    x = _rand(B, R)
    w = whiten(x, MASK)
    vals = [x[b, t].item() for b in range(B) for t in range(R) if MASK[b, t]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)
    for b in range(B):
        for t in range(R):
            want = (x[b, t].item() - mean) / math.sqrt(var + 1e-8) if MASK[b, t] else 0.0
            assert w[b, t].item() == pytest.approx(want, abs=1e-9)


def test_kl_estimators():
    logp, ref = _rand(B, R), _rand(B, R)
    k1, k3 = kl_penalty(logp, ref, "k1"), kl_penalty(logp, ref, "k3")
    for b in range(B):
        for t in range(R):
            lr = ref[b, t].item() - logp[b, t].item()
            assert k1[b, t].item() == pytest.approx(-lr)
            assert k3[b, t].item() == pytest.approx(math.exp(lr) - 1 - lr)
    assert (k3 >= 0).all()
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k2")


def test_kl_k1_and_k3_estimate_the_true_kl():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    true = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[samples], q.log()[samples]
    assert kl_penalty(logp, logq, "k1").mean().item() == pytest.approx(true, abs=0.01)
    assert kl_penalty(logp, logq, "k3").mean().item() == pytest.approx(true, abs=0.01)


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    kl = _rand(B, R)
    scores = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    beta = 0.1
    r = shaped_rewards(scores, kl, MASK, beta)
    for b in range(B):
        last = int(MASK[b].sum()) - 1
        for t in range(R):
            want = (-beta * kl[b, t].item()) * MASK[b, t].item() + (scores[b].item() if t == last else 0.0)
            assert r[b, t].item() == pytest.approx(want, abs=1e-12)


def test_policy_loss_matches_a_loop():
    new, old, adv = _rand(B, R) * 0.3, _rand(B, R) * 0.3, _rand(B, R)
    eps = 0.2
    loss, stats = ppo_policy_loss(new, old, adv, MASK, eps)
    terms, clipped, n = 0.0, 0, 0
    for b in range(B):
        for t in range(R):
            if not MASK[b, t]:
                continue
            ratio = math.exp(new[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            u, c = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            terms += max(u, c)
            clipped += c > u
            n += 1
    assert loss.item() == pytest.approx(terms / n, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(clipped / n)
    assert 0 < stats["clipfrac"].item() < 1


def test_policy_loss_gradient_is_minus_advantage_at_ratio_one():
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    loss, _ = ppo_policy_loss(logp, torch.zeros(1, 2, dtype=torch.float64), adv, torch.ones(1, 2), 0.2)
    loss.backward()
    assert logp.grad.tolist() == [[-1.0, 0.5]]


def test_value_loss_matches_a_loop():
    v, old, ret = _rand(B, R), _rand(B, R), _rand(B, R)
    c = 0.2
    loss, clipfrac = value_loss(v, old, ret, MASK, c)
    total, n, nclip = 0.0, 0, 0
    for b in range(B):
        for t in range(R):
            if MASK[b, t]:
                vc = old[b, t].item() + min(max(v[b, t].item() - old[b, t].item(), -c), c)
                l1, l2 = (v[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2
                total += 0.5 * max(l1, l2)
                nclip += l2 > l1
                n += 1
    assert loss.item() == pytest.approx(total / n, abs=1e-12)
    assert clipfrac.item() == pytest.approx(nclip / n)


def test_explained_variance():
    ret = _rand(B, R)
    assert explained_variance(ret, ret, MASK).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret), ret, MASK).item() < 0.5


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 1000)                       # KL far above target: error clipped at +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    ctl.update(6.0 * 0.95, 1000)
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.05 * 0.1))
    fixed = AdaptiveKLController(0.1, target=None, horizon=10000)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.1
    restored = AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_policy_logprobs_line_up_with_the_reference_contract_columns():
    """πθ's response log-probs (rollout layout) equal the contract's columns [P−1:] on a padded batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tribune.trainer.data import pad_left
    from tribune.trainer.modeling import sequence_logprobs
    from tribune.trainer.modeling import response_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[20, 21, 1], [22, 1, 0], [23, 24, 25]]
    resp_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    p_ids, p_mask = pad_left(prompts, 0)
    P = p_ids.shape[1]
    qr = torch.cat([p_ids, torch.tensor(responses)], 1)
    mask = torch.cat([p_mask, resp_mask], 1)
    with torch.no_grad():
        ours, _ = response_logprobs(model, qr, mask, P, temperature=0.7)
        contract = sequence_logprobs(model, qr, mask, temperature=0.7)[:, P - 1:]
    torch.testing.assert_close(ours * resp_mask, contract, atol=1e-5, rtol=0)
    assert (contract[1, 2] == 0) and contract[1, 1] != 0
