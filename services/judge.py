"""The gold judge: one switch for every stage that reports a gold score.

A judge plays the human rater in evaluation only; it never trains anything. Two kinds:

* ``--judge module:function`` — any importable Python callable ``(prompt, response) -> float``
  (the suite tasks register theirs this way, e.g. ``tribune.trainer.task.judge:gold_score``);
* ``--judge-url H:P`` — a ``tribune.v1.RewardService`` (e.g. a larger reward model served by
  `tribune gateway`), used only to evaluate, as in Gao et al. 2022.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Protocol

from tribune.services.common.config import field
from tribune.services.common.errors import UserError

log = logging.getLogger("tribune")


@dataclass(kw_only=True)
class JudgeConfig:
    """A gold judge for evaluation (never used for training)."""
    judge: str | None = field(None, help="gold judge: module:function, a Python callable (prompt, response) -> float")
    judge_url: str | None = field(None, help="gold judge: host:port of a tribune.v1.RewardService used only to evaluate")
    judge_timeout_s: float = field(60.0, help="deadline of each --judge-url call")

    def __post_init__(self) -> None:
        if self.judge and self.judge_url:
            raise ValueError("judge and judge_url: give one of them")
        if self.judge is not None and ":" not in self.judge:
            raise ValueError(f"judge must be module:function, got {self.judge!r}")


class Judge(Protocol):
    name: str

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Gold scores of (prompt, response) pairs, in order."""


class CallableJudge:
    """A Python callable ``(prompt, response) -> float``, imported by reference."""

    def __init__(self, ref: str):
        module, _, name = ref.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:     # ValueError: an empty module name
            raise UserError(f"--judge {ref}: cannot import it ({e})") from None
        if not callable(fn):
            raise UserError(f"--judge {ref} is not callable")
        self.name, self.fn = ref, fn

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses):
            try:
                out.append(float(self.fn(p, r)))
            except Exception as e:  # the judge's own error (e.g. another task's judge): the user's setup
                log.debug("judge %s failed on %r / %r", self.name, p, r, exc_info=True)
                raise UserError(f"--judge {self.name} cannot score the prompt {p[:80]!r}: {type(e).__name__}: {e} "
                                "(is it the judge of this data's task?)") from None
        return out


class ServiceJudge:
    """A RewardService: raw rewards of ``Score`` calls, at most ``batch`` items per call."""

    def __init__(self, target: str, timeout_s: float, batch: int = 128):
        import grpc

        from tribune.v1 import reward_pb2, reward_pb2_grpc

        self.name, self.timeout_s, self.batch = f"service {target}", timeout_s, batch
        self.channel = grpc.insecure_channel(target)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise UserError(f"--judge-url {target}: no RewardService answered within {timeout_s:.0f}s") from None
        try:                                   # the service's own limit per request, when it says
            info = self.stub.GetModelInfo(reward_pb2.GetModelInfoRequest(), timeout=timeout_s, wait_for_ready=True)
            if info.max_items > 0:
                self.batch = min(batch, info.max_items)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:      # a judge needs Score only
                raise UserError(f"--judge-url {target}: {e.code().name}: {e.details()}") from None

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        import grpc

        from tribune.v1 import reward_pb2

        out: list[float] = []
        for i in range(0, len(prompts), self.batch):
            items = [reward_pb2.ScoreItem(prompt=p, response=r)
                     for p, r in zip(prompts[i:i + self.batch], responses[i:i + self.batch])]
            try:
                reply = self.stub.Score(reward_pb2.ScoreRequest(items=items), timeout=self.timeout_s,
                                        wait_for_ready=True)
            except grpc.RpcError as e:
                raise UserError(f"judge {self.name}: {e.code().name}: {e.details()}") from None
            out += list(reply.rewards)
        return out


def load_judge(cfg: JudgeConfig, prompts: list[str] = ()) -> Judge | None:
    """The configured judge, or None when there is none (no gold score is reported).

    With ``prompts`` (what it will judge), it scores the first with an empty response at once:
    a judge that cannot score this data (another task's, a service that refuses it) is a clear
    error before any training, not after it."""
    judge = None
    if cfg.judge:
        judge = CallableJudge(cfg.judge)
    elif cfg.judge_url:
        judge = ServiceJudge(cfg.judge_url, cfg.judge_timeout_s)
    if judge is not None and prompts:
        judge.score([prompts[0]], [""])
    return judge

