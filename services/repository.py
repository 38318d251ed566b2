"""The Triton model repository: config.pbtxt files, the tribune.json manifest, fingerprints.

Layout (a standard Triton repository that stock Triton loads unchanged)::

    REPO/tribune.json                 manifest: contract, tokenizer, reward stats (per ensemble
                                      member too), sources, sha256s of every file
    REPO/tokenizer/                   the tokenizer the repository's models were trained with
    REPO/reward/config.pbtxt          REPO/reward/1/model.onnx
    REPO/reference/config.pbtxt       REPO/reference/1/model.onnx

A repository serves `reward`, `reference` or both (``ServedFacts.models``); a reward model
of another family than the policy gets a repository of its own, with its own tokenizer.
A graph over the 2 GB protobuf limit keeps its weights as ONNX external data beside it,
``1/model.onnx`` + ``1/model.onnx.data``: stock Triton's ONNX Runtime backend opens the
model by path, so ONNX Runtime finds the data file in the same folder.

config.pbtxt files are built as ``ModelConfig`` protobufs (the message Triton itself
parses, shipped in tritonclient) and written in text format, so they are valid by
construction and can be parsed back the same way.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tribune.services.contract import (ATTENTION_MASK, CONTRACT_VERSION, MANIFEST, MANIFEST_FILE, MANIFEST_SPEC, MODELS,
                               PARAM_CONTRACT_VERSION, PARAM_MAX_SEQUENCE_LENGTH, PARAM_TOKENIZER_FINGERPRINT,
                               PARAM_VOCAB_SIZE, PROBE, TEMPERATURE, TOKENIZER_DIR, TOKENIZER_FILES, ContractError,
                               ModelSpec, ServedFacts)

# in each model's version folder; a large graph's weights are ONNX external data beside it
ONNX_FILE, ONNX_DATA_FILE = "model.onnx", "model.onnx.data"


@dataclass(frozen=True)
class TritonSettings:
    """What goes into each config.pbtxt besides the contract's tensors."""
    max_batch_size: int
    queue_delay_us: int
    max_queue_size: int
    instance_count: int
    instance_kind: str            # "KIND_GPU" | "KIND_CPU"
    accelerator: str              # "none" | "tensorrt" | "cuda"
    precision_mode: str           # TensorRT's: "FP32" | "FP16" | "BF16" (the export's dtype)
    warmup: bool
    warmup_length: int


# Where stock Triton's TensorRT execution accelerator keeps its engine and timing caches
# (k8s/overlays/prod mounts a persistent volume there); ONNX Runtime names engines by model
# and GPU architecture, so one directory serves every model of a pod.
TRT_CACHE_DIR = "/var/cache/tensorrt"


def model_config(spec: ModelSpec, s: TritonSettings, parameters: dict[str, str]):
    """The ModelConfig protobuf for a contract model (``ServedFacts.model_spec(name)``)."""
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = mc.ModelConfig(name=spec.name, platform="onnxruntime_onnx", max_batch_size=s.max_batch_size)
    for t in spec.inputs:
        cfg.input.add(name=t.name, data_type=getattr(mc, "TYPE_" + t.dtype), dims=list(t.dims))
    for t in spec.outputs:
        cfg.output.add(name=t.name, data_type=getattr(mc, "TYPE_" + t.dtype), dims=list(t.dims))
    db = cfg.dynamic_batching
    db.max_queue_delay_microseconds = s.queue_delay_us
    db.default_queue_policy.max_queue_size = s.max_queue_size
    cfg.instance_group.add(count=s.instance_count, kind=getattr(mc.ModelInstanceGroup, s.instance_kind))
    if s.accelerator != "none":
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add()
        if s.accelerator == "tensorrt":
            acc.name = "tensorrt"
            acc.parameters["precision_mode"] = s.precision_mode
            acc.parameters["max_workspace_size_bytes"] = str(1 << 30)
            # engines and kernel timings persist across pods (a volume there in the prod overlay),
            # so a new pod loads its engines instead of rebuilding them inside its startup probe
            for cache in ("engine", "timing"):
                acc.parameters[f"trt_{cache}_cache_enable"] = "1"
                acc.parameters[f"trt_{cache}_cache_path"] = TRT_CACHE_DIR
        else:
            acc.name = "cuda"
    if s.warmup:
        w = cfg.model_warmup.add(name="warmup", batch_size=min(8, s.max_batch_size), count=1)
        for t in spec.inputs:
            dims = [s.warmup_length if d == -1 else d for d in t.dims]
            inp = w.inputs[t.name]
            inp.data_type = getattr(mc, "TYPE_" + t.dtype)
            inp.dims.extend(dims)
            if t is TEMPERATURE:
                inp.random_data = False
                inp.zero_data = False
                inp.input_data_file = "temperature_one"   # model dir's warmup/ holds 1.0
            elif t is ATTENTION_MASK:
                inp.input_data_file = "mask_ones"
            else:
                inp.zero_data = True
    for k, v in parameters.items():
        cfg.parameters[k].string_value = str(v)
    return cfg


def manifest_model_config():
    """The unbatched `tribune_manifest` model: probe INT64 [1] → manifest BYTES [1] (JSON)."""
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = mc.ModelConfig(name=MANIFEST_SPEC.name, platform="onnxruntime_onnx", max_batch_size=0)
    for t in MANIFEST_SPEC.inputs:
        cfg.input.add(name=t.name, data_type=getattr(mc, "TYPE_" + t.dtype), dims=list(t.dims))
    for t in MANIFEST_SPEC.outputs:   # Triton calls BYTES "TYPE_STRING" in model configs
        cfg.output.add(name=t.name, data_type=mc.TYPE_STRING, dims=list(t.dims))
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    return cfg


def tokenizer_files_json(tokenizer_dir: Path) -> str:
    """{file name: base64} of every file in a tokenizer directory."""
    import base64

    return json.dumps({p.name: base64.b64encode(p.read_bytes()).decode() for p in sorted(Path(tokenizer_dir).iterdir())
                       if p.is_file()}, sort_keys=True)


def manifest_onnx(facts: ServedFacts, tokenizer_dir: Path) -> bytes:
    """An ONNX graph of two constants: the served facts and the tokenizer files, as JSON strings."""
    import onnx
    from onnx import TensorProto, helper

    nodes = []
    for spec, text in ((MANIFEST, json.dumps(facts.to_dict(), sort_keys=True)),
                       (TOKENIZER_FILES, tokenizer_files_json(tokenizer_dir))):
        value = helper.make_tensor("value", TensorProto.STRING, [1], [text.encode()])
        nodes.append(helper.make_node("Constant", [], [spec.name], value=value))
    graph = helper.make_graph(nodes, MANIFEST_SPEC.name,
                              [helper.make_tensor_value_info(PROBE.name, TensorProto.INT64, list(PROBE.dims))],
                              [helper.make_tensor_value_info(t.name, TensorProto.STRING, list(t.dims))
                               for t in MANIFEST_SPEC.outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_config(path: Path, cfg) -> None:
    from google.protobuf import text_format

    path.write_text(text_format.MessageToString(cfg))


def read_config(path: Path):
    """Parses a config.pbtxt with Triton's own ModelConfig schema (unknown fields fail)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
    except text_format.ParseError as e:
        raise ContractError(f"{path}: not a valid Triton model config: {e}") from None


def contract_parameters(facts: ServedFacts) -> dict[str, str]:
    """The contract identity every model config carries (statistics live in the served facts only)."""
    return {PARAM_CONTRACT_VERSION: str(facts.contract_version), PARAM_TOKENIZER_FINGERPRINT: facts.tokenizer_fingerprint,
            PARAM_MAX_SEQUENCE_LENGTH: str(facts.max_sequence_length), PARAM_VOCAB_SIZE: str(facts.vocab_size)}


# ---------------------------------------------------------------- fingerprints and manifest

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: the vocabulary and the special tokens.

    Computed from the loaded tokenizer rather than file bytes, because the same tokenizer
    saved by two transformers versions gives different files but identical ids.
    """
    canon = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items()),
        "added": sorted((t, i) for t, i in tokenizer.get_added_vocab().items()),
        "bos_on_encode": tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        if tokenizer.bos_token_id is not None else False,
    }
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()


def other_tokenizer(tokenizer, source: Path, dirs) -> Path | None:
    """The first of the model directories ``dirs`` whose tokenizer gives other ids than ``tokenizer``
    (loaded from ``source``, which is not loaded again); None when they all tokenise alike."""
    from tribune.services.common.text import load_tokenizer

    fp = tokenizer_fingerprint(tokenizer)
    return next((d for d in dict.fromkeys(Path(d) for d in dirs)
                 if d != Path(source) and tokenizer_fingerprint(load_tokenizer(d)) != fp), None)


def file_hashes(repo: Path) -> dict[str, str]:
    repo = Path(repo)
    return {str(p.relative_to(repo)): sha256_file(p) for p in sorted(repo.rglob("*"))
            if p.is_file() and p.name != MANIFEST_FILE}


def write_manifest(repo: Path, manifest: dict) -> dict:
    manifest = {**manifest, "files": file_hashes(repo)}
    (Path(repo) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(repo: Path) -> dict:
    path = Path(repo) / MANIFEST_FILE
    if not path.is_file():
        raise ContractError(f"{repo} is not a Tribune model repository (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ContractError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("contract_version") != CONTRACT_VERSION:
        raise ContractError(f"{path}: contract version {manifest.get('contract_version')}, "
                            f"this Tribune speaks {CONTRACT_VERSION}")
    return manifest


def verify_repository(repo: Path) -> dict:
    """Checks every file against the manifest's sha256; raises naming what differs."""
    manifest = read_manifest(repo)
    expected = manifest.get("files", {})
    actual = file_hashes(repo)
    problems = [f"{f}: modified" for f in expected if f in actual and actual[f] != expected[f]]
    problems += [f"{f}: missing" for f in expected if f not in actual]
    problems += [f"{f}: not in the manifest" for f in actual if f not in expected]
    if problems:
        raise ContractError(f"repository {repo} does not match its manifest: " + "; ".join(problems[:10]))
    facts = ServedFacts.parse(manifest.get("served", {}))
    for name in [*facts.models, MANIFEST_SPEC.name]:
        path = Path(repo) / name / "config.pbtxt"
        if not path.is_file():
            raise ContractError(f"{repo} serves {name!r} by its manifest but has no {name}/config.pbtxt")
        cfg = read_config(path)
        if cfg.name != name:
            raise ContractError(f"{repo}/{name}/config.pbtxt names model {cfg.name!r}")
        if name in MODELS:   # e.g. an ensemble's member_rewards [K] with the manifest's K
            want = [(t.name, list(t.dims)) for t in facts.model_spec(name).outputs]
            got = [(o.name, list(o.dims)) for o in cfg.output]
            if got != want:
                raise ContractError(f"{repo}/{name}/config.pbtxt has outputs {got}, the manifest "
                                    f"(ensemble_size {facts.ensemble_size}) says {want}")
    if not (Path(repo) / TOKENIZER_DIR).is_dir():
        raise ContractError(f"{repo} has no {TOKENIZER_DIR}/")
    return manifest
