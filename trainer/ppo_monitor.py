"""Monitoring PPO: the gold score, reward-hacking warnings, the final plot.

The gold judge (``--judge`` / ``--judge-url``) is never used for training: it is evaluated
on held-out prompts every N iterations, next to the proxy (the served reward model) on the same responses. When the
proxy rises while gold falls between two evaluations, the policy is exploiting the reward
model (over-optimisation; Gao et al. 2022) and a warning says so.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tribune.services.common.jsonl import SkipCounter
from tribune.services.common.text import encode_prompt, pad
from tribune.services.judge import Judge
from tribune.trainer.data import load_preference_groups
from tribune.trainer.measures import fell_beyond_noise, prompt_mean_se
from tribune.trainer.modeling import sample_responses
from tribune.trainer.rollout import Generated

log = logging.getLogger("tribune")


@torch.no_grad()
def gold_and_proxy(policy, tokenizer, judge: Judge, scorer, prompts: list[str], *, max_prompt_length: int,
                   max_new_tokens: int, temperature: float, seed: int, chunk: int = 64) -> dict[str, float]:
    """Mean gold score (and its standard error over prompts) and mean proxy reward (raw) of one sampled
    response per held-out prompt."""
    golds, proxies, lengths = [], [], []
    for s in sample_responses(policy, tokenizer, prompts, max_prompt_length=max_prompt_length,
                              max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, chunk=chunk):
        golds += judge.score(s.prompts, s.texts)
        lengths += [len(t.split()) for t in s.texts]
        proxies += scorer.score(Generated(s.prompts, s.query_responses.cpu().numpy(), s.mask.cpu().numpy(),
                                          s.P)).tolist()
    n = len(golds)
    return {"gold/score": sum(golds) / n, "gold/score_se": prompt_mean_se(golds, 1), "gold/proxy_score": sum(proxies) / n,
            "gold/response_words": sum(lengths) / n}


def generated_from_text(tokenizer, prompts: list[str], responses: list[str], *, max_prompt_length: int,
                        max_new_tokens: int) -> Generated:
    """Given responses laid out as the policy's rollouts are: prompts left-padded to P, each response
    (cut to max_new_tokens − 1) + EOS after them, right-padded. (B, P+R) int64."""
    q_ids, q_mask = pad([encode_prompt(tokenizer, p, max_prompt_length) for p in prompts], tokenizer.pad_token_id,
                        left=True)
    r = [tokenizer(x, add_special_tokens=False)["input_ids"][:max_new_tokens - 1] + [tokenizer.eos_token_id]
         for x in responses]
    r_ids, r_mask = pad(r, tokenizer.pad_token_id, left=False)
    return Generated(list(prompts), np.concatenate([q_ids, r_ids], 1), np.concatenate([q_mask, r_mask], 1),
                     q_ids.shape[1])


def preferred_score(scorer, tokenizer, path: Path, optimised, *, max_prompt_length: int, max_new_tokens: int,
                    limit: int = 256, chunk: int = 64) -> tuple[float, int]:
    """(mean optimised score of the responses ranked first in a held-out preference file, rows used):
    how high PPO's objective rates what raters preferred — the height past which the policy's
    score is extrapolation (``tribune.trainer.defences.proxy_past_preferred``). ``optimised`` maps
    the members' raw scores (B, K) to the score PPO optimises (B,) (``ppo_step.optimised_score``)."""
    groups = load_preference_groups(path, SkipCounter())[:limit]
    total = 0.0
    for i in range(0, len(groups), chunk):
        part = groups[i:i + chunk]
        g = generated_from_text(tokenizer, [x.prompt for x in part], [x.responses[0] for x in part],
                                max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens)
        members = torch.from_numpy(np.asarray(scorer.score_members_async(g).result())).float()   # (b, K)
        total += float(optimised(members).sum())
    return total / len(groups), len(groups)


def served_preferred_score(facts, optimised) -> tuple[float, int]:
    """``preferred_score`` from the reward model's own scores of its preferred held-out responses,
    served with it (``ServedFacts.preferred_member_scores``, (rows, K)): no preference file needed."""
    members = torch.tensor(facts.preferred_member_scores, dtype=torch.float32)      # (rows, K)
    return float(optimised(members).mean()), members.shape[0]


@dataclass
class HackingDetector:
    """Warns when the proxy reward has risen while the gold score has fallen since its best evaluation so
    far: by more than ``tolerance`` and by more than ``z`` standard errors of the difference, so that the
    sampling noise of a few hundred held-out responses (a standard error of about 0.03–0.05 on a score in
    [0, 1]) does not raise the alarm, while a fall spread over several evaluations still does (each step of
    it may be within the noise)."""
    tolerance: float = 0.02
    z: float = 2.0
    history: list[tuple] = field(default_factory=list)   # (step, proxy, gold, gold SE or None: not recorded)

    def observe(self, step: int, proxy: float, gold: float, gold_se: float = 0.0) -> bool:
        hacked = False
        if self.history:
            s0, p0, g0, se0 = max(self.history, key=lambda h: h[2])       # the best gold so far (the first if tied)
            se0 = gold_se if se0 is None else se0          # a checkpoint's row from before the SE was kept
            if (proxy > p0 + self.tolerance and g0 - gold > self.tolerance
                    and fell_beyond_noise(g0, se0, gold, gold_se, self.z)):
                log.warning("reward hacking? step %d: since step %d, proxy reward rose %.3f → %.3f while the gold "
                            "score fell %.3f → %.3f (more than %g standard errors); consider a larger β (--kl-coef) "
                            "or stopping at step %d's checkpoint", step, s0, p0, proxy, g0, gold, self.z, s0)
                hacked = True
        self.history.append((step, proxy, gold, gold_se))
        return hacked

    def load_history(self, rows: list) -> None:
        """From a checkpoint; rows written before the standard error was kept have three fields (its SE is
        then taken to be the next evaluation's)."""
        self.history = [(*row[:3], row[3] if len(row) > 3 else None) for row in rows]


def plot_metrics(metrics_jsonl: Path, out_png: Path) -> Path | None:
    """reward, gold score and KL over iterations, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in Path(metrics_jsonl).read_text().splitlines() if l.strip()]
    if not rows:
        return None

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, keys, title in ((axes[0], ["objective/scores_normalized", "objective/rlhf_reward"], "proxy reward"),
                            (axes[1], ["gold/score", "gold/proxy_score"], "held-out: gold vs proxy"),
                            (axes[2], ["objective/kl"], "KL(πθ ‖ π_ref) per sequence")):
        for key in keys:
            x, y = series(key)
            if x:
                ax.plot(x, y, marker="o" if key.startswith("gold") else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
