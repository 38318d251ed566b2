"""A short, generic pretraining of a task's tiny base model: in-context copying, no instructions.

A real base model comes out of pretraining able to match and copy what it has seen earlier in
its context (induction heads, Olsson et al. 2022); a randomly initialised one acquires that only
after a phase change that a task's few thousand demonstrations or preference pairs may never
reach (``keyword``'s rule needs it: is the prompt's word in the response?). ``tribune task make``
trains every task's base model for ``BaseModelSpec.pretrain_steps`` steps (1,000 unless the task
or ``--pretrain-steps`` says otherwise) of next-token prediction on this corpus before saving it.

The corpus knows nothing of any task but its vocabulary: a run of random words, a few more
random words, then the start of the first run again::

    wind over wave dark  sea  wind over wave      (predicting the repeat needs the earlier run)

No prompt, response, instruction or rule of the task appears in it.
"""
from __future__ import annotations

import logging
import random

log = logging.getLogger("tribune")

BATCH_SIZE = 64
LEARNING_RATE = 1e-3


def copy_text(vocabulary: list[str], rng: random.Random) -> str:
    """One line of the corpus: 4–10 random words, 0–4 more, then the first 2…all of the run again."""
    run = [rng.choice(vocabulary) for _ in range(rng.randint(4, 10))]
    gap = [rng.choice(vocabulary) for _ in range(rng.randint(0, 4))]
    return " ".join(run + gap + run[:rng.randint(2, len(run))])


def pretrain_base_model(model, tokenizer, vocabulary: list[str], steps: int, seed: int) -> list[float]:
    """Trains ``model`` in place for ``steps`` AdamW steps on fresh corpus lines; returns the losses.

    Deterministic for a seed on one machine: the data come from ``random.Random(seed)``, the
    initialisation and dropout from the caller's ``torch.manual_seed``.
    """
    import torch

    rng = random.Random(seed)
    words = [w for w in vocabulary if w not in tokenizer.all_special_tokens]
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    from tqdm.auto import tqdm

    model.train()
    losses: list[float] = []
    for step in tqdm(range(1, steps + 1), desc="pretrain base", unit="step", dynamic_ncols=True, leave=False):
        enc = tokenizer([copy_text(words, rng) for _ in range(BATCH_SIZE)], return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)  # (B, T)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == steps:
            log.debug("pretrain base: step %d/%d, loss %.3f", step, steps, loss.item())
    model.eval()
    return losses
