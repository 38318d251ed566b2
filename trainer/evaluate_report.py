"""The evaluation's table, plot and summary lines (from the rows `tribune evaluate` writes)."""
from __future__ import annotations

from pathlib import Path

from tribune.trainer.measures import PERFECT, TARGET_RM_GOLD_ACCURACY


def row_name(r: dict) -> str:
    """``task`` for the pipeline's row, ``task·rN`` for round N of the iterated loop."""
    return r["task"] + (f"·r{r['round']}" if r.get("round") else "")


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [k for k in rows[0] if isinstance(rows[0][k], dict) and "ppo_gold" in rows[0][k]]
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(4.5 * (len(settings) + 1), 4))
    x = range(len(rows))
    for ax, name in zip(axes, settings):
        for shift, who, label in ((-0.2, "sft", "πSFT"), (0.2, "ppo", "PPO")):     # error bars: ± one standard error
            ax.bar([i + shift for i in x], [r[name][f"{who}_gold"] for r in rows], 0.4, label=label,
                   yerr=[r[name][f"{who}_gold_se"] for r in rows], capsize=3)
        ax.axhline(PERFECT, color="grey", lw=0.8, ls="--")
        ax.set_xticks(list(x), [row_name(r) for r in rows], rotation=30)
        ax.set_title(f"held-out gold score, {name}")
        ax.legend(fontsize=8)
    ax = axes[-1]
    ax.bar(list(x), [r["rm_gold_accuracy"] or 0 for r in rows])
    ax.axhline(TARGET_RM_GOLD_ACCURACY, color="red", lw=0.8, ls="--")
    ax.set_ylim(0.5, 1.0)
    ax.set_xticks(list(x), [row_name(r) for r in rows], rotation=30)
    ax.set_title("reward model: gold-order accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(rows: list[dict]) -> list[str]:
    settings = [k for k in rows[0] if isinstance(rows[0][k], dict) and "ppo_gold" in rows[0][k]]
    # eq-len: held-out accuracy on the rater's pairs of equal length (gold-free; near 0.5, the model ranks by length)
    # weight: the given pairs' weight the pipeline kept (--given-weights; '-' where it made no choice)
    head = ("task        weight  RM gold-acc  eq-len  own-samples  best-of-n  " + "  ".join(f"{s:>22s}" for s in settings)
            + "   KL    len SFT→PPO  stop   wall")
    lines = [head, " " * 38 + "(acc, gain)  " + " " * 12 + "  ".join(f"{'SFT → PPO ± se':>22s}" for _ in settings)]
    for r in rows:
        first, bon = r[settings[0]], r.get("best_of_n") or {}
        eq, w = r.get("rm_equal_length_accuracy"), r.get("rm_given_weight")
        lines.append(f"{row_name(r):<11s} {'-' if w is None else f'{w:g}':>6s}  {r['rm_gold_accuracy'] or 0:>10.3f}"
                     f"  {'-' if eq is None else f'{eq:.3f}':>6s}"
                     f"  {r.get('rm_onpolicy_accuracy') or 0:>11.3f}"
                     f"  {bon.get('gain_over_random', 0):>+9.3f}  "
                     + "  ".join(f"{r[s]['sft_gold']:+.3f} → {r[s]['ppo_gold']:+.3f} ± {r[s]['ppo_gold_se']:.3f}"
                                 for s in settings)
                     + f"  {r['ppo_final_kl'] or 0:5.2f}  {first['sft_length']:4.1f} → {first['ppo_length']:4.1f}"
                     + f"  {r.get('ppo_stopped_at') or '-':>4}  {r['wall_s']:5.0f}s")
    return lines


DATA_LABELS = {"given": "given pairs", "collected": "collected on πSFT's samples",
               "given_and_collected": "given + collected", "collected_equal_rows": "collected, as many rows as given"}


def comparison_lines(rows: list[dict]) -> list[str]:
    """The pipeline's reward model next to those of ``--compare-collected``, per task."""
    rows = [r for r in rows if r.get("compared")]
    if not rows:
        return []
    settings = [k for k in rows[0] if isinstance(rows[0][k], dict) and "ppo_gold" in rows[0][k]][:2]
    lines = ["reward models on other preference data than the pipeline's (same start and settings):",
             "task        data: pipeline's → other                                pairs  own-samples acc  held-out gold acc  "
             "best-of-n gain  " + "  ".join(f"PPO gold {s} (SFT → pipeline | other)" for s in settings)]
    for r in rows:
        for key, c in r["compared"].items():
            if not isinstance(c, dict):
                continue
            label = f"{DATA_LABELS[r.get('rm_data', 'given')]} → {DATA_LABELS[key]}"
            lines.append(f"{r['task']:<11s} {label:<55s} {c['pipeline_train_pairs']:>6d} → {c['train_pairs']:<6d}  "
                         f"{r['rm_onpolicy_accuracy'] or 0:.3f} → {c['rm_onpolicy_accuracy'] or 0:.3f}    "
                         f"{r['rm_gold_accuracy'] or 0:.3f} → {c['rm_gold_accuracy'] or 0:.3f}     "
                         f"{(r['best_of_n'] or {}).get('gain_over_random', 0):+.3f} → "
                         f"{c['best_of_n']['gain_over_random']:+.3f}  "
                         + "  ".join(f"{r[s]['sft_gold']:+.3f} → {r[s]['ppo_gold']:+.3f} | {c[s]['ppo_gold']:+.3f}"
                                     for s in settings))
    return lines


def study_lines(study: dict | None) -> list[str]:
    from tribune.trainer.overoptimisation import gold_peak

    if not study:
        return []
    lines = [f"over-optimisation study ({study['task']}, PPO {study['aggressive']}, {study['ensemble_size']}-member "
             f"ensemble of {study.get('members', 'seeds')}, starting from {study.get('member_starts', 'sft')}):"]
    for name, r in study["runs"].items():
        se = f" ± {r['final_gold_se']:.3f}" if r.get("final_gold_se") is not None else ""
        peak = gold_peak(r) or (0, r["sft_gold"])
        lines.append(f"  {name:<22s} gold {r['sft_gold']:+.3f} → best {peak[1]:+.3f} (iteration {peak[0]}) → "
                     f"{r['final_gold']:+.3f}{se}, proxy {r['sft_proxy']:+.3f} → {r['final_proxy']:+.3f}, "
                     f"KL {r['final_kl'] or 0:.2f}, length ×{r['final_length_ratio'] or 0:.2f}; "
                     f"over-optimised: {r['overoptimised']} (below πSFT: {r.get('fell_below_sft')}); "
                     f"gold-free warning at iteration {r['first_warning_at']}"
                     + (f" (gold then {r['gold_at_warning']:+.3f})" if r.get("gold_at_warning") is not None else "")
                     + (", before gold fell" if r.get("warned_before_fall") else ""))
    verdict = study.get("verdict")
    if verdict:
        lines.append(f"  single reward model over-optimised: {', '.join(verdict['single_overoptimised']) or 'no'}; "
                     f"ensemble with the penalty held (or warned before gold fell): "
                     f"{'yes' if verdict['ensemble_defended'] else 'no'} → the defence is "
                     f"{'shown' if verdict['shown'] else 'not shown'} on this run")
    return lines
