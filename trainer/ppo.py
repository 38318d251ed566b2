"""Stage 3, `tribune ppo`: PPO against the remote reward and reference services.

The trainer holds only the policy πθ (from πSFT) and a value model; rewards and
reference log-probs come from Triton through ``services.client.TritonScorer``. The
objective is E[r(x, y) − β·KL(πθ ‖ π_ref)] with the KL as a per-token penalty and the
reward model's (normalised) score at the last response token (Ziegler et al. 2019).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.client import ClientConfig
from trainer.config import field

log = logging.getLogger("tribune")


@dataclass(kw_only=True)
class PPOConfig:
    """PPO against remote scorers (Triton: models `reward` and `reference`)."""
    policy: Path = field(help="SFT model directory: the initial policy (and its tokenizer)")
    prompts: Path = field(help="JSONL of {prompt}")
    reward_url: str = field(help="host:port (or dns:///host:port) of the Triton serving `reward`")
    reference_url: str = field(help="host:port (or dns:///host:port) of the Triton serving `reference`")
    output: Path = field(help="directory for the trained policy, metrics, plot and checkpoints")
    value_init: Path | None = field(None, help="initialise the value model from this directory, e.g. the reward "
                                    "model (N+ details); default: the policy's weights with a fresh head")
    eval_prompts: Path | None = field(None, help="held-out JSONL of {prompt} for the gold score (bundled task)")
    seed: int = field(0, help="seed of prompt order, sampling and minibatches")
    max_steps: int | None = field(None, help="cap on PPO iterations")
    iterations: int = field(100, help="PPO iterations (rollout batch → updates)")
    rollout_batch_size: int = field(64, help="prompts per iteration, summed over processes")
    mini_batch_size: int = field(16, help="rollouts per optimiser step")
    gradient_accumulation_steps: int = field(1, help="minibatches accumulated per optimiser step")
    ppo_epochs: int = field(4, help="passes over each rollout batch")
    learning_rate: float = field(1e-4, help="policy learning rate (AdamW)")
    value_learning_rate: float | None = field(None, help="value-model learning rate (default: learning_rate)")
    max_grad_norm: float = field(1.0, help="gradient clipping norm, per model")
    cliprange: float = field(0.2, help="PPO ratio clip ε")
    cliprange_value: float = field(0.2, help="value clip")
    vf_coef: float = field(0.5, help="weight of the value loss (the value model has its own optimiser)")
    gamma: float = field(1.0, help="discount γ")
    lam: float = field(0.95, help="GAE λ")
    whiten_advantages: bool = field(True, help="normalise advantages per batch")
    kl_coef: float = field(0.1, help="initial β of the KL penalty")
    kl_estimator: Literal["k1", "k3"] = field("k1", help="per-token KL estimator in the reward")
    adaptive_kl: bool = field(False, help="adapt β towards --target-kl (Ziegler et al.); else β is fixed")
    target_kl: float = field(6.0, help="KL target (nats per sequence) of the adaptive controller")
    kl_horizon: int = field(10000, help="horizon of the adaptive controller, in rollouts")
    normalize_reward: bool = field(True, help="(r − mean) / std with the statistics in tribune.json")
    reward_clip: float | None = field(None, help="clip normalised rewards to ±this")
    missing_eos_penalty: float = field(-1.0, help="added to the score of a response that never emits EOS")
    temperature: float = field(1.0, help="sampling temperature; also sent to `reference` and used for πθ's log-probs")
    max_new_tokens: int = field(16, help="longest response")
    max_prompt_length: int = field(48, help="prompt tokens kept (cut from the left)")
    scoring_chunk: int = field(32, help="rollouts per scoring request chunk (overlapped with generation)")
    overlap_scoring: bool = field(True, help="score one chunk while generating the next")
    gold_every: int = field(10, help="every N iterations, the bundled task's gold score on --eval-prompts")
    gold_eval_size: int = field(200, help="held-out prompts used for the gold score")
    log_every: int = field(1, help="log metrics every N iterations")
    checkpoint_every: int = field(20, help="save a resumable checkpoint every N iterations")
    keep_checkpoints: int = field(2, help="how many recent checkpoints to keep")
    resume: bool = field(False, help="continue from the newest checkpoint in --output")
    timeout_s: float = field(60.0, help="deadline of each scoring request")
    retry_budget_s: float = field(60.0, help="time spent retrying an unavailable scorer before stopping")
    auth_token: str | None = field(None, help="bearer token for the scoring services")
    ssl: bool = field(False, help="TLS to the scoring services")
    root_certificates: Path | None = field(None, help="CA certificate (PEM) for TLS")

    def __post_init__(self) -> None:
        positives = ("iterations", "rollout_batch_size", "mini_batch_size", "gradient_accumulation_steps",
                     "ppo_epochs", "max_new_tokens", "scoring_chunk", "gold_every", "log_every",
                     "checkpoint_every", "keep_checkpoints", "gold_eval_size")
        for name in positives:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError("rollout_batch_size must be a multiple of mini_batch_size")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError("gamma and lam must be in [0, 1]")
        if self.kl_coef < 0:
            raise ValueError("kl_coef must be non-negative")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")

    @property
    def total_iterations(self) -> int:
        return min(self.iterations, self.max_steps) if self.max_steps else self.iterations

    def client(self, url: str) -> ClientConfig:
        return ClientConfig(url=url, timeout_s=self.timeout_s, retry_budget_s=self.retry_budget_s,
                            chunk_size=None, auth_token=self.auth_token, ssl=self.ssl,
                            root_certificates=self.root_certificates, max_in_flight=4)


def run_ppo(cfg: PPOConfig) -> dict:
    from trainer.ppo_loop import train

    t0 = time.perf_counter()
    metrics = train(cfg)
    metrics["time/total_s"] = round(time.perf_counter() - t0, 2)
    return metrics

