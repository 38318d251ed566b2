"""`tribune export`: the reward model and the reference policy as a Triton model repository.

Each model becomes one ONNX graph with the contract's tensors. The graphs do the work
that must not cross the wire: the reward graph pools the score at the last real token,
and the reference graph applies the temperature, log-softmax and the gather of the
observed tokens inside the graph, so (B, T, V) logits never leave it. Position ids come
from the mask in both, so padding side does not matter.

Before anything is written, ONNX Runtime is checked against PyTorch on a padded batch
(left, right and no padding, mixed lengths); the export fails if they differ by more than
the tolerance. The repository is assembled in a temporary directory and moved into place
at the end: a failed export leaves nothing half-written.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from services.common.config import field
from services.common.errors import UserError
from services.common.text import load_tokenizer
from services.contract import (ATTENTION_MASK, CONTRACT_VERSION, INPUT_IDS, LOGPROBS, MANIFEST_FILE, MANIFEST_SPEC,
                               REFERENCE, REWARD, REWARDS, TEMPERATURE, TOKENIZER_DIR, ModelSpec, ServedFacts)
from services.repository import (TritonSettings, contract_parameters, manifest_model_config, manifest_onnx,
                                 model_config, sha256_file, tokenizer_fingerprint, write_config, write_manifest)
from trainer.modeling import load_causal_lm, load_reward_model, scalar_head_values, sequence_logprobs
from trainer.reward import read_reward_stats
from trainer.sequences import gather_last

log = logging.getLogger("tribune")


@dataclass(kw_only=True)
class ExportConfig:
    """Export to a Triton model repository (ONNX Runtime backend)."""
    reward: Path = field(help="reward model directory (from train-rm)")
    reference: Path = field(help="reference policy directory (the SFT model)")
    output: Path = field(help="model repository to create")
    overwrite: bool = field(False, help="replace --output if it exists")
    dtype: Literal["fp32", "fp16"] = field("fp32", help="weights and activations; fp16 is for GPUs")
    max_batch_size: int = field(64, help="largest batch Triton forms or accepts per request")
    queue_delay_us: int = field(500, help="dynamic batching: longest wait for more requests (µs)")
    max_queue_size: int = field(512, help="dynamic batching: requests queued before Triton rejects new ones")
    instance_count: int = field(1, help="model instances per GPU")
    instance_kind: Literal["KIND_GPU", "KIND_CPU"] = field("KIND_GPU", help="where stock Triton runs the models")
    accelerator: Literal["none", "cuda", "tensorrt"] = field(
        "none", help="ONNX Runtime GPU execution accelerator block in config.pbtxt")
    warmup: bool = field(True, help="add a model_warmup block so the first request is not slow")
    warmup_length: int = field(32, help="sequence length of the warm-up request")
    opset: int = field(17, help="ONNX opset")
    parity_tolerance: float | None = field(None, help="max |ORT − PyTorch| allowed (default 1e-4 fp32, 5e-2 fp16)")
    max_prompt_length: int | None = field(None, help="prompt tokens text clients keep (default: the reward model's "
                                          "training setting; 3/4 of the maximum for a model trained elsewhere)")

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.queue_delay_us < 0 or self.max_queue_size < 1 or self.instance_count < 1:
            raise ValueError("queue_delay_us must be >= 0, max_queue_size and instance_count >= 1")
        if self.warmup_length < 2:
            raise ValueError("warmup_length must be at least 2")

    @property
    def tolerance(self) -> float:
        if self.parity_tolerance is not None:
            return self.parity_tolerance
        return 1e-4 if self.dtype == "fp32" else 5e-2


class RewardGraph(nn.Module):
    """(input_ids, attention_mask) (B, T) → rewards (B, 1): the score at the last real token."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        values = scalar_head_values(self.model, input_ids, attention_mask)          # (B, T)
        return gather_last(values, attention_mask)[:, None]                         # (B, 1)


class ReferenceGraph(nn.Module):
    """(input_ids, attention_mask (B, T), temperature (B, 1)) → logprobs (B, T−1), the contract's columns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, temperature):
        return sequence_logprobs(self.model, input_ids, attention_mask, temperature.float())


def parity_batch(vocab_size: int, low: int, max_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mixed lengths with left padding, right padding and none: what the services will see."""
    g = np.random.default_rng(seed)
    T = min(max_len, 24)
    ids = g.integers(low, vocab_size, size=(6, T), dtype=np.int64)
    mask = np.ones((6, T), dtype=np.int64)
    mask[1, :T // 2] = 0            # left-padded
    mask[2, T - 5:] = 0             # right-padded
    mask[3, :3] = 0
    mask[4, T - 1:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _export_onnx(module: nn.Module, args: tuple, path: Path, spec: ModelSpec, output_axes: dict[int, str],
                 opset: int) -> None:
    import warnings

    dyn = {t.name: ({0: "batch"} if t is TEMPERATURE else {0: "batch", 1: "sequence"}) for t in spec.inputs}
    (output,) = spec.output_names
    dyn[output] = output_axes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=spec.input_names, output_names=[output],
                          dynamic_axes=dyn, opset_version=opset, dynamo=False, do_constant_folding=True)


def _ort_session(path: Path):
    import onnxruntime as ort

    from services.runtime import execution_providers

    return ort.InferenceSession(str(path), providers=execution_providers())


def export_reward(model, path: Path, cfg: ExportConfig, vocab_size: int, low: int, max_len: int) -> float:
    graph = RewardGraph(model).eval()
    ids, mask = parity_batch(vocab_size, low, max_len)
    targs = (torch.from_numpy(ids), torch.from_numpy(mask))
    _export_onnx(graph, targs, path, REWARD, {0: "batch"}, cfg.opset)
    with torch.no_grad():
        ref = graph(*targs).float().numpy()
    got = _ort_session(path).run([REWARDS.name], {INPUT_IDS.name: ids, ATTENTION_MASK.name: mask})[0]
    return float(np.abs(got - ref).max())


def export_reference(model, path: Path, cfg: ExportConfig, vocab_size: int, low: int, max_len: int) -> float:
    graph = ReferenceGraph(model).eval()
    ids, mask = parity_batch(vocab_size, low, max_len)
    temp = np.full((ids.shape[0], 1), 0.7, dtype=np.float32)
    targs = (torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(temp))
    _export_onnx(graph, targs, path, REFERENCE, {0: "batch", 1: "sequence_minus_one"}, cfg.opset)
    with torch.no_grad():
        ref = graph(*targs).float().numpy()
    got = _ort_session(path).run([LOGPROBS.name], {INPUT_IDS.name: ids, ATTENTION_MASK.name: mask,
                                                    TEMPERATURE.name: temp})[0]
    return float(np.abs(got - ref).max())


def _reward_stats(rm_dir: Path) -> dict:
    stats = read_reward_stats(rm_dir)
    if stats is None:
        log.warning("%s has no reward statistics; normalisation will be the identity (mean 0, std 1)", rm_dir)
        return {"mean": 0.0, "std": 1.0}
    return stats


def _truncation(rm_dir: Path, max_len: int, max_prompt_length: int | None) -> tuple[int, int]:
    """(max_length, max_prompt_length) the reward model was trained with, served to text clients."""
    resolved = Path(rm_dir) / "config.resolved.json"
    trained = json.loads(resolved.read_text()) if resolved.is_file() else {}
    length = min(int(trained.get("max_length", max_len)), max_len)
    prompt = max_prompt_length or trained.get("max_prompt_length") or (3 * length) // 4
    return length, int(prompt)


def served_facts(fingerprint: str, stats: dict, max_len: int, vocab: int, cfg: ExportConfig,
                 sources: dict) -> ServedFacts:
    """What the `tribune_manifest` model answers: everything a remote client must check."""
    import hashlib

    weights = json.dumps(sources["reward"]["weights_sha256"], sort_keys=True).encode()
    length, prompt = _truncation(cfg.reward, max_len, cfg.max_prompt_length)
    return ServedFacts(contract_version=CONTRACT_VERSION, tokenizer_fingerprint=fingerprint,
                       reward_mean=float(stats["mean"]), reward_std=float(stats["std"]),
                       max_sequence_length=max_len, vocab_size=vocab, max_batch_size=cfg.max_batch_size,
                       reward_model_id="rm-" + hashlib.sha256(weights).hexdigest()[:16],
                       max_length=length, max_prompt_length=prompt, reward_model_source=sources["reward"]["path"])


def _source(path: Path) -> dict:
    path = Path(path)
    return {"path": str(path.resolve()), "config_sha256": sha256_file(path / "config.json"),
            "weights_sha256": {p.name: sha256_file(p) for p in sorted(path.glob("*.safetensors"))}}


def run_export(cfg: ExportConfig) -> dict:
    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.reference)
    fp = tokenizer_fingerprint(tok)
    if tokenizer_fingerprint(load_tokenizer(cfg.reward)) != fp:
        raise UserError(f"the tokenizers of {cfg.reward} and {cfg.reference} differ; both models must share one")
    rm = load_reward_model(cfg.reward, attn_implementation="eager").eval()
    ref = load_causal_lm(cfg.reference, attn_implementation="eager").eval()
    if cfg.dtype == "fp16":
        rm, ref = rm.half(), ref.half()
    max_len = int(getattr(ref.config, "max_position_embeddings", 0) or tok.model_max_length)
    vocab = int(ref.config.vocab_size)
    low = max(tok.all_special_ids, default=-1) + 1
    low = low if low < vocab else 0          # e.g. GPT-2: its only special id is the last one
    stats = _reward_stats(cfg.reward)
    sources = {"reward": _source(cfg.reward), "reference": _source(cfg.reference)}
    facts = served_facts(fp, stats, max_len, vocab, cfg, sources)
    params = contract_parameters(facts)
    settings = TritonSettings(cfg.max_batch_size, cfg.queue_delay_us, cfg.max_queue_size, cfg.instance_count,
                              cfg.instance_kind, cfg.accelerator, cfg.dtype == "fp16", cfg.warmup,
                              min(cfg.warmup_length, max_len))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        parity = {}
        for spec, model, export in ((REWARD, rm, export_reward), (REFERENCE, ref, export_reference)):
            (tmp / spec.name / "1").mkdir(parents=True)
            log.info("export: %s → ONNX", spec.name)
            parity[spec.name] = export(model, tmp / spec.name / "1" / "model.onnx", cfg, vocab, low, max_len)
            log.info("export: %s parity max|ORT − PyTorch| = %.3g (tolerance %.0e)", spec.name,
                     parity[spec.name], cfg.tolerance)
            if not parity[spec.name] <= cfg.tolerance:
                raise UserError(f"{spec.name}: ONNX Runtime differs from PyTorch by {parity[spec.name]:.3g} "
                                f"> {cfg.tolerance:.0e}; nothing was written")
            write_config(tmp / spec.name / "config.pbtxt", model_config(spec.name, settings, params))
            if cfg.warmup:
                warm = tmp / spec.name / "warmup"
                warm.mkdir()
                np.ones(settings.warmup_length, dtype=np.int64).tofile(warm / "mask_ones")
                if spec is REFERENCE:
                    np.ones(1, dtype=np.float32).tofile(warm / "temperature_one")
        tok.save_pretrained(tmp / TOKENIZER_DIR)
        (tmp / MANIFEST_SPEC.name / "1").mkdir(parents=True)
        (tmp / MANIFEST_SPEC.name / "1" / "model.onnx").write_bytes(manifest_onnx(facts, tmp / TOKENIZER_DIR))
        write_config(tmp / MANIFEST_SPEC.name / "config.pbtxt", manifest_model_config())
        manifest = write_manifest(tmp, {
            "contract_version": CONTRACT_VERSION,
            "tokenizer": {"fingerprint": fp, "dir": TOKENIZER_DIR},
            "sources": sources,
            "served": facts.to_dict(),
            "reward_statistics_source": {k: v for k, v in stats.items() if k not in ("mean", "std")},
            "export": {"dtype": cfg.dtype, "opset": cfg.opset, "parity_max_abs_diff": parity,
                       "max_sequence_length": max_len, "vocab_size": vocab,
                       "max_batch_size": cfg.max_batch_size},
        })
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = {"repository": str(out), "parity_max_abs_diff": parity, "files": len(manifest["files"]),
              "tokenizer_fingerprint": fp, "elapsed_s": round(time.perf_counter() - t0, 2)}
    log.info("export: wrote %s (%s)", out, MANIFEST_FILE)
    return result

