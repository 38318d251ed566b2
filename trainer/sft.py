"""Stage 1, `tribune sft`: supervised fine-tuning of any local causal LM.

Loss on response tokens only (prompt and padding labels are −100); EOS is appended to
every response so the policy learns to stop; long prompts are cut from the left and the
cuts are counted and reported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tribune.services.common.config import field, group
from tribune.services.common.jsonl import SkipCounter
from tribune.services.common.text import Truncation, encode_pair
from tribune.services.judge import Judge, JudgeConfig, load_judge
from tribune.trainer.adapters import prepare_model
from tribune.trainer.lengths import check_lengths, with_fitted_lengths
from tribune.trainer.data import load_sft_rows, pad_right
from tribune.trainer.modeling import causal_logits, load_causal_lm, sample_responses
from tribune.trainer.run import OptimizerConfig, Run, TrainingConfig, default, train_supervised

log = logging.getLogger("tribune")


@dataclass(kw_only=True)
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning.

    By default up to 20 epochs at a learning rate of 3e-3, the held-out loss measured once per
    epoch, the weights of the lowest kept, stopped after 2 epochs without a lower one: chosen on the
    task suite (the same defaults as the pipeline's), where 1 or 3 fixed epochs left πSFT far below
    its demonstrator and a reward model starting from it without the features it has to judge."""
    epochs: float = default(TrainingConfig, "epochs", 20.0)
    evals_per_epoch: float = default(TrainingConfig, "evals_per_epoch", 1.0)
    keep_best: bool = default(TrainingConfig, "keep_best", True)
    early_stopping_patience: int | None = default(TrainingConfig, "early_stopping_patience", 2)
    optim: OptimizerConfig = group(OptimizerConfig(learning_rate=3e-3), help="optimiser")
    model: Path = field(help="local Hugging Face model directory to start from")
    train: Path = field(help="JSONL of {prompt, response} or {messages}")
    eval: Path | None = field(None, help="held-out JSONL in the same format (default: 5% of --train)")
    max_length: int | None = field(None, help="maximum tokens of prompt + response + EOS (default: the longest "
                                   "sequence of the data, or with --max-prompt-length that plus the longest "
                                   "response; at most the model's max_position_embeddings)")
    max_prompt_length: int | None = field(None, help="prompts longer than this are cut from the left (default: the "
                                          "longest prompt, at most 3/4 of max_length when some sequences are cut)")
    eval_fraction: float = field(0.05, help="share of --train held out when --eval is not given")
    gold: JudgeConfig = group(JudgeConfig(), help="gold judge for evaluation")
    gold_eval_prompts: int = field(200, help="held-out prompts sampled for the gold score (with a judge)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lengths(self.max_length, self.max_prompt_length)
        if not 0 < self.eval_fraction < 1:
            raise ValueError("eval_fraction must be in (0, 1)")


def sft_batch(tokenizer, rows: list[tuple[str, str]], cfg: SFTConfig, trunc: Truncation | None = None):
    """(input_ids, attention_mask, labels) each (B, T), right-padded, labels −100 off-response."""
    seqs, plens = zip(*(encode_pair(tokenizer, p, r, cfg.max_prompt_length, cfg.max_length, trunc)
                        for p, r in rows))
    ids, mask = pad_right(list(seqs), tokenizer.pad_token_id)
    labels = ids.clone()
    for i, plen in enumerate(plens):
        labels[i, :plen] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def response_nll(model, ids, mask, labels) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens. (B, T) inputs -> ()"""
    logits = causal_logits(model, ids, mask)                                # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


@torch.no_grad()
def gold_eval(model, tokenizer, judge: Judge, prompts: list[str], max_prompt_length: int, max_new_tokens: int,
              seed: int, batch_size: int = 64) -> dict[str, float]:
    """Mean gold score of sampled responses (temperature 1) to held-out prompts."""
    scores, lengths = [], []
    for s in sample_responses(model, tokenizer, prompts, max_prompt_length=max_prompt_length,
                              max_new_tokens=max_new_tokens, seed=seed, chunk=batch_size):
        scores += judge.score(s.prompts, s.texts)
        lengths += [len(t.split()) for t in s.texts]
    return {"gold_score": sum(scores) / len(scores), "gold_response_words": sum(lengths) / len(lengths)}


def run_sft(cfg: SFTConfig) -> dict[str, float]:
    run = Run(cfg, cfg.model, desc="sft")
    acc, tokenizer = run.acc, run.tokenizer
    skipped = SkipCounter()
    rows = load_sft_rows(cfg.train, tokenizer, skipped)
    if cfg.eval is not None:
        eval_rows = load_sft_rows(cfg.eval, tokenizer, skipped)
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        perm = torch.randperm(len(rows), generator=g).tolist()
        n_eval = max(1, int(len(rows) * cfg.eval_fraction))
        eval_rows, rows = [rows[i] for i in perm[:n_eval]], [rows[i] for i in perm[n_eval:]]
    cfg = run.cfg = with_fitted_lengths(cfg, cfg.model, tokenizer, rows + eval_rows)
    trunc = Truncation()
    for p, r in rows:  # count truncations once, up front
        encode_pair(tokenizer, p, r, cfg.max_prompt_length, cfg.max_length, trunc)
    log.info("sft: %d train rows, %d eval rows; skipped: %s; max_length %d, max_prompt_length %d; truncated "
             "prompts: %d, responses: %d", len(rows), len(eval_rows), skipped.summary(), cfg.max_length,
             cfg.max_prompt_length, trunc.prompts, trunc.responses)

    model = prepare_model(load_causal_lm(cfg.model, dropout=cfg.dropout), cfg.memory, name="sft")

    def loss_on(module, idx):
        ids, mask, labels = sft_batch(tokenizer, [rows[i] for i in idx], cfg)
        return response_nll(module, ids.to(acc.device), mask.to(acc.device), labels.to(acc.device)), {}

    gold_prompts = [p for p, _ in eval_rows][:cfg.gold_eval_prompts]
    judge = load_judge(cfg.gold, gold_prompts)          # tried on one of them before training

    def evaluate(module) -> dict[str, float]:
        losses = []
        with torch.no_grad():
            for i in range(0, len(eval_rows), 64):
                ids, mask, labels = sft_batch(tokenizer, eval_rows[i:i + 64], cfg)
                losses.append(float(response_nll(module, ids.to(acc.device), mask.to(acc.device),
                                                 labels.to(acc.device))))
        metrics = {"eval_loss": sum(losses) / len(losses)}
        if judge is not None:
            metrics.update(gold_eval(module, tokenizer, judge, gold_prompts, cfg.max_prompt_length,
                                     cfg.max_length - cfg.max_prompt_length, cfg.seed))
        return metrics

    model, metrics = train_supervised(run, cfg, model, len(rows), loss_on, evaluate)
    metrics.update({"train_rows": len(rows), "skipped_rows": skipped.total,
                    "truncated_prompts": trunc.prompts, "truncated_responses": trunc.responses})
    return run.finish(model, metrics)
