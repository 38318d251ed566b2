"""Shared fixtures: the bundled task and one trained SFT + reward model per test session.

Everything is produced through the real `tribune` command line, once per session.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the bundled task's gold judge, plugged in like any other (`--judge module:function`)
JUDGE = ("--judge", "trainer.task.judge:gold_score")


def tribune(*args: str, check: bool = True, timeout: float = 900, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Runs the real console script (as `python -m trainer`) and returns the finished process."""
    proc = subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"tribune {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def last_json(stdout: str) -> dict:
    """The JSON object a command prints last."""
    start = stdout.rindex("\n{") + 1 if "\n{" in stdout else stdout.index("{")
    return json.loads(stdout[start:])


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("task") / "task"
    tribune("task", "make", out)
    return out


@pytest.fixture(scope="session")
def sft_dir(task_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "sft"
    tribune("sft", "--model", task_dir / "base", "--train", task_dir / "sft.jsonl", "--output", out,
            "--epochs", "3", "--learning-rate", "3e-3", *JUDGE)
    return out


@pytest.fixture(scope="session")
def rm_dir(task_dir, sft_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "rm"
    tribune("train-rm", "--model", sft_dir, "--train", task_dir / "prefs_train.jsonl",
            "--eval", task_dir / "prefs_eval.jsonl", "--output", out, "--epochs", "4", *JUDGE)
    return out


@pytest.fixture(scope="session")
def repo_dir(rm_dir, sft_dir, tmp_path_factory) -> Path:
    """An exported model repository with a small max batch size, so batches get split."""
    out = tmp_path_factory.mktemp("repo") / "repo"
    tribune("export", "--reward", rm_dir, "--reference", sft_dir, "--output", out, "--max-batch-size", "8")
    return out


@pytest.fixture(scope="session")
def served(repo_dir):
    """`tribune serve` on free ports for the whole session; stopped (SIGTERM) at the end."""
    from tests.servers import start_serve

    server = start_serve(repo_dir)
    yield server
    assert server.stop() == 0, "".join(server.lines)[-3000:]
