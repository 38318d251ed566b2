"""Reward-hacking detection and the PPO plot."""
import json
import logging

from tribune.trainer.ppo_monitor import HackingDetector, plot_metrics


def test_warns_when_proxy_rises_while_gold_falls(caplog):
    d = HackingDetector(tolerance=0.02)
    with caplog.at_level(logging.WARNING, logger="tribune"):
        assert not d.observe(0, proxy=-0.5, gold=0.50)
        assert not d.observe(10, proxy=0.2, gold=0.60)       # both up: learning
        assert not d.observe(20, proxy=0.21, gold=0.55)      # proxy flat: not hacking
        assert d.observe(30, proxy=0.60, gold=0.40)          # proxy up, gold down
    assert "reward hacking" in caplog.text and "step 30" in caplog.text
    assert [h[0] for h in d.history] == [0, 10, 20, 30]


def test_a_gold_fall_within_the_sampling_noise_raises_no_warning(caplog):
    d = HackingDetector(tolerance=0.02, z=2.0)
    with caplog.at_level(logging.WARNING, logger="tribune"):
        assert not d.observe(0, proxy=1.36, gold=0.661, gold_se=0.03)
        # what a `make demo` warned about: gold 0.661 → 0.624, a fall of 0.037 < 2 · √(0.03² + 0.03²) = 0.085
        assert not d.observe(30, proxy=1.42, gold=0.624, gold_se=0.03)
        assert d.observe(40, proxy=1.60, gold=0.50, gold_se=0.03)        # 0.124 > 0.085
    assert caplog.text.count("reward hacking") == 1 and "step 40" in caplog.text


def test_a_slow_fall_is_caught_against_the_best_gold_so_far(caplog):
    # each step is within the noise (0.04 < 2 · √(0.03² + 0.03²) = 0.085); the fall since the best is not
    d = HackingDetector(tolerance=0.02, z=2.0)
    golds = [0.50, 0.46, 0.42, 0.38, 0.34]
    with caplog.at_level(logging.WARNING, logger="tribune"):
        fired = [d.observe(10 * i, proxy=0.2 * i, gold=g, gold_se=0.03) for i, g in enumerate(golds)]
    assert fired == [False, False, False, True, True]
    assert "step 30: since step 0, proxy reward rose 0.000 → 0.600 while the gold score fell 0.500 → 0.380" \
        in caplog.text


def test_the_gold_history_of_an_older_checkpoint_loads():
    d = HackingDetector()
    d.load_history([[0, -0.5, 0.5], [10, 0.2, 0.6, 0.03]])        # before and after the SE was kept
    assert d.history == [(0, -0.5, 0.5, None), (10, 0.2, 0.6, 0.03)]
    assert d.observe(20, proxy=0.6, gold=0.4, gold_se=0.03)
    old = HackingDetector()
    old.load_history([[0, 1.36, 0.661]])
    assert not old.observe(10, proxy=1.42, gold=0.624, gold_se=0.03)   # its SE taken as this one's: noise


def test_fell_beyond_noise_against_a_float64_reference():
    import math

    from tribune.trainer.measures import fell_beyond_noise

    for before, se0, after, se1 in ((0.5, 0.03, 0.42, 0.04), (0.5, 0.03, 0.39, 0.04), (0.5, 0.0, 0.49, 0.0)):
        want = (before - after) / math.sqrt(se0 ** 2 + se1 ** 2) > 2.0 if se0 or se1 else after < before
        assert fell_beyond_noise(before, se0, after, se1) == want
    assert not fell_beyond_noise(0.5, 0.03, 0.6, 0.03)               # a rise is never a fall


def test_plot_has_reward_gold_and_kl(tmp_path):
    rows = [{"step": s, "objective/scores_normalized": s / 10, "objective/rlhf_reward": s / 12,
             "objective/kl": s / 20} for s in range(1, 11)]
    rows += [{"step": s, "gold/score": 0.5 + s / 100, "gold/proxy_score": s / 10} for s in (0, 5, 10)]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_metrics(log, tmp_path / "ppo.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
