"""`tribune export`: the reward model, the reference policy or both as a Triton model repository.

Each model becomes one ONNX graph with the contract's tensors. The graphs do the work
that must not cross the wire: the reward graph pools the score at the last real token,
and the reference graph applies the temperature, log-softmax and the gather of the
observed tokens inside the graph, so (B, T, V) logits never leave it. Position ids come
from the mask in both, so padding side does not matter.

Before anything is written, ONNX Runtime is checked against PyTorch on padded batches of
two shapes (left, right and no padding, mixed lengths); the export fails if they differ by
more than the tolerance. The repository is assembled in a temporary directory and moved into place
at the end: a failed export leaves nothing half-written.

An ensemble of reward models (``--reward`` holding ``ensemble.json``: K member directories,
each one written by train-rm) becomes one ONNX graph holding all K members, so stock
Triton's ONNX Runtime backend serves it unchanged (no Triton ensemble scheduler, no
Python backend for the mean): ``rewards`` (B, 1) is the members' mean and
``member_rewards`` (B, K) their raw scores. Parity is checked per member and for the mean.
The graph holds K copies of the weights.

Each repository has one tokenizer: a reward model of another family than the policy is
exported on its own (``--reward`` without ``--reference``) and served next to the
reference's repository; each carries its own tokenizer and fingerprint.

An ONNX file is one protobuf, limited to 2 GB: a graph with more weights than
``EXTERNAL_DATA_BYTES`` keeps them as ONNX external data in one file beside it in the
version folder (``model.onnx`` + ``model.onnx.data``), which ONNX Runtime, `tribune serve`
and stock Triton's ONNX Runtime backend (it opens the model by path) load unchanged.
``TRIBUNE_EXPORT_EXTERNAL_DATA=1`` forces that layout on any model (tests).

``--dtype fp16|bf16`` exports the weights and activations in that precision; the contract's
outputs stay FP32 (the graphs cast the scores and log-probs to float32 at the end), and
parity is checked at a tolerance suited to the precision: an absolute part plus a part relative to
the largest value compared (a reference's log-probs of unlikely tokens reach −40 or below, where
fp32's rounding alone is ~1e-5 per operation). bf16 is refused with the
operator ONNX Runtime has no bf16 kernel for on this machine's execution providers.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from tribune.services.common.config import field
from tribune.services.common.errors import UserError
from tribune.services.common.text import load_tokenizer
from tribune.services.contract import (ATTENTION_MASK, CONTRACT_VERSION, INPUT_IDS, LOGPROBS, MANIFEST_FILE, MANIFEST_SPEC,
                               MEMBER_REWARDS_NAME, REFERENCE, REFERENCE_MODEL, REWARD_MODEL, REWARDS, TEMPERATURE,
                               TOKENIZER_DIR, ModelSpec, ServedFacts, reward_spec)
from tribune.services.repository import (ONNX_DATA_FILE, ONNX_FILE, TritonSettings, contract_parameters, manifest_model_config,
                                 manifest_onnx, model_config, other_tokenizer, sha256_file, tokenizer_fingerprint,
                                 write_config, write_manifest)
from tribune.trainer.modeling import (load_causal_lm, load_reward_model, scalar_head_values, score_sequences,
                              sequence_logprobs)
from tribune.trainer.reward import ENSEMBLE_FILE, read_reward_stats, reward_members
from tribune.trainer.sequences import gather_last

log = logging.getLogger("tribune")

# An ensemble reward-model directory: {"ensemble_size": K, "members": ["member-0", …]}, each
# member a complete train-rm output; the directory also holds the shared tokenizer.

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |ORT − PyTorch| by precision: fp16 keeps ~3 decimal digits, bf16 ~2, on values of a few units
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2e-1}           # |ORT − PyTorch|, absolute part
RELATIVE_TOLERANCES = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}  # × the largest |value| compared
# Weights past this go to external data. Well below the 2 GB protobuf limit, because the
# traced graph can hold more than the module's parameters (constant folding may copy tied weights).
EXTERNAL_DATA_BYTES = 1 << 30
FORCE_EXTERNAL_DATA_ENV = "TRIBUNE_EXPORT_EXTERNAL_DATA"


@dataclass(kw_only=True)
class ExportConfig:
    """Export to a Triton model repository (ONNX Runtime backend)."""
    reward: Path | None = field(None, help="reward model directory (from train-rm; with ensemble.json, an ensemble "
                                "of K); without --reference, a repository of the reward model alone")
    reference: Path | None = field(None, help="reference policy directory (the SFT model); without --reward, a "
                                   "repository of the reference alone")
    output: Path = field(help="model repository to create")
    overwrite: bool = field(False, help="replace --output if it exists")
    dtype: Literal["fp32", "fp16", "bf16"] = field(
        "fp32", help="weights and activations (outputs stay FP32); fp16/bf16 are for GPUs, bf16 where ONNX "
        "Runtime has the kernels")
    max_batch_size: int = field(64, help="largest batch Triton forms or accepts per request")
    queue_delay_us: int = field(500, help="dynamic batching: longest wait for more requests (µs)")
    max_queue_size: int = field(512, help="dynamic batching: requests queued before Triton rejects new ones")
    instance_count: int = field(1, help="model instances per GPU")
    instance_kind: Literal["KIND_GPU", "KIND_CPU"] = field("KIND_GPU", help="where stock Triton runs the models")
    accelerator: Literal["none", "cuda", "tensorrt"] = field(
        "none", help="ONNX Runtime GPU execution accelerator block in config.pbtxt")
    warmup: bool = field(True, help="add a model_warmup block so the first request is not slow")
    warmup_length: int = field(32, help="sequence length of the warm-up request")
    exporter: Literal["dynamo", "torchscript"] = field(
        "dynamo", help="torch.onnx exporter: dynamo (torch.export + onnxscript) or the deprecated torchscript")
    opset: int = field(18, help="ONNX opset (the dynamo exporter writes 18 or newer)")
    parity_tolerance: float | None = field(None, help="max |ORT − PyTorch| allowed, absolute part (default 1e-4 "
                                           "fp32, 5e-2 fp16, 2e-1 bf16)")
    parity_rtol: float | None = field(None, help="added to it: this times the largest |value| compared (default "
                                      "1e-5 fp32, 2e-3 fp16, 1.6e-2 bf16; 0: absolute only)")
    max_prompt_length: int | None = field(None, help="prompt tokens text clients keep (default: the reward model's "
                                          "training setting; 3/4 of the maximum for a model trained elsewhere)")

    def __post_init__(self) -> None:
        if self.reward is None and self.reference is None:
            raise ValueError("reward and reference: give either or both")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.queue_delay_us < 0 or self.max_queue_size < 1 or self.instance_count < 1:
            raise ValueError("queue_delay_us must be >= 0, max_queue_size and instance_count >= 1")
        if self.warmup_length < 2:
            raise ValueError("warmup_length must be at least 2")
        if (self.parity_tolerance is not None and self.parity_tolerance < 0) or \
                (self.parity_rtol is not None and self.parity_rtol < 0):
            raise ValueError("parity_tolerance and parity_rtol must be >= 0")
        if self.exporter == "dynamo" and self.opset < 18:
            raise ValueError("opset must be at least 18 with exporter dynamo")

    @property
    def tolerance(self) -> float:
        """The absolute part of the parity tolerance."""
        if self.parity_tolerance is not None:
            return self.parity_tolerance
        return TOLERANCES[self.dtype]

    @property
    def rtol(self) -> float:
        """The relative part: times the largest |value| compared."""
        return RELATIVE_TOLERANCES[self.dtype] if self.parity_rtol is None else self.parity_rtol

    def allowed(self, scale: float) -> float:
        """The largest |ORT − PyTorch| allowed where the values compared reach ``scale`` in magnitude."""
        return self.tolerance + self.rtol * scale


@dataclass(frozen=True)
class Parity:
    """How far ONNX Runtime is from PyTorch on one output: max |ORT − PyTorch| and the largest |PyTorch
    value| compared (the scale the relative tolerance applies to)."""
    diff: float
    scale: float

    @classmethod
    def of(cls, got: np.ndarray, want: np.ndarray) -> "Parity":
        return cls(float(np.abs(got - want).max()), float(np.abs(want).max()))

    def worst(self, other: "Parity | None") -> "Parity":
        """Over two batches: the larger difference and the larger scale."""
        return self if other is None else Parity(max(self.diff, other.diff), max(self.scale, other.scale))


class RewardGraph(nn.Module):
    """(input_ids, attention_mask) (B, T) → rewards (B, 1): the score at the last real token."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        values = scalar_head_values(self.model, input_ids, attention_mask)          # (B, T)
        return gather_last(values, attention_mask)[:, None]                         # (B, 1)


class EnsembleRewardGraph(nn.Module):
    """(input_ids, attention_mask) (B, T) → rewards (B, 1), the members' mean, and member_rewards (B, K).

    Each member is exactly ``RewardGraph``'s computation, so column k is member k's reward.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.stack([gather_last(scalar_head_values(m, input_ids, attention_mask), attention_mask)
                              for m in self.members], -1)                    # (B, K)
        return scores.mean(-1, keepdim=True), scores                          # (B, 1), (B, K)


class ReferenceGraph(nn.Module):
    """(input_ids, attention_mask (B, T), temperature (B, 1)) → logprobs (B, T−1), the contract's columns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, temperature):
        return sequence_logprobs(self.model, input_ids, attention_mask, temperature.float())


def parity_batch(vocab_size: int, low: int, max_len: int, seed: int = 0, rows: int = 6, length: int = 24
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Mixed lengths with left padding, right padding and none: what the services will see."""
    g = np.random.default_rng(seed)
    T = min(max_len, length)
    ids = g.integers(low, vocab_size, size=(rows, T), dtype=np.int64)
    mask = np.ones((rows, T), dtype=np.int64)
    mask[1, :T // 2] = 0            # left-padded
    mask[2, T - 5:] = 0             # right-padded
    mask[3, :3] = 0
    mask[4, T - 1:] = 0
    ids[mask == 0] = 0
    return ids, mask


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers (shared tensors once)."""
    tensors = {t.data_ptr(): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def external_data_wanted(module: nn.Module) -> bool:
    """Past EXTERNAL_DATA_BYTES of weights, or forced with TRIBUNE_EXPORT_EXTERNAL_DATA=1."""
    return os.environ.get(FORCE_EXTERNAL_DATA_ENV) == "1" or weight_bytes(module) > EXTERNAL_DATA_BYTES


def parity_batches(vocab_size: int, low: int, max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two batch shapes: the first is the export's example input, the second checks that batch
    and sequence axes are really dynamic in the graph (not the example's sizes baked in)."""
    return [parity_batch(vocab_size, low, max_len), parity_batch(vocab_size, low, max_len, seed=1, rows=5, length=40)]


def _dynamo_exporter_available() -> None:
    import importlib.util

    if importlib.util.find_spec("onnxscript") is None:   # torch.onnx's dynamo exporter translates through it
        raise UserError("the dynamo ONNX exporter needs onnxscript (pip install onnxscript); "
                        "or pass --exporter torchscript")


def _export_onnx(module: nn.Module, args: tuple, version_dir: Path, spec: ModelSpec, output_axes: dict[int, str],
                 cfg: "ExportConfig") -> Path:
    """Writes ``version_dir/model.onnx`` (and, for a large graph, ``model.onnx.data``); returns its path.

    ``output_axes``: the dynamic axes of every output of ``spec`` (in the module's output order).
    The dynamo exporter (``torch.export`` + onnxscript) is torch's supported path; the
    TorchScript one is deprecated and kept as ``--exporter torchscript``. Neither one's
    warnings are silenced: they go to the run's log file like every library warning. The
    exporter writes into a scratch folder (past 2 GB it scatters one file per tensor); a large
    graph is then saved again with all its weights in one external-data file.
    """
    import warnings

    import onnx

    dyn = {t.name: ({0: "batch"} if t is TEMPERATURE else {0: "batch", 1: "sequence"}) for t in spec.inputs}
    dyn.update({name: output_axes for name in spec.output_names})
    scratch = Path(tempfile.mkdtemp(prefix=".trace-", dir=version_dir.parent))
    path = version_dir / ONNX_FILE
    try:
        if cfg.exporter == "dynamo":
            _dynamo_exporter_available()
            dim = torch.export.Dim.DYNAMIC
            shapes = {t.name: ({0: dim} if t is TEMPERATURE else {0: dim, 1: dim}) for t in spec.inputs}
            torch.onnx.export(module, args, str(scratch / ONNX_FILE), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_shapes=shapes, opset_version=cfg.opset,
                              dynamo=True, verbose=False, optimize=True,
                              external_data=external_data_wanted(module))   # its default writes .data always
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.onnx.export(module, args, str(scratch / ONNX_FILE), input_names=spec.input_names,
                                  output_names=spec.output_names, dynamic_axes=dyn, opset_version=cfg.opset,
                                  dynamo=False, do_constant_folding=True)
            # the tracer's warnings (constants baked into the trace, negative indices) are what the
            # parity check guards against: each is logged (log file, or the console with -v)
            for w in caught:
                logging.getLogger("py.warnings").warning(
                    warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
            if caught:
                log.info("export: %s: the deprecated TorchScript exporter raised %d warning(s) (shown with -v)",
                         spec.name, len(caught))
        if external_data_wanted(module) or len(list(scratch.iterdir())) > 1:
            graph = onnx.load(str(scratch / ONNX_FILE))             # with the exporter's external tensors, if any
            onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=ONNX_DATA_FILE, size_threshold=1024)
            # onnx writes the data file owner-only (0600): Triton running as another user must read it
            shutil.copymode(path, version_dir / ONNX_DATA_FILE)
        else:
            shutil.move(scratch / ONNX_FILE, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def _ort_session(path: Path, precision: str):
    """An ONNX Runtime session; a graph it has no kernels for is refused (e.g. bf16 on CPU)."""
    import onnxruntime as ort

    from tribune.services.runtime import execution_providers

    providers = execution_providers()
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind types: NotImplemented, Fail, …
        if "NOT_IMPLEMENTED" not in str(e) and "Could not find an implementation" not in str(e):
            raise
        detail = str(e).split("Could not find an implementation for ", 1)[-1].split(" node", 1)[0]
        raise UserError(f"--dtype {precision}: ONNX Runtime ({', '.join(providers)}) has no {precision} kernel for "
                        f"{detail}; export with --dtype fp32 (or fp16)") from None


def _check_fp32(session, path: Path) -> None:
    """The contract hands FP32 to clients whatever the export's precision."""
    wrong = [(o.name, o.type) for o in session.get_outputs() if o.type != "tensor(float)"]
    if wrong:
        raise UserError(f"{path}: outputs {wrong} are not float32 as the contract requires")


def export_reward(members: list, version_dir: Path, cfg: ExportConfig, vocab_size: int, low: int,
                  max_len: int) -> dict[str, Parity]:
    """One reward model, or K members in one graph; max |ORT − PyTorch| over two batch shapes for
    `reward` (the served ``rewards``) and, for an ensemble, for each member's column (``reward.member-k``)."""
    spec = reward_spec(len(members))
    graph = (RewardGraph(members[0]) if len(members) == 1 else EnsembleRewardGraph(members)).eval()
    batches = parity_batches(vocab_size, low, max_len)
    path = _export_onnx(graph, tuple(map(torch.from_numpy, batches[0])), version_dir, spec, {0: "batch"}, cfg)
    session = _ort_session(path, cfg.dtype)
    _check_fp32(session, path)
    parity: dict[str, Parity] = {}
    for ids, mask in batches:
        got = dict(zip(spec.output_names, session.run(spec.output_names,
                                                      {INPUT_IDS.name: ids, ATTENTION_MASK.name: mask})))
        with torch.no_grad():     # each member on its own, as train-rm and PPO score with it
            want = np.stack([score_sequences(m, torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
                             for m in members], -1)                                   # (B, K)
        compared = {REWARD_MODEL: Parity.of(got[REWARDS.name][:, 0], want.mean(-1))}
        if len(members) > 1:
            compared.update({f"{REWARD_MODEL}.member-{k}": Parity.of(got[MEMBER_REWARDS_NAME][:, k], want[:, k])
                             for k in range(len(members))})
        parity = {k: v.worst(parity.get(k)) for k, v in compared.items()}
    return parity


def export_reference(model, version_dir: Path, cfg: ExportConfig, vocab_size: int, low: int,
                     max_len: int) -> dict[str, Parity]:
    """The reference graph; max |ORT − PyTorch| of its log-probs over two batch shapes."""
    graph = ReferenceGraph(model).eval()
    batches = [(ids, mask, np.full((ids.shape[0], 1), 0.7, dtype=np.float32))
               for ids, mask in parity_batches(vocab_size, low, max_len)]
    path = _export_onnx(graph, tuple(map(torch.from_numpy, batches[0])), version_dir, REFERENCE,
                        {0: "batch", 1: "sequence_minus_one"}, cfg)
    session = _ort_session(path, cfg.dtype)
    _check_fp32(session, path)
    parity = None
    for ids, mask, temp in batches:
        with torch.no_grad():
            ref = graph(*map(torch.from_numpy, (ids, mask, temp))).float().numpy()
        got = session.run([LOGPROBS.name], {INPUT_IDS.name: ids, ATTENTION_MASK.name: mask, TEMPERATURE.name: temp})[0]
        parity = Parity.of(got, ref).worst(parity)
    return {REFERENCE.name: parity}


def _reward_stats(rm_dir: Path) -> dict:
    stats = read_reward_stats(rm_dir)
    if stats is None:
        log.warning("%s has no reward statistics; normalisation will be the identity (mean 0, std 1)", rm_dir)
        return {"mean": 0.0, "std": 1.0}
    return stats


def ensemble_stats(rm_dir: Path, member_stats: list[dict]) -> dict:
    """Statistics of the served ``rewards`` of K > 1 members (their mean) on SFT samples.

    Measured when the ensemble directory has its own reward_stats.json (train-rm scoring the
    mean on SFT samples); otherwise derived from the members' own: the mean of their means
    (exact in expectation) and the mean of their stds, an upper bound on the std of the mean
    (Minkowski), reached when the members are perfectly correlated, as members trained on
    the same preferences nearly are.
    """
    measured = read_reward_stats(rm_dir)
    if measured is not None:
        return measured
    return {"mean": float(np.mean([m["mean"] for m in member_stats])),
            "std": float(np.mean([m["std"] for m in member_stats])),
            "source": "derived from the members' statistics: mean of their means, mean of their stds "
                      "(an upper bound on the std of the members' mean)"}


def _truncation(rm_dirs: list[Path], max_len: int, max_prompt_length: int | None) -> tuple[int, int]:
    """(max_length, max_prompt_length) the reward model(s) were trained with, served to text clients."""
    trained = []
    for d in rm_dirs:
        resolved = Path(d) / "config.resolved.json"
        cfg = json.loads(resolved.read_text()) if resolved.is_file() else {}
        trained.append((cfg.get("max_length"), cfg.get("max_prompt_length")))
    if len(set(trained)) > 1:
        raise UserError(f"the ensemble's members were trained with different truncations (max_length, "
                        f"max_prompt_length): {sorted(set(map(str, trained)))}; text clients need one")
    length = min(int(trained[0][0] or max_len), max_len)
    prompt = max_prompt_length or trained[0][1] or (3 * length) // 4
    return length, int(prompt)


def served_facts(fingerprint: str, stats: dict | None, member_stats: list[dict], max_len: int, vocab: int,
                 cfg: ExportConfig, sources: dict, members: list[Path]) -> ServedFacts:
    """What the `tribune_manifest` model answers: everything a remote client must check.

    ``members`` is empty (and ``stats`` None) for a repository of the reference alone.
    """
    import hashlib

    common = dict(contract_version=CONTRACT_VERSION, tokenizer_fingerprint=fingerprint, max_sequence_length=max_len,
                  vocab_size=vocab, max_batch_size=cfg.max_batch_size,
                  models=tuple(m for m in (REWARD_MODEL, REFERENCE_MODEL) if m in sources),
                  reference_model_source=sources.get(REFERENCE_MODEL, {}).get("path", ""))
    if not members:
        return ServedFacts(**common)
    reward = sources["reward"]
    digests = [m["weights_sha256"] for m in reward.get("members", [reward])]
    # one model keeps the id it always had (its weights' digests, not a list of them)
    weights = json.dumps(digests[0] if len(digests) == 1 else digests, sort_keys=True).encode()
    length, prompt = _truncation(members, max_len, cfg.max_prompt_length)
    return ServedFacts(**common, reward_mean=float(stats["mean"]), reward_std=float(stats["std"]),
                       reward_model_id="rm-" + hashlib.sha256(weights).hexdigest()[:16],
                       max_length=length, max_prompt_length=prompt, reward_model_source=reward["path"],
                       ensemble_size=len(members),
                       member_reward_mean=tuple(float(m["mean"]) for m in member_stats),
                       member_reward_std=tuple(float(m["std"]) for m in member_stats),
                       preferred_member_scores=_preferred(stats, len(members)))


def _preferred(stats: dict, k: int) -> tuple:
    """The reward model's scores of its raters' preferred held-out responses, (rows, K), when its
    statistics hold them for all K members (an ensemble's derived statistics do not)."""
    rows = stats.get("preferred_member_scores") or []
    if any(len(row) != k for row in rows):
        log.warning("the reward statistics' preferred_member_scores do not have %d columns; not served", k)
        return ()
    return tuple(tuple(row) for row in rows)


def _source(path: Path) -> dict:
    path = Path(path)
    return {"path": str(path.resolve()), "config_sha256": sha256_file(path / "config.json"),
            "weights_sha256": {p.name: sha256_file(p) for p in sorted(path.glob("*.safetensors"))}}


def _reward_source(rm_dir: Path, members: list[Path]) -> dict:
    """A single reward model's source; for an ensemble, its directory and each member's source."""
    if not (Path(rm_dir) / ENSEMBLE_FILE).is_file():
        return _source(rm_dir)
    return {"path": str(Path(rm_dir).resolve()), "ensemble_size": len(members),
            "members": [{"name": m.name, **_source(m)} for m in members]}


def _statistics_source(stats: dict, member_stats: list[dict]) -> dict:
    extra = {k: v for k, v in stats.items() if k not in ("mean", "std")}
    if len(member_stats) > 1:
        extra["members"] = [{k: v for k, v in m.items() if k not in ("mean", "std")} for m in member_stats]
    return extra


def _limits(models: list[nn.Module], tok) -> tuple[int, int]:
    """(max sequence length, vocab size) every exported model accepts: the smallest of each."""
    lengths = [int(getattr(m.config, "max_position_embeddings", 0) or tok.model_max_length) for m in models]
    return min(lengths), min(int(m.config.vocab_size) for m in models)


def _write_model(tmp: Path, spec: ModelSpec, model, export, cfg: ExportConfig, settings: TritonSettings,
                 params: dict, vocab: int, low: int, max_len: int) -> dict[str, float]:
    """One contract model: its version folder (parity checked first), config.pbtxt and warm-up data;
    max |ORT − PyTorch| of each output checked."""
    version_dir = tmp / spec.name / "1"
    version_dir.mkdir(parents=True)
    members = len(model) if isinstance(model, list) else 1
    log.info("export: %s → ONNX (%s%s)", spec.name, cfg.dtype, f", {members} members" if members > 1 else "")
    checked = export(model, version_dir, cfg, vocab, low, max_len)
    for name, p in checked.items():
        allowed = cfg.allowed(p.scale)
        log.info("export: %s parity max|ORT − PyTorch| = %.3g (tolerance %.2g = %.0e + %.0e × %.3g, the largest "
                 "|value|)", name, p.diff, allowed, cfg.tolerance, cfg.rtol, p.scale)
        if not p.diff <= allowed:
            raise UserError(f"{name}: ONNX Runtime differs from PyTorch by {p.diff:.3g} > {allowed:.2g} "
                            f"({cfg.tolerance:.0e} + {cfg.rtol:.0e} × {p.scale:.3g}, the largest |value|; "
                            f"--parity-tolerance / --parity-rtol); nothing was written")
    write_config(tmp / spec.name / "config.pbtxt", model_config(spec, settings, params))
    if cfg.warmup:
        warm = tmp / spec.name / "warmup"
        warm.mkdir()
        np.ones(settings.warmup_length, dtype=np.int64).tofile(warm / "mask_ones")
        if spec is REFERENCE:
            np.ones(1, dtype=np.float32).tofile(warm / "temperature_one")
    return {name: p.diff for name, p in checked.items()}


def run_export(cfg: ExportConfig) -> dict:
    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if cfg.exporter == "dynamo":
        _dynamo_exporter_available()
    t0 = time.perf_counter()
    # one tokenizer per repository: the reference's (the policy's) when it is exported
    tok_dir = Path(cfg.reference if cfg.reference is not None else cfg.reward)
    tok = load_tokenizer(tok_dir)
    fp = tokenizer_fingerprint(tok)
    members = reward_members(cfg.reward) if cfg.reward is not None else []
    other = other_tokenizer(tok, tok_dir, [Path(cfg.reward), *members] if members else [])
    if other is not None:
        raise UserError(f"the tokenizers of {other} and {tok_dir} differ; a repository has one tokenizer: export "
                        "the reward model and the reference into two repositories (--reward alone, "
                        "--reference alone) and serve both")
    dtype = DTYPES[cfg.dtype]
    rms = [load_reward_model(d, attn_implementation="eager").eval().to(dtype) for d in members]
    ref = load_causal_lm(cfg.reference, attn_implementation="eager").eval().to(dtype) if cfg.reference else None
    max_len, vocab = _limits([*rms, *([ref] if ref is not None else [])], tok)
    low = max(tok.all_special_ids, default=-1) + 1
    low = low if low < vocab else 0          # e.g. GPT-2: its only special id is the last one
    member_stats = [_reward_stats(d) for d in members]
    stats = None if not members else member_stats[0] if len(members) == 1 else ensemble_stats(cfg.reward, member_stats)
    sources = {}
    if members:
        sources[REWARD_MODEL] = _reward_source(cfg.reward, members)
    if ref is not None:
        sources[REFERENCE_MODEL] = _source(cfg.reference)
    facts = served_facts(fp, stats, member_stats, max_len, vocab, cfg, sources, members)
    params = contract_parameters(facts)
    settings = TritonSettings(cfg.max_batch_size, cfg.queue_delay_us, cfg.max_queue_size, cfg.instance_count,
                              cfg.instance_kind, cfg.accelerator, cfg.dtype.upper(), cfg.warmup,
                              min(cfg.warmup_length, max_len))
    jobs = ([(facts.model_spec(REWARD_MODEL), rms, export_reward)] if members else []) + \
        ([(REFERENCE, ref, export_reference)] if ref is not None else [])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        parity = {}
        for spec, model, export in jobs:
            parity.update(_write_model(tmp, spec, model, export, cfg, settings, params, vocab, low, max_len))
        tok.save_pretrained(tmp / TOKENIZER_DIR)
        (tmp / MANIFEST_SPEC.name / "1").mkdir(parents=True)
        (tmp / MANIFEST_SPEC.name / "1" / ONNX_FILE).write_bytes(manifest_onnx(facts, tmp / TOKENIZER_DIR))
        write_config(tmp / MANIFEST_SPEC.name / "config.pbtxt", manifest_model_config())
        external = {spec.name: (tmp / spec.name / "1" / ONNX_DATA_FILE).is_file() for spec, _, _ in jobs}
        manifest = write_manifest(tmp, {
            "contract_version": CONTRACT_VERSION,
            "tokenizer": {"fingerprint": fp, "dir": TOKENIZER_DIR},
            "sources": sources,
            "served": facts.to_dict(),
            **({"reward_statistics_source": _statistics_source(stats, member_stats)} if members else {}),
            "export": {"dtype": cfg.dtype, "opset": cfg.opset, "exporter": cfg.exporter, "parity_max_abs_diff": parity,
                       "max_sequence_length": max_len, "vocab_size": vocab,
                       "max_batch_size": cfg.max_batch_size, "external_data": external},
        })
        if out.exists():
            shutil.rmtree(out)
        shutil.copymode(out.parent, tmp)     # mkdtemp's 0700 would hide the repository from Triton's user
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = {"repository": str(out), "models": list(facts.models), "dtype": cfg.dtype,
              "parity_max_abs_diff": parity, "files": len(manifest["files"]),
              "external_data": [name for name, ext in external.items() if ext],
              "tokenizer_fingerprint": fp, "ensemble_size": len(members),
              "elapsed_s": round(time.perf_counter() - t0, 2)}
    log.info("export: wrote %s (%s; %s)", out, MANIFEST_FILE, " + ".join(facts.models))
    return result
