"""The run skeleton every training stage uses: SFT, reward-model training and PPO.

A ``Run`` owns what every stage does alike: accelerate set-up, seeds, the output
directory and tokenizer, ``--resume`` from the newest checkpoint, ``config.resolved.json``,
``metrics.jsonl`` + the ``--report-to`` trackers (TensorBoard by default), the log file
``tribune.log`` (every record, the libraries' too), the progress bar, periodic and signal
checkpoints, and the final ``save_pretrained`` + ``metrics.json`` with the ranks' weight check. A stage supplies
one function per step (``Run.loop``); ``train_supervised`` is that function for the two
stages that minimise a loss over a data set.

Batches are drawn from a seeded permutation per epoch, so the data position is a pure
function of the optimiser step: resuming from step N replays nothing and skips nothing,
and every rank of ``accelerate launch --num_processes K`` takes a disjoint slice of the
same global batch.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from tribune.services.common.config import field, group, to_dict
from tribune.services.common.console import log_to_file
from tribune.services.common.errors import UserError
from tribune.services.common.jsonl import write_json
from tribune.services.common.text import load_tokenizer
from tribune.trainer.adapters import MemoryConfig, check_precision, plain_model
from tribune.trainer.checkpoints import (StopRequested, check_ranks_agree, checkpoint_dir, drop_tied_aliases,
                                         latest_checkpoint, load_checkpoint, save_checkpoint)
from tribune.trainer.tracking import PROJECT, check_installed, hparams, init_kwargs, log_with, parse_report_to, tracker_row

log = logging.getLogger("tribune")
LOG_FILE = "tribune.log"


def default(cls: type, name: str, value: Any) -> Any:
    """Field ``name`` of config ``cls`` with another default and the same help, for a subclass."""
    f = cls.__dataclass_fields__[name]
    return field(value, help=f.metadata["help"], secret=f.metadata.get("secret", False))


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule."""
    learning_rate: float = field(1e-3, help="peak learning rate of AdamW")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    adam_eps: float = field(1e-8, help="AdamW epsilon")
    warmup_ratio: float = field(0.05, help="share of optimiser steps with linear warm-up")
    lr_scheduler: Literal["cosine", "linear", "constant"] = field("cosine", help="learning-rate schedule after warm-up")
    max_grad_norm: float = field(1.0, help="gradient clipping norm (per model)")

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.weight_decay < 0 or self.adam_eps <= 0 or self.max_grad_norm <= 0:
            raise ValueError("weight_decay must be >= 0, adam_eps and max_grad_norm positive")

    def build(self, params, total_steps: int, learning_rate: float | None = None):
        """(AdamW, scheduler) for ``total_steps`` optimiser steps."""
        from transformers import get_scheduler

        lr = self.learning_rate if learning_rate is None else learning_rate
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay, eps=self.adam_eps)
        name = "constant_with_warmup" if self.lr_scheduler == "constant" else self.lr_scheduler
        sched = get_scheduler(name, opt, num_warmup_steps=int(self.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
        return opt, sched


@dataclass(kw_only=True)
class RunConfig:
    """Fields every run has."""
    output: Path = field(help="directory for the trained model, metrics.json, logs and checkpoints")
    seed: int = field(0, help="seed for data order, initialisation and sampling")
    max_steps: int | None = field(None, help="cap on optimiser steps (ppo: on PPO iterations)")
    log_every: int = field(10, help="log metrics every N steps")
    checkpoint_every: int = field(100, help="save a resumable checkpoint every N steps")
    keep_checkpoints: int = field(2, help="how many recent checkpoints to keep")
    resume: bool = field(False, help="continue from the newest checkpoint in --output")
    report_to: str = field("tensorboard", help="experiment trackers, comma-separated: tensorboard, wandb, mlflow, "
                           "trackio, or none (metrics.jsonl is always written)")
    memory: MemoryConfig = group(MemoryConfig(), help="mixed precision, gradient checkpointing and LoRA")

    def __post_init__(self) -> None:
        for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        parse_report_to(self.report_to)

    @property
    def trackers(self) -> list[str]:
        return parse_report_to(self.report_to)


@dataclass(kw_only=True)
class TrainingConfig(RunConfig):
    """Fields of the stages that minimise a loss over a data set (SFT, reward model)."""
    epochs: float = field(1.0, help="passes over the training data")
    batch_size: int = field(32, help="examples per optimiser step, summed over processes")
    optim: OptimizerConfig = group(OptimizerConfig(), help="optimiser")
    dropout: bool = field(False, help="keep the model's dropout on (off by default)")
    eval_every: int | None = field(None, help="evaluate every N steps (default: --evals-per-epoch, else only at the end)")
    evals_per_epoch: float = field(0.0, help="evaluations per epoch when --eval-every is not given (0: only at the end)")
    keep_best: bool = field(False, help="end with the weights of the evaluation with the lowest eval_loss")
    early_stopping_patience: int | None = field(
        None, help="stop after this many evaluations without a lower eval_loss (none: never)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.epochs <= 0:
            raise ValueError("epochs must be positive")
        if self.evals_per_epoch < 0 or (self.eval_every is not None and self.eval_every < 1):
            raise ValueError("evals_per_epoch must be >= 0 and eval_every >= 1")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError("early_stopping_patience must be at least 1")

    def steps_per_epoch(self, n_examples: int) -> int:
        return max(n_examples // self.batch_size, 1)

    def total_steps(self, n_examples: int) -> int:
        steps = math.ceil(self.epochs * self.steps_per_epoch(n_examples))
        return min(steps, self.max_steps) if self.max_steps else steps

    def evaluation_interval(self, n_examples: int) -> int | None:
        """Steps between evaluations (None: only at the end), derived in this one place."""
        if self.eval_every:
            return self.eval_every
        if self.evals_per_epoch > 0:
            return max(1, round(self.steps_per_epoch(n_examples) / self.evals_per_epoch))
        return None


class StopTraining(Exception):
    """Raised by a step function to end the run early and cleanly (e.g. early stopping);
    ``row`` holds the metrics of the step that stopped it, logged like any other."""

    def __init__(self, reason: str, row: dict[str, Any] | None = None):
        super().__init__(reason)
        self.row = row or {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(mixed_precision: str | None = None, log_with: list | None = None):
    """One Accelerator per run. Without CUDA, ranks started by a launcher (torchrun or
    ``accelerate launch --multi_gpu --num_processes N``) join one gloo process group on CPU.
    ``mixed_precision`` None keeps accelerate's own setting (its launcher's flag or config).
    Checkpoints store tied weights once (see ``drop_tied_aliases``)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    check_precision(mixed_precision, cuda)
    acc = Accelerator(cpu=not cuda, mixed_precision=mixed_precision, log_with=log_with or None)
    acc.register_save_state_pre_hook(drop_tied_aliases)
    return acc


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


# ---------------------------------------------------------------- logs

class MetricsLog:
    """metrics.jsonl (one object per logged step), on the main process."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"

    def truncate(self, step: int) -> None:
        """Keeps the rows up to ``step``: on resume the checkpoint's, so no step appears twice; -1 keeps none."""
        if not (self.enabled and self.path.exists()):
            return
        rows = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        self.path.write_text("".join(r + "\n" for r in rows))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


# ---------------------------------------------------------------- the skeleton

class Run:
    """One training run; see the module docstring. ``unit`` names a step in messages."""

    def __init__(self, cfg: RunConfig, model_dir: Path, desc: str, unit: str = "step"):
        self.cfg, self.desc, self.unit = cfg, desc, unit
        self.out = Path(cfg.output)
        check_installed(cfg.trackers)
        self.acc = make_accelerator(cfg.memory.mixed_precision, log_with(cfg.trackers, self.out))
        seed_everything(cfg.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            log_to_file(self.out / LOG_FILE)
        self.tokenizer = load_tokenizer(model_dir)
        self.start = 0
        self.metrics_log: MetricsLog | None = None
        self._replace_checkpoints = False      # a fresh run's first checkpoint replaces an earlier run's

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def begin(self) -> dict[str, Any]:
        """Call after ``acc.prepare``: resumes (with --resume) and opens the logs; returns the stage's state."""
        state: dict[str, Any] = {}
        if self.cfg.resume:
            self.start, state = load_checkpoint(self.acc, self.out)
        else:
            earlier = latest_checkpoint(self.out)
            if earlier is not None and self.is_main:
                # an interrupted run's (no metrics.json after its newest checkpoint) is worth a warning: the user
                # may have meant --resume; a finished run's are replaced as its outputs are
                done = self.out / "metrics.json"
                finished = done.is_file() and done.stat().st_mtime >= earlier.stat().st_mtime
                (log.info if finished else log.warning)(
                    "%s holds an earlier%s run's checkpoints (newest %s); this fresh run replaces them at its first "
                    "checkpoint%s", checkpoint_dir(self.out), "" if finished else ", unfinished", earlier.name,
                    "" if finished else ": stop now and run with --resume to continue that run instead")
            self._replace_checkpoints = earlier is not None
        self.metrics_log = MetricsLog(self.out, self.is_main)
        if self.is_main:     # a run that starts at step 0 (fresh, or no checkpoint yet) starts its metrics afresh
            self.metrics_log.truncate(self.start or -1)
            write_json(self.out / "config.resolved.json", to_dict(self.cfg))
        if self.cfg.trackers:
            self.acc.init_trackers(PROJECT, config=hparams(to_dict(self.cfg)),
                                   init_kwargs=init_kwargs(self.desc, self.out))
        return state

    def _save(self, step: int, state: dict[str, Any]) -> Path:
        path = save_checkpoint(self.acc, self.out, step, state, self.cfg.keep_checkpoints,
                               replace_others=self._replace_checkpoints)
        self._replace_checkpoints = False
        return path

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.metrics_log.write(step, row)
        if self.cfg.trackers:
            self.acc.log(tracker_row(row), step=step)

    def due(self, done: int, total: int, every: int | None) -> bool:
        """Whether something that runs every ``every`` steps (and at the end) runs after step ``done``."""
        return bool(every) and (done % every == 0 or done == total)

    def loop(self, total: int, step: Callable[[int], dict[str, Any] | None], *,
             state: Callable[[], dict[str, Any]] = dict,
             postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None) -> dict[str, Any]:
        """Runs ``step(i)`` for i in [start, total); logs the rows it returns; checkpoints every
        --checkpoint-every steps and after a signal (then stops with a --resume hint).
        Returns the last value of every metric."""
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.start, desc=self.desc, disable=not self.is_main, dynamic_ncols=True)
        last: dict[str, Any] = {}
        try:
            with StopRequested() as stop:
                for i in range(self.start, total):
                    try:
                        row = step(i)
                    except StopTraining as why:
                        log.info("%s: stopping after %s %d/%d: %s", self.desc, self.unit, i + 1, total, why)
                        if why.row:
                            self.log(i + 1, why.row)
                            last.update(why.row)
                        last["stopped_early_at"] = i + 1
                        break
                    done = i + 1
                    if row:
                        self.log(done, row)
                        last.update(row)
                        if postfix:
                            bar.set_postfix(postfix(row))
                    bar.update(1)
                    if done % self.cfg.checkpoint_every == 0 and done != total:
                        self._save(done, state())
                    if done != total and stop.agreed(self.acc):
                        path = self._save(done, state())
                        raise UserError(f"stopped by a signal after {self.unit} {done}/{total}; checkpoint {path}; "
                                        "run the same command with --resume to continue")
        finally:
            bar.close()
        return last

    def finish(self, model, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """save_pretrained (model + tokenizer, and ``extra`` models in sub-directories) and
        metrics.json from the main process, after checking that every rank holds the same weights.
        LoRA adapters are merged first, so the saved models are plain weights."""
        metrics = {**metrics, "rank_weight_sha256": check_ranks_agree(self.acc, model)}
        model, extra = plain_model(model), {sub: plain_model(m) for sub, m in (extra or {}).items()}
        if self.is_main:
            model.save_pretrained(self.out)
            self.tokenizer.save_pretrained(self.out)
            for sub, m in extra.items():
                m.save_pretrained(self.out / sub)
            write_json(self.out / "metrics.json", metrics)
        self.acc.wait_for_everyone()
        if self.cfg.trackers:       # last: accelerate's end_training also destroys the process group
            self.acc.end_training()
        if self.is_main:
            log_to_file(None)
        return metrics


@dataclass
class BestWeights:
    """The weights of the evaluation with the lowest ``key`` so far, kept on disk (any model size)."""
    path: Path
    key: str = "eval_loss"
    value: float = math.inf
    step: int = 0
    since: int = 0           # evaluations since the best one

    def observe(self, acc, model, step: int, metrics: dict[str, float]) -> bool:
        """Records an evaluation; saves the weights when it is the best. True when it improved."""
        value = metrics.get(self.key)
        if value is None:
            return False
        if value < self.value:
            self.value, self.step, self.since = float(value), step, 0
            if acc.is_main_process:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), self.path.with_suffix(".tmp"))
                self.path.with_suffix(".tmp").replace(self.path)
            acc.wait_for_everyone()
            return True
        self.since += 1
        return False

    def restore(self, acc, model) -> None:
        acc.wait_for_everyone()
        model.load_state_dict(torch.load(self.path, map_location="cpu", weights_only=True))

    def state_dict(self) -> dict:
        return {"value": self.value, "step": self.step, "since": self.since}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.step, self.since = float(state["value"]), int(state["step"]), int(state["since"])


def train_supervised(run: Run, cfg: TrainingConfig, model, n_examples: int,
                     loss_on: Callable[[Any, list[int]], tuple[torch.Tensor, dict[str, float]]],
                     evaluate: Callable[[Any], dict[str, float]]):
    """Optimiser steps over a data set until the budget; returns (trained module, final eval metrics).

    ``loss_on(module, indices)`` computes this rank's loss on its examples of the global
    batch, calling the prepared (possibly DDP-wrapped) module so gradients are averaged
    across ranks; ``evaluate(module)`` gets the unwrapped module. With ``keep_best`` the
    run ends with the weights of the evaluation with the lowest eval_loss (model selection
    on held-out data), and ``early_stopping_patience`` evaluations without a better one stop it.
    """
    acc = run.acc
    steps = cfg.total_steps(n_examples)
    every = cfg.evaluation_interval(n_examples)
    optimizer, scheduler = cfg.optim.build(model.parameters(), steps)
    # every rank runs every global step, so the scheduler must step once per step: accelerate's
    # wrapper would step it once per process; it is registered for checkpoints instead
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)
    best = BestWeights(run.out / "checkpoints" / "best.pt")
    state = run.begin()
    if "best" in state:
        best.load_state_dict(state["best"])
    t0 = time.perf_counter()
    model.train()

    def step(i: int) -> dict[str, Any] | None:
        idx = shard(global_batch_indices(n_examples, cfg.batch_size, i, cfg.seed), acc.process_index,
                    acc.num_processes)
        loss, stats = loss_on(model, idx)
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        done, row = i + 1, {}
        if run.due(done, steps, cfg.log_every):
            # the Hugging Face Trainer's names (TRL's SFT and reward trainers log these)
            row = {"train/loss": float(acc.reduce(loss.detach(), "mean")), "train/grad_norm": float(grad_norm),
                   "train/learning_rate": scheduler.get_last_lr()[0],
                   "train/epoch": done / cfg.steps_per_epoch(n_examples), "time/elapsed_s": time.perf_counter() - t0,
                   **{f"train/{k}": v for k, v in stats.items()}}
        if every and done % every == 0 and done != steps:
            model.eval()
            metrics = evaluate(acc.unwrap_model(model))
            model.train()
            if cfg.keep_best or cfg.early_stopping_patience:
                best.observe(acc, acc.unwrap_model(model), done, metrics)
            row.update(metrics)
            if cfg.early_stopping_patience and best.since >= cfg.early_stopping_patience:
                raise StopTraining(f"{best.since} evaluations without a lower {best.key} "
                                   f"(best {best.value:.4f} at step {best.step})", row)
        return row

    last = run.loop(steps, step, state=lambda: {"best": best.state_dict()},
                    postfix=lambda r: {"loss": f"{r['train/loss']:.4f}"} if "train/loss" in r else {})
    model.eval()
    final = evaluate(acc.unwrap_model(model))
    if cfg.keep_best:
        ended = last.get("stopped_early_at", steps)
        if best.step and best.value < final.get(best.key, math.inf):
            best.restore(acc, acc.unwrap_model(model))
            final = evaluate(acc.unwrap_model(model))
            ended = best.step
            log.info("%s: kept the weights of step %d (%s %.4f)", run.desc, best.step, best.key, best.value)
            if best.step == every and "stopped_early_at" in last:
                # the model got worse on the held-out set from the first evaluation on: it learns
                # something, but not what the held-out set measures
                log.warning("%s: the held-out %s never improved after the first evaluation (step %d), so those "
                            "nearly untrained weights were kept: does the held-out set come from the distribution "
                            "the model trains on?", run.desc, best.key, best.step)
        final["best_step"] = ended
    if "stopped_early_at" in last:
        final["stopped_early_at"] = last["stopped_early_at"]
    run.log(steps, final)
    acc.wait_for_everyone()
    return acc.unwrap_model(model), final
