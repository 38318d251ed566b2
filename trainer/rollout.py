"""Rollouts: generate with the local policy, score with the remote services, overlapped.

A rollout batch is produced in chunks. Each chunk is generated, then its query-responses
go to the `reward` and `reference` services concurrently (futures), and the next chunk is
generated while they are scored; the trainer blocks only when it needs the last results.
The query-response layout sent to the services is exactly the one used for the policy's
own log-probs, so the contract's log-prob columns line up with the response tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from trainer.data import encode_prompt
from trainer.losses import position_ids_from_mask
from trainer.modeling import generate, reward_head


@dataclass
class Rollout:
    """One PPO batch. Shapes: B rollouts, P prompt tokens (left-padded), R response tokens.

    query_responses (B, P+R) token ids; attention_mask (B, P+R); response_mask (B, R) 1 up to
    and including the first EOS; logprobs, ref_logprobs, values (B, R) at response tokens;
    scores (B,) raw reward-model scores; eos (B,) whether the response ended with EOS.
    """
    query_responses: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    P: int
    scores: torch.Tensor
    ref_logprobs: torch.Tensor
    eos: torch.Tensor
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def responses(self) -> torch.Tensor:
        return self.query_responses[:, self.P:]


@dataclass
class RolloutTimes:
    generation_s: float = 0.0
    scoring_wait_s: float = 0.0


def response_logprobs_and_entropy(policy: nn.Module, qr: torch.Tensor, mask: torch.Tensor, P: int,
                                  temperature: float, with_entropy: bool = False):
    """log π(response tokens) (B, R) with logits / temperature, and optionally the entropy (B, R)."""
    logits = policy(input_ids=qr, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=False).logits                                  # (B, P+R, V)
    logits = logits[:, P - 1:-1] / temperature                              # (B, R, V): predicts response
    logp = torch.log_softmax(logits.float(), -1).gather(-1, qr[:, P:, None]).squeeze(-1)   # (B, R)
    if not with_entropy:
        return logp, None
    from trainer.rl_math import entropy_from_logits

    return logp, entropy_from_logits(logits)


def response_values(value_model: nn.Module, qr: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
    """V(state before each response token) from a scalar-head model. (B, P+R) -> (B, R)"""
    hidden = value_model.base_model(input_ids=qr, attention_mask=mask,
                                    position_ids=position_ids_from_mask(mask)).last_hidden_state
    return reward_head(value_model)(hidden).squeeze(-1)[:, P - 1:-1].float()


def _pad_to(x: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(x, (left, right), value=value)


@dataclass
class PendingRollout:
    """Generated rollouts whose remote scores are still in flight.

    The trainer computes the policy's own log-probs and values on ``query_responses``
    while the services work, then calls ``wait()``.
    """
    query_responses: torch.Tensor
    attention_mask: torch.Tensor
    P: int
    eos: torch.Tensor
    chunks: list                      # (rows, P_chunk, R_chunk, score future, reference future)
    times: RolloutTimes

    @property
    def response_mask(self) -> torch.Tensor:
        return self.attention_mask[:, self.P:]

    def wait(self) -> Rollout:
        t0 = time.perf_counter()
        R = self.query_responses.shape[1] - self.P
        scores, refs = [], []
        for _, p, r, score_f, ref_f in self.chunks:
            ref = torch.from_numpy(ref_f.result())[:, p - 1:]              # (b, r): the response columns
            refs.append(_pad_to(ref, 0, R - r, 0.0))
            scores.append(torch.from_numpy(score_f.result()))
        self.times.scoring_wait_s += time.perf_counter() - t0
        return Rollout(self.query_responses, self.attention_mask, self.response_mask, self.P,
                       torch.cat(scores).float(), torch.cat(refs).float(), self.eos)


@torch.no_grad()
def start_rollouts(policy: nn.Module, tokenizer, scorer, prompts: list[str], *, chunk_size: int,
                   max_prompt_length: int, max_new_tokens: int, temperature: float, overlap: bool,
                   generator: torch.Generator) -> PendingRollout:
    """Generates responses chunk by chunk, sending each chunk to the services as soon as it exists.

    With ``overlap`` the next chunk is generated while the previous one is scored; without
    it each chunk's scores are awaited before the next is generated (the baseline).
    """
    times = RolloutTimes()
    parts = []
    for i in range(0, len(prompts), chunk_size):
        t0 = time.perf_counter()
        ids = [encode_prompt(tokenizer, p, max_prompt_length) for p in prompts[i:i + chunk_size]]
        qr, mask, P = generate(policy, tokenizer, ids, max_new_tokens, temperature=temperature, generator=generator)
        qr, mask = qr.cpu(), mask.cpu()
        times.generation_s += time.perf_counter() - t0
        score_f = scorer.score_async(qr.numpy(), mask.numpy())
        ref_f = scorer.logprobs_async(qr.numpy(), mask.numpy(), temperature)
        if not overlap:
            t0 = time.perf_counter()
            score_f.result(), ref_f.result()
            times.scoring_wait_s += time.perf_counter() - t0
        parts.append((qr, mask, P, score_f, ref_f))
    # one layout for the batch: prompts left-padded to the longest P, responses right-padded to the longest R
    P = max(p for _, _, p, _, _ in parts)
    R = max(qr.shape[1] - p for qr, _, p, _, _ in parts)
    qrs, masks, chunks = [], [], []
    for qr, mask, p, score_f, ref_f in parts:
        r = qr.shape[1] - p
        qrs.append(_pad_to(qr, P - p, R - r, tokenizer.pad_token_id))
        masks.append(_pad_to(mask, P - p, R - r, 0))
        chunks.append((qr.shape[0], p, r, score_f, ref_f))
    qr, mask = torch.cat(qrs), torch.cat(masks)
    eos = ((qr[:, P:] == tokenizer.eos_token_id) & mask[:, P:].bool()).any(-1)
    return PendingRollout(qr, mask, P, eos, chunks, times)
