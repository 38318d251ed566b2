"""Experiment trackers through accelerate (``--report-to``), next to ``metrics.jsonl``.

``--report-to tensorboard,wandb`` (any of ``TRACKERS``, comma-separated, or ``none``) becomes
``Accelerator(log_with=...)``; the run's config (secrets redacted) is each tracker's
hyper-parameters. TensorBoard writes to ``OUTPUT/tensorboard`` as before; wandb, MLflow and
Trackio take their usual environment (``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, …), with
the project ``tribune`` and the stage as the run name. Tracker names follow the Hugging Face
Trainer's (``eval_loss`` → ``eval/loss``) so TRL dashboards carry over; ``metrics.jsonl``
keeps every row's own keys.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tribune.services.common.errors import UserError

# --report-to name → the package it needs (its import name) and how to install it
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
PROJECT = "tribune"


def parse_report_to(value: str) -> list[str]:
    """``"tensorboard,wandb"`` → ["tensorboard", "wandb"]; ``"none"`` → []. Unknown names raise ValueError."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if not names or unknown:
        raise ValueError(f"report_to: {', '.join(unknown) or 'nothing'} is not one of "
                         f"{', '.join(TRACKERS)} or none (comma-separated)")
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    """A clear error, before anything runs, for a chosen tracker whose package is missing."""
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--report-to {name} needs the {package!r} package (pip install {package}), "
                            f"or choose another tracker (--report-to none keeps only metrics.jsonl)")


def log_with(names: list[str], out: Path) -> list[Any]:
    """``Accelerator(log_with=...)``: TensorBoard as a tracker object writing to OUTPUT/tensorboard,
    the others by name (accelerate builds them in ``init_trackers``)."""
    trackers: list[Any] = []
    for name in names:
        if name == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            trackers.append(TensorBoardTracker("tensorboard", str(out)))
        else:
            trackers.append(name)
    return trackers


def init_kwargs(desc: str, out: Path) -> dict[str, dict[str, Any]]:
    """Per-tracker arguments: the stage as the run's name."""
    return {"wandb": {"name": desc, "dir": str(out)}, "mlflow": {"run_name": desc},
            "trackio": {"name": desc}}


def hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict (from ``to_dict``, secrets already redacted) flattened to the scalar
    values trackers accept: ``optim/learning_rate``; lists and None as text."""
    flat: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat.update(hparams(v, f"{prefix}{k}/"))
        elif isinstance(v, (bool, int, float, str)):
            flat[prefix + k] = v
        else:
            flat[prefix + k] = str(v)
    return flat


def tracker_name(key: str) -> str:
    """The Hugging Face Trainer's names in trackers: ``eval_loss`` → ``eval/loss``; others unchanged."""
    return "eval/" + key[len("eval_"):] if key.startswith("eval_") else key


def tracker_row(row: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics row, under their tracker names."""
    return {tracker_name(k): float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
