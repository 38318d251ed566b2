"""What every training stage shares: accelerate set-up, deterministic sharded batches,
periodic atomic checkpoints with ``--resume``, progress bars, JSONL + TensorBoard logs.

Batches are drawn from a seeded permutation per epoch, so the data position is a pure
function of the optimiser step: resuming from step N replays nothing and skips nothing,
and every rank of ``accelerate launch --num_processes K`` takes a disjoint slice of the
same global batch.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from trainer.config import field, to_dict
from trainer.errors import UserError

log = logging.getLogger("tribune")


@dataclass(kw_only=True)
class TrainingConfig:
    """Fields every training stage has."""
    output: Path = field(help="directory for the trained model, metrics.json, logs and checkpoints")
    seed: int = field(0, help="seed for data order, initialisation and sampling")
    max_steps: int | None = field(None, help="cap on optimiser steps (default: run all epochs)")
    epochs: float = field(1.0, help="passes over the training data")
    batch_size: int = field(32, help="examples per optimiser step, summed over processes")
    learning_rate: float = field(1e-3, help="peak learning rate of AdamW")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_ratio: float = field(0.05, help="share of steps with linear warm-up")
    max_grad_norm: float = field(1.0, help="gradient clipping norm")
    dropout: bool = field(False, help="keep the model's dropout on (off by default)")
    log_every: int = field(10, help="log metrics every N steps")
    eval_every: int | None = field(None, help="evaluate every N steps (default: only at the end)")
    checkpoint_every: int = field(100, help="save a resumable checkpoint every N steps")
    keep_checkpoints: int = field(2, help="how many recent checkpoints to keep")
    resume: bool = field(False, help="continue from the newest checkpoint in --output")

    def __post_init__(self) -> None:
        positive = ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if self.epochs <= 0:
            raise ValueError("epochs must be positive")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(seed: int, output: Path, model_dir: Path):
    """What every stage does first: accelerator, seeds, output directory, tokenizer."""
    from trainer.modeling import load_tokenizer

    acc = make_accelerator()
    seed_everything(seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    return acc, out, load_tokenizer(model_dir)


def make_accelerator():
    """One Accelerator per run. Without CUDA, ranks started by a launcher (torchrun or
    ``accelerate launch --multi_gpu --num_processes N``) join one gloo process group on CPU."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


# ---------------------------------------------------------------- batches

def global_batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimiser step ``step`` (0-based); epochs are seeded permutations."""
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    chunk = perm[offset * batch_size:(offset + 1) * batch_size]
    return chunk if chunk else perm[:batch_size]


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's slice of a global batch (contiguous, sizes differ by at most one)."""
    n = len(indices)
    lo, hi = rank * n // world, (rank + 1) * n // world
    return list(indices[lo:hi])


def total_steps(n_examples: int, cfg: TrainingConfig) -> int:
    steps = math.ceil(cfg.epochs * max(n_examples // cfg.batch_size, 1))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


# ---------------------------------------------------------------- logs

class MetricsLog:
    """metrics.jsonl (one object per logged step) and TensorBoard, on the main process."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: a reader never sees half a file."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- checkpoints

def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    root = checkpoint_dir(out)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file() and not p.name.endswith(".tmp")]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(acc, out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """accelerate's full state (model, optimiser, scheduler, RNGs) + our own, atomically.

    Written to ``step-N.tmp`` and renamed only when complete, so a crash mid-save leaves
    the previous checkpoint as the newest complete one.
    """
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
        os.replace(tmp, final)
        old = sorted((p for p in root.glob("step-*") if not p.name.endswith(".tmp")),
                     key=lambda p: int(p.name.split("-")[1]))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(acc, out: Path) -> tuple[int, dict[str, Any]]:
    """Restores the newest checkpoint; returns (step, our state). (0, {}) when none."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", checkpoint_dir(out))
        return 0, {}
    acc.load_state(str(ckpt))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    log.info("resumed from %s (step %d)", ckpt, state["step"])
    return int(state.pop("step")), state


# ---------------------------------------------------------------- the loop

class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop checkpoints after the current step and stops.

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


def run_training(acc, cfg: TrainingConfig, model, n_examples: int,
                 loss_on: Callable[[Any, list[int]], tuple[torch.Tensor, dict[str, float]]],
                 evaluate: Callable[[Any], dict[str, float]], desc: str):
    """Runs optimiser steps until the budget; returns (trained module, final eval metrics).

    ``loss_on(module, indices)`` computes this rank's loss on its examples of the global
    batch, calling the prepared (possibly DDP-wrapped) module so gradients are averaged
    across ranks; ``evaluate(module)`` gets the unwrapped module.
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    out = Path(cfg.output)
    steps = total_steps(n_examples, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps),
                              num_training_steps=steps)
    # every rank runs every global step, so the scheduler must step once per step: accelerate's
    # wrapper would step it once per process; it is registered for checkpoints instead
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)
    start = 0
    if cfg.resume:
        start, _ = load_checkpoint(acc, out)
    metrics_log = MetricsLog(out, acc.is_main_process)
    if acc.is_main_process:
        truncate_log(metrics_log.path, start)
    if acc.is_main_process:
        write_json(out / "config.resolved.json", to_dict(cfg))
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not acc.is_main_process, dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    with StopRequested() as stop:
        _steps(acc, cfg, model, optimizer, scheduler, n_examples, loss_on, evaluate, metrics_log, bar,
               start, steps, t0, stop)
    bar.close()
    model.eval()
    final = evaluate(acc.unwrap_model(model))
    metrics_log.write(steps, final)
    metrics_log.close()
    acc.wait_for_everyone()
    return acc.unwrap_model(model), final


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log rows past the checkpoint so no step appears twice."""
    if not path.exists():
        return
    rows = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


def _steps(acc, cfg, model, optimizer, scheduler, n_examples, loss_on, evaluate, metrics_log, bar,
           start, steps, t0, stop) -> None:
    out = Path(cfg.output)
    for step in range(start, steps):
        idx = shard(global_batch_indices(n_examples, cfg.batch_size, step, cfg.seed), acc.process_index,
                    acc.num_processes)
        loss, stats = loss_on(model, idx)
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            row = {"train/loss": float(acc.reduce(loss.detach(), "mean")), "train/grad_norm": float(grad_norm),
                   "train/lr": scheduler.get_last_lr()[0], "time/elapsed_s": time.perf_counter() - t0,
                   **{f"train/{k}": v for k, v in stats.items()}}
            bar.set_postfix(loss=f"{row['train/loss']:.4f}")
            metrics_log.write(done, row)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != steps:
            model.eval()
            metrics_log.write(done, evaluate(acc.unwrap_model(model)))
            model.train()
        if done % cfg.checkpoint_every == 0 and done != steps:
            save_checkpoint(acc, out, done, {}, cfg.keep_checkpoints)
        if done != steps and stop.agreed(acc):
            path = save_checkpoint(acc, out, done, {}, cfg.keep_checkpoints)
            bar.close()
            raise UserError(f"stopped by a signal after step {done}/{steps}; checkpoint {path}; "
                            "run the same command with --resume to continue")


def save_final(acc, model, tokenizer, out: Path, metrics: dict[str, float]) -> None:
    """save_pretrained (model + tokenizer) and metrics.json, from the main process."""
    metrics = {**metrics, "rank_weight_sha256": check_ranks_agree(acc, model)}
    if acc.is_main_process:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        write_json(Path(out) / "metrics.json", metrics)
    acc.wait_for_everyone()
