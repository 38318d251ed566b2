"""Rollouts: generate with the local policy, score with the remote services, overlapped.

A rollout batch is produced in chunks. Each chunk is generated, then its query-responses
go to the `reward` and `reference` services concurrently (futures), and the next chunk is
generated while they are scored; the trainer blocks only when it needs the last results.
The query-response layout sent to the services is exactly the one used for the policy's
own log-probs, so the contract's log-prob columns line up with the response tokens.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from tribune.services.common.text import encode_prompt
from tribune.services.contract import ServedFacts
from tribune.trainer.modeling import generate


@dataclass
class Generated:
    """One generated chunk as the scorers see it: the prompts as given (a ``ChatPrompt`` keeps its
    conversation), query_responses and attention_mask (B, P+R) int64 (prompts left-padded), and P."""
    prompts: list[str]
    query_responses: np.ndarray
    attention_mask: np.ndarray
    P: int


class Scorer(Protocol):
    """What PPO needs from the scoring services (``tribune.trainer.scorers``: token ids to Triton, or text
    to a RewardService for the reward and token ids to Triton for the reference)."""
    facts: ServedFacts

    def score_members_async(self, chunk: Generated) -> Future:
        """Future of the raw scores of every reward-model member (B, K) of a generated chunk."""

    def score(self, chunk: Generated) -> np.ndarray:
        """Raw rewards (B,) of a generated chunk (blocking; the held-out monitor)."""

    def logprobs_async(self, input_ids: np.ndarray, attention_mask: np.ndarray, temperature: float) -> Future:
        """Future of reference log-probs (B, T−1), the contract's columns."""


@dataclass
class Rollout:
    """One PPO batch, carried through the phases of an iteration (OpenRLHF's ``Experience``).

    Shapes: B rollouts, P prompt tokens (left-padded), R response tokens (right-padded).
    1. generate: query_responses (B, P+R), attention_mask (B, P+R), P, eos (B,) whether the
       response ended with EOS; the policy's logprobs and values (B, R);
    2. score remotely: member_scores (B, K) raw scores of the K reward-model members, scores (B,)
       their mean (what `reward` serves); ref_logprobs (B, R);
    3. KL-shaped rewards: kl (B, R) per-token estimate, rewards (B, R);
    4. advantages, returns (B, R).
    Fields of later phases are None until their phase has run. ``rollout[idx]`` is the
    minibatch of rows ``idx``.
    """
    query_responses: torch.Tensor
    attention_mask: torch.Tensor
    P: int
    eos: torch.Tensor
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    member_scores: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def response_mask(self) -> torch.Tensor:
        """(B, R) float: 1 on response tokens up to and including the first EOS."""
        return self.attention_mask[:, self.P:].float()

    @property
    def responses(self) -> torch.Tensor:
        return self.query_responses[:, self.P:]

    def _map(self, fn) -> "Rollout":
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def __getitem__(self, idx: torch.Tensor) -> "Rollout":
        return self._map(lambda t: t[idx])

    def to(self, device) -> "Rollout":
        return self._map(lambda t: t.to(device))


@dataclass
class RolloutTimes:
    generation_s: float = 0.0
    scoring_wait_s: float = 0.0


def _pad_to(x: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(x, (left, right), value=value)


@dataclass
class PendingRollout:
    """Generated rollouts whose remote scores are still in flight.

    The trainer computes the policy's own log-probs and values on ``rollout`` while the
    services work, then calls ``wait()``, which fills in scores and ref_logprobs.
    """
    rollout: Rollout
    chunks: list                      # (P_chunk, R_chunk, score future, reference future)
    times: RolloutTimes

    def wait(self) -> Rollout:
        t0 = time.perf_counter()
        b = self.rollout
        R = b.query_responses.shape[1] - b.P
        scores, refs = [], []
        for p, r, score_f, ref_f in self.chunks:
            ref = torch.from_numpy(ref_f.result())[:, p - 1:]              # (b, r): the response columns
            refs.append(_pad_to(ref, 0, R - r, 0.0))
            scores.append(torch.from_numpy(score_f.result()))
        self.times.scoring_wait_s += time.perf_counter() - t0
        device = b.query_responses.device
        b.member_scores = torch.cat(scores).float().to(device)                        # (B, K)
        b.scores = b.member_scores.mean(-1)                                           # (B,)
        b.ref_logprobs = torch.cat(refs).float().to(device) * b.response_mask         # (B, R)
        return b


@torch.no_grad()
def start_rollouts(policy: nn.Module, tokenizer, scorer: Scorer, prompts: list[str], *, chunk_size: int,
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
        score_f = scorer.score_members_async(Generated(prompts[i:i + chunk_size], qr.numpy(), mask.numpy(), P))
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
        chunks.append((p, r, score_f, ref_f))
    qr, mask = torch.cat(qrs), torch.cat(masks)
    eos = ((qr[:, P:] == tokenizer.eos_token_id) & mask[:, P:].bool()).any(-1)
    return PendingRollout(Rollout(qr, mask, P, eos), chunks, times)
