"""Resumable checkpoints, signal handling and rank agreement: the durable side of a run.

A checkpoint is accelerate's full state (models, optimisers, registered schedulers, RNGs)
plus the stage's own state (``trainer_state.json``), written to ``step-N.tmp`` and renamed
only when complete, so a crash mid-save leaves the previous one as the newest.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from tribune.services.common.jsonl import write_json

log = logging.getLogger("tribune")


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    root = checkpoint_dir(out)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file() and not p.name.endswith(".tmp")]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(acc, out: Path, step: int, state: dict[str, Any], keep: int, replace_others: bool = False) -> Path:
    """Writes the checkpoint of ``step`` atomically and keeps the ``keep`` newest; with ``replace_others``
    (a fresh run's first checkpoint) every other one goes: an earlier run's would outrank this run's own
    (the newest steps are kept) and be what --resume continues."""
    root = checkpoint_dir(out)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json(tmp / "trainer_state.json", {"step": step, **state})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        saved = sorted((p for p in root.glob("step-*") if not p.name.endswith(".tmp")),
                       key=lambda p: int(p.name.split("-")[1]))
        for p in [p for p in saved if p != final] if replace_others else saved[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def drop_tied_aliases(models, weights: list[dict], output_dir) -> None:
    """accelerate's save-state hook: a tied weight (e.g. ``lm_head.weight`` with
    ``tie_word_embeddings``) is stored once. Safetensors cannot store two names of one
    tensor, and accelerate would otherwise drop the alias itself with a warning on every
    checkpoint; loading refills it (safetensors' ``load_model`` knows shared tensors)."""
    for state in weights:
        seen: set[tuple] = set()
        for name in list(state):
            t = state[name]
            if not isinstance(t, torch.Tensor):
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key in seen:
                del state[name]
            else:
                seen.add(key)


def load_checkpoint(acc, out: Path) -> tuple[int, dict[str, Any]]:
    """Restores the newest checkpoint; returns (step, the stage's state). (0, {}) when none."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", checkpoint_dir(out))
        return 0, {}
    acc.load_state(str(ckpt))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    log.info("resumed from %s (step %d)", ckpt, state["step"])
    return int(state.pop("step")), state


class StopRequested:
    """SIGTERM / SIGINT set a flag; the run checkpoints after the current step and stops.

    This is what a preempted Kubernetes pod or a Ctrl-C needs: no half-applied step, and a
    checkpoint that ``--resume`` continues from exactly.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, acc) -> bool:
        """True on every rank once any rank got the signal, so all ranks stop after the same step."""
        if acc.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=acc.device)
        return bool(acc.reduce(flag, "sum").item() > 0)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def weights_fingerprint(model) -> str:
    """sha256 over every parameter, to check that all ranks hold the same weights."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_ranks_agree(acc, model) -> list[str]:
    """Gathers every rank's weight fingerprint; raises if any two differ."""
    from accelerate.utils import gather_object

    prints = gather_object([weights_fingerprint(model)])
    if len(set(prints)) != 1:
        raise RuntimeError(f"ranks ended with different weights: {prints}")
    return prints
