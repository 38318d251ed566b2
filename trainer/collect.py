"""`tribune collect`: k responses per prompt sampled from a local policy, for raters to rank.

The data step of the RLHF recipe (InstructGPT ranked 4–9 samples per prompt of πSFT;
Anthropic re-collected on the current policy in rounds): the reward model then learns from
the very distribution PPO will optimise, instead of from whatever pairs were given.

Rows: ``{"prompt", "candidates": [k texts], "policy": "<dir>@<weights hash>"}`` (chat
prompts keep their ``messages`` and gain the rendered ``prompt``). Prompts are sampled in
fixed chunks, each with its own seed, so a run is identical per seed and ``--resume``
continues after the last complete chunk. The sampling settings, the seed and the counts
(duplicate and empty responses) go to ``OUTPUT.meta.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tribune.services.common.config import field
from tribune.services.common.errors import UserError
from tribune.services.common.jsonl import SkipCounter, cut_torn_line, read_jsonl, write_json

log = logging.getLogger("tribune")


@dataclass(kw_only=True)
class SamplingConfig:
    """How candidates are sampled (recorded with the data)."""
    k: int = field(4, help="responses sampled per prompt")
    temperature: float = field(1.0, help="sampling temperature (the policy's own distribution at 1)")
    max_new_tokens: int = field(16, help="longest response")
    max_prompt_length: int = field(48, help="prompt tokens kept (cut from the left)")

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError("k must be at least 2 (raters compare candidates)")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.max_new_tokens < 1 or self.max_prompt_length < 1:
            raise ValueError("max_new_tokens and max_prompt_length must be at least 1")


@dataclass(kw_only=True)
class CollectConfig(SamplingConfig):
    """k samples per prompt from a local policy (πSFT or a PPO output), for labelling."""
    policy: Path = field(help="policy model directory (Hugging Face format)")
    prompts: Path = field(help='JSONL of {"prompt": ...} or {"messages": [...]} rows')
    output: Path = field(help="JSONL of candidates to write")
    seed: int = field(0, help="seed of the sampling; the same seed gives the same file")
    max_prompts: int | None = field(None, help="use only the first N prompts")
    rows_per_prompt: int = field(1, help="rows (rating tasks) of k samples per prompt; the output goes through the "
                                         "prompts this many times, each pass with fresh samples")
    chunk: int = field(32, help="prompts sampled together (each chunk has its own seed)")
    resume: bool = field(False, help="continue an interrupted run with the same settings")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk < 1:
            raise ValueError("chunk must be at least 1")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError("max_prompts must be at least 1")
        if self.rows_per_prompt < 1:
            raise ValueError("rows_per_prompt must be at least 1")


def policy_id(policy_dir: Path) -> str:
    """``<dir name>@<12 hex of sha256 over the weight files>``: which policy made a sample."""
    policy_dir = Path(policy_dir)
    files = sorted(p for p in policy_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise UserError(f"{policy_dir}: no weight files (*.safetensors, *.bin)")
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return f"{policy_dir.name}@{h.hexdigest()[:12]}"


def load_prompt_rows(path: Path, tokenizer, skipped: SkipCounter) -> list[dict[str, Any]]:
    """``{"prompt"}`` rows as they are; ``{"messages"}`` rows gain ``prompt`` rendered with the
    policy's chat template (generation prompt added)."""
    from tribune.services.common.text import render_prompt

    rows = []
    for _, obj in read_jsonl(path):
        if "messages" in obj:
            msgs = obj["messages"]
            if (not isinstance(msgs, list) or not msgs
                    or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs)
                    or msgs[-1].get("role") == "assistant"):
                skipped.skip("invalid messages (a list of {role, content} ending before an assistant turn)")
                continue
            rows.append({"messages": msgs, "prompt": render_prompt(tokenizer, msgs)})
        elif isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
            rows.append({"prompt": obj["prompt"]})
        else:
            skipped.skip("missing prompt")
    if not rows:
        raise UserError(f"{path}: no usable prompts (skipped: {skipped.summary()})")
    return rows


NEWER_SETTINGS = ("prompts_sha256", "max_prompts")     # not in the settings of older meta files


def _settings(cfg: CollectConfig, pid: str) -> dict[str, Any]:
    from tribune.services.repository import sha256_file

    # the prompts by content and how many are used: rows go pass by pass over them, so a resume with
    # other prompts would give prompts different numbers of rows
    return {"policy": pid, "prompts": str(cfg.prompts), "prompts_sha256": sha256_file(cfg.prompts),
            "max_prompts": cfg.max_prompts, "seed": cfg.seed, "chunk": cfg.chunk,
            "rows_per_prompt": cfg.rows_per_prompt,
            "sampling": asdict(SamplingConfig(k=cfg.k, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                              max_prompt_length=cfg.max_prompt_length))}


def _start(cfg: CollectConfig, meta_path: Path, settings: dict) -> int:
    """Rows already written (resume) or 0; refuses to mix settings or to overwrite silently."""
    out = Path(cfg.output)
    if not out.exists() or out.stat().st_size == 0:
        return 0
    if not cfg.resume:
        raise UserError(f"{out} exists; pass --resume to continue it, or choose another --output")
    if not meta_path.is_file():
        raise UserError(f"{out} exists but {meta_path} does not: cannot check it was made with these settings")
    old = json.loads(meta_path.read_text()).get("settings")
    if isinstance(old, dict):   # a file collected before a setting was recorded: that one cannot be checked
        old = {**{k: settings[k] for k in NEWER_SETTINGS if k not in old}, **old}
    if old != settings:
        changed = sorted(k for k in settings if (old or {}).get(k) != settings[k])
        raise UserError(f"--resume: {out} was collected with other settings ({', '.join(changed)} differ)")
    done = cut_torn_line(out)
    whole = done - done % cfg.chunk        # restart at a chunk boundary: the seed is per chunk
    if whole != done:
        lines = out.read_bytes().splitlines(keepends=True)[:whole]
        out.write_bytes(b"".join(lines))
    return whole


def run_collect(cfg: CollectConfig) -> dict:
    import torch

    from tribune.services.common.text import load_tokenizer
    from tribune.trainer.modeling import load_causal_lm, sample_responses
    from tqdm.auto import tqdm

    pid = policy_id(cfg.policy)
    tokenizer = load_tokenizer(cfg.policy)
    skipped = SkipCounter()
    rows = load_prompt_rows(cfg.prompts, tokenizer, skipped)[:cfg.max_prompts] * cfg.rows_per_prompt   # pass-major
    out, meta_path = Path(cfg.output), Path(str(cfg.output) + ".meta.json")
    settings = _settings(cfg, pid)
    start = _start(cfg, meta_path, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, {"settings": settings, "complete": False})
    policy = load_causal_lm(cfg.policy).eval()
    log.info("collect: %d rows × %d samples from %s (T=%g, seed %d)%s; skipped prompts: %s", len(rows), cfg.k,
             pid, cfg.temperature, cfg.seed, f", resuming after {start}" if start else "", skipped.summary())
    counts = {"duplicates": 0, "rows_with_duplicates": 0, "empty": 0}
    if start:       # counts of the rows already there
        for _, obj in read_jsonl(out):
            _count(obj["candidates"], counts)
    with out.open("a", encoding="utf-8") as f, torch.no_grad(), \
            tqdm(total=len(rows), initial=start, desc="collect", unit="prompt", dynamic_ncols=True) as bar:
        for c0 in range(start, len(rows), cfg.chunk):
            part = rows[c0:c0 + cfg.chunk]
            prompts = [r["prompt"] for r in part for _ in range(cfg.k)]       # each prompt k times, together
            texts: list[str] = []
            for s in sample_responses(policy, tokenizer, prompts, max_prompt_length=cfg.max_prompt_length,
                                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1_000_003 + c0 // cfg.chunk,
                                      temperature=cfg.temperature, chunk=len(prompts)):
                texts += s.texts
            for i, r in enumerate(part):
                cands = texts[i * cfg.k:(i + 1) * cfg.k]
                _count(cands, counts)
                f.write(json.dumps({**r, "candidates": cands, "policy": pid}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(part))
    summary = {"rows": len(rows), "candidates": len(rows) * cfg.k, **counts, "skipped_prompts": skipped.total,
               "policy": pid, "output": str(out)}
    write_json(meta_path, {"settings": settings, "complete": True, "counts": summary})
    log.info("collect: %d rows → %s; %d duplicate and %d empty responses", len(rows), out, counts["duplicates"],
             counts["empty"])
    return summary


def _count(cands: list[str], counts: dict[str, int]) -> None:
    dup = len(cands) - len(set(cands))
    counts["duplicates"] += dup
    counts["rows_with_duplicates"] += int(dup > 0)
    counts["empty"] += sum(1 for c in cands if not c.strip())
