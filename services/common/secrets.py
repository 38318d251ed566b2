"""Secrets (bearer tokens) from a flag, a file or the environment; never in any output.

A flag is visible to every user of the machine in ``ps``; a file (a mounted Kubernetes
Secret) or an environment variable is not. Config fields that hold a secret are declared
``secret=True`` and ``to_dict`` redacts them, so ``config.resolved.json``, the trackers'
hyper-parameters and the logs never carry one. Tokens are compared in constant time.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

from tribune.services.common.errors import UserError


def resolve_secret(value: str | None, path: Path | None, env: str) -> str | None:
    """The secret from ``value`` (a flag), else the file ``path``, else ``$env``; None when none is set."""
    if value:
        return value
    if path is not None:
        try:
            text = Path(path).read_text().strip()
        except OSError as e:
            raise UserError(f"cannot read the token file {path}: {e.strerror}") from None
        if not text:
            raise UserError(f"the token file {path} is empty")
        return text
    return os.environ.get(env, "").strip() or None


def same_secret(sent: str | None, expected: str) -> bool:
    """Whether ``sent`` equals ``expected``, in time independent of where they differ."""
    return sent is not None and hmac.compare_digest(sent.encode(), expected.encode())
