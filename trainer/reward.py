"""Stage 2, `tribune train-rm`: a Bradley–Terry reward model from the SFT weights.

The model is ``AutoModelForSequenceClassification`` with one label (a fresh scalar head on
the SFT backbone), so the saved directory loads anywhere as a standard HF model. The
reward of a sequence is the head's value at its last real token (EOS), for either
padding side.

A batch holds whole preference groups: a k-way ranking contributes all its C(k, 2) pairs
to the same batch (InstructGPT), weighted so each prompt counts once. Every distinct
(prompt, response) sequence of the batch goes through a single forward pass, chosen and
rejected alike, and pairs index into the resulting rewards.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tribune.services.common.config import field, group
from tribune.services.common.errors import UserError
from tribune.services.common.jsonl import SkipCounter, write_json
from tribune.services.common.text import Truncation, encode_pair, encode_prompt, load_tokenizer
from tribune.services.judge import Judge, JudgeConfig, load_judge
from tribune.services.repository import other_tokenizer
from tribune.trainer.adapters import prepare_model
from tribune.trainer.lengths import (check_lengths, fit_generation, model_context, trained_lengths,
                                     with_fitted_lengths)
from tribune.trainer.data import PreferenceGroup, load_preference_groups, pad_right
from tribune.trainer.losses import bradley_terry_loss, pairwise_accuracy, ranking_to_pairs
from tribune.trainer.measures import at_chance
from tribune.trainer.modeling import (check_model_dir, load_causal_lm, load_reward_model, reward_head_name, sample_responses,
                              score_sequences)
from tribune.trainer.run import Run, TrainingConfig, default, train_supervised

log = logging.getLogger("tribune")

# The one home of a reward model's statistics: mean and std of its rewards on πSFT samples
# (PPO's normalisation), next to the saved model. `tribune export` serves them.
REWARD_STATS_FILE = "reward_stats.json"


def read_reward_stats(rm_dir: Path) -> dict | None:
    """The statistics a Tribune reward model was saved with; None for a model from elsewhere."""
    path = Path(rm_dir) / REWARD_STATS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(kw_only=True)
class RewardConfig(TrainingConfig):
    """Reward-model training (Bradley–Terry on preference pairs and rankings)."""
    model: Path = field(help="model directory the reward model starts from: the SFT model, or a reward model "
                             "to warm-start from (its scalar head kept)")
    train: Path = field(help="JSONL of {prompt, chosen, rejected} or {prompt, ranking}")
    eval: Path = field(help="held-out preference JSONL in the same format")
    max_length: int | None = field(None, help="maximum tokens of prompt + response + EOS (default: the longest "
                                   "sequence of the data, or with --max-prompt-length that plus the longest "
                                   "response; at most the model's max_position_embeddings)")
    max_prompt_length: int | None = field(None, help="prompts longer than this are cut from the left (default: the "
                                          "longest prompt, at most 3/4 of max_length when some sequences are cut)")
    epochs: float = default(TrainingConfig, "epochs", 4.0)
    evals_per_epoch: float = default(TrainingConfig, "evals_per_epoch", 4.0)
    keep_best: bool = default(TrainingConfig, "keep_best", True)
    early_stopping_patience: int | None = default(TrainingConfig, "early_stopping_patience", 6)
    margin_scale: float = field(1.0, help="multiplies a pair's optional 'margin' field in the loss")
    center_rewards_coefficient: float = field(0.0, help="weight of TRL's reward-centering term mean((r_w+r_l)^2)")
    gold: JudgeConfig = group(JudgeConfig(), help="gold judge: accuracy against its ordering of the eval pairs")
    stats_samples: int = field(256, help="responses sampled from the SFT policy for the reward mean/std")
    stats_max_new_tokens: int | None = field(None, help="maximum length of those sampled responses (default: what "
                                             "`tribune ppo` samples from that policy by default, so the statistics "
                                             "describe responses as long as PPO's: its SFT run's response room, else "
                                             "what its context leaves after the longest prompt, at most 256)")
    stats_policy: Path | None = field(None, help="policy those responses are sampled from (default: --model; "
                                      "give the policy PPO will start from when --model is a reward model)")
    ensemble: int = field(1, help="train K members (different seeds and data order) into OUTPUT/member-i")
    bootstrap: bool = field(False, help="with --ensemble: each member trains on a bootstrap resample of the rows")
    member_train: list[Path] = field([], help="with --ensemble: member i trains on file i mod N of these instead of "
                                     "--train (members that learn from different data err less alike, e.g. the "
                                     "given pairs and preferences collected on the policy's samples)")
    member_eval: list[Path] = field([], help="with --member-train: member i early-stops on file i mod N of these "
                                    "instead of --eval, held-out data of the kind it trains on (one file per "
                                    "--member-train file; a member scored on another kind kept its first weights)")
    member_model: list[Path] = field([], help="with --ensemble: member i starts from model directory i mod N of these "
                                     "instead of --model (e.g. SFT runs of other seeds, with the same tokenizer: "
                                     "members that start apart err less alike); the statistics still sample "
                                     "--stats-policy, by default --model")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lengths(self.max_length, self.max_prompt_length)
        if self.center_rewards_coefficient < 0:
            raise ValueError("center_rewards_coefficient must be non-negative")
        if self.stats_samples < 2:
            raise ValueError("stats_samples must be at least 2")
        if self.stats_max_new_tokens is not None and self.stats_max_new_tokens < 1:
            raise ValueError("stats_max_new_tokens must be at least 1")
        if self.ensemble < 1:
            raise ValueError("ensemble must be at least 1")
        if self.member_train and self.ensemble < 2:
            raise ValueError("member_train needs --ensemble K with K >= 2")
        if self.member_model and self.ensemble < 2:
            raise ValueError("member_model needs --ensemble K with K >= 2")
        if len(self.member_model) > self.ensemble:
            raise ValueError(f"member_model: {len(self.member_model)} starts for {self.ensemble} members")
        if self.member_eval and len(self.member_eval) != len(self.member_train):
            raise ValueError(f"member_eval needs one file per member_train file ({len(self.member_train)}), "
                             f"got {len(self.member_eval)}")


class RewardScorer(nn.Module):
    """Wraps the HF model so one forward call (through DDP) gives rewards (B,)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return score_sequences(self.model, input_ids, attention_mask)


@dataclass
class PairBatch:
    """A batch of preference groups flattened for one forward pass.

    input_ids, attention_mask: (S, T) every distinct sequence, right-padded;
    chosen_idx, rejected_idx, margin, weight, group_idx: (K,) one entry per pair (group_idx: its group's
    index in the batch; weight: the group's weight over its pairs and the batch's groups, so rows of weight 1
    sum to 1).
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    chosen_idx: torch.Tensor
    rejected_idx: torch.Tensor
    margin: torch.Tensor
    weight: torch.Tensor
    group_idx: torch.Tensor


def collate_groups(tokenizer, groups: list[PreferenceGroup], max_prompt_length: int, max_length: int,
                   trunc: Truncation | None = None) -> PairBatch:
    seqs, chosen, rejected, margin, weight, group = [], [], [], [], [], []
    for gi, g in enumerate(groups):
        base = len(seqs)
        seqs.extend(encode_pair(tokenizer, g.prompt, r, max_prompt_length, max_length, trunc)[0]
                    for r in g.responses)
        pairs = ranking_to_pairs(len(g.responses))
        for a, b in pairs:
            chosen.append(base + a)
            rejected.append(base + b)
            margin.append(g.margin)
            weight.append(g.weight / (len(pairs) * len(groups)))      # rows of weight 1 share the loss equally
            group.append(gi)
    ids, mask = pad_right(seqs, tokenizer.pad_token_id)
    return PairBatch(ids, mask, torch.tensor(chosen), torch.tensor(rejected),
                     torch.tensor(margin, dtype=torch.float32), torch.tensor(weight, dtype=torch.float32),
                     torch.tensor(group, dtype=torch.long))


def pair_rewards(scorer: nn.Module, batch: PairBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
    r = scorer(batch.input_ids.to(device), batch.attention_mask.to(device))        # (S,)
    return r[batch.chosen_idx.to(device)], r[batch.rejected_idx.to(device)]        # (K,), (K,)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (0 when either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.norm() * y.norm()).item()
    return float((x * y).sum() / denom) if denom > 0 else 0.0


@torch.no_grad()
def evaluate_rm(scorer, tokenizer, groups: list[PreferenceGroup], cfg: RewardConfig, device,
                judge: Judge | None) -> dict[str, float]:
    """Held-out pairwise accuracy, mean margin and loss; accuracy against the judge's ordering;
    and how much the reward leans on response length (its most common flaw: Singhal et al. 2023),
    next to how much the gold score does. From the labels alone (no judge needed): the accuracy on
    the pairs whose two responses have the same length, where length cannot decide (``eval_equal_length_accuracy``,
    over ``eval_equal_length_pairs`` pairs from ``eval_equal_length_groups`` rows): at chance,
    the reward model has learnt length and little else."""
    rc, rr, mg, eq_all, gold_hits, gold_pairs, eq_groups = [], [], [], [], 0, 0, 0
    rewards, lengths, golds_all = [], [], []
    for i in range(0, len(groups), 64):
        chunk = groups[i:i + 64]
        batch = collate_groups(tokenizer, chunk, cfg.max_prompt_length, cfg.max_length)
        r_all = scorer(batch.input_ids.to(device), batch.attention_mask.to(device)).cpu()       # (S,)
        c, r = r_all[batch.chosen_idx], r_all[batch.rejected_idx]                              # (K,), (K,)
        rc.append(c), rr.append(r), mg.append(batch.margin)
        rewards.append(r_all)
        lengths += [len(tokenizer(resp, add_special_tokens=False)["input_ids"]) for g in chunk for resp in g.responses]
        # a pair shares its prompt: equal sequences as the model sees them (after any cut) are equal responses
        seq_lengths = batch.attention_mask.sum(-1)                                              # (S,)
        eq = seq_lengths[batch.chosen_idx] == seq_lengths[batch.rejected_idx]                   # (K,)
        eq_all.append(eq)
        eq_groups += int(batch.group_idx[eq].unique().numel())
        if judge is not None:
            flat = judge.score([g.prompt for g in chunk for _ in g.responses], [r for g in chunk for r in g.responses])
            golds_all += flat
            k, start = 0, 0
            for g in chunk:
                golds, start = flat[start:start + len(g.responses)], start + len(g.responses)
                for a, b in ranking_to_pairs(len(g.responses)):
                    if golds[a] != golds[b]:
                        gold_pairs += 1
                        better_first = golds[a] > golds[b]
                        gold_hits += int((c[k] > r[k]).item() == better_first)
                    k += 1
    c, r, m = torch.cat(rc), torch.cat(rr), torch.cat(mg)
    length = torch.tensor(lengths, dtype=torch.float64)
    metrics = {
        "eval_accuracy": float(pairwise_accuracy(c, r)),
        "eval_loss": float(bradley_terry_loss(c, r, cfg.margin_scale * m)),
        "eval_margin": float((c - r).mean()),
        "eval_pairs": int(c.numel()),
        "eval_length_correlation": pearson(torch.cat(rewards), length),
    }
    eq = torch.cat(eq_all)
    if eq.any():
        metrics.update({"eval_equal_length_accuracy": float(pairwise_accuracy(c[eq], r[eq])),
                        "eval_equal_length_pairs": int(eq.sum()), "eval_equal_length_groups": eq_groups})
    if judge is not None and gold_pairs:
        metrics["eval_gold_accuracy"] = gold_hits / gold_pairs
        metrics["eval_gold_length_correlation"] = pearson(torch.tensor(golds_all), length)
    return metrics


def warn_if_length_only(metrics: dict, min_rows: int = 30) -> bool:
    """Warns (and says True) when the held-out pairs of equal-length responses, from at least ``min_rows``
    rows, are ranked at chance: the reward model orders responses by length and little else, so PPO
    against it can only move the length (gold-free; the keyword task's reward model is such a case)."""
    n = metrics.get("eval_equal_length_groups", 0)
    if n < min_rows or not at_chance(metrics["eval_equal_length_accuracy"], n):
        return False
    log.warning("train-rm: on held-out pairs of equal length the reward model is at chance (accuracy %.3f over %d "
                "pairs from %d rows, %.3f on all pairs): it ranks by length and little else, so PPO against it can "
                "only change the length; more or cleaner preferences on what the raters judge besides length, or a "
                "base model able to tell it, are what help", metrics["eval_equal_length_accuracy"],
                metrics["eval_equal_length_pairs"], n, metrics["eval_accuracy"])
    return True


@torch.no_grad()
def evaluate_rm_dir(rm_dir: Path, path: Path, cfg: RewardConfig, judge: Judge | None) -> dict[str, float]:
    """``evaluate_rm`` of a saved reward model (an ensemble: its members' mean) on any preference file,
    e.g. gold-ordered rankings of the policy's own samples."""
    if cfg.max_length is None or cfg.max_prompt_length is None:     # the lengths the model was trained with
        saved = Path(rm_dir) / "config.resolved.json"
        trained = json.loads(saved.read_text()) if saved.is_file() else {}
        cfg = dataclasses.replace(cfg, max_length=trained.get("max_length") or 512,
                                  max_prompt_length=trained.get("max_prompt_length") or 384)
    members = [RewardScorer(load_reward_model(m)).eval() for m in reward_members(rm_dir)]
    scorer = members[0] if len(members) == 1 else (lambda ids, mask: torch.stack([m(ids, mask) for m in members]).mean(0))
    return evaluate_rm(scorer, load_tokenizer(rm_dir), load_preference_groups(path, SkipCounter()), cfg, "cpu", judge)


def stats_response_length(cfg: RewardConfig, sft_dir: Path, tokenizer, prompts: list[str]) -> int:
    """--stats-max-new-tokens, else what `tribune ppo` samples from that policy by default
    (``tribune.trainer.lengths.fit_generation``: its SFT run's response room, else what its context
    leaves after the longest prompt, at most 256), so the statistics describe PPO's responses."""
    if cfg.stats_max_new_tokens is not None:
        return cfg.stats_max_new_tokens
    lengths = [len(encode_prompt(tokenizer, p, 1 << 30)) for p in prompts]
    return fit_generation(lengths, model_context(sft_dir), trained_lengths(sft_dir))[0]


@torch.no_grad()
def reward_stats_on_sft_samples(score, sft_dir: Path, tokenizer, prompts: list[str], cfg: RewardConfig,
                                device) -> dict[str, float]:
    """Mean and std of ``score(ids, mask) -> (B,)`` on responses sampled from πSFT: PPO's normalisation.

    The samples depend on the base seed only, so every member of an ensemble (and the
    ensemble's mean) is measured on the same responses.
    """
    new_tokens = stats_response_length(cfg, sft_dir, tokenizer, prompts)
    policy = load_causal_lm(sft_dir).to(device)
    rewards = []
    for s in sample_responses(policy, tokenizer, prompts, max_prompt_length=cfg.max_prompt_length,
                              max_new_tokens=new_tokens, seed=cfg.seed + 17):
        # the sampled ids themselves, as PPO sends them (no re-tokenisation of decoded text)
        rewards.append(score(s.query_responses.to(device), s.mask.to(device)).cpu())
    r = torch.cat(rewards).double()
    return {"mean": float(r.mean()), "std": float(r.std().clamp(min=1e-6)), "samples": int(r.numel()),
            "max_new_tokens": new_tokens, "source": "responses sampled from the SFT policy at temperature 1"}


PREFERRED_ROWS = 256     # held-out rows whose first-ranked response the reward model's stats keep scored


@torch.no_grad()
def preferred_member_scores(scores: list, tokenizer, groups: list[PreferenceGroup], cfg: RewardConfig,
                            device) -> list[list[float]]:
    """(rows, K): each of the K scorers' raw score ``score(ids, mask) -> (B,)`` of the response ranked first
    in each of the first PREFERRED_ROWS held-out rows — how high the reward model rates what raters
    preferred. Served with the model (``ServedFacts.preferred_member_scores``), so that PPO's gold-free
    monitor has that height without the preference file (``tribune ppo --preferred-eval`` measures it
    from a file instead)."""
    firsts = [PreferenceGroup(g.prompt, g.responses[:1]) for g in groups[:PREFERRED_ROWS]]
    rows = []
    for i in range(0, len(firsts), 64):
        batch = collate_groups(tokenizer, firsts[i:i + 64], cfg.max_prompt_length, cfg.max_length)
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        rows.append(torch.stack([score(ids, mask).cpu() for score in scores], 1))          # (b, K)
    return torch.cat(rows).double().tolist() if rows else []


def with_preferred(stats: dict, scores: list, tokenizer, groups: list[PreferenceGroup], cfg: RewardConfig,
                   device) -> dict:
    """``stats`` plus the scorers' ``preferred_member_scores`` on ``groups`` (the rows of ``cfg.eval``)
    and where they come from."""
    rows = preferred_member_scores(scores, tokenizer, groups, cfg, device)
    return {**stats, "preferred_member_scores": rows,
            "preferred_source": f"the responses ranked first in the first {len(rows)} rows of {cfg.eval}"}


ENSEMBLE_FILE = "ensemble.json"      # {"ensemble_size": K, "members": ["member-0", ...]} of `--ensemble K`


def reward_members(rm_dir: Path) -> list[Path]:
    """The reward models behind ``--reward``: [rm_dir] itself, or the K members its ensemble.json lists."""
    rm_dir = Path(rm_dir)
    path = rm_dir / ENSEMBLE_FILE
    if not path.is_file():
        return [check_model_dir(rm_dir)]
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    members = spec.get("members") if isinstance(spec, dict) else None
    if not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members):
        raise UserError(f"{path}: 'members' must be a non-empty list of member directory names")
    if spec.get("ensemble_size") != len(members):
        raise UserError(f"{path}: ensemble_size is {spec.get('ensemble_size')}, but {len(members)} members are listed")
    if any(Path(m).is_absolute() or ".." in Path(m).parts for m in members) or len(set(members)) != len(members):
        raise UserError(f"{path}: members must be distinct directories inside {rm_dir}")
    return [check_model_dir(rm_dir / m) for m in members]


PER_MEMBER_METRICS = ("eval_accuracy", "eval_gold_accuracy", "best_step", "stopped_early_at")


def ensemble_metrics(per_member: list[dict]) -> dict:
    """The members' mean of every number all of them report, and the per-member lists of
    PER_MEMBER_METRICS (None for a member without it: e.g. one that did not stop early)."""
    numeric = [{k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} for m in per_member]
    shared = set.intersection(*numeric)
    metrics: dict = {k: sum(m[k] for m in per_member) / len(per_member) for k in per_member[0] if k in shared}
    metrics.update({f"member_{k}": [m.get(k) for m in per_member] for k in PER_MEMBER_METRICS
                    if any(k in m for m in per_member)})
    return metrics


def for_members(files: list[Path], k: int) -> list[Path]:
    """File i mod N of ``files`` for each of k ensemble members ([] when none are given)."""
    return [files[i % len(files)] for i in range(k)] if files else []


def check_member_starts(cfg: RewardConfig, tokenizer, starts: list[Path]) -> None:
    """The members' starts (--member-model) are models with ``--model``'s tokenizer (the ensemble is served
    with one) and a context that holds the lengths fitted to ``--model``."""
    other = other_tokenizer(tokenizer, cfg.model, [check_model_dir(m) for m in starts])
    if other is not None:
        raise UserError(f"member_model {other}: its tokenizer differs from {cfg.model}'s; an ensemble's members "
                        "share one tokenizer")
    for m in dict.fromkeys(starts):
        context = model_context(m)
        if context is not None and context < cfg.max_length:
            raise UserError(f"member_model {m}: its context ({context} tokens) is shorter than max_length "
                            f"{cfg.max_length}; give --max-length at most {context}")


def run_train_rm(cfg: RewardConfig) -> dict[str, float]:
    """One reward model, or with ``--ensemble K`` K members and OUTPUT/ensemble.json."""
    # one truncation for every member (text clients need one), fitted on all the training rows
    train, tokenizer = load_preference_groups(cfg.train, SkipCounter()), load_tokenizer(cfg.model)
    cfg = with_fitted_lengths(cfg, cfg.model, tokenizer, [(g.prompt, r) for g in train for r in g.responses])
    if cfg.ensemble == 1:
        return train_one_rm(cfg)
    out = Path(cfg.output)
    members, per_member = [f"member-{i}" for i in range(cfg.ensemble)], []
    # every member's statistics on the same πSFT samples (same prompts, same seed), whatever rows it trains on:
    # offsets between them must come from the members, not from what they were measured on
    stats_prompts = [g.prompt for g in train[:cfg.stats_samples]]
    trains, evals = for_members(cfg.member_train, cfg.ensemble), for_members(cfg.member_eval, cfg.ensemble)
    starts = for_members(cfg.member_model, cfg.ensemble) or [cfg.model] * cfg.ensemble
    if cfg.member_model:
        check_member_starts(cfg, tokenizer, starts)
    for i, name in enumerate(members):
        log.info("train-rm: ensemble member %d/%d → %s", i + 1, cfg.ensemble, out / name)
        member = dataclasses.replace(cfg, ensemble=1, output=out / name, seed=cfg.seed + 1009 * i, member_train=[],
                                     member_eval=[], member_model=[], model=starts[i],
                                     stats_policy=cfg.stats_policy or cfg.model,
                                     train=trains[i] if trains else cfg.train, eval=evals[i] if evals else cfg.eval)
        per_member.append(train_one_rm(member, bootstrap_seed=member.seed if cfg.bootstrap else None,
                                       stats_seed=cfg.seed, stats_prompts=stats_prompts))
    metrics = ensemble_metrics(per_member)
    metrics["ensemble_size"] = cfg.ensemble
    tokenizer.save_pretrained(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"      # sampling PPO-length responses: a GPU if any
    models = [load_reward_model(out / name).eval().to(device) for name in members]
    stats = reward_stats_on_sft_samples(lambda ids, mask: torch.stack([score_sequences(m, ids, mask) for m in models])
                                        .mean(0), cfg.stats_policy or cfg.model, tokenizer, stats_prompts, cfg, device)
    stats["source"] += ", the members' mean"
    stats = with_preferred(stats, [lambda ids, mask, m=m: score_sequences(m, ids, mask) for m in models], tokenizer,
                           load_preference_groups(cfg.eval, SkipCounter()), cfg, device)
    metrics.update({"reward_mean": stats["mean"], "reward_std": stats["std"]})
    write_json(out / REWARD_STATS_FILE, stats)
    write_json(out / ENSEMBLE_FILE, {"ensemble_size": cfg.ensemble, "members": members, "bootstrap": cfg.bootstrap,
                                     "member_train": list(map(str, trains)), "member_eval": list(map(str, evals)),
                                     "member_model": list(map(str, starts))})
    write_json(out / "metrics.json", metrics)
    return metrics


def train_one_rm(cfg: RewardConfig, bootstrap_seed: int | None = None, stats_seed: int | None = None,
                 stats_prompts: list[str] | None = None) -> dict[str, float]:
    """One reward model; an ensemble member gets the seed and prompts of the ensemble's statistics."""
    run = Run(cfg, cfg.model, desc="train-rm")
    acc, tokenizer = run.acc, run.tokenizer
    skipped = SkipCounter()
    train = load_preference_groups(cfg.train, skipped)
    if bootstrap_seed is not None:     # a resample with replacement: members err less alike (Eisenstein et al.)
        g = torch.Generator().manual_seed(bootstrap_seed)
        train = [train[i] for i in torch.randint(len(train), (len(train),), generator=g).tolist()]
    eval_skipped = SkipCounter()
    evals = load_preference_groups(cfg.eval, eval_skipped)
    judge = load_judge(cfg.gold, [g.prompt for g in evals])    # tried on one of them before training
    trunc = Truncation()
    collate_groups(tokenizer, train, cfg.max_prompt_length, cfg.max_length, trunc)
    n_pairs = sum(math.comb(len(g.responses), 2) for g in train)
    log.info("train-rm: %d train rows (%d pairs), %d eval rows; skipped train: %s; skipped eval: %s; "
             "max_length %d, max_prompt_length %d; truncated prompts: %d, responses: %d", len(train), n_pairs,
             len(evals), skipped.summary(), eval_skipped.summary(), cfg.max_length, cfg.max_prompt_length,
             trunc.prompts, trunc.responses)

    rm = load_reward_model(cfg.model, dropout=cfg.dropout)
    scorer = RewardScorer(prepare_model(rm, cfg.memory, head=reward_head_name(rm), name="train-rm"))

    def loss_on(module, idx):
        batch = collate_groups(tokenizer, [train[i] for i in idx], cfg.max_prompt_length, cfg.max_length)
        c, r = pair_rewards(module, batch, acc.device)
        # weights sum to 1 over this rank's groups when every row weighs 1; DDP then averages across ranks
        loss = bradley_terry_loss(c, r, cfg.margin_scale * batch.margin.to(acc.device),
                                  cfg.center_rewards_coefficient, batch.weight.to(acc.device))
        return loss, {"accuracy": float(pairwise_accuracy(c, r)), "margin": float((c - r).mean().detach())}

    scorer, metrics = train_supervised(run, cfg, scorer, len(train), loss_on,
                                       lambda m: evaluate_rm(m, tokenizer, evals, cfg, acc.device, judge))
    rm = scorer.model
    if run.is_main:
        warn_if_length_only(metrics)
    prompts = stats_prompts if stats_prompts is not None else [g.prompt for g in train[:cfg.stats_samples]]
    stats_cfg = dataclasses.replace(cfg, seed=cfg.seed if stats_seed is None else stats_seed)
    stats = reward_stats_on_sft_samples(lambda ids, mask: score_sequences(rm, ids, mask), cfg.stats_policy or cfg.model,
                                        tokenizer,
                                        prompts, stats_cfg, acc.device)
    stats = with_preferred(stats, [lambda ids, mask: score_sequences(rm, ids, mask)], tokenizer, evals, cfg,
                           acc.device)
    metrics.update({"reward_mean": stats["mean"], "reward_std": stats["std"], "train_rows": len(train),
                    "train_pairs": n_pairs, "skipped_rows": skipped.total + eval_skipped.total})
    metrics = run.finish(rm, metrics)
    if run.is_main:
        write_json(run.out / REWARD_STATS_FILE, stats)
    return metrics
