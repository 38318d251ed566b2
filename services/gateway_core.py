"""The gateway's domain, free of gRPC: config, errors, text → tokens, micro-batching, backend.

Servicers translate protos to these types and back; everything that decides something
lives here so it can be tested and reused.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tribune.services.client import ClientOptions, ScorerRequestError, ScorerTimeout, ScorerUnavailable, TritonScorer
from tribune.services.common.config import field, group
from tribune.services.common.secrets import resolve_secret
from tribune.services.common.text import encode_pair, load_tokenizer, pad, render_chat
from tribune.services.contract import REWARD_MODEL, TOKENIZER_DIR, ContractError, ServedFacts
from tribune.services.repository import read_manifest, tokenizer_fingerprint

log = logging.getLogger("tribune.gateway")
# the token clients must send, when --auth-token-file is not given (unset: no auth)
GATEWAY_TOKEN_ENV = "TRIBUNE_GATEWAY_AUTH_TOKEN"


@dataclass(kw_only=True)
class GatewayConfig:
    """The gRPC text API (tribune.v1.RewardService) in front of Triton's `reward` model."""
    repository: Path = field(help="model repository (for its tokenizer/ and tribune.json)")
    triton_url: str = field(help="Triton gRPC address, host:port or dns:///host:port")
    host: str = field("127.0.0.1", help="address to bind; 0.0.0.0 to accept remote clients")
    port: int = field(50051, help="gRPC port of the gateway")
    metrics_port: int = field(9090, help="Prometheus /metrics port (0: off)")
    max_items: int = field(256, help="most items per request")
    max_text_bytes: int = field(16384, help="longest prompt or response, in UTF-8 bytes")
    max_prompt_length: int | None = field(None, help="prompt tokens kept, cut from the left; below the model's "
                                          "max_length (default: the reward model's training setting, served with "
                                          "the model)")
    batch_max_items: int = field(64, help="micro-batching: most items sent to Triton in one call")
    batch_max_delay_ms: float = field(2.0, help="micro-batching: longest wait for more items")
    max_queue_items: int = field(4096, help="items waiting before new requests get RESOURCE_EXHAUSTED")
    health_interval_s: float = field(1.0, help="how often Triton's readiness is checked")
    auth_token_file: Path | None = field(None, help="file holding the bearer token clients must send (default: "
                                         f"${GATEWAY_TOKEN_ENV} when set, else no auth)")
    tls_cert: Path | None = field(None, help="PEM server certificate (TLS on when set)")
    tls_key: Path | None = field(None, help="PEM server key")
    tls_client_ca: Path | None = field(None, help="PEM CA for client certificates (mutual TLS when set)")
    triton: ClientOptions = group(ClientOptions(timeout_s=30.0, connect_timeout_s=2.0, retry_budget_s=0.0,
                                                max_in_flight=8), prefix="triton_",
                                  help="the connection to Triton (timeout_s: deadline when the caller sets none)")
    max_message_bytes: int = field(16 << 20, help="largest gRPC message accepted")
    grace_s: float = field(10.0, help="on SIGTERM, time given to requests in flight")

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError("port and metrics_port must be TCP ports")
        for name in ("max_items", "max_text_bytes", "batch_max_items", "max_queue_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue_items < self.max_items:
            raise ValueError(f"max_queue_items ({self.max_queue_items}) must be at least max_items ({self.max_items}): "
                             "a request of max_items could never be queued")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError("max_prompt_length must be at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")

    def required_token(self) -> str | None:
        """The bearer token clients must send: the file --auth-token-file, else $TRIBUNE_GATEWAY_AUTH_TOKEN."""
        return resolve_secret(None, self.auth_token_file, GATEWAY_TOKEN_ENV)


# ---------------------------------------------------------------- domain errors

class GatewayError(Exception):
    """Base of the errors the interceptor maps to gRPC status codes."""


class InvalidInput(GatewayError):
    """A request field is wrong; the message names the field, ``field`` is its path (items[3].prompt),
    sent to clients as a google.rpc.BadRequest field violation."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


class Overloaded(GatewayError):
    """The queue is full; ``retry_after_s`` is sent to clients as google.rpc.RetryInfo."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(GatewayError):
    """Triton is not (or no longer) ready."""


class Unauthenticated(GatewayError):
    """Missing or wrong bearer token."""


class DeadlineExceeded(GatewayError):
    """The caller's deadline passed before Triton answered."""


# ---------------------------------------------------------------- text → tokens

@dataclass(frozen=True)
class Item:
    prompt: str | None
    response: str | None
    messages: tuple[tuple[str, str], ...] = ()


class Tokenisation:
    """The repository's tokenizer and the truncation policy of the training code."""

    def __init__(self, repo: Path, cfg: GatewayConfig):
        self.tokenizer = load_tokenizer(Path(repo) / TOKENIZER_DIR)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.cfg = cfg

    def validate(self, items: list[Item], field_name: str = "items") -> None:
        if not items:
            raise InvalidInput(f"{field_name}: at least one item is required", field_name)
        if len(items) > self.cfg.max_items:
            raise InvalidInput(f"{field_name}: {len(items)} items, the limit is {self.cfg.max_items}", field_name)
        for i, item in enumerate(items):
            where = f"{field_name}[{i}]"
            if item.messages:
                if item.messages[-1][0] != "assistant":
                    raise InvalidInput(f"{where}.messages: the last message must be the assistant's response",
                                       f"{where}.messages")
                if len(item.messages) < 2:
                    raise InvalidInput(f"{where}.messages: a conversation needs at least one turn before the "
                                       "assistant's response", f"{where}.messages")
                if not getattr(self.tokenizer, "chat_template", None):
                    raise InvalidInput(f"{where}.messages: this model's tokenizer has no chat template; "
                                       "send prompt and response instead", f"{where}.messages")
                for j, (_, content) in enumerate(item.messages):
                    self._check_text(f"{where}.messages[{j}].content", content)
                continue
            if not item.prompt:
                raise InvalidInput(f"{where}.prompt is required (or messages)", f"{where}.prompt")
            # an empty response is valid: a policy that stops at once produced it, and it is scored
            # as the token path scores it, prompt + EOS (encode_pair)
            self._check_text(f"{where}.prompt", item.prompt)
            self._check_text(f"{where}.response", item.response or "")

    def _check_text(self, where: str, text: str) -> None:
        # invalid UTF-8 never gets here (the request does not parse: INVALID_ARGUMENT); U+FFFD is valid text
        if len(text.encode("utf-8", "surrogatepass")) > self.cfg.max_text_bytes:
            raise InvalidInput(f"{where} is longer than {self.cfg.max_text_bytes} bytes", where)

    def encode(self, item: Item, facts: ServedFacts, where: str = "items") -> list[int]:
        """Token ids as the reward model was trained: its truncation policy comes with the facts.

        A conversation the model's chat template refuses (e.g. roles that do not alternate, which
        Llama-2 and Mistral templates raise on) is the caller's input error, naming the item."""
        prompt, response = item.prompt, item.response or ""
        if item.messages:
            try:
                prompt, response = render_chat(self.tokenizer, [{"role": r, "content": c} for r, c in item.messages])
            except Exception as e:  # the template's own error (jinja2 TemplateError, ValueError): the input
                raise InvalidInput(f"{where}.messages: the model's chat template refuses this conversation: {e}",
                                   f"{where}.messages") from None
        max_prompt = self.cfg.max_prompt_length or facts.max_prompt_length     # < max_length: check_prompt_limit
        return encode_pair(self.tokenizer, prompt, response or "", max_prompt, facts.max_length)[0]


# ---------------------------------------------------------------- Triton backend and micro-batching

def check_prompt_limit(cfg: GatewayConfig, facts: ServedFacts) -> None:
    """A --max-prompt-length must leave the served model room for a response (at least its EOS): at or
    past its max_length a long prompt would fill the sequence and every response would score alike."""
    if cfg.max_prompt_length is not None and cfg.max_prompt_length >= facts.max_length:
        raise ContractError(f"--max-prompt-length {cfg.max_prompt_length} leaves no room for a response: the reward "
                            f"model takes at most {facts.max_length} tokens in all")


class Backend:
    """The Triton connection: (re)connects in the background, reports readiness."""

    def __init__(self, cfg: GatewayConfig, fingerprint: str):
        self.cfg, self.fingerprint = cfg, fingerprint
        self.scorer: TritonScorer | None = None
        self.ready = False
        self.repository_facts = ServedFacts.parse(read_manifest(cfg.repository).get("served"))   # ContractError if none
        self.repository_facts.require(REWARD_MODEL)       # a repository of the reference alone has no scores
        check_prompt_limit(cfg, self.repository_facts)
        self.last_error = "not connected yet"

    @property
    def facts(self) -> ServedFacts:
        """The connected server's facts; the repository's own until connected."""
        return self.scorer.facts if self.scorer else self.repository_facts

    def check(self) -> bool:
        """Blocking: one readiness probe, connecting first if needed. Run in a thread.

        While not ready, every probe connects afresh, so a Triton that comes back with another
        repository is checked again (fingerprint) and its facts (model id, statistics) re-read.
        """
        if not self.ready and self.scorer is not None:
            self.scorer.close()
            self.scorer = None
        try:
            if self.scorer is None:
                self.scorer = TritonScorer(self.cfg.triton.at(self.cfg.triton_url), self.fingerprint,
                                           models=(REWARD_MODEL,))
                check_prompt_limit(self.cfg, self.scorer.facts)
                log.info("connected to Triton at %s (reward model %s)", self.cfg.triton_url,
                         self.scorer.facts.reward_model_id)
            self.ready = self.scorer.is_ready(REWARD_MODEL, timeout_s=self.cfg.triton.connect_timeout_s)
            self.last_error = "" if self.ready else f"model {REWARD_MODEL!r} is not ready"
        except ContractError as e:
            self.ready, self.last_error = False, f"Triton at {self.cfg.triton_url} refused: {e}"
            log.error(self.last_error)
        except Exception as e:  # any transport failure means "not ready"; the probe repeats
            self.ready, self.last_error = False, f"Triton at {self.cfg.triton_url} unreachable: {e}"
            log.debug(self.last_error)
        return self.ready

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()


@dataclass(frozen=True)
class Scores:
    """One request's items as scored by one server: raw rewards (n,), the members' raw
    scores (n, K), and that server's facts (their statistics belong to its models)."""
    rewards: np.ndarray
    members: np.ndarray
    facts: ServedFacts

    @property
    def normalized(self) -> np.ndarray:
        """(reward − mean) / std of the served rewards on SFT samples. (n,)"""
        return self.facts.normalise(self.rewards)

    @property
    def spread(self) -> np.ndarray:
        """The members' disagreement: std over members of the standardised scores (0 for K = 1). (n,)"""
        return self.facts.member_spread(self.members)


@dataclass
class _Pending:
    seqs: list[list[int]]
    future: asyncio.Future
    deadline_s: float | None      # time.monotonic() by which the caller needs the answer


class MicroBatcher:
    """Collects items of concurrent requests into Triton calls of up to batch_max_items.

    A request's items stay together and in order; the queue is bounded (Overloaded).
    """

    def __init__(self, cfg: GatewayConfig, backend: Backend, pad_id: int, observe_batch=None, observe_queue=None):
        self.cfg, self.backend, self.pad_id = cfg, backend, pad_id
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.queued_items = 0
        self.observe_batch = observe_batch or (lambda n: None)
        self.observe_queue = observe_queue or (lambda n: None)
        self._task: asyncio.Task | None = None
        self._sending: set[asyncio.Task] = set()     # Triton calls in flight

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def score(self, seqs: list[list[int]], deadline_s: float | None) -> Scores:
        if not self.backend.ready:
            raise NotReady(f"the reward model is not available: {self.backend.last_error}")
        if self.queued_items + len(seqs) > self.cfg.max_queue_items:
            # a hint, not a promise: the queue drains by about one batch per batching delay
            batches = -(-self.queued_items // self.cfg.batch_max_items)
            raise Overloaded(f"{self.queued_items} items queued (limit {self.cfg.max_queue_items}); retry later",
                             retry_after_s=max(0.05, batches * self.cfg.batch_max_delay_ms / 1000))
        fut = asyncio.get_running_loop().create_future()
        self.queued_items += len(seqs)
        self.observe_queue(self.queued_items)
        await self.queue.put(_Pending(seqs, fut, deadline_s))
        return await fut

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()
            batch = [first]
            n = len(first.seqs)
            wait_until = time.monotonic() + self.cfg.batch_max_delay_ms / 1000
            while n < self.cfg.batch_max_items:
                timeout = wait_until - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                batch.append(nxt)
                n += len(nxt.seqs)
            self.observe_batch(n)
            # held until done: the event loop keeps only a weak reference to a task
            task = asyncio.get_running_loop().create_task(self._send(batch, n))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Pending], n_items: int) -> None:
        try:
            await self._score_batch(batch)
        finally:
            # items count against the queue limit until Triton has answered: that bounds
            # the work in flight, not only the work waiting
            self.queued_items -= n_items
            self.observe_queue(self.queued_items)

    async def _score_batch(self, batch: list[_Pending]) -> None:
        now = time.monotonic()
        expired = [p for p in batch if p.deadline_s is not None and p.deadline_s <= now]
        self._fail(expired, DeadlineExceeded("the request's deadline passed while it was queued"))
        batch = [p for p in batch if p not in expired]
        if not batch:
            return
        seqs = [s for p in batch for s in p.seqs]
        # Triton gets the most generous deadline of the batch (none: the configured one);
        # each caller's own deadline is enforced by gRPC on its call
        if any(p.deadline_s is None for p in batch):
            timeout = self.cfg.triton.timeout_s
        else:
            timeout = max(p.deadline_s for p in batch) - now
        try:
            scorer = self.backend.scorer
            if scorer is None or not self.backend.ready:
                raise NotReady(f"the reward model is not available: {self.backend.last_error}")
            ids, mask = pad(seqs, self.pad_id, left=True)
            rewards, members = await asyncio.wrap_future(scorer.score_with_members_async(ids, mask, timeout_s=timeout))
        except ScorerTimeout as e:
            self._fail(batch, DeadlineExceeded(f"Triton did not answer in time: {e}"))
            return
        except ScorerUnavailable as e:
            self.backend.ready = False
            self.backend.last_error = str(e)
            self._fail(batch, NotReady(f"Triton is unavailable: {e}"))
            return
        except ScorerRequestError as e:
            self._fail(batch, InvalidInput(str(e)))
            return
        except Exception as e:  # reported to the callers; the batcher goes on
            self._fail(batch, e)
            return
        start = 0
        for p in batch:
            if not p.future.done():
                end = start + len(p.seqs)
                p.future.set_result(Scores(rewards[start:end], members[start:end], scorer.facts))
            start += len(p.seqs)

    @staticmethod
    def _fail(batch: list[_Pending], error: Exception) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(error)


def model_info(backend: Backend, cfg: GatewayConfig) -> dict:
    f = backend.facts
    return {"model_id": f.reward_model_id, "contract_version": f.contract_version,
            "tokenizer_fingerprint": f.tokenizer_fingerprint, "reward_mean": f.reward_mean,
            "reward_std": f.reward_std, "max_sequence_length": f.max_sequence_length,
            "max_items": cfg.max_items, "max_text_bytes": cfg.max_text_bytes, "ensemble_size": f.ensemble_size,
            "preferred_rewards": f.preferred_rewards, "preferred_spread": f.preferred_spread}

