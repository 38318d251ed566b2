"""Memory options every training command shares: LoRA adapters (peft) and gradient checkpointing.

``MemoryConfig`` is one group of ``RunConfig``, so `sft`, `train-rm` and `ppo` (policy and
value model alike) take the same ``--lora-r``, ``--lora-alpha``, ``--lora-target-modules``,
``--gradient-checkpointing`` and ``--mixed-precision`` flags. LoRA layers are injected into
the Hugging Face model in place, so every forward pass of Tribune (positions from the mask,
the scalar head at every position) runs unchanged; ``plain_model`` merges the adapters
before ``save_pretrained``, so exports and Triton see ordinary weights (Hu et al. 2021).
"""
from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Literal

from torch import nn

from tribune.services.common.config import field
from tribune.services.common.errors import UserError

log = logging.getLogger("tribune")

# model → its peft wrapper, kept aside so the model itself stays the one every forward pass uses
_PEFT: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


@dataclass(kw_only=True)
class MemoryConfig:
    """Precision, adapters and activation memory of the trained models."""
    mixed_precision: Literal["no", "bf16", "fp16"] | None = field(
        None, help="autocast through accelerate: bf16 (CPU or GPU), fp16 (GPU only) or no "
        "(default: accelerate's own setting, e.g. `accelerate launch --mixed_precision`, else no)")
    gradient_checkpointing: bool = field(False, help="recompute activations in the backward pass (less memory, "
                                         "about a third more compute)")
    lora_r: int = field(0, help="LoRA rank; 0 trains every weight (full fine-tuning)")
    lora_alpha: float = field(16.0, help="LoRA scaling α (the update is scaled by α / r)")
    lora_dropout: float = field(0.0, help="dropout on the LoRA input")
    lora_target_modules: list[str] | None = field(
        None, help="module names (or suffixes) that get adapters (default: peft's choice for the architecture, "
        "else every linear layer but the output head)")

    def __post_init__(self) -> None:
        if self.lora_r < 0:
            raise ValueError("lora_r must be >= 0")
        if self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_alpha must be positive and lora_dropout in [0, 1)")


def check_precision(mixed_precision: str | None, cuda: bool) -> None:
    """fp16 autocast needs a GPU (accelerate has no CPU fp16); refuse before anything is loaded."""
    if mixed_precision == "fp16" and not cuda:
        raise UserError("--mixed-precision fp16 needs a CUDA GPU; on CPU use bf16 or no")


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _default_targets(model: nn.Module, head: str | None) -> list[str]:
    """Every linear layer's name suffix except the output heads (lm_head, score): all-linear LoRA."""
    skip = {"lm_head", "score", "classifier", "v_head"} | ({head} if head else set())
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names - skip) or sorted(names)


def prepare_model(model: nn.Module, cfg: MemoryConfig, *, head: str | None = None, name: str = "model") -> nn.Module:
    """Gradient checkpointing and LoRA on a freshly loaded HF model; returns the same object.

    ``head``: the name of a scalar head (reward and value models) that trains in full next to
    the adapters, as it starts from scratch.
    """
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(f"{type(model).__name__} does not support --gradient-checkpointing")
        # non-reentrant: works with frozen inputs (LoRA) and without use_cache
        if hasattr(model, "activation_checkpointing_enable"):        # transformers >= 5.x (the old name is deprecated)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:                                                         # transformers 4.56 – 5.x before the rename
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UserError("--lora-r needs peft (pip install peft)") from None
        targets = cfg.lora_target_modules or _default_targets(model, head)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, modules_to_save=[head] if head else None, bias="none")
        try:
            with warnings.catch_warnings():
                # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning
                # from transformers 5); nothing for our code to change
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                _PEFT[model] = get_peft_model(model, lora)
        except ValueError as e:
            raise UserError(f"--lora-target-modules: {e}") from None
    trainable, total = trainable_parameters(model)
    log.info("%s: %d of %d parameters trainable (%.2f%%)%s%s", name, trainable, total, 100 * trainable / total,
             f"; LoRA r={cfg.lora_r}" if cfg.lora_r else "", "; gradient checkpointing" if cfg.gradient_checkpointing
             else "")
    return model


def plain_model(model: nn.Module) -> nn.Module:
    """The model with its LoRA adapters merged into the weights (itself when it has none).

    Called once, to save: afterwards the model holds the merged weights and no adapters.
    """
    peft_model = _PEFT.pop(model, None)
    if peft_model is None:
        return model
    return peft_model.merge_and_unload()
