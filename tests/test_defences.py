"""Over-optimisation defences as pure functions, against float64 loops on hand-made tensors."""
import math

import pytest
import torch

from tribune.trainer.defences import (DriftMonitor, KLBudget, ensemble_reward, member_disagreement,
                                      proxy_past_preferred, standardise_members)

torch.manual_seed(0)
RAW = torch.randn(5, 4, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5, 2.0]) + torch.tensor([0.0, 5.0, -2.0, 1.0])
MEANS = torch.tensor([0.1, 4.0, -2.5, 1.5], dtype=torch.float64)
STDS = torch.tensor([1.2, 2.5, 0.4, 2.2], dtype=torch.float64)


def _std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def test_members_are_standardised_with_their_own_statistics():
    z = standardise_members(RAW, MEANS, STDS)
    for b in range(5):
        for k in range(4):
            assert z[b, k].item() == pytest.approx((RAW[b, k].item() - MEANS[k].item()) / STDS[k].item())


@pytest.mark.parametrize("coef", [0.0, 0.5, 2.0])
def test_uncertainty_weighted_and_worst_case_rewards(coef):
    z = standardise_members(RAW, MEANS, STDS)
    uwo, wco, mean = ensemble_reward(z, "uncertainty", coef), ensemble_reward(z, "worst"), ensemble_reward(z, "mean")
    for b in range(5):
        row = z[b].tolist()
        assert mean[b].item() == pytest.approx(sum(row) / 4)
        assert uwo[b].item() == pytest.approx(sum(row) / 4 - coef * _std(row))
        assert wco[b].item() == pytest.approx(min(row))
        assert member_disagreement(z)[b].item() == pytest.approx(_std(row))
    assert (wco <= mean).all() and (uwo <= mean + 1e-12).all()


def test_one_member_is_its_own_score_in_every_mode():
    z = torch.tensor([[0.3], [-1.2], [2.0]], dtype=torch.float64)
    for mode in ("mean", "uncertainty", "worst"):
        torch.testing.assert_close(ensemble_reward(z, mode, 5.0), z[:, 0])
    assert member_disagreement(z).abs().sum() == 0
    with pytest.raises(ValueError):
        ensemble_reward(z, "median")


def test_kl_budget_raises_beta_or_stops():
    raise_beta = KLBudget(target=2.0)
    assert raise_beta.check(1.9, 0.1) == (0.1, False)
    beta, stop = raise_beta.check(2.5, 0.1)
    assert beta == pytest.approx(0.15) and not stop and raise_beta.exceeded == 1
    assert KLBudget(target=2.0, action="stop").check(2.5, 0.1) == (0.1, True)
    assert KLBudget(target=None).check(100.0, 0.1) == (0.1, False)
    assert KLBudget(target=1.0).check(5.0, 0.0)[0] > 0        # a zero β can still be raised


def test_drift_monitor_warns_on_shrinking_length_or_rising_disagreement_while_the_proxy_rises():
    shrink = DriftMonitor(length_tolerance=0.3, window=2)
    rows = [(0.0, 1.0, 6.0), (0.1, 1.0, 6.0), (0.5, 1.0, 5.0), (0.9, 1.0, 3.0), (1.2, 1.0, 2.5)]
    flags = [shrink.observe(*r)["monitor/overoptimisation_warning"] for r in rows]
    assert flags[:3] == [0.0, 0.0, 0.0] and flags[-1] == 1.0
    assert shrink.observe(1.3, 1.0, 2.5)["monitor/length_ratio"] == pytest.approx(2.5 / 6.0)

    disagree = DriftMonitor(window=1)
    disagree.observe(0.0, 1.0, 5.0)
    assert disagree.observe(0.5, 1.5, 5.0)["monitor/overoptimisation_warning"] == 1.0

    honest = DriftMonitor(window=1)           # length drifts but the proxy does not rise: no alarm
    honest.observe(1.0, 1.0, 6.0)
    assert honest.observe(0.5, 1.0, 3.0)["monitor/overoptimisation_warning"] == 0.0
    restored = DriftMonitor(window=1)
    restored.load_state_dict(honest.state_dict())
    assert restored.history == honest.history


def test_proxy_past_preferred_against_a_float64_reference():
    proxy, start, preferred = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64).tolist()
    want = (proxy - start) / (preferred - start)
    assert proxy_past_preferred(proxy, start, preferred) == pytest.approx(want, rel=1e-12)
    assert proxy_past_preferred(preferred, start, preferred) == pytest.approx(1.0)
    assert math.isnan(proxy_past_preferred(1.0, 0.5, 0.5))      # favourites no higher than πSFT: no yardstick
    assert math.isnan(proxy_past_preferred(1.0, 0.5, 0.2))


def test_drift_monitor_warns_when_the_proxy_climbs_past_the_preferred_responses():
    # πSFT's samples score 0, the raters' favourites 1: warn past 1.5× their height, not before
    m = DriftMonitor(window=1, preferred=1.0, preferred_tolerance=1.5)
    rows = [m.observe(p, 0.0, 5.0) for p in (0.0, 0.8, 1.4, 1.6)]
    assert [r["monitor/overoptimisation_warning"] for r in rows] == [0.0, 0.0, 0.0, 1.0]
    assert [r["monitor/proxy_past_preferred"] for r in rows] == pytest.approx([0.0, 0.8, 1.4, 1.6])
    assert "monitor/proxy_past_preferred" not in DriftMonitor(window=1).observe(3.0, 0.0, 5.0)
    flat = DriftMonitor(window=1, preferred=-1.0)                 # favourites below πSFT: the alarm stays off
    assert [flat.observe(p, 0.0, 5.0)["monitor/overoptimisation_warning"] for p in (0.0, 9.0)] == [0.0, 0.0]
