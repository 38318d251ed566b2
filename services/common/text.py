"""Text → token ids, exactly as training does it: one home for encoding and truncation.

Used by the trainer (SFT, reward model, PPO prompts), the gateway and ``tribune score``,
so a served reward model sees the same ids for a (prompt, response) as it was trained on.
Sequences are ``prompt tokens + response tokens + EOS``. Long prompts are cut from the
left (the end of a prompt is what the response depends on), long responses from the
right; both are counted. Imports no torch: the gateway runs without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tribune.services.common.errors import UserError


def load_tokenizer(path: Path):
    """A Hugging Face tokenizer from a local directory, with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a Hugging Face model directory (not found)")
    try:
        if _saved_as_generic_backend(path):
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: no usable tokenizer ({e})") from None
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer in {path} has no EOS token")
    if tok.pad_token_id is None:
        # Common for decoder-only models; EOS as pad is safe because masks, not pad ids,
        # decide which positions count everywhere in Tribune.
        tok.pad_token = tok.eos_token
    return tok


def _saved_as_generic_backend(path: Path) -> bool:
    """A tokenizer.json saved as the generic `tokenizers` backend, loaded as saved.

    For some model types (qwen2) transformers 5 replaces it by the type's registered class,
    which re-derives pre-tokenisation from the vocabulary: the ids would differ from the saved
    file's, and from the exported repository's tokenizer/ (no config.json), under the same
    fingerprint. The saved file is what the model was trained with.
    """
    import json

    config = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not config.is_file():
        return False
    try:
        cls = json.loads(config.read_text()).get("tokenizer_class")
    except ValueError:
        return False
    return cls in ("TokenizersBackend", "PreTrainedTokenizerFast")


def render_prompt(tokenizer, messages: list[dict[str, Any]]) -> str:
    """A conversation as prompt text: the tokenizer's chat template with the generation prompt
    added; a tokenizer without a template joins the contents with newlines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def render_chat(tokenizer, messages: list[dict[str, Any]]) -> tuple[str, str]:
    """(prompt text, last assistant turn) of a conversation: everything before the last
    message rendered by ``render_prompt``."""
    return render_prompt(tokenizer, messages[:-1]), messages[-1]["content"]


def split_messages(tokenizer, messages: Any) -> tuple[str, str] | None:
    """(prompt text, response) of a conversation whose last turn is the assistant's (``render_chat``);
    None when it is not one (not a list of at least two {role, content} turns with text)."""
    if (not isinstance(messages, list) or len(messages) < 2
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       and m["content"].strip() for m in messages)
            or messages[-1].get("role") != "assistant"):
        return None
    return render_chat(tokenizer, messages)


@dataclass
class Truncation:
    """How many prompts and responses were cut."""
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


def pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pads to (B, T) int64 ids and mask, on the left (generation, the services) or right."""
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(T - len(s), T) if left else slice(0, len(s))
            ids[i, cols] = s
            mask[i, cols] = 1
    return ids, mask
