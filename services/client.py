"""The client side of the wire contract: what the trainer, the gateway and the CLI use.

``TritonScorer`` talks KServe v2 gRPC to any server that follows the contract (stock
Triton serving an exported repository, or `tribune serve`):

* at connect it reads the `tribune_manifest` model, checks the contract version, that the
  repository serves the models it will call (a repository may hold `reward` or `reference`
  alone, so the two can be at two URLs with two tokenizers), that the server's tokenizer
  fingerprint equals the caller's, then waits for those models and checks their tensor
  metadata (an ensemble's `reward` with its member_rewards [K], K from the manifest); it
  refuses otherwise;
* a large batch is split into chunks of at most the server's max batch size, each chunk
  is trimmed to the columns that hold tokens and left-padded up to a length bucket (a
  multiple of ``length_bucket``: Triton's dynamic batcher merges only requests of equal
  shape, so exact lengths would make every request its own execution), several chunks are
  in flight at once, and results are reassembled in order;
* every request has a deadline; UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED (a server that stopped
  with the call in flight) and a model that is still loading are retried with exponential backoff until a time budget runs out, then
  a ``ScorerUnavailable`` says what happened; every other error is raised at once.

Targets are ``host:port`` or ``dns:///host:port`` (with round-robin load balancing over
every address the name resolves to: Kubernetes headless Services).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from tribune.services.common.config import field
from tribune.services.common.secrets import resolve_secret
from tribune.services.contract import (ATTENTION_MASK, INPUT_IDS, LOGPROBS, MANIFEST, MANIFEST_SPEC, MEMBER_REWARDS_NAME,
                               PROBE, REFERENCE_MODEL, REWARD_MODEL, REWARDS, TEMPERATURE, TOKENIZER_FILES,
                               ContractError, ServedFacts, check_metadata)

log = logging.getLogger("tribune")
# where a client's bearer token comes from when neither --auth-token nor --auth-token-file is given
AUTH_TOKEN_ENV = "TRIBUNE_AUTH_TOKEN"

# CANCELLED too: this client never cancels its own calls, so it comes from a server that stopped or restarted
# with the call in flight (seen when a scorer restarts mid-run); scoring calls are idempotent
RETRYABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED")
# Triton answers these while a model is (re)loading; they clear by themselves.
LOADING_HINTS = ("is not ready", "unknown model", "no available versions")


class ScorerUnavailable(RuntimeError):
    """The scoring service could not be reached within the retry budget."""


class ScorerTimeout(ScorerUnavailable):
    """The last attempt ran past its deadline (DEADLINE_EXCEEDED)."""


class ScorerRequestError(ValueError):
    """The server rejected a request as bad input; retrying would not help."""


class ScorerServerError(RuntimeError):
    """The server failed on a valid request (e.g. INTERNAL); not the caller's fault."""


@dataclass(kw_only=True)
class ClientOptions:
    """How to talk to a Triton server that serves the Tribune contract (everything but its address).

    One group shared by `tribune ppo`, `tribune score`, the gateway (``--triton-…``) and the demo.
    """
    timeout_s: float = field(60.0, help="deadline of each request")
    connect_timeout_s: float = field(60.0, help="how long to wait for the models to become ready at connect")
    max_in_flight: int = field(4, help="chunks in flight at once")
    chunk_size: int | None = field(None, help="rows per request (default and maximum: the server's max batch size)")
    retry_budget_s: float = field(30.0, help="total time spent retrying one chunk before giving up")
    initial_backoff_s: float = field(0.1, help="first retry delay; doubles up to max_backoff_s, with jitter")
    max_backoff_s: float = field(2.0, help="longest retry delay")
    ssl: bool = field(False, help="use TLS")
    root_certificates: Path | None = field(None, help="PEM file of the CA that signed the server certificate")
    private_key: Path | None = field(None, help="PEM client key (mutual TLS)")
    certificate_chain: Path | None = field(None, help="PEM client certificate (mutual TLS)")
    auth_token: str | None = field(None, help="sent as 'authorization: Bearer TOKEN' on every call (visible in ps: "
                                   f"prefer --auth-token-file or ${AUTH_TOKEN_ENV})", secret=True)
    auth_token_file: Path | None = field(None, help=f"file holding the bearer token (default: ${AUTH_TOKEN_ENV} "
                                         "when set, else no token)")
    load_balancing: Literal["round_robin", "pick_first"] = field("round_robin", help="gRPC load-balancing policy")
    length_bucket: int = field(16, help="pad each request's length up to a multiple of this (0: exact lengths), "
                                        "so that Triton can batch requests of nearby lengths together")

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0 or self.retry_budget_s < 0:
            raise ValueError("timeout_s and connect_timeout_s must be positive, retry_budget_s >= 0")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if self.length_bucket < 0:
            raise ValueError("length_bucket must be >= 0 (0: exact lengths)")
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("private_key and certificate_chain (mutual TLS) go together")
        if self.auth_token and self.auth_token_file is not None:
            raise ValueError("auth_token and auth_token_file are alternatives: give one")

    def bearer_token(self) -> str | None:
        """--auth-token, else the file --auth-token-file, else $TRIBUNE_AUTH_TOKEN; None: send none."""
        return resolve_secret(self.auth_token, self.auth_token_file, AUTH_TOKEN_ENV)

    def at(self, url: str) -> "ClientConfig":
        """These options for the server at ``url``."""
        return ClientConfig(url=url, **{f.name: getattr(self, f.name) for f in dataclasses.fields(ClientOptions)})


@dataclass(kw_only=True)
class ClientConfig(ClientOptions):
    """Connection to one Triton server: its address and the client options."""
    url: str = field(help="host:port, or dns:///host:port to balance over every address of a headless Service")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.url:
            raise ValueError("url must be host:port or dns:///host:port")


def _path_str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _trim(mask: np.ndarray) -> tuple[int, int]:
    """[lo, hi] columns that hold any token (mask 1) in a chunk."""
    cols = np.flatnonzero(mask.any(0))
    return (int(cols[0]), int(cols[-1])) if cols.size else (0, mask.shape[1] - 1)


def bucket_length(length: int, bucket: int, max_length: int) -> int:
    """``length`` rounded up to a multiple of ``bucket``, never past ``max_length`` (nor below
    ``length``); ``bucket`` 0 keeps it exact."""
    if bucket <= 0 or length >= max_length:
        return length
    return min(-(-length // bucket) * bucket, max_length)


class TritonScorer:
    """Rewards and reference log-probs from the remote services, batched and retried.

    ``expected_fingerprint`` is the caller's tokenizer fingerprint
    (``tribune.services.repository.tokenizer_fingerprint(tokenizer)``); None skips the check,
    for callers that send text through the server's own tokenizer.
    """

    def __init__(self, cfg: ClientConfig, expected_fingerprint: str | None,
                 models: tuple[str, ...] = (REWARD_MODEL, REFERENCE_MODEL)):
        self.cfg = cfg
        self.models = models
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_in_flight, thread_name_prefix="tribune-scorer")
        token = cfg.bearer_token()
        self._headers = {"authorization": f"Bearer {token}"} if token else None
        self.facts = self._connect(expected_fingerprint)
        self.max_batch = min(self.facts.max_batch_size, cfg.chunk_size or self.facts.max_batch_size)

    # ------------------------------------------------------------ connection

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.grpc as grpcclient

            options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20),
                       ("grpc.lb_policy_name", self.cfg.load_balancing),
                       ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]
            client = grpcclient.InferenceServerClient(
                self.cfg.url, ssl=self.cfg.ssl, root_certificates=_path_str(self.cfg.root_certificates),
                private_key=_path_str(self.cfg.private_key), certificate_chain=_path_str(self.cfg.certificate_chain),
                channel_args=options)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _connect(self, expected_fingerprint: str | None) -> ServedFacts:
        """Reads the manifest, checks that the server serves ``models`` with the caller's tokenizer
        (before waiting for them: a repository without them would never become ready), then waits."""
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        self._wait_ready([MANIFEST_SPEC.name], deadline)
        try:
            facts = ServedFacts.parse(self._manifest_output(MANIFEST.name))
            facts.require(*self.models)
        except ContractError as e:
            raise ContractError(f"{self.cfg.url}: {e}") from None
        if expected_fingerprint is not None and facts.tokenizer_fingerprint != expected_fingerprint:
            raise ContractError(
                f"tokenizer mismatch: the {' and '.join(self.models)} at {self.cfg.url} speaks tokenizer "
                f"{facts.tokenizer_fingerprint[:12]}…, yours is {expected_fingerprint[:12]}…; token ids would "
                "mean different words. Use the tokenizer in the model repository's tokenizer/ directory (a reward "
                "model of another family is scored as text, through the gateway).")
        self._wait_ready(list(self.models), deadline)
        for name in self.models:
            check_metadata(facts.model_spec(name),
                           self._client().get_model_metadata(name, headers=self._headers, as_json=True))
        return facts

    def _wait_ready(self, names: list[str], deadline: float) -> None:
        waiting_for, last = list(names), None
        while waiting_for:
            try:
                if self._client().is_model_ready(waiting_for[0], headers=self._headers,
                                                 client_timeout=self.cfg.timeout_s):
                    waiting_for.pop(0)
                    continue
                last = f"model {waiting_for[0]!r} is not ready"
            except Exception as e:  # tritonclient raises its own exception type for transport errors
                if not self._retryable(e):
                    raise ContractError(f"{self.cfg.url}: {self._message(e)}") from None
                last = self._message(e)
            if time.monotonic() > deadline:
                raise ScorerUnavailable(f"{self.cfg.url}: not ready after {self.cfg.connect_timeout_s:.0f}s ({last})")
            time.sleep(0.2)

    def is_ready(self, model: str, timeout_s: float | None = None) -> bool:
        """One readiness probe of ``model`` (raises the transport error if the server is unreachable)."""
        return bool(self._client().is_model_ready(model, headers=self._headers,
                                                  client_timeout=timeout_s or self.cfg.timeout_s))

    def _manifest_output(self, name: str) -> str:
        import tritonclient.grpc as grpcclient

        probe = grpcclient.InferInput(PROBE.name, [1], PROBE.dtype)
        probe.set_data_from_numpy(np.zeros(1, dtype=np.int64))
        value = self._call(MANIFEST_SPEC.name, [probe], (name,))[0][0]
        return value.decode() if isinstance(value, bytes) else value

    def fetch_tokenizer(self, dest: Path) -> Path:
        """Writes the server's tokenizer files into ``dest`` (for text clients without the repository)."""
        import base64

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for name, content in json.loads(self._manifest_output(TOKENIZER_FILES.name)).items():
            (dest / Path(name).name).write_bytes(base64.b64decode(content))
        return dest

    # ------------------------------------------------------------ retries

    @staticmethod
    def _message(e: Exception) -> str:
        msg = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
        msg = msg or str(e)
        return msg.strip().splitlines()[0] if msg.strip() else repr(e)

    @staticmethod
    def _is_bad_request(e: Exception) -> bool:
        status = e.status() if hasattr(e, "status") and callable(e.status) else None
        return status == "StatusCode.INVALID_ARGUMENT"

    @staticmethod
    def _retryable(e: Exception) -> bool:
        status = e.status() if hasattr(e, "status") and callable(e.status) else None
        text = str(e)
        return status in RETRYABLE or any(h in text for h in LOADING_HINTS) or (
            status is None and ("UNAVAILABLE" in text or "failed to connect" in text.lower()))

    def _call(self, model: str, inputs: list, outputs: tuple[str, ...], timeout_s: float | None = None
              ) -> list[np.ndarray]:
        """The named outputs of one request (only those are asked for), retried as described above."""
        import tritonclient.grpc as grpcclient

        requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
        budget_end = time.monotonic() + self.cfg.retry_budget_s
        backoff = self.cfg.initial_backoff_s
        attempt = 0
        while True:
            attempt += 1
            try:
                result = self._client().infer(model, inputs, headers=self._headers, outputs=requested,
                                              client_timeout=timeout_s or self.cfg.timeout_s)
                return [result.as_numpy(name) for name in outputs]
            except Exception as e:
                if not self._retryable(e):
                    error = ScorerRequestError if self._is_bad_request(e) else ScorerServerError
                    raise error(f"{model}: {self._message(e)}") from None
                if time.monotonic() + backoff > budget_end:
                    timed_out = "DEADLINE_EXCEEDED" in str(getattr(e, "status", lambda: "")())
                    raise (ScorerTimeout if timed_out else ScorerUnavailable)(
                        f"{model} at {self.cfg.url}: still failing after {attempt} attempts over "
                        f"{self.cfg.retry_budget_s:.0f}s retry budget: {self._message(e)}") from None
                log.warning("%s at %s: %s; retry %d in %.2fs", model, self.cfg.url, self._message(e), attempt, backoff)
                time.sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, self.cfg.max_backoff_s)

    # ------------------------------------------------------------ requests

    def _check(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ScorerRequestError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be equal (B, T)")
        if ids.shape[0] == 0:
            raise ScorerRequestError("empty batch")
        if ids.shape[1] > self.facts.max_sequence_length:
            raise ScorerRequestError(f"sequence length {ids.shape[1]} exceeds the served model's maximum "
                                     f"{self.facts.max_sequence_length}")
        return ids, mask

    def _chunk(self, model: str, ids: np.ndarray, mask: np.ndarray, temperature: float | None,
               timeout_s: float | None = None, members: bool = False) -> np.ndarray:
        """One request: rewards (b,), or with ``members`` [rewards | member scores] (b, 1 + K);
        or reference log-probs (b, T−1)."""
        import tritonclient.grpc as grpcclient

        lo, hi = _trim(mask)
        L = hi + 1 - lo
        pad = bucket_length(L, self.cfg.length_bucket, self.facts.max_sequence_length) - L
        # left padding (mask 0) up to the bucket: positions come from the mask, so the scores are unchanged
        feeds = [(INPUT_IDS, np.pad(ids[:, lo:hi + 1], ((0, 0), (pad, 0)))),
                 (ATTENTION_MASK, np.pad(mask[:, lo:hi + 1], ((0, 0), (pad, 0))))]
        if temperature is not None:
            feeds.append((TEMPERATURE, np.full((ids.shape[0], 1), temperature, dtype=np.float32)))
        inputs = []
        for spec, value in feeds:
            x = grpcclient.InferInput(spec.name, list(value.shape), spec.dtype)
            x.set_data_from_numpy(np.ascontiguousarray(value, dtype=spec.numpy_dtype))
            inputs.append(x)
        if model == REWARD_MODEL and not members:
            return self._call(model, inputs, (REWARDS.name,), timeout_s)[0][:, 0]          # (b,)
        if model == REWARD_MODEL:
            if self.facts.ensemble_size == 1:      # a single reward model is its own only member
                (rewards,) = self._call(model, inputs, (REWARDS.name,), timeout_s)       # (b, 1)
                return np.concatenate([rewards, rewards], 1)                             # (b, 2)
            rewards, scores = self._call(model, inputs, (REWARDS.name, MEMBER_REWARDS_NAME), timeout_s)
            return np.concatenate([rewards, scores], 1)                                  # (b, 1 + K)
        out = np.zeros((ids.shape[0], ids.shape[1] - 1), dtype=np.float32)              # (b, T−1)
        out[:, lo:hi] = self._call(model, inputs, (LOGPROBS.name,), timeout_s)[0][:, pad:]   # our padding dropped
        return out

    def _map(self, model: str, ids: np.ndarray, mask: np.ndarray, temperature: float | None,
             timeout_s: float | None = None, members: bool = False) -> list[Future]:
        return [self._pool.submit(self._chunk, model, ids[i:i + self.max_batch], mask[i:i + self.max_batch],
                                  temperature, timeout_s, members)
                for i in range(0, ids.shape[0], self.max_batch)]

    def score_async(self, input_ids, attention_mask, timeout_s: float | None = None) -> Future:
        """Future of rewards (B,) for token ids (B, T) and their mask (any padding side).

        ``timeout_s`` overrides the configured per-request deadline (e.g. a caller's own).
        """
        ids, mask = self._check(input_ids, attention_mask)
        return _gather(self._map(REWARD_MODEL, ids, mask, None, timeout_s))

    def score_with_members_async(self, input_ids, attention_mask, timeout_s: float | None = None) -> Future:
        """Future of (rewards (B,), the members' raw scores (B, K)) from the same requests.

        K is ``facts.ensemble_size``; for K = 1 the member scores are the rewards, as (B, 1).
        Chunked, retried and in order like ``score_async``. Standardise member scores with
        ``facts.standardise_members`` before comparing members (``facts.member_spread``).
        """
        ids, mask = self._check(input_ids, attention_mask)
        both = _gather(self._map(REWARD_MODEL, ids, mask, None, timeout_s, members=True))    # (B, 1 + K)
        return _then(both, lambda a: (np.ascontiguousarray(a[:, 0]), np.ascontiguousarray(a[:, 1:])))

    def score_members_async(self, input_ids, attention_mask, timeout_s: float | None = None) -> Future:
        """Future of the members' raw scores (B, K) (K = 1: the rewards as one column); see above."""
        return _then(self.score_with_members_async(input_ids, attention_mask, timeout_s), lambda rm: rm[1])

    def logprobs_async(self, input_ids, attention_mask, temperature: float = 1.0) -> Future:
        """Future of reference log-probs (B, T−1): column t−1 is token t, 0 where masked."""
        if not temperature > 0:
            raise ScorerRequestError("temperature must be > 0")
        ids, mask = self._check(input_ids, attention_mask)
        return _gather(self._map(REFERENCE_MODEL, ids, mask, float(temperature)))

    def score(self, input_ids, attention_mask) -> np.ndarray:
        return self.score_async(input_ids, attention_mask).result()

    def logprobs(self, input_ids, attention_mask, temperature: float = 1.0) -> np.ndarray:
        return self.logprobs_async(input_ids, attention_mask, temperature).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for c in self._clients:
                try:
                    c.close()
                except Exception:  # closing a broken channel must not mask the real error
                    pass
            self._clients.clear()

    def __enter__(self) -> "TritonScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _then(future: Future, fn) -> Future:
    """A future of ``fn(result)``; errors (and cancellation, as ScorerUnavailable) pass through."""
    done: Future = Future()

    def _finished(f: Future) -> None:
        if f.cancelled():
            done.set_exception(ScorerUnavailable("the scorer was closed while a request was in flight"))
        elif f.exception() is not None:
            done.set_exception(f.exception())
        else:
            try:
                done.set_result(fn(f.result()))
            except Exception as e:  # a bug in fn must reach the caller, not vanish in a callback
                done.set_exception(e)

    future.add_done_callback(_finished)
    return done


def _gather(parts: list[Future]) -> Future:
    """One future for the in-order concatenation of chunk futures; the first error wins."""
    done: Future = Future()
    remaining = [len(parts)]
    lock = threading.Lock()

    def _one_finished(f: Future) -> None:
        if done.done():
            return
        if f.cancelled():
            with lock:
                if not done.done():
                    done.set_exception(ScorerUnavailable("the scorer was closed while a request was in flight"))
            return
        if f.exception() is not None:
            with lock:
                if not done.done():
                    done.set_exception(f.exception())
            return
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0 and not done.done():
                done.set_result(np.concatenate([p.result() for p in parts], 0))

    for p in parts:
        p.add_done_callback(_one_finished)
    return done
