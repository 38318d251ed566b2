"""The scoring services behind PPO's ``tribune.trainer.rollout.Scorer`` protocol, two ways.

* ``TokenScorers`` (``--reward-url``): the reward model shares the policy's tokenizer; token
  ids go to Triton's `reward` and `reference` models (possibly on different servers).
* ``TextScorers`` (``--reward-gateway``): the reward model has its own tokenizer and chat
  template. Responses are decoded with the policy's tokenizer and sent as text to a
  ``tribune.v1.RewardService``, which tokenises them as the reward model was trained (a
  ``ChatPrompt`` goes as its conversation plus the response, so the reward model applies its
  own template). The reference still gets token ids, so it must share the policy's
  tokenizer: checked at connect against the fingerprint in its served facts. An ensemble
  behind the gateway comes back as its members' mean and spread, turned into K stand-in
  members with that mean and spread, so the uncertainty penalty and the disagreement monitor
  work as on the token path; ``--ensemble-reward worst`` (the members' minimum) needs the
  members themselves and is refused for K > 2.

Both keep the token path's chunking and overlap (one future per generated chunk), deadlines
and retry budget (the shared client options); normalisation statistics come from the
served facts, or from the gateway's GetModelInfo.
"""
from __future__ import annotations

from concurrent.futures import Future

import numpy as np

from tribune.services.client import ScorerUnavailable, TritonScorer, _then
from tribune.services.common.errors import UserError
from tribune.services.contract import REFERENCE_MODEL, REWARD_MODEL, ContractError
from tribune.services.reward_client import RewardClient, facts_from_model_info, members_from_spread
from tribune.trainer.modeling import decode_responses
from tribune.trainer.ppo_config import PPOConfig
from tribune.trainer.rollout import Generated

REFERENCE_ROLE = "the reference (--reference-url) must share the policy's tokenizer"


def _triton(cfg: PPOConfig, url: str, fingerprint: str, model: str, role: str) -> TritonScorer:
    try:
        return TritonScorer(cfg.client.at(url), fingerprint, models=(model,))
    except ContractError as e:
        raise ContractError(f"{role}: {e}") from None


class TokenScorers:
    """The `reward` and `reference` services (possibly on different servers) behind one ``Scorer``."""

    def __init__(self, cfg: PPOConfig, fingerprint: str):
        self.reward = _triton(cfg, cfg.reward_url, fingerprint, REWARD_MODEL, "the reward model (--reward-url; "
                              "one with another tokenizer goes behind `tribune gateway`: --reward-gateway)")
        self.reference = _triton(cfg, cfg.reference_url, fingerprint, REFERENCE_MODEL, REFERENCE_ROLE)
        self.facts = self.reward.facts

    def score_members_async(self, chunk: Generated) -> Future:
        return self.reward.score_members_async(chunk.query_responses, chunk.attention_mask)

    def score(self, chunk: Generated) -> np.ndarray:
        return self.reward.score(chunk.query_responses, chunk.attention_mask)

    def logprobs_async(self, ids, mask, temperature):
        return self.reference.logprobs_async(ids, mask, temperature)

    def close(self) -> None:
        self.reward.close()
        self.reference.close()


def text_item(prompt: str, response: str) -> dict:
    """What the RewardService scores for one rollout: the conversation plus the response, or
    prompt and response text."""
    messages = getattr(prompt, "messages", None)
    if messages:
        return {"messages": [*messages, {"role": "assistant", "content": response}]}
    return {"prompt": str(prompt), "response": response}


class TextScorers:
    """Rewards from a RewardService (text), reference log-probs from Triton (token ids)."""

    def __init__(self, cfg: PPOConfig, tokenizer, fingerprint: str):
        self.tokenizer = tokenizer
        # the reference first: a tokenizer mismatch is refused before anything else is contacted
        self.reference = _triton(cfg, cfg.reference_url, fingerprint, REFERENCE_MODEL, REFERENCE_ROLE)
        self.reward = RewardClient(cfg.client.at(cfg.reward_gateway))
        try:
            self.reward.wait_for_ready()
            self.facts = facts_from_model_info(self.reward.model_info())
            if cfg.ensemble_reward == "worst" and self.facts.ensemble_size > 2:
                raise ContractError(f"--ensemble-reward worst needs each member's score, and a RewardService serves "
                                    f"the {self.facts.ensemble_size} members' mean and spread only: use "
                                    f"--ensemble-reward uncertainty or mean, or the token path (--reward-url)")
        except BaseException:
            self.close()
            raise

    def _items(self, chunk: Generated) -> list[dict]:
        texts = decode_responses(self.tokenizer, chunk.query_responses, chunk.attention_mask, chunk.P)
        return [text_item(p, r) for p, r in zip(chunk.prompts, texts)]

    def score_members_async(self, chunk: Generated) -> Future:
        # the served mean and spread as K stand-in members (B, K): see members_from_spread
        k, std = self.facts.ensemble_size, self.facts.reward_std
        return _then(self.reward.score_async(self._items(chunk)),
                     lambda s: members_from_spread(s.rewards, s.spread, std, k).astype(np.float32))

    def score(self, chunk: Generated) -> np.ndarray:
        return self.reward.score(self._items(chunk)).rewards

    def logprobs_async(self, ids, mask, temperature):
        return self.reference.logprobs_async(ids, mask, temperature)

    def close(self) -> None:
        self.reward.close()
        self.reference.close()


def connect(cfg: PPOConfig, tokenizer, fingerprint: str):
    """The configured scorers, connected and checked; refusals are user errors."""
    try:
        if cfg.reward_gateway:
            return TextScorers(cfg, tokenizer, fingerprint)
        return TokenScorers(cfg, fingerprint)
    except (ContractError, ScorerUnavailable) as e:
        raise UserError(f"cannot use the scoring services: {e}") from None
