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
the model's maximum, positive temperatures); a bad request gets INVALID_ARGUMENT with one
sentence naming the input and the rule, alone (the good requests Triton merged with it are
answered), and the server keeps serving (services/triton_proxy.py carries the refusal).

Readiness is honest: tritonserver loads every model from a local model store before it
opens its endpoints, so /v2/health/ready (the probe of every k8s overlay) is never 200
while a model is loading; "tribune serve: ready" is printed once the models answer (and,
with --with-gateway, once the gateway listens). Requests of unequal lengths are merged by
the dynamic batcher (ragged batching) and padded together by OnnxModel.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tribune.services.client import bucket_length
from tribune.services.common.config import field
from tribune.services.common.errors import UserError
from tribune.services.contract import (ATTENTION_MASK, INPUT_IDS, MANIFEST_SPEC, MIN_TEMPERATURE, MODELS, PROBE,
                                       REFERENCE, REWARD_MODEL, TEMPERATURE, ContractError, ModelSpec, ServedFacts)
from tribune.services.launcher import PORT_CLASH
from tribune.services.repository import ONNX_FILE, read_config, verify_repository
from tribune.services.runtime import ensure_libpython_on_loader_path, execution_providers

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
    intra_op_threads: int = field(0, help="ONNX Runtime threads per session (0: $OMP_NUM_THREADS when set, "
                                          "else ONNX Runtime's default, every core)")
    log_verbose: int = field(0, help="Triton's own log verbosity")
    exit_timeout_s: int = field(15, help="on SIGTERM, how long Triton waits for in-flight requests (and model "
                                         "unloads) before it exits; Triton's own default, 30, plus PyTriton's "
                                         "30-second wait on it could outlast a pod's grace period")
    with_gateway: bool = field(False, help="also start the tribune.v1.RewardService gateway in front of it")
    gateway_port: int = field(50051, help="gateway gRPC port (with --with-gateway)")
    gateway_metrics_port: int = field(9090, help="gateway Prometheus port (with --with-gateway; 0: off)")
    ragged_batching: bool = field(True, help="let the dynamic batcher merge requests of unequal lengths "
                                             "(off: stock Triton's rule, equal shapes only)")

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port", "metrics_port", "gateway_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"{name} must be a TCP port (1-65535)")
        first: dict[int, str] = {}
        for flag, port in self.listening_ports().items():
            if port in first:      # Triton would print its whole usage text and exit
                raise ValueError(f"{first[port]} and {flag} are both {port}: {PORT_CLASH}")
            first[port] = flag
        if self.instances < 1:
            raise ValueError("instances must be at least 1")
        if self.intra_op_threads < 0:
            raise ValueError("intra_op_threads must be non-negative")
        if not 0 <= self.exit_timeout_s < 30:       # below PyTriton's wait, which kills Triton past it
            raise ValueError("exit_timeout_s must be between 0 and 29")

    def listening_ports(self) -> dict[str, int]:
        """{flag: port} of every endpoint this server opens."""
        ports = {"--grpc-port": self.grpc_port, "--http-port": self.http_port, "--metrics-port": self.metrics_port}
        if self.with_gateway:
            ports["--gateway-port"] = self.gateway_port
            if self.gateway_metrics_port:
                ports["--gateway-metrics-port"] = self.gateway_metrics_port
        return ports

    def session_threads(self) -> int:
        """ONNX Runtime's intra-op threads (0: its default): the flag, else the process's thread
        budget in $OMP_NUM_THREADS (a job sharing the cores, e.g. a task of `tribune evaluate`)."""
        if self.intra_op_threads:
            return self.intra_op_threads
        env = os.environ.get("OMP_NUM_THREADS", "")
        return int(env) if env.isdigit() else 0


class BadRequest(ValueError):
    """A request that breaks the contract; reported to the client, the server goes on."""


# Requests whose lengths round up to the same multiple of this run as one ORT call (OnnxModel.run).
MERGE_BUCKET = 16

# The output that carries a refusal from the inference callable to the proxy model, which turns it
# into that request's INVALID_ARGUMENT (services/triton_proxy.py; not part of the wire contract).
ERROR_OUTPUT = "tribune_error"


def validate(spec: ModelSpec, inputs: dict[str, np.ndarray], vocab_size: int, max_len: int) -> None:
    """Raises BadRequest with one sentence naming the input and the rule it breaks.

    ``inputs`` of one request: input_ids and attention_mask (B, T), for `reference` also
    temperature (B, 1). Dtypes, a missing input and the batch size are Triton's own checks
    (it knows the model config); this is what only the contract knows.
    """
    for t in spec.inputs:
        if inputs.get(t.name) is None:
            raise BadRequest(f"{t.name}: required by model {spec.name}")
    ids, mask = inputs[INPUT_IDS.name], inputs[ATTENTION_MASK.name]
    if ids.ndim != 2:
        raise BadRequest(f"input_ids: shape {list(ids.shape)} is not (batch, sequence)")
    if mask.shape != ids.shape:
        raise BadRequest(f"attention_mask: shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
    B, T = ids.shape
    if B == 0:
        raise BadRequest("input_ids: empty batch; send at least one row")
    if T == 0:
        raise BadRequest("input_ids: empty sequence; a sequence needs at least one token")
    if T > max_len:
        raise BadRequest(f"input_ids: length {T} over the maximum sequence length of {max_len}")
    if T < 2 and spec is REFERENCE:
        raise BadRequest("input_ids: length 1; reference log-probs need at least 2 tokens")
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.size:
        raise BadRequest(f"input_ids: id {outside[0]} outside the vocabulary of {vocab_size}")
    not_binary = mask[(mask != 0) & (mask != 1)]
    if not_binary.size:
        raise BadRequest(f"attention_mask: value {not_binary[0]} is not 0 or 1")
    empty_rows = np.flatnonzero(mask.sum(-1) == 0)
    if empty_rows.size:
        raise BadRequest(f"attention_mask: row {empty_rows[0]} is all 0, so it has no token to score")
    if spec is REFERENCE:
        temp = inputs[TEMPERATURE.name]
        if temp.shape != (B, 1):
            raise BadRequest(f"temperature: shape {list(temp.shape)} is not (batch, 1) = {[B, 1]}")
        bad = temp[~(np.isfinite(temp) & (temp >= MIN_TEMPERATURE))]
        if bad.size:
            raise BadRequest(f"temperature: {bad[0]:g} is not a finite number of at least {MIN_TEMPERATURE:g}")


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
        """Triton hands over the requests of one dynamic batch, equal lengths or not (the inputs
        are ragged-batched); the valid ones run as one ORT call, each invalid one is refused alone."""
        refusals = []
        for r in requests:
            try:
                validate(self.spec, {k: np.asarray(v) for k, v in r.items()}, self.vocab_size, self.max_len)
                refusals.append(None)
            except BadRequest as e:
                refusals.append(str(e))
        good = [r for r, why in zip(requests, refusals) if why is None]
        answers = iter(self.run(good) if good else [])
        return [{ERROR_OUTPUT: np.array([why.encode()], dtype=np.object_)} if why else next(answers)
                for why in refusals]

    def run(self, requests) -> list[dict[str, np.ndarray]]:
        """Valid requests of any lengths: those within one length bucket run as one ORT call.

        On a CPU a forward pass costs about the same per token at any batch size, so padding a
        16-token request to the 64 of another would cost more than a second call; grouping by
        bucket (as the client pads) bounds the padding and keeps each call batched.
        """
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            L = r[INPUT_IDS.name].shape[1]
            groups.setdefault(bucket_length(L, MERGE_BUCKET, self.max_len), []).append(i)
        responses: list = [None] * len(requests)
        for members in groups.values():
            for i, response in zip(members, self._run_padded([requests[i] for i in members])):
                responses[i] = response
        return responses

    def _run_padded(self, requests) -> list[dict[str, np.ndarray]]:
        """Requests left-padded to the longest of them (positions come from the mask), one ORT call."""
        sizes = [r[INPUT_IDS.name].shape[0] for r in requests]
        lengths = [r[INPUT_IDS.name].shape[1] for r in requests]
        T = max(lengths)
        feeds = {}
        for t in self.spec.inputs:
            parts = []
            for r, L in zip(requests, lengths):
                x = np.asarray(r[t.name], dtype=t.numpy_dtype)
                if t.dims == (-1,) and L < T:
                    x = np.pad(x, ((0, 0), (T - L, 0)))
                parts.append(x)
            feeds[t.name] = np.concatenate(parts, 0)                     # (ΣB, T)
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


def ports_in_use(cfg: ServeConfig) -> list[str]:
    """The ports this server would listen on where another socket already listens, as "--flag PORT".
    Checked before Triton starts, which would otherwise fail on its own with a less clear error. The probe
    sets SO_REUSEADDR, as servers do, so a port left in TIME_WAIT by a server just stopped counts as free."""
    busy = []
    for flag, port in cfg.listening_ports().items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((cfg.host, port))
            except OSError:
                busy.append(f"{flag} {port}")
    return busy


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
        fns = [OnnxModel(spec, repo / spec.name / "1" / ONNX_FILE, vocab, max_len, cfg.session_threads())
               for _ in range(cfg.instances)]
        db = pb.dynamic_batching
        batcher = DynamicBatcher(max_queue_delay_microseconds=db.max_queue_delay_microseconds,
                                 default_queue_policy=QueuePolicy(max_queue_size=db.default_queue_policy.max_queue_size))
        triton.bind(
            model_name=spec.name, infer_func=fns,
            inputs=[Tensor(name=t.name, dtype=t.numpy_dtype, shape=t.dims) for t in spec.inputs],
            outputs=[Tensor(name=t.name, dtype=t.numpy_dtype, shape=t.dims) for t in spec.outputs],
            # not strict: a refused request's response holds ERROR_OUTPUT, which the config does not list
            config=ModelConfig(max_batch_size=pb.max_batch_size, batcher=batcher), strict=False)
        limits[spec.name] = pb.max_batch_size
    return limits


def install_proxy(model_dir: Path, spec: ModelSpec, ragged: bool = True) -> None:
    """Per-request errors and ragged batching for one model in PyTriton's local model store.

    PyTriton's proxy ``model.py`` becomes ``pytriton_model.py`` under ours (services/triton_proxy.py,
    which turns ERROR_OUTPUT into INVALID_ARGUMENT). The variable-length inputs get
    ``allow_ragged_batch``: Triton's dynamic batcher merges only requests of equal shapes
    otherwise, and OnnxModel pads a batch of unequal lengths itself (PyTriton's ModelConfig has
    no such option, so its generated config.pbtxt is amended before Triton reads it).
    """
    from google.protobuf import text_format

    version = model_dir / "1"
    (version / "model.py").rename(version / "pytriton_model.py")
    (version / "model.py").write_text((Path(__file__).parent / "triton_proxy.py").read_text())
    config = read_config(model_dir / "config.pbtxt")
    for tensor in config.input:
        if ragged and tuple(spec.input(tensor.name).dims) == (-1,):
            tensor.allow_ragged_batch = True
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))


def run_serve(cfg: ServeConfig) -> None:
    from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
    from pytriton.utils.workspace import Workspace

    repo = Path(cfg.repository)
    try:
        manifest = verify_repository(repo)
    except ContractError as e:
        raise UserError(str(e)) from None
    facts = ServedFacts.parse(manifest["served"])
    if cfg.with_gateway and REWARD_MODEL not in facts.models:
        raise UserError(f"--with-gateway scores text with `reward`, and {repo} serves only {', '.join(facts.models)}")
    busy = ports_in_use(cfg)
    if busy:
        raise UserError(f"address already in use: {', '.join(busy)} (another server is listening there; "
                        "choose other ports)")
    ensure_libpython_on_loader_path()
    tconfig = TritonConfig(grpc_address=cfg.host, grpc_port=cfg.grpc_port, http_address=cfg.host,
                           http_port=cfg.http_port, metrics_address=cfg.host, metrics_port=cfg.metrics_port,
                           log_verbose=cfg.log_verbose, strict_readiness=True, exit_on_error=True,
                           allow_gpu_metrics=False, exit_timeout_secs=cfg.exit_timeout_s)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    t0 = time.perf_counter()
    # Honest readiness: the models are written to a local model store that tritonserver loads at
    # startup, before it opens its endpoints, so /v2/health/ready never answers 200 before every
    # model is loaded (PyTriton's default loads them through the API after the server is up).
    workspace = Workspace()
    policy = TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True)
    with Triton(config=tconfig, workspace=workspace, triton_lifecycle_policy=policy) as triton:
        limits = bind_repository(triton, repo, cfg)
        for name in limits:
            install_proxy(workspace.model_store_path / name, MODELS[name], cfg.ragged_batching)   # inputs: the same for any K
        triton.run()
        gateway = None
        if cfg.with_gateway:
            from tribune.services.gateway import GatewayThread
            from tribune.services.gateway_core import GatewayConfig

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

