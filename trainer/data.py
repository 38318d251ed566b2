"""JSONL data: reading with clear errors, row validation, tokenisation and collation.

A malformed line stops the run with ``file:line``; a well-formed row that cannot be used
(missing fields, chosen == rejected, …) is skipped and counted, and the counts are logged.

Sequences are always ``prompt tokens + response tokens + EOS``. Long prompts are
truncated from the left (the end of a prompt is what the response depends on), long
responses from the right; both are counted.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from trainer.errors import UserError


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, object); a line that is not a JSON object is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


@dataclass
class SkipCounter:
    """Why rows were skipped, for the log."""
    counts: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in sorted(self.counts.items())) or "none"


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def load_sft_rows(path: Path, tokenizer, skipped: SkipCounter) -> list[tuple[str, str]]:
    """(prompt, response) pairs from ``{"prompt","response"}`` or ``{"messages": [...]}`` rows."""
    rows = []
    for _, obj in read_jsonl(path):
        if "messages" in obj:
            pair = _split_messages(obj["messages"], tokenizer)
            if pair is None:
                skipped.skip("invalid messages")
                continue
            rows.append(pair)
        elif _is_text(obj.get("prompt")) and _is_text(obj.get("response")):
            rows.append((obj["prompt"], obj["response"]))
        else:
            skipped.skip("missing prompt/response")
    if not rows:
        raise UserError(f"{path}: no usable SFT rows (skipped: {skipped.summary()})")
    return rows


def _split_messages(messages: Any, tokenizer) -> tuple[str, str] | None:
    """Chat rows: everything before the last assistant turn is the prompt (chat template)."""
    if (not isinstance(messages, list) or len(messages) < 2
            or not all(isinstance(m, dict) and _is_text(m.get("content")) for m in messages)
            or messages[-1].get("role") != "assistant"):
        return None
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    else:
        prompt = "\n".join(m["content"] for m in messages[:-1])
    return prompt, messages[-1]["content"]


@dataclass
class PreferenceGroup:
    """One prompt with its responses ranked best first; a pair is a group of two."""
    prompt: str
    responses: list[str]
    margin: float = 0.0   # optional per-pair margin (pairs only), as in TRL / Llama 2


def load_preference_groups(path: Path, skipped: SkipCounter) -> list[PreferenceGroup]:
    """Rows ``{"prompt","chosen","rejected"[,"margin"]}`` or ``{"prompt","ranking":[best…worst]}``."""
    groups = []
    for _, obj in read_jsonl(path):
        prompt = obj.get("prompt")
        if not _is_text(prompt):
            skipped.skip("missing prompt")
            continue
        if "ranking" in obj:
            ranking = obj["ranking"]
            if not isinstance(ranking, list) or len(ranking) < 2 or not all(_is_text(r) for r in ranking):
                skipped.skip("invalid ranking")
                continue
            if len(set(ranking)) != len(ranking):
                skipped.skip("ranking with repeated responses")
                continue
            groups.append(PreferenceGroup(prompt, list(ranking)))
        elif _is_text(obj.get("chosen")) and _is_text(obj.get("rejected")):
            if obj["chosen"] == obj["rejected"]:
                skipped.skip("chosen == rejected")
                continue
            margin = obj.get("margin", 0.0)
            if not isinstance(margin, (int, float)):
                skipped.skip("non-numeric margin")
                continue
            groups.append(PreferenceGroup(prompt, [obj["chosen"], obj["rejected"]], float(margin)))
        else:
            skipped.skip("missing chosen/rejected")
    if not groups:
        raise UserError(f"{path}: no usable preference rows (skipped: {skipped.summary()})")
    return groups


def load_prompts(path: Path, skipped: SkipCounter) -> list[str]:
    prompts = []
    for _, obj in read_jsonl(path):
        if _is_text(obj.get("prompt")):
            prompts.append(obj["prompt"])
        else:
            skipped.skip("missing prompt")
    if not prompts:
        raise UserError(f"{path}: no usable prompts (skipped: {skipped.summary()})")
    return prompts


# ---------------------------------------------------------------- tokenisation

@dataclass
class Truncation:
    prompts: int = 0
    responses: int = 0


def encode_prompt(tokenizer, prompt: str, max_prompt_length: int, trunc: Truncation | None = None) -> list[int]:
    """Prompt ids (with the tokenizer's own special tokens, e.g. BOS), left-truncated.

    A prompt rendered by a chat template already starts with the BOS text, so no second BOS
    is added; a cut from the left keeps the leading BOS.
    """
    bos = tokenizer.bos_token
    rendered = bool(bos) and prompt.startswith(bos)
    ids = tokenizer(prompt, add_special_tokens=not rendered)["input_ids"]
    if len(ids) > max_prompt_length:
        if trunc is not None:
            trunc.prompts += 1
        if ids and ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None:
            ids = ids[:1] + ids[len(ids) - max_prompt_length + 1:]
        else:
            ids = ids[-max_prompt_length:]
    return ids


def encode_pair(tokenizer, prompt: str, response: str, max_prompt_length: int, max_length: int,
                trunc: Truncation | None = None) -> tuple[list[int], int]:
    """(prompt + response + EOS ids, prompt length); the response is cut to fit max_length."""
    p = encode_prompt(tokenizer, prompt, max_prompt_length, trunc)
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    room = max_length - len(p) - 1
    if len(r) > room:
        if trunc is not None:
            trunc.responses += 1
        r = r[:max(room, 0)]
    return p + r + [tokenizer.eos_token_id], len(p)


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(T - len(s), T) if left else slice(0, len(s))
            ids[i, cols] = torch.tensor(s)
            mask[i, cols] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads to (B, T) ids and mask: the layout generation and the services use."""
    return _pad(seqs, pad_id, left=True)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads to (B, T) ids and mask."""
    return _pad(seqs, pad_id, left=False)
