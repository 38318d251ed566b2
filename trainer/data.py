"""Training data: row validation for the SFT, preference and prompt formats, and collation.

A malformed line stops the run with ``file:line``; a well-formed row that cannot be used
(missing fields, chosen == rejected, …) is skipped and counted, and the counts are logged.
Encoding and truncation live in ``tribune.services.common.text``, shared with the gateway and
``tribune score``; this module adds the torch side (padded tensors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tribune.services.common.errors import UserError
from tribune.services.common.jsonl import SkipCounter, read_jsonl
from tribune.services.common.text import pad, render_prompt, split_messages


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def load_sft_rows(path: Path, tokenizer, skipped: SkipCounter) -> list[tuple[str, str]]:
    """(prompt, response) pairs from ``{"prompt","response"}`` or ``{"messages": [...]}`` rows."""
    rows = []
    for _, obj in read_jsonl(path):
        if "messages" in obj:
            pair = split_messages(tokenizer, obj["messages"])
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


@dataclass
class PreferenceGroup:
    """One prompt with its responses ranked best first; a pair is a group of two."""
    prompt: str
    responses: list[str]
    margin: float = 0.0   # optional per-pair margin (pairs only), as in TRL / Llama 2
    weight: float = 1.0   # optional: multiplies the row's term in the training loss (not renormalised)


def finite_number(x) -> float | None:
    """A JSON value as a float when it is a finite number (not a bool, NaN or ±Infinity), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        x = float(x)
    except OverflowError:                   # an integer too large for a float
        return None
    return x if math.isfinite(x) else None


def row_weight(obj: dict) -> float | None:
    """A preference row's ``"weight"`` (default 1) as a float; None when it is not a finite number ≥ 0."""
    w = finite_number(obj.get("weight", 1.0))
    return w if w is not None and w >= 0 else None


def load_preference_groups(path: Path, skipped: SkipCounter) -> list[PreferenceGroup]:
    """Rows ``{"prompt","chosen","rejected"[,"margin"]}`` or ``{"prompt","ranking":[best…worst]}``, each
    with an optional ``"weight"`` (a number ≥ 0, default 1, that multiplies the row's term in the training
    loss; weights are not renormalised, and the held-out figures ignore them)."""
    groups = []
    for _, obj in read_jsonl(path):
        prompt = obj.get("prompt")
        if not _is_text(prompt):
            skipped.skip("missing prompt")
            continue
        weight = row_weight(obj)
        if weight is None:
            skipped.skip("invalid weight")
            continue
        if "ranking" in obj:
            ranking = obj["ranking"]
            # a response may be empty (a policy that stops at once): it is scored as prompt + EOS
            if not isinstance(ranking, list) or len(ranking) < 2 or not all(isinstance(r, str) for r in ranking):
                skipped.skip("invalid ranking")
                continue
            if len(set(ranking)) != len(ranking):
                skipped.skip("ranking with repeated responses")
                continue
            groups.append(PreferenceGroup(prompt, list(ranking), weight=weight))
        elif isinstance(obj.get("chosen"), str) and isinstance(obj.get("rejected"), str):
            if obj["chosen"] == obj["rejected"]:
                skipped.skip("chosen == rejected")
                continue
            margin = finite_number(obj.get("margin", 0.0))
            if margin is None:
                skipped.skip("margin not a finite number")
                continue
            groups.append(PreferenceGroup(prompt, [obj["chosen"], obj["rejected"]], margin, weight))
        else:
            skipped.skip("missing chosen/rejected")
    if not groups:
        raise UserError(f"{path}: no usable preference rows (skipped: {skipped.summary()})")
    return groups


class ChatPrompt(str):
    """A prompt given as a conversation: the text is the conversation rendered with the policy's
    chat template (generation prompt added); ``messages`` keeps the turns, so a reward model
    with another tokenizer can apply its own template (``tribune ppo --reward-gateway``)."""
    messages: tuple[dict[str, str], ...]

    def __new__(cls, text: str, messages: list[dict[str, str]]):
        self = super().__new__(cls, text)
        self.messages = tuple({"role": m["role"], "content": m["content"]} for m in messages)
        return self


def _prompt_messages(messages: Any) -> bool:
    """A conversation PPO can continue: user/system turns (and earlier assistant turns), not ending
    with the assistant's."""
    return (isinstance(messages, list) and len(messages) >= 1
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and _is_text(m.get("content"))
                    for m in messages) and messages[-1]["role"] != "assistant")


def load_prompts(path: Path, skipped: SkipCounter, tokenizer=None) -> list[str]:
    """Prompts from ``{"prompt"}`` rows (str) or ``{"messages"}`` rows (``ChatPrompt``, rendered with
    ``tokenizer``'s chat template; contents joined by newlines without one)."""
    prompts: list[str] = []
    for _, obj in read_jsonl(path):
        if "messages" in obj:
            if _prompt_messages(obj["messages"]):
                prompts.append(ChatPrompt(render_prompt(tokenizer, obj["messages"]), obj["messages"]))
            else:
                skipped.skip("invalid messages")
        elif _is_text(obj.get("prompt")):
            prompts.append(obj["prompt"])
        else:
            skipped.skip("missing prompt")
    if not prompts:
        raise UserError(f"{path}: no usable prompts (skipped: {skipped.summary()})")
    return prompts


# ---------------------------------------------------------------- collation

def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads to (B, T) ids and mask: the layout generation and the services use."""
    ids, mask = pad(seqs, pad_id, left=True)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads to (B, T) ids and mask."""
    ids, mask = pad(seqs, pad_id, left=False)
    return torch.from_numpy(ids), torch.from_numpy(mask)
