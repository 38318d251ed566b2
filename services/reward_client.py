"""A small Python client for ``tribune.v1.RewardService`` (`tribune gateway`).

* The channel carries a gRPC service config: ``waitForReady`` (a call waits for a
  connection instead of failing at once while the gateway starts or restarts) and a
  ``retryPolicy`` that retries UNAVAILABLE inside gRPC itself (at most 5 attempts, gRPC's
  cap). Over that, each call has a time budget (``retry_budget_s``): UNAVAILABLE,
  DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED (a full queue) are retried with exponential
  backoff and jitter until it runs out. Every other status is raised at once.
* Errors are the token client's (``tribune.services.client``): ``ScorerUnavailable`` /
  ``ScorerTimeout`` after the budget, ``ScorerRequestError`` for INVALID_ARGUMENT,
  ``ScorerServerError`` otherwise, so callers handle both paths alike.
* ``score_async`` splits a large list into requests of at most the gateway's ``max_items``,
  several in flight at once, and reassembles the results in order.

Imports neither torch nor the trainer: other systems can use it with grpcio alone.
"""
from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from tribune.services.client import (ClientConfig, ScorerRequestError, ScorerServerError, ScorerTimeout, ScorerUnavailable,
                             _gather, _then)

SERVICE = "tribune.v1.RewardService"
RETRIED = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


def service_config(cfg: ClientConfig) -> str:
    """The channel's gRPC service config (JSON): wait-for-ready, a deadline and UNAVAILABLE retries."""
    def seconds(s: float) -> str:
        return f"{max(s, 0.001):.3f}s"

    return json.dumps({
        "loadBalancingConfig": [{cfg.load_balancing: {}}],
        "methodConfig": [{
            "name": [{"service": SERVICE}],
            "waitForReady": True,
            "timeout": seconds(cfg.timeout_s),
            "retryPolicy": {"maxAttempts": 5, "initialBackoff": seconds(cfg.initial_backoff_s),
                            "maxBackoff": seconds(cfg.max_backoff_s), "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"]},
        }],
    })


@dataclass(frozen=True)
class Scored:
    """Rewards of n items: raw (n,), normalised (n,) with the model's statistics, the ensemble's spread (n,)."""
    rewards: np.ndarray
    normalized: np.ndarray
    spread: np.ndarray
    model_id: str


def to_item(item: Any):
    """A ScoreItem from (prompt, response), {"prompt", "response"} or {"messages": [{role, content}, ...]}."""
    from tribune.v1 import reward_pb2 as pb

    if isinstance(item, pb.ScoreItem):
        return item
    if isinstance(item, dict) and "messages" in item:
        return pb.ScoreItem(messages=[pb.Message(role=m["role"], content=m["content"]) for m in item["messages"]])
    if isinstance(item, dict):
        return pb.ScoreItem(prompt=item["prompt"], response=item.get("response") or "")
    prompt, response = item
    return pb.ScoreItem(prompt=prompt, response=response or "")


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


class RewardClient:
    """Score, ScoreBestOfN and GetModelInfo of a RewardService, with the retries described above.

    ``cfg`` is the shared client options at the gateway's address (``ClientOptions.at(url)``):
    timeout_s per call, retry_budget_s, backoff, TLS / mutual TLS, bearer token, in-flight
    requests and (chunk_size) items per request.
    """

    def __init__(self, cfg: ClientConfig):
        import grpc

        from tribune.v1 import reward_pb2_grpc

        self.cfg = cfg
        target = cfg.url
        options = [("grpc.service_config", service_config(cfg)), ("grpc.enable_retries", 1),
                   ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                   ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]
        if cfg.ssl or cfg.root_certificates is not None:
            creds = grpc.ssl_channel_credentials(_read(cfg.root_certificates), _read(cfg.private_key),
                                                 _read(cfg.certificate_chain))
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        token = cfg.bearer_token()          # --auth-token, --auth-token-file or $TRIBUNE_AUTH_TOKEN, as Triton's client
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_in_flight, thread_name_prefix="tribune-reward-client")
        self._info = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ readiness

    def wait_for_ready(self, timeout_s: float | None = None) -> None:
        """Blocks until the gateway's health service says SERVING (its reward model is ready).

        Watches the health status (a server stream) instead of polling; raises
        ``ScorerUnavailable`` after ``timeout_s`` (default: connect_timeout_s).
        """
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        timeout_s = self.cfg.connect_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        health = health_pb2_grpc.HealthStub(self.channel)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ScorerUnavailable(f"{self.cfg.url}: the reward service is not serving after "
                                        f"{timeout_s:.0f}s ({last})")
            try:
                for reply in health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=left,
                                          wait_for_ready=True):
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise ScorerServerError(f"{self.cfg.url}: health check failed: {e.code().name}: "
                                            f"{e.details()}") from None
                last = f"{e.code().name}: {e.details()}"
                time.sleep(min(self.cfg.initial_backoff_s, max(deadline - time.monotonic(), 0)))

    # ------------------------------------------------------------ calls

    def _call(self, method, request, timeout_s: float | None = None):
        """One unary call, retried on UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED within the budget."""
        import grpc

        budget_end = time.monotonic() + self.cfg.retry_budget_s
        backoff, attempt = self.cfg.initial_backoff_s, 0
        while True:
            attempt += 1
            try:
                return method(request, timeout=timeout_s or self.cfg.timeout_s, metadata=self._metadata,
                              wait_for_ready=True)
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ScorerRequestError(f"{self.cfg.url}: {details}") from None
                if code.name not in RETRIED:
                    raise ScorerServerError(f"{self.cfg.url}: {code.name}: {details}") from None
                if time.monotonic() + backoff > budget_end:
                    error = ScorerTimeout if code == grpc.StatusCode.DEADLINE_EXCEEDED else ScorerUnavailable
                    raise error(f"reward service at {self.cfg.url}: still failing after {attempt} attempts over "
                                f"{self.cfg.retry_budget_s:.0f}s retry budget: {code.name}: {details}") from None
                time.sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, self.cfg.max_backoff_s)

    def model_info(self):
        """The gateway's ``ModelInfo`` (cached after the first call): model id, statistics, limits."""
        from tribune.v1 import reward_pb2 as pb

        with self._lock:
            if self._info is None:
                self._info = self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest())
            return self._info

    def score(self, items: Iterable[Any], timeout_s: float | None = None) -> Scored:
        """Rewards of items (see ``to_item`` for the accepted forms), in order."""
        return self.score_async(items, timeout_s).result()

    def score_async(self, items: Iterable[Any], timeout_s: float | None = None) -> Future:
        """Future of ``Scored`` for any number of items, sent as concurrent requests of at most max_items."""
        items = [to_item(i) for i in items]
        if not items:
            raise ScorerRequestError("no items to score")
        size = max(1, min(self.model_info().max_items or len(items), self.cfg.chunk_size or len(items)))
        parts = [self._pool.submit(self._score_chunk, items[i:i + size], timeout_s)
                 for i in range(0, len(items), size)]
        model_id = self.model_info().model_id
        return _then(_gather(parts), lambda a: Scored(a[:, 0].copy(), a[:, 1].copy(), a[:, 2].copy(), model_id))

    def _score_chunk(self, items: Sequence, timeout_s: float | None) -> np.ndarray:
        from tribune.v1 import reward_pb2 as pb

        reply = self._call(self.stub.Score, pb.ScoreRequest(items=items), timeout_s)
        n = len(items)
        spread = list(reply.ensemble_spread) or [0.0] * n
        return np.stack([np.asarray(reply.rewards, np.float32), np.asarray(reply.normalized_rewards, np.float32),
                         np.asarray(spread, np.float32)], 1)                               # (n, 3)

    def best_of_n(self, prompt: str, candidates: Sequence[str], timeout_s: float | None = None):
        """The ``BestOfNResponse``: rewards, ranking and best_index of the candidates."""
        from tribune.v1 import reward_pb2 as pb

        return self._call(self.stub.ScoreBestOfN, pb.BestOfNRequest(prompt=prompt, candidates=list(candidates)),
                          timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.channel.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()



def spread_pattern(k: int) -> np.ndarray:
    """(k,) evenly spaced values with mean 0 and population standard deviation 1 (zeros for k = 1)."""
    if k < 2:
        return np.zeros(k)
    u = np.arange(k) - (k - 1) / 2
    return u / np.sqrt((k * k - 1) / 12)


def members_from_spread(rewards: np.ndarray, spread: np.ndarray, reward_std: float, k: int) -> np.ndarray:
    """K stand-in member scores with the served members' mean and disagreement. (n,), (n,) -> (n, K)

    A gateway serves an ensemble's mean raw reward and the members' spread (std over members of
    their standardised scores), not each member. Columns ``rewards + reward_std·spread·u_k`` (u:
    ``spread_pattern``), standardised with the mean's statistics, have exactly the served
    normalised reward as their mean and ``spread`` as their population std: so the members' mean,
    mean − λ·std and the disagreement come out as on the token path. Their minimum is not the
    members' (it assumes evenly spaced members) except for K = 2.
    """
    rewards, spread = np.asarray(rewards, np.float64), np.asarray(spread, np.float64)
    return rewards[:, None] + reward_std * spread[:, None] * spread_pattern(k)[None, :]      # (n, K)


def facts_from_model_info(info, max_prompt_length: int = 0):
    """``ServedFacts`` of a gateway's ``ModelInfo``, for code written against the token path's facts.

    The gateway serves one score per item (an ensemble's members' mean, with the statistics of
    that mean) and the members' spread, not each member's score: the facts describe K members
    that all have the mean's statistics, and a client turns each (reward, spread) into their
    scores with ``members_from_spread``. The preferred responses' height travels the same way
    (``preferred_rewards`` and ``preferred_spread``). A server that predates ``preferred_spread``
    serves an ensemble's height without it: that height is left out (PPO's penalty would apply to the
    policy's scores and not to it), so ``--preferred-eval`` measures one instead.
    """
    from tribune.services.contract import ContractError, ServedFacts

    if not info.reward_std > 0:
        raise ContractError(f"the reward service reports reward_std {info.reward_std}; it must be positive")
    n, k = int(info.max_sequence_length), max(int(info.ensemble_size), 1)
    preferred = np.asarray(info.preferred_rewards, np.float64)
    spread = np.asarray(info.preferred_spread, np.float64)
    if spread.size == 0:
        if k > 1:
            preferred = np.zeros(0)
        spread = np.zeros_like(preferred)
    if spread.shape != preferred.shape or (spread < 0).any():
        raise ContractError(f"the reward service's ModelInfo is malformed: preferred_spread must hold one non-negative "
                            f"value per preferred_rewards entry ({preferred.size}), got {list(spread)}")
    try:
        return ServedFacts(contract_version=int(info.contract_version), tokenizer_fingerprint=info.tokenizer_fingerprint,
                           reward_mean=float(info.reward_mean), reward_std=float(info.reward_std),
                           max_sequence_length=n, vocab_size=0, max_batch_size=int(info.max_items),
                           reward_model_id=info.model_id, max_length=n,
                           max_prompt_length=max_prompt_length or (3 * n) // 4, ensemble_size=k,
                           member_reward_mean=(float(info.reward_mean),) * k,
                           member_reward_std=(float(info.reward_std),) * k,
                           preferred_member_scores=tuple(map(tuple, members_from_spread(
                               preferred, spread, float(info.reward_std), k).tolist())))
    except ValueError as e:
        raise ContractError(f"the reward service's ModelInfo is malformed: {e}") from None
