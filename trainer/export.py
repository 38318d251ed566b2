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

An ensemble of reward models (``--reward`` holding ``ensemble.json``: K member directories,
each one written by train-rm) becomes one ONNX graph holding all K members, so stock
Triton's ONNX Runtime backend serves it unchanged (no Triton ensemble scheduler, no
Python backend for the mean): ``rewards`` (B, 1) is the members' mean and
``member_rewards`` (B, K) their raw scores. Parity is checked per member and for the mean.
The graph holds K copies of the weights: an ONNX file is one protobuf, limited to 2 GB,
so large members will need ONNX external data (not done yet).
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
                               MEMBER_REWARDS_NAME, REFERENCE, REWARD_MODEL, REWARDS, TEMPERATURE, TOKENIZER_DIR,
                               ModelSpec, ServedFacts, reward_spec)
from services.repository import (TritonSettings, contract_parameters, manifest_model_config, manifest_onnx,
                                 model_config, sha256_file, tokenizer_fingerprint, write_config, write_manifest)
from trainer.modeling import (load_causal_lm, load_reward_model, scalar_head_values, score_sequences,
                              sequence_logprobs)
from trainer.reward import ENSEMBLE_FILE, read_reward_stats, reward_members
from trainer.sequences import gather_last

log = logging.getLogger("tribune")

# An ensemble reward-model directory: {"ensemble_size": K, "members": ["member-0", …]}, each
# member a complete train-rm output; the directory also holds the shared tokenizer.


@dataclass(kw_only=True)
class ExportConfig:
    """Export to a Triton model repository (ONNX Runtime backend)."""
    reward: Path = field(help="reward model directory (from train-rm; with ensemble.json, an ensemble of K)")
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
    """``output_axes``: the dynamic axes of every output of ``spec`` (in the module's output order)."""
    import warnings

    dyn = {t.name: ({0: "batch"} if t is TEMPERATURE else {0: "batch", 1: "sequence"}) for t in spec.inputs}
    dyn.update({name: output_axes for name in spec.output_names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=dyn, opset_version=opset, dynamo=False, do_constant_folding=True)


def _ort_session(path: Path):
    import onnxruntime as ort

    from services.runtime import execution_providers

    return ort.InferenceSession(str(path), providers=execution_providers())


def export_reward(members: list, path: Path, cfg: ExportConfig, vocab_size: int, low: int,
                  max_len: int) -> dict[str, float]:
    """One reward model, or K members in one graph; max |ORT − PyTorch| for `reward` (the served
    ``rewards``) and, for an ensemble, for each member's column (``reward.member-k``)."""
    spec = reward_spec(len(members))
    graph = (RewardGraph(members[0]) if len(members) == 1 else EnsembleRewardGraph(members)).eval()
    ids, mask = parity_batch(vocab_size, low, max_len)
    targs = (torch.from_numpy(ids), torch.from_numpy(mask))
    _export_onnx(graph, targs, path, spec, {0: "batch"}, cfg.opset)
    got = dict(zip(spec.output_names, _ort_session(path).run(spec.output_names,
                                                             {INPUT_IDS.name: ids, ATTENTION_MASK.name: mask})))
    with torch.no_grad():     # each member on its own, as train-rm and PPO score with it
        want = np.stack([score_sequences(m, *targs).float().numpy() for m in members], -1)   # (B, K)
    parity = {REWARD_MODEL: float(np.abs(got[REWARDS.name][:, 0] - want.mean(-1)).max())}
    if len(members) > 1:
        parity.update({f"{REWARD_MODEL}.member-{k}": float(np.abs(got[MEMBER_REWARDS_NAME][:, k] - want[:, k]).max())
                       for k in range(len(members))})
    return parity


def export_reference(model, path: Path, cfg: ExportConfig, vocab_size: int, low: int,
                     max_len: int) -> dict[str, float]:
    graph = ReferenceGraph(model).eval()
    ids, mask = parity_batch(vocab_size, low, max_len)
    temp = np.full((ids.shape[0], 1), 0.7, dtype=np.float32)
    targs = (torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(temp))
    _export_onnx(graph, targs, path, REFERENCE, {0: "batch", 1: "sequence_minus_one"}, cfg.opset)
    with torch.no_grad():
        ref = graph(*targs).float().numpy()
    got = _ort_session(path).run([LOGPROBS.name], {INPUT_IDS.name: ids, ATTENTION_MASK.name: mask,
                                                    TEMPERATURE.name: temp})[0]
    return {REFERENCE.name: float(np.abs(got - ref).max())}


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


def served_facts(fingerprint: str, stats: dict, member_stats: list[dict], max_len: int, vocab: int,
                 cfg: ExportConfig, sources: dict, members: list[Path]) -> ServedFacts:
    """What the `tribune_manifest` model answers: everything a remote client must check."""
    import hashlib

    reward = sources["reward"]
    digests = [m["weights_sha256"] for m in reward.get("members", [reward])]
    # one model keeps the id it always had (its weights' digests, not a list of them)
    weights = json.dumps(digests[0] if len(digests) == 1 else digests, sort_keys=True).encode()
    length, prompt = _truncation(members, max_len, cfg.max_prompt_length)
    return ServedFacts(contract_version=CONTRACT_VERSION, tokenizer_fingerprint=fingerprint,
                       reward_mean=float(stats["mean"]), reward_std=float(stats["std"]),
                       max_sequence_length=max_len, vocab_size=vocab, max_batch_size=cfg.max_batch_size,
                       reward_model_id="rm-" + hashlib.sha256(weights).hexdigest()[:16],
                       max_length=length, max_prompt_length=prompt, reward_model_source=reward["path"],
                       ensemble_size=len(members),
                       member_reward_mean=tuple(float(m["mean"]) for m in member_stats),
                       member_reward_std=tuple(float(m["std"]) for m in member_stats))


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


def run_export(cfg: ExportConfig) -> dict:
    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.reference)
    fp = tokenizer_fingerprint(tok)
    members = reward_members(cfg.reward)
    for d in dict.fromkeys([Path(cfg.reward), *members]):
        if tokenizer_fingerprint(load_tokenizer(d)) != fp:
            raise UserError(f"the tokenizers of {d} and {cfg.reference} differ; all models must share one")
    rms = [load_reward_model(d, attn_implementation="eager").eval() for d in members]
    ref = load_causal_lm(cfg.reference, attn_implementation="eager").eval()
    if cfg.dtype == "fp16":
        rms, ref = [rm.half() for rm in rms], ref.half()
    max_len = int(getattr(ref.config, "max_position_embeddings", 0) or tok.model_max_length)
    vocab = int(ref.config.vocab_size)
    low = max(tok.all_special_ids, default=-1) + 1
    low = low if low < vocab else 0          # e.g. GPT-2: its only special id is the last one
    member_stats = [_reward_stats(d) for d in members]
    stats = member_stats[0] if len(members) == 1 else ensemble_stats(cfg.reward, member_stats)
    sources = {"reward": _reward_source(cfg.reward, members), "reference": _source(cfg.reference)}
    facts = served_facts(fp, stats, member_stats, max_len, vocab, cfg, sources, members)
    params = contract_parameters(facts)
    settings = TritonSettings(cfg.max_batch_size, cfg.queue_delay_us, cfg.max_queue_size, cfg.instance_count,
                              cfg.instance_kind, cfg.accelerator, cfg.dtype == "fp16", cfg.warmup,
                              min(cfg.warmup_length, max_len))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        parity = {}
        for spec, model, export in ((facts.model_spec(REWARD_MODEL), rms, export_reward),
                                    (REFERENCE, ref, export_reference)):
            (tmp / spec.name / "1").mkdir(parents=True)
            log.info("export: %s → ONNX%s", spec.name, f" ({len(rms)} members)" if model is rms and len(rms) > 1 else "")
            checked = export(model, tmp / spec.name / "1" / "model.onnx", cfg, vocab, low, max_len)
            for name, diff in checked.items():
                log.info("export: %s parity max|ORT − PyTorch| = %.3g (tolerance %.0e)", name, diff, cfg.tolerance)
                if not diff <= cfg.tolerance:
                    raise UserError(f"{name}: ONNX Runtime differs from PyTorch by {diff:.3g} "
                                    f"> {cfg.tolerance:.0e}; nothing was written")
            parity.update(checked)
            write_config(tmp / spec.name / "config.pbtxt", model_config(spec, settings, params))
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
            "reward_statistics_source": _statistics_source(stats, member_stats),
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
              "tokenizer_fingerprint": fp, "ensemble_size": len(members),
              "elapsed_s": round(time.perf_counter() - t0, 2)}
    log.info("export: wrote %s (%s)", out, MANIFEST_FILE)
    return result

