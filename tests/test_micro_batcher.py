"""The gateway's micro-batcher through a small scorer protocol double: fast, no server.

The end-to-end gateway tests (test_gateway.py) run the same code against real Triton.
"""
import asyncio
import time
from concurrent.futures import Future

import numpy as np
import pytest

from tribune.services.client import ScorerUnavailable
from tribune.services.contract import ServedFacts
from tribune.services.gateway_core import DeadlineExceeded, GatewayConfig, MicroBatcher, NotReady, Overloaded


class FakeScorer:
    """``score_with_members_async`` of TritonScorer: one member, reward = sum of the real token ids;
    records every call."""
    facts = ServedFacts(contract_version=1, tokenizer_fingerprint="f", reward_mean=0.0, reward_std=1.0,
                        max_sequence_length=64, vocab_size=100, max_batch_size=8, reward_model_id="rm-x",
                        max_length=64, max_prompt_length=48)

    def __init__(self, fail_with: Exception | None = None):
        self.calls: list[int] = []
        self.fail_with = fail_with

    def score_with_members_async(self, ids: np.ndarray, mask: np.ndarray, timeout_s=None) -> Future:
        self.calls.append(ids.shape[0])
        f = Future()
        if self.fail_with:
            f.set_exception(self.fail_with)
        else:
            rewards = (ids * mask).sum(-1).astype(np.float32)
            f.set_result((rewards, rewards[:, None]))
        return f


class FakeBackend:
    def __init__(self, scorer):
        self.scorer, self.ready, self.last_error = scorer, True, ""


def _run(coro):
    return asyncio.run(coro)


def _batcher(scorer, **cfg):
    config = GatewayConfig(repository="r", triton_url="127.0.0.1:1", **cfg)
    sizes = []
    return MicroBatcher(config, FakeBackend(scorer), pad_id=0, observe_batch=sizes.append), sizes


def test_concurrent_requests_are_merged_and_answered_in_order():
    scorer = FakeScorer()

    async def main():
        batcher, sizes = _batcher(scorer, batch_max_items=64, batch_max_delay_ms=50)
        batcher.start()
        requests = [[[i + 1] * (i % 3 + 1) for _ in range(i % 4 + 1)] for i in range(10)]
        replies = await asyncio.gather(*(batcher.score(r, None) for r in requests))
        await batcher.stop()
        return requests, replies, sizes

    requests, replies, sizes = _run(main())
    for seqs, got in zip(requests, replies):
        np.testing.assert_array_equal(got.rewards, [sum(s) for s in seqs])
        np.testing.assert_array_equal(got.spread, np.zeros(len(seqs)))
    assert len(scorer.calls) < len(requests) and sum(scorer.calls) == sum(len(r) for r in requests)
    assert sum(sizes) == sum(len(r) for r in requests)


def test_queue_limit_deadlines_and_outages():
    async def main():
        batcher, _ = _batcher(FakeScorer(), max_queue_items=3, max_items=3, batch_max_delay_ms=20)
        batcher.start()
        first = asyncio.ensure_future(batcher.score([[1], [2]], None))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.score([[1], [2]], None)
        late = asyncio.ensure_future(batcher.score([[5]], time.monotonic() - 1))   # already past its deadline
        assert list((await first).rewards) == [1, 2]
        with pytest.raises(DeadlineExceeded):
            await late
        await batcher.stop()

        down, _ = _batcher(FakeScorer(fail_with=ScorerUnavailable("gone")))
        down.start()
        with pytest.raises(NotReady):
            await down.score([[1]], None)
        assert down.backend.ready is False          # the health watcher reconnects from here
        with pytest.raises(NotReady):
            await down.score([[1]], None)          # refused at once while not ready
        await down.stop()

    _run(main())
