"""Loading Hugging Face models and the forward passes every stage shares.

Any local Hugging Face model directory works. Position ids always come from the mask
(cumsum − 1), so a left-padded row gets exactly the logits of the unpadded one; the
exported ONNX graphs do the same.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from tribune.services.common.errors import UserError
from tribune.services.common.text import encode_prompt
from tribune.trainer.data import pad_left
from tribune.trainer.sequences import gather_last, position_ids_from_mask, token_logprobs

log = logging.getLogger("tribune")
HEAD_NAMES = ("score", "classifier", "v_head")      # what sequence-classification models call the scalar head


def check_model_dir(path: Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a Hugging Face model directory (not found)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere: RLHF log-prob ratios and rewards must be deterministic."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for key, value in list(model.config.to_dict().items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(model.config, key, 0.0)


def load_causal_lm(path: Path, dropout: bool = False, attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(check_model_dir(path), dtype=torch.float32, **kw)
    if not dropout:
        disable_dropout(model)
    return model


def load_reward_model(path: Path, dropout: bool = False, attn_implementation: str | None = None):
    """A sequence-classification model with one label: the scalar reward head."""
    from transformers import AutoModelForSequenceClassification

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model, info = AutoModelForSequenceClassification.from_pretrained(
        check_model_dir(path), num_labels=1, dtype=torch.float32, output_loading_info=True, **kw)
    # a causal LM has no scalar head: transformers' load report (in the log file) lists it as
    # missing; one line here says what that means
    missing = sorted(info.get("missing_keys", ()))
    head = [k for k in missing if k.split(".")[0] in HEAD_NAMES]
    if head:
        log.info("%s: fresh scalar head initialised (%s)", path, ", ".join(head))
    if len(head) < len(missing):
        log.warning("%s: weights missing from the checkpoint, initialised at random: %s", path,
                    ", ".join(k for k in missing if k not in head))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if not dropout:
        disable_dropout(model)
    return model


def reward_head_name(model: nn.Module) -> str:
    """The attribute that holds a sequence-classification model's scalar head."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise UserError(f"{type(model).__name__} has no scalar head named score/classifier")


def reward_head(model: nn.Module) -> nn.Module:
    return getattr(model, reward_head_name(model))


def scalar_head_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position, positions from the mask. (B, T) -> (B, T) float32

    The one scalar-head forward: rewards (its value at the last real token), PPO's value
    model (its value at every response position) and the exported reward graph use it.
    The head is one linear layer, so applying it to every position costs little.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return reward_head(model)(hidden).squeeze(-1).float()                     # (B, T)


def score_sequences(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward at the last position whose mask is 1, any padding side. (B, T) -> (B,)"""
    return gather_last(scalar_head_values(model, input_ids, attention_mask), attention_mask)


class ValueModel(nn.Module):
    """A scalar-head model giving V at every position; one forward call (through DDP). (B, T) -> (B, T)"""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return scalar_head_values(self.model, input_ids, attention_mask)


def causal_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits with positions from the mask. (B, T) -> (B, T, V)"""
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """log π(token t | <t) for t ≥ 1; 0 where token t or t−1 is padding. (B, T) -> (B, T−1)

    The columns the `reference` service returns (see tribune.services.contract): a row's first
    real token has no context, so its column is 0, exactly as for the row unpadded.
    """
    logp = token_logprobs(causal_logits(model, input_ids, attention_mask), input_ids, temperature)
    keep = attention_mask[:, 1:] * attention_mask[:, :-1]
    return logp * keep.to(logp.dtype)


def response_logprobs(model: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor, P: int,
                      temperature: float, with_entropy: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(response tokens) (B, R) with logits / temperature, and optionally the entropy (B, R).

    The same kernel as ``sequence_logprobs``, on the columns from P − 1 on: the logits at
    position P − 1 predict the first response token.
    """
    logits = causal_logits(model, query_responses, attention_mask)[:, P - 1:]          # (B, R+1, V)
    logp = token_logprobs(logits, query_responses[:, P - 1:], temperature)             # (B, R)
    if not with_entropy:
        return logp, None
    from tribune.trainer.rl_math import entropy_from_logits

    return logp, entropy_from_logits(logits[:, :-1].float() / temperature)


def cache_argument(model: nn.Module) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers 5.x, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (4.x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model: nn.Module):
    """An empty ``DynamicCache`` for ``model`` (its config decides e.g. sliding-window layers)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
             temperature: float = 1.0, do_sample: bool = True, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Samples continuations of left-padded prompts with a KV cache.

    Returns (query_responses (B, P+R), mask (B, P+R), P). Response tokens after the first
    EOS are padding and masked out. Sampling uses ``generator`` so runs are reproducible.
    """
    model.eval()
    ids, mask = pad_left(prompt_ids, tokenizer.pad_token_id)                 # (B, P)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    P = ids.shape[1]
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # the cache is filled in place by every forward; passed under the name this transformers
    # version takes (`cache` from 5.x, `past_key_values` before), never read back from outputs
    cache = {cache_argument(model): new_cache(model)}
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
                **cache)
    logits = out.logits[:, -1]
    tokens, masks = [], []
    for _ in range(max_new_tokens):
        if do_sample:
            probs = torch.softmax(logits.float() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_token_id), nxt)
        tokens.append(nxt)
        masks.append((~done).long())
        done = done | (nxt == tokenizer.eos_token_id)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = (mask.sum(-1, keepdim=True) - 1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **cache)
        logits = out.logits[:, -1]
    resp = torch.stack(tokens, 1)                                           # (B, R)
    resp_mask = torch.stack(masks, 1)                                       # (B, R)
    full_mask = torch.cat([mask[:, :P], resp_mask], 1)
    return torch.cat([ids, resp], 1), full_mask, P


@dataclass
class Samples:
    """One chunk of sampled responses: prompts, (B, P+R) ids and mask, P, decoded texts."""
    prompts: list[str]
    query_responses: torch.Tensor
    mask: torch.Tensor
    P: int
    texts: list[str]


def sample_responses(model: nn.Module, tokenizer, prompts: list[str], *, max_prompt_length: int,
                     max_new_tokens: int, seed: int, temperature: float = 1.0, chunk: int = 64) -> Iterator[Samples]:
    """Samples one response per prompt, ``chunk`` prompts at a time, reproducibly (``seed``);
    temperature 0 decodes greedily."""
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), chunk):
        part = prompts[i:i + chunk]
        qr, mask, P = generate(model, tokenizer, [encode_prompt(tokenizer, p, max_prompt_length) for p in part],
                               max_new_tokens, temperature=temperature or 1.0, do_sample=temperature > 0,
                               generator=g)
        yield Samples(part, qr, mask, P, decode_responses(tokenizer, qr, mask, P))


def decode_responses(tokenizer, query_responses: torch.Tensor, mask: torch.Tensor, P: int) -> list[str]:
    texts = []
    for row, m in zip(query_responses[:, P:].tolist(), mask[:, P:].tolist()):
        toks = [t for t, keep in zip(row, m) if keep and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
    return texts
