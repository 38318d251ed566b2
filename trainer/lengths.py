"""Length limits that fit the model and the data, derived in one place.

A limit left unset (``None``) on the command line comes from the model's context window
(``max_position_embeddings``) and the data: nothing is cut that fits the model, and what
is cut is counted and logged by the stage. `tribune demo` passes its small values
explicitly (``tribune.trainer.pipeline.STAGE_DEFAULTS``).
"""
from __future__ import annotations

import json
from pathlib import Path

# the longest response PPO samples when neither the flag nor the SFT run says otherwise
DEFAULT_MAX_NEW_TOKENS = 256


def model_context(model_dir: Path) -> int | None:
    """The model's context window from its config.json (None when it states none)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    return None


def fit_lengths(prompt_lengths: list[int], sequence_lengths: list[int], context: int | None,
                max_length: int | None = None, max_prompt_length: int | None = None) -> tuple[int, int]:
    """(max_length, max_prompt_length) for training on sequences of these token counts.

    max_length: the longest sequence (prompt + response + EOS), at most the context window;
    with a given max_prompt_length, the longest one a prompt of that length makes (it plus
    the longest response), so that the response room (max_length − max_prompt_length, what
    PPO samples) is the data's. max_prompt_length: the longest prompt when every sequence
    fits; otherwise at most 3/4 of max_length (the rule text clients use for a model trained
    elsewhere), so long prompts leave room for the response. Given values are kept.
    """
    longest = max(sequence_lengths)
    if max_length is None:
        if max_prompt_length is not None:
            longest = max_prompt_length + max(s - p for p, s in zip(prompt_lengths, sequence_lengths))
        max_length = min(longest, context) if context else longest
        if max_prompt_length is not None and max_length <= max_prompt_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) leaves no room for a response in the "
                             f"model's context ({context} tokens)")
    max_length = max(max_length, 2)
    if max_prompt_length is None:
        prompt = max(prompt_lengths)
        cap = max_length - 1 if longest <= max_length else (3 * max_length) // 4
        max_prompt_length = max(1, min(prompt, cap))
    return max_length, max_prompt_length


def trained_lengths(model_dir: Path) -> tuple[int, int] | None:
    """(max_length, max_prompt_length) a Tribune-trained model was trained with (config.resolved.json)."""
    path = Path(model_dir) / "config.resolved.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("max_length"), int) and isinstance(cfg.get("max_prompt_length"), int):
        return cfg["max_length"], cfg["max_prompt_length"]
    return None


def fit_generation(prompt_lengths: list[int], context: int | None, trained: tuple[int, int] | None,
                   max_new_tokens: int | None = None, max_prompt_length: int | None = None) -> tuple[int, int]:
    """(max_new_tokens, max_prompt_length) for sampling responses to prompts of these token counts.

    max_new_tokens: the response room the policy's SFT run trained on (max_length −
    max_prompt_length), else the context left after the longest prompt, at most
    DEFAULT_MAX_NEW_TOKENS. max_prompt_length: the longest prompt, at most what the context
    leaves after max_new_tokens. Given values are kept.
    """
    longest = max(prompt_lengths)
    if max_new_tokens is None:
        if trained is not None:
            max_new_tokens = trained[0] - trained[1]
        else:
            room = context - longest if context else DEFAULT_MAX_NEW_TOKENS
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, room if room > 0 else (context or 2) // 4)
        max_new_tokens = max(1, max_new_tokens)
    if max_prompt_length is None:
        cap = context - max_new_tokens if context else longest
        max_prompt_length = max(1, min(longest, cap))
    return max_new_tokens, max_prompt_length


def pair_lengths(tokenizer, pairs: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token counts (prompt, prompt + response + EOS) of (prompt, response) pairs, uncut."""
    from tribune.services.common.text import encode_prompt

    prompts, seqs = [], []
    for prompt, response in pairs:
        p = len(encode_prompt(tokenizer, prompt, 1 << 30))
        prompts.append(p)
        seqs.append(p + len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1)
    return prompts, seqs


def with_fitted_lengths(cfg, model_dir: Path, tokenizer, pairs: list[tuple[str, str]]):
    """``cfg`` (SFT or reward-model config) with max_length / max_prompt_length filled in when unset."""
    import dataclasses

    if cfg.max_length is not None and cfg.max_prompt_length is not None:
        return cfg
    from tribune.services.common.errors import UserError

    prompts, seqs = pair_lengths(tokenizer, pairs)
    try:
        length, prompt = fit_lengths(prompts, seqs, model_context(model_dir), cfg.max_length, cfg.max_prompt_length)
    except ValueError as e:
        raise UserError(str(e)) from None
    return dataclasses.replace(cfg, max_length=length, max_prompt_length=prompt)


def check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    """Validation of a stage's length fields (None: derived later by ``with_fitted_lengths``)."""
    if max_length is not None and max_length < 2:
        raise ValueError("max_length must be at least 2")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError("max_prompt_length must be at least 1")
    if None not in (max_length, max_prompt_length) and max_prompt_length >= max_length:
        raise ValueError("max_prompt_length must be smaller than max_length")
