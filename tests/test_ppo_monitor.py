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


def test_plot_has_reward_gold_and_kl(tmp_path):
    rows = [{"step": s, "objective/scores_normalized": s / 10, "objective/rlhf_reward": s / 12,
             "objective/kl": s / 20} for s in range(1, 11)]
    rows += [{"step": s, "gold/score": 0.5 + s / 100, "gold/proxy_score": s / 10} for s in (0, 5, 10)]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_metrics(log, tmp_path / "ppo.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
