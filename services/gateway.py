"""`tribune gateway`: tribune.v1.RewardService over gRPC (grpc.aio), in front of Triton.

Servicers only translate: proto in → ``gateway_core`` types → a plain function → proto
out. Domain errors become gRPC status codes in one interceptor; authentication is a
second interceptor (health checks stay open for probes). The server also serves
``grpc.health.v1.Health`` (NOT_SERVING until Triton's `reward` model is ready, and again
if it goes away), server reflection, and Prometheus metrics on their own port.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tribune.services.common.errors import UserError
from tribune.services.common.secrets import same_secret
from tribune.services.contract import ContractError
from tribune.services.gateway_core import (Backend, DeadlineExceeded, GatewayConfig, GatewayError, InvalidInput, Item,
                                   MicroBatcher, NotReady, Overloaded, Scores, Tokenisation, Unauthenticated,
                                   model_info)
from tribune.v1 import reward_pb2, reward_pb2_grpc

log = logging.getLogger("tribune.gateway")
SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
METHODS = frozenset(reward_pb2.DESCRIPTOR.services_by_name["RewardService"].methods_by_name)
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")

STATUS = {InvalidInput: grpc.StatusCode.INVALID_ARGUMENT, Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
          NotReady: grpc.StatusCode.UNAVAILABLE, Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
          DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED}


class Metrics:
    """Prometheus metrics of the gateway (its own registry, so several can live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("tribune_gateway_requests", "requests by method and status code",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("tribune_gateway_request_seconds", "request latency", ["method"],
                                 registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("tribune_gateway_batch_items", "items per Triton call", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue = Gauge("tribune_gateway_queue_items", "items waiting for a Triton call", registry=self.registry)
        self.ready = Gauge("tribune_gateway_triton_ready", "1 when Triton's reward model is ready",
                           registry=self.registry)


def _request_id(context, request=None) -> str:
    """The caller's id: the request's ``request_id`` field, else the x-request-id header, else a new one."""
    own = getattr(request, "request_id", "")           # none on a request that did not parse (_Malformed)
    if own and own.isascii() and own.isprintable():     # what gRPC metadata (the trailer) can carry
        return own[:128]
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return value[:128]
    return uuid.uuid4().hex[:16]


class _Malformed:
    """Stands in for a request that did not parse, so the interceptor can answer INVALID_ARGUMENT."""

    def __init__(self, type_name: str, error: Exception):
        self.message = (f"malformed request: not a valid {type_name} (invalid UTF-8 in a string field, or a "
                        f"truncated or garbled protobuf: {error})")


def _tolerant(deserializer, type_name: str):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # any parse failure is the client's input error
            return _Malformed(type_name, e)
    return parse


def _check_parsed(request):
    if isinstance(request, _Malformed):
        raise InvalidInput(request.message)
    return request


def rich_details(code: grpc.StatusCode, error: GatewayError) -> tuple[tuple[str, bytes], ...]:
    """The error as a google.rpc.Status in the ``grpc-status-details-bin`` trailer (the gRPC
    richer error model): BadRequest with the failing field, RetryInfo on RESOURCE_EXHAUSTED.
    Clients read it with ``grpc_status.rpc_status.from_call``; those that do not see code and text."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    details = []
    if isinstance(error, InvalidInput) and error.field:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=error.field, description=str(error))]))
    if isinstance(error, Overloaded):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if not details:
        return ()
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    status = status_pb2.Status(code=code.value[0], message=str(error), details=packed)
    return (("grpc-status-details-bin", status.SerializeToString()),)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Domain errors → status codes; unexpected errors → INTERNAL (logged); metrics and logs per call."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        metrics = self.metrics
        method_desc = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].methods_by_name.get(method)
        deserializer = _tolerant(handler.request_deserializer,
                                 method_desc.input_type.full_name if method_desc else "request")

        async def _guard(coro_fn, context, request=None):
            t0 = time.perf_counter()
            rid = _request_id(context, request)
            context.set_trailing_metadata((("x-request-id", rid),))
            code = grpc.StatusCode.OK
            try:
                return await coro_fn(rid)
            except GatewayError as e:
                code = STATUS[type(e)]
                await context.abort(code, str(e), (("x-request-id", rid), *rich_details(code, e)))
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception:  # never crash on a request: log it, answer INTERNAL
                code = grpc.StatusCode.INTERNAL
                log.exception(json.dumps({"event": "internal_error", "method": method, "request_id": rid}))
                await context.abort(code, f"internal error (request id {rid})")
            finally:
                elapsed = time.perf_counter() - t0
                metrics.requests.labels(method, code.name).inc()
                metrics.latency.labels(method).observe(elapsed)
                log.info(json.dumps({"event": "request", "method": method, "request_id": rid, "code": code.name,
                                     "ms": round(elapsed * 1000, 2)}))

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                async def run(rid):
                    return await inner(_check_parsed(request), context, rid)
                return await _guard(run, context, request)

            return grpc.unary_unary_rpc_method_handler(unary, deserializer, handler.response_serializer)
        if handler.stream_stream:
            inner_stream = handler.stream_stream

            async def stream(request_iterator, context):
                async def checked():
                    async for request in request_iterator:
                        yield _check_parsed(request)

                async def run(rid):
                    async for response in inner_stream(checked(), context, rid):
                        await context.write(response)
                await _guard(run, context)

            return grpc.stream_stream_rpc_method_handler(stream, deserializer, handler.response_serializer)
        return handler


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires 'authorization: Bearer TOKEN' except on health checks and reflection; a refused
    call is counted (code UNAUTHENTICATED) and logged like every other."""

    def __init__(self, token: str, metrics: Metrics):
        self.expected = f"Bearer {token}"
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization")
        if same_secret(sent, self.expected):
            return await continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        if not details.method.startswith(f"/{SERVICE}/") or method not in METHODS:
            method = "unknown"          # a label per made-up name would grow the metrics without bound
        self.metrics.requests.labels(method, grpc.StatusCode.UNAUTHENTICATED.name).inc()
        log.info(json.dumps({"event": "request", "method": method, "code": grpc.StatusCode.UNAUTHENTICATED.name,
                             "detail": "missing or invalid bearer token"}))

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization)")

        handler = await continuation(details)
        if handler is not None and handler.stream_stream:
            async def deny_stream(request_iterator, context):
                await deny(None, context)
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)


def _items(proto_items) -> list[Item]:
    """proto3 cannot tell an unset string from an empty one: a missing prompt is refused, a
    missing response is the empty response (prompt + EOS)."""
    return [Item(i.prompt or None, i.response, tuple((m.role, m.content) for m in i.messages))
            for i in proto_items]


class RewardService(reward_pb2_grpc.RewardServiceServicer):
    """Translates tribune.v1 messages to domain calls; the interceptor adds the request id."""

    def __init__(self, cfg: GatewayConfig, tok: Tokenisation, backend: Backend, batcher: MicroBatcher):
        self.cfg, self.tok, self.backend, self.batcher = cfg, tok, backend, batcher

    async def _score(self, items: list[Item], context, field_name: str) -> Scores:
        self.tok.validate(items, field_name)
        facts = self.backend.facts
        seqs = [self.tok.encode(item, facts, f"{field_name}[{i}]") for i, item in enumerate(items)]
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return await self.batcher.score(seqs, deadline)    # with the facts of the server that answered

    async def Score(self, request, context, rid=None):
        s = await self._score(_items(request.items), context, "items")
        return reward_pb2.ScoreResponse(rewards=s.rewards.tolist(), normalized_rewards=s.normalized.tolist(),
                                        ensemble_spread=s.spread.tolist(), model_id=s.facts.reward_model_id,
                                        request_id=request.request_id or rid or "")

    async def ScoreBestOfN(self, request, context, rid=None):
        if not request.prompt:
            raise InvalidInput("prompt is required", "prompt")
        items = [Item(request.prompt, c) for c in request.candidates]
        s = await self._score(items, context, "candidates")
        rewards = s.rewards.tolist()
        ranking = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))
        return reward_pb2.BestOfNResponse(rewards=rewards, normalized_rewards=s.normalized.tolist(),
                                          ensemble_spread=s.spread.tolist(), best_index=ranking[0],
                                          ranking=ranking, model_id=s.facts.reward_model_id,
                                          request_id=request.request_id or rid or "")

    async def ScoreStream(self, request_iterator, context, rid=None):
        async for request in request_iterator:
            yield await self.Score(request, context, rid)

    async def GetModelInfo(self, request, context, rid=None):
        return reward_pb2.ModelInfo(**model_info(self.backend, self.cfg))


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


class Gateway:
    """The server and what it owns; built by ``create_server``, started with ``start()``."""

    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        try:
            self.tok = Tokenisation(cfg.repository, cfg)
            self.backend = Backend(cfg, self.tok.fingerprint)
        except ContractError as e:
            raise UserError(str(e)) from None
        self.metrics = Metrics()
        self.batcher = MicroBatcher(cfg, self.backend, self.tok.tokenizer.pad_token_id,
                                    observe_batch=self.metrics.batch.observe, observe_queue=self.metrics.queue.set)
        interceptors = [ErrorInterceptor(self.metrics)]
        self.token = cfg.required_token()
        if self.token is not None:
            interceptors.insert(0, AuthInterceptor(self.token, self.metrics))
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000),
                   ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                   ("grpc.keepalive_permit_without_calls", 1)]
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        reward_pb2_grpc.add_RewardServiceServicer_to_server(
            RewardService(cfg, self.tok, self.backend, self.batcher), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert is not None:
            creds = grpc.ssl_server_credentials([(_read(cfg.tls_key), _read(cfg.tls_cert))],
                                                root_certificates=_read(cfg.tls_client_ca),
                                                require_client_auth=cfg.tls_client_ca is not None)
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise UserError(f"cannot bind the gateway to {address} (address already in use, or not this host's)")
        self._tasks: list[asyncio.Task] = []
        self._metrics_http = None          # the /metrics HTTP server, from start() to stop()

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def _watch_triton(self) -> None:
        loop = asyncio.get_running_loop()
        was = None
        while True:
            ready = await loop.run_in_executor(None, self.backend.check)
            if ready != was:
                await self._set_health(ready)
                self.metrics.ready.set(1 if ready else 0)
                log.info(json.dumps({"event": "health", "serving": ready, "detail": self.backend.last_error}))
                was = ready
            await asyncio.sleep(self.cfg.health_interval_s)

    async def start(self) -> None:
        if self.cfg.metrics_port:          # first: a busy port is refused before anything listens
            from prometheus_client import start_http_server

            try:
                self._metrics_http = start_http_server(self.cfg.metrics_port, addr=self.cfg.host,
                                                       registry=self.metrics.registry)[0]
            except OSError as e:
                raise UserError(f"cannot serve metrics on {self.cfg.host}:{self.cfg.metrics_port} ({e.strerror or e}); "
                                "choose another --metrics-port, or 0 for none") from None
        await self._set_health(False)
        try:
            await self.server.start()
        except BaseException:
            self._stop_metrics()
            raise
        self.batcher.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_triton()))

    async def stop(self) -> None:
        await self._set_health(False)
        await self.server.stop(self.cfg.grace_s)
        for t in self._tasks:
            t.cancel()
        await self.batcher.stop()
        self.backend.close()
        self._stop_metrics()

    def _stop_metrics(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None


def create_server(cfg: GatewayConfig) -> tuple[Gateway, int]:
    """Builds the gateway (not started); returns it and the bound port (port 0 picks one)."""
    gw = Gateway(cfg)
    return gw, gw.port


async def serve(cfg: GatewayConfig, stop_event: asyncio.Event | None = None, on_started=None) -> None:
    """Runs the gateway until ``stop_event`` (or SIGINT/SIGTERM); ``on_started()`` once it listens."""
    gw, port = create_server(cfg)
    await gw.start()
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop_event.set)
        except (NotImplementedError, RuntimeError):
            pass
    print(f"tribune gateway: ready on {cfg.host}:{port} ({'TLS' if cfg.tls_cert else 'plaintext'}"
          f"{', mTLS' if cfg.tls_client_ca else ''}{', bearer auth' if gw.token else ''}); "
          f"Triton {cfg.triton_url}; metrics {cfg.host}:{cfg.metrics_port or 'off'}", flush=True)
    if on_started is not None:
        on_started()
    await stop_event.wait()
    print("tribune gateway: stopping", flush=True)
    await gw.stop()
    print("tribune gateway: stopped", flush=True)


class GatewayThread:
    """The gateway on its own event loop in a background thread (for `tribune serve --with-gateway`)."""

    def __init__(self, cfg: GatewayConfig):
        import threading

        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tribune-gateway", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            self.stop_event = asyncio.Event()
            await serve(self.cfg, self.stop_event, on_started=self.started.set)   # set once it listens

        try:
            self.loop.run_until_complete(main())
        except BaseException as e:  # surfaced to the caller by start()/stop()
            self.error = e
            self.started.set()

    def start(self) -> "GatewayThread":
        self.thread.start()
        if not self.started.wait(120) and not self.error:
            raise UserError(f"the gateway did not start listening on {self.cfg.host}:{self.cfg.port} in 120s")
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        if self.stop_event is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(self.cfg.grace_s + 10)


def run_gateway(cfg: GatewayConfig) -> None:
    logging.getLogger("tribune.gateway").setLevel(logging.INFO)
    asyncio.run(serve(cfg))
