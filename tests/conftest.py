"""Shared fixtures: the bundled task and one trained SFT + reward model per test run.

Everything is produced through the real `tribune` command line, once per run: `make test` runs
the suite in one pytest-xdist worker per core, and the workers share these artefacts (the first
to need one builds it under a file lock, the others wait and reuse it). Each worker gets its
share of the cores as its thread budget (OMP_NUM_THREADS, inherited by every command it runs):
on the suite's tiny models two single-threaded processes get more done than one with two threads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """Under pytest-xdist: each worker's thread budget is its share of the cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        from tribune.trainer.jobs import available_cores

        os.environ["OMP_NUM_THREADS"] = str(max(1, available_cores() // workers))
# the bundled task's gold judge, plugged in like any other (`--judge module:function`)
JUDGE = ("--judge", "tribune.trainer.task.judge:gold_score")
# the pipeline's lengths (tribune.trainer.pipeline.STAGE_DEFAULTS), so the session's models match the demo's
LENGTHS = ("--max-length", "64", "--max-prompt-length", "48")


def tribune(*args: str, check: bool = True, timeout: float = 900, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Runs the real console script (as `python -m tribune.trainer`) and returns the finished process."""
    proc = subprocess.run([sys.executable, "-m", "tribune.trainer", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"tribune {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# what `pip install .` needs of the repository (the images COPY the same)
SOURCE = ("pyproject.toml", "README.md", "constraints.txt", "protos", "services", "trainer")


def copy_source(dest: Path) -> Path:
    """The installable source in a fresh directory (a build writes build/ and *.egg-info beside it)."""
    import shutil

    dest.mkdir(parents=True)
    for name in SOURCE:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(REPO / name, dest / name)
    return dest


def last_json(stdout: str) -> dict:
    """The JSON object a command prints last."""
    start = stdout.rindex("\n{") + 1 if "\n{" in stdout else stdout.index("{")
    return json.loads(stdout[start:])


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(out)`` once per test run, also across pytest-xdist workers: the first worker to get
    here builds ``name`` under a file lock, the others wait for it and reuse it (tests never write
    into these artefacts). A build that fails leaves its error behind: the tests that need it elsewhere
    fail at once with it instead of building it again, each in turn."""
    import shutil

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "built-once"
    root.mkdir(parents=True, exist_ok=True)
    out, done, failed = root / name / name, root / f"{name}.done", root / f"{name}.failed"
    with FileLock(str(root / f"{name}.lock")):
        if failed.exists():
            raise RuntimeError(f"building the shared test artefact {name!r} failed earlier in this run:\n"
                               f"{failed.read_text()}")
        if not done.exists():
            shutil.rmtree(out.parent, ignore_errors=True)
            out.parent.mkdir()
            try:
                build(out)
            except Exception as e:
                failed.write_text(f"{type(e).__name__}: {e}"[:4000])
                raise
            done.touch()
    return out


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "task", lambda out: tribune("task", "make", out))


@pytest.fixture(scope="session")
def sft_dir(task_dir, tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "sft", lambda out: tribune(
        "sft", "--model", task_dir / "base", "--train", task_dir / "sft.jsonl", "--output", out,
        "--epochs", "3", "--learning-rate", "3e-3", *LENGTHS, *JUDGE))


@pytest.fixture(scope="session")
def rm_dir(task_dir, sft_dir, tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "rm", lambda out: tribune(
        "train-rm", "--model", sft_dir, "--train", task_dir / "prefs_train.jsonl",
        "--eval", task_dir / "prefs_eval.jsonl", "--output", out, "--epochs", "4", *LENGTHS, *JUDGE))


def with_other_token_ids(model_dir: Path, out: Path) -> Path:
    """A copy of ``model_dir`` whose tokenizer gives two words each other's ids: the same model, another
    tokenizer fingerprint."""
    import shutil

    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    tok = json.loads((out / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[3:5]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    return out


def make_ensemble(rm_dir: Path, out: Path, k: int = 3) -> Path:
    """An ensemble directory in train-rm's layout (ensemble.json, member-i/, the shared tokenizer),
    from one trained reward model: member i > 0 has every weight perturbed and its head rescaled,
    so the members differ in scale and opinion; its reward_stats.json is moved by the scale and
    an offset (plausible, not measured).
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    names = [f"member-{i}" for i in range(k)]
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(names):
        member = out / name
        shutil.copytree(rm_dir, member, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
        weights = load_file(member / "model.safetensors")
        scale = 1.0 + 0.5 * i
        if i > 0:
            for name, w in weights.items():
                noise = (0.3 if name == "score.weight" else 0.02) * w.std() * torch.randn(w.shape, generator=g)
                weights[name] = ((scale if name == "score.weight" else 1.0) * w + noise).contiguous()
        save_file(weights, member / "model.safetensors", metadata={"format": "pt"})
        stats = json.loads((member / "reward_stats.json").read_text())
        stats.update(mean=stats["mean"] * scale + 0.25 * i, std=stats["std"] * scale)
        (member / "reward_stats.json").write_text(json.dumps(stats))
    for f in rm_dir.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    shutil.copy(rm_dir / "metrics.json", out / "metrics.json")
    (out / "ensemble.json").write_text(json.dumps({"ensemble_size": k, "members": names}))
    return out


@pytest.fixture(scope="session")
def ensemble_rm_dir(rm_dir, tmp_path_factory) -> Path:
    """Three reward models in train-rm --ensemble's layout, made from the session's one."""
    return built_once(tmp_path_factory, "ensemble", lambda out: make_ensemble(rm_dir, out, k=3))


@pytest.fixture(scope="session")
def repo_dir(rm_dir, sft_dir, tmp_path_factory) -> Path:
    """An exported model repository with a small max batch size, so batches get split."""
    return built_once(tmp_path_factory, "repo", lambda out: tribune(
        "export", "--reward", rm_dir, "--reference", sft_dir, "--output", out, "--max-batch-size", "8"))


@pytest.fixture(scope="session")
def served(repo_dir):
    """`tribune serve` on free ports for the whole session; stopped (SIGTERM) at the end. It runs
    with `import torch` failing, as the serve image ships no torch: every test against it shows
    that serving needs none."""
    import sys

    from tests.servers import WITHOUT_TORCH, start_serve

    server = start_serve(repo_dir, command=[sys.executable, "-c", WITHOUT_TORCH])
    yield server
    assert server.stop() == 0, "".join(server.lines)[-3000:]
