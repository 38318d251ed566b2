"""`tribune serve`: the exported repository served by a real Triton Inference Server.

Triton is started through PyTriton (the nvidia-pytriton wheel ships the server binary).
Each contract model the repository has (`reward`, `reference` or both: its manifest's
``models``) is bound with the repository's name, tensors, max batch size and
dynamic-batching settings, and runs the repository's ONNX file (with its external data,
if any, beside it) in ONNX Runtime (CUDA execution provider when a GPU is there). Clients
see the same models, tensors, ports and model-config parameters as with stock Triton
serving the same repository.

The manifest's sha256s are verified before anything starts: a tampered repository is
refused. Requests are validated (token ids in the vocabulary, 0/1 masks, lengths within
the model's maximum, positive temperatures); a bad request gets an error and the server
keeps serving.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.config import field
from services.common.errors import UserError
from services.contract import (ATTENTION_MASK, INPUT_IDS, MANIFEST_SPEC, PROBE, REFERENCE, REWARD_MODEL,
                               TEMPERATURE, ContractError, ModelSpec, ServedFacts)
from services.repository import ONNX_FILE, read_config, verify_repository
from services.runtime import ensure_libpython_on_loader_path, execution_providers

log = logging.getLogger("tribune")


@dataclass(kw_only=True)
class ServeConfig:
    """The embedded Triton server (PyTriton + ONNX Runtime)."""
    repository: Path = field(help="model repository written by `tribune export`")
    host: str = field("127.0.0.1", help="address to bind; 0.0.0.0 to accept remote clients")
    grpc_port: int = field(8001, help="Triton gRPC port (KServe v2)")
    http_port: int = field(8000, help="Triton HTTP port (health: /v2/health/ready)")
    metrics_port: int = field(8002, help="Prometheus metrics port (/metrics)")
    instances: int = field(1, help="ONNX Runtime sessions per model (parallel batches)")
    intra_op_threads: int = field(0, help="ONNX Runtime threads per session (0: all cores)")
    log_verbose: int = field(0, help="Triton's own log verbosity")
    with_gateway: bool = field(False, help="also start the tribune.v1.RewardService gateway in front of it")
    gateway_port: int = field(50051, help="gateway gRPC port (with --with-gateway)")
    gateway_metrics_port: int = field(9090, help="gateway Prometheus port (with --with-gateway; 0: off)")

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port", "metrics_port", "gateway_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"{name} must be a TCP port (1-65535)")
        if self.instances < 1:
            raise ValueError("instances must be at least 1")


class BadRequest(ValueError):
    """A request that breaks the contract; reported to the client, the server goes on."""


def validate(spec: ModelSpec, inputs: dict[str, np.ndarray], vocab_size: int, max_len: int) -> None:
    ids, mask = inputs.get(INPUT_IDS.name), inputs.get(ATTENTION_MASK.name)
    if ids is None or mask is None:
        raise BadRequest(f"{spec.name}: input_ids and attention_mask are required")
    if ids.shape != mask.shape or ids.ndim != 2:
        raise BadRequest(f"{spec.name}: input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} "
                         "must both be (batch, sequence)")
    B, T = ids.shape
    if B == 0 or T == 0:
        raise BadRequest(f"{spec.name}: empty batch or empty sequences")
    if T > max_len:
        raise BadRequest(f"{spec.name}: sequence length {T} exceeds the model's maximum {max_len}")
    if T < 2 and spec is REFERENCE:
        raise BadRequest("reference: sequences need at least 2 tokens to have log-probs")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise BadRequest(f"{spec.name}: input_ids must be in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
    if not np.isin(mask, (0, 1)).all():
        raise BadRequest(f"{spec.name}: attention_mask must be 0 or 1")
    if (mask.sum(-1) == 0).any():
        raise BadRequest(f"{spec.name}: a row has no token with attention_mask 1")
    if spec is REFERENCE:
        temp = inputs.get(TEMPERATURE.name)
        if temp is None or temp.shape != (B, 1):
            raise BadRequest("reference: temperature must be (batch, 1)")
        if not (np.isfinite(temp).all() and (temp > 0).all()):
            raise BadRequest("reference: temperature must be finite and > 0")


class OnnxModel:
    """One contract model in ONNX Runtime, as a PyTriton inference callable."""

    def __init__(self, spec: ModelSpec, onnx_path: Path, vocab_size: int, max_len: int, intra_op_threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=execution_providers())
        self.spec, self.vocab_size, self.max_len = spec, vocab_size, max_len
        self.outputs = spec.output_names           # an ensemble's reward: rewards and member_rewards
        missing = set(self.outputs) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise ContractError(f"{onnx_path} has no output {', '.join(sorted(missing))}")

    def __call__(self, requests):
        """Triton hands over the requests of one dynamic batch; we run them as one ORT call."""
        from pytriton.exceptions import PyTritonBadParameterError

        try:
            for r in requests:
                validate(self.spec, {k: np.asarray(v) for k, v in r.items()}, self.vocab_size, self.max_len)
        except BadRequest as e:
            raise PyTritonBadParameterError(str(e)) from None
        sizes = [r[INPUT_IDS.name].shape[0] for r in requests]
        lengths = [r[INPUT_IDS.name].shape[1] for r in requests]
        T = max(lengths)
        feeds = {}
        for t in self.spec.inputs:
            parts = []
            for r, L in zip(requests, lengths):
                x = np.asarray(r[t.name], dtype=t.numpy_dtype)
                if t.dims == (-1,) and L < T:   # left-pad to a common length: positions come from the mask
                    x = np.pad(x, ((0, 0), (T - L, 0)))
                parts.append(x)
            feeds[t.name] = np.concatenate(parts, 0)
        outs = self.session.run(self.outputs, feeds)
        responses, start = [], 0
        for n, L in zip(sizes, lengths):
            response = {}
            for name, out in zip(self.outputs, outs):
                chunk = out[start:start + n]
                if self.spec is REFERENCE:
                    chunk = chunk[:, T - L:]          # drop the columns of our own left padding
                response[name] = np.ascontiguousarray(chunk, dtype=np.float32)
            responses.append(response)
            start += n
        return responses


class ManifestModel:
    """The unbatched `tribune_manifest` model: its ONNX graph is one constant JSON string."""

    def __init__(self, onnx_path: Path):
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        names = MANIFEST_SPEC.output_names
        manifest, files = session.run(names, {PROBE.name: np.zeros(1, dtype=PROBE.numpy_dtype)})
        self.facts = ServedFacts.parse(manifest[0])
        self.outputs = {name: np.array([value[0].encode()], dtype=np.object_)
                        for name, value in zip(names, (manifest, files))}

    def __call__(self, requests):
        return [dict(self.outputs) for _ in requests]


def bind_repository(triton, repo: Path, cfg: ServeConfig) -> dict[str, int]:
    """Binds the repository's contract models; returns their max batch sizes."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor

    manifest = ManifestModel(repo / MANIFEST_SPEC.name / "1" / ONNX_FILE)
    triton.bind(model_name=MANIFEST_SPEC.name, infer_func=manifest,
                inputs=[Tensor(name=t.name, dtype=t.numpy_dtype, shape=t.dims) for t in MANIFEST_SPEC.inputs],
                outputs=[Tensor(name=t.name, dtype=np.bytes_, shape=t.dims) for t in MANIFEST_SPEC.outputs],
                config=ModelConfig(batching=False), strict=False)
    vocab, max_len = manifest.facts.vocab_size, manifest.facts.max_sequence_length
    limits = {}
    # the repository's own specs: an ensemble's reward adds member_rewards [K] (verify_repository
    # has checked that config.pbtxt agrees with the manifest's K)
    for spec in map(manifest.facts.model_spec, manifest.facts.models):
        pb = read_config(repo / spec.name / "config.pbtxt")
        fns = [OnnxModel(spec, repo / spec.name / "1" / ONNX_FILE, vocab, max_len, cfg.intra_op_threads)
               for _ in range(cfg.instances)]
        db = pb.dynamic_batching
        batcher = DynamicBatcher(max_queue_delay_microseconds=db.max_queue_delay_microseconds,
                                 default_queue_policy=QueuePolicy(max_queue_size=db.default_queue_policy.max_queue_size))
        triton.bind(
            model_name=spec.name, infer_func=fns,
            inputs=[Tensor(name=t.name, dtype=t.numpy_dtype, shape=t.dims) for t in spec.inputs],
            outputs=[Tensor(name=t.name, dtype=t.numpy_dtype, shape=t.dims) for t in spec.outputs],
            config=ModelConfig(max_batch_size=pb.max_batch_size, batcher=batcher), strict=True)
        limits[spec.name] = pb.max_batch_size
    return limits


def run_serve(cfg: ServeConfig) -> None:
    from pytriton.triton import Triton, TritonConfig

    repo = Path(cfg.repository)
    try:
        manifest = verify_repository(repo)
    except ContractError as e:
        raise UserError(str(e)) from None
    facts = ServedFacts.parse(manifest["served"])
    if cfg.with_gateway and REWARD_MODEL not in facts.models:
        raise UserError(f"--with-gateway scores text with `reward`, and {repo} serves only {', '.join(facts.models)}")
    ensure_libpython_on_loader_path()
    tconfig = TritonConfig(grpc_address=cfg.host, grpc_port=cfg.grpc_port, http_address=cfg.host,
                           http_port=cfg.http_port, metrics_address=cfg.host, metrics_port=cfg.metrics_port,
                           log_verbose=cfg.log_verbose, strict_readiness=True, exit_on_error=True,
                           allow_gpu_metrics=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    t0 = time.perf_counter()
    with Triton(config=tconfig) as triton:
        limits = bind_repository(triton, repo, cfg)
        triton.run()
        gateway = None
        if cfg.with_gateway:
            from services.gateway import GatewayThread
            from services.gateway_core import GatewayConfig

            gateway = GatewayThread(GatewayConfig(
                repository=repo, triton_url=f"127.0.0.1:{cfg.grpc_port}" if cfg.host == "0.0.0.0" else
                f"{cfg.host}:{cfg.grpc_port}", host=cfg.host, port=cfg.gateway_port,
                metrics_port=cfg.gateway_metrics_port)).start()
        print(f"tribune serve: ready in {time.perf_counter() - t0:.1f}s; models "
              f"{', '.join(f'{m} (max batch {b})' for m, b in limits.items())}; gRPC {cfg.host}:{cfg.grpc_port}, "
              f"HTTP {cfg.host}:{cfg.http_port}, metrics {cfg.host}:{cfg.metrics_port}"
              + (f"; reward model {facts.reward_model_id}" if REWARD_MODEL in facts.models else "")
              + (f" (ensemble of {facts.ensemble_size})" if facts.ensemble_size > 1 else "")
              + (f"; gateway {cfg.host}:{cfg.gateway_port}" if gateway else ""), flush=True)
        while not stop.wait(0.5):
            if not triton.is_alive():
                raise UserError("Triton stopped unexpectedly; see its log above")
        print("tribune serve: stopping", flush=True)
        if gateway is not None:
            gateway.stop()
    print("tribune serve: stopped", flush=True)

