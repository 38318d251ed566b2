"""Jobs in spawned worker processes (what `tribune evaluate` runs its tasks as): each gets its share
of the cores (torch's threads and OMP_NUM_THREADS for the processes it starts), its console output
in its own log file, jobs can be submitted as others finish, and a failure comes back as the error."""
import os
import subprocess
import sys

import pytest

from tribune.trainer import jobs
from tribune.trainer.jobs import Job, JobPool, resolve_jobs


def report(tag: str) -> dict:
    """A job: says where it runs and what thread budget it has, and starts a child process."""
    import torch

    print(f"{tag} on stdout", flush=True)
    print(f"{tag} on stderr", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-c", "import os, sys; print('child sees', os.environ['OMP_NUM_THREADS'], "
                                          "file=sys.stderr)"], check=True)
    return {"threads": torch.get_num_threads(), "omp": os.environ["OMP_NUM_THREADS"], "pid": os.getpid()}


def fail(message: str) -> None:
    raise ValueError(message)


def test_jobs_run_in_workers_with_a_share_of_the_cores_and_their_output_in_their_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "available_cores", lambda: 4)
    with JobPool(2) as pool:
        assert pool.threads == 2
        for name in ("a", "b"):
            pool.submit(Job(name, report, (name,), tmp_path / name / "job.log"))
        results = {}
        for job, result in pool.completed():
            results[job.name] = result
            if job.name == "a":          # a job that needs another's output, submitted once that one is done
                pool.submit(Job("after-a", report, ("after-a",), tmp_path / "after-a.log"))
    assert set(results) == {"a", "b", "after-a"}          # the one submitted while iterating too
    for name, r in results.items():
        assert r["threads"] == 2 and r["omp"] == "2" and r["pid"] != os.getpid()
    text = (tmp_path / "a" / "job.log").read_text()
    assert "a on stdout" in text and "a on stderr" in text and "child sees 2" in text
    assert "b on stdout" not in text


def test_the_console_says_when_a_queued_job_gets_its_worker(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="tribune"), JobPool(1) as pool:
        for name in ("first", "second"):
            pool.submit(Job(name, report, (name,), tmp_path / f"{name}.log"))
        assert [job.name for job, _ in pool.completed()] == ["first", "second"]
    lines = [r.getMessage().split(";")[0] for r in caplog.records]
    assert len(lines) == 5 and lines[1] == "second: queued until a worker is free"
    assert [line.split(":")[0] + ":" + line.split(":")[1][:8] for line in (lines[0], lines[2], lines[3], lines[4])] == [
        "first: started", "first: done in", "second: started", "second: done in"]


def test_a_job_submitted_first_while_a_result_is_handled_takes_the_free_worker_before_the_queue(tmp_path, caplog):
    """The study's runs can start only once their task is done; they go ahead of the tasks still queued."""
    import logging

    with caplog.at_level(logging.INFO, logger="tribune"), JobPool(1) as pool:
        for name in ("task-a", "task-b", "task-c"):
            pool.submit(Job(name, report, (name,), tmp_path / f"{name}.log"))
        order = []
        for job, _ in pool.completed():
            order.append(job.name)
            if job.name == "task-a":
                pool.submit(Job("long", report, ("long",), tmp_path / "long.log"))          # the free worker
                pool.submit(Job("after-long", report, ("after-long",), tmp_path / "x.log"), first=True)
    assert order == ["task-a", "long", "after-long", "task-b", "task-c"]
    started = [r.getMessage().split(":")[0] for r in caplog.records if ": started in a worker" in r.getMessage()]
    assert started == order


def test_a_failing_job_is_raised_with_its_own_error(tmp_path):
    with pytest.raises(ValueError, match="the task broke"):
        with JobPool(2) as pool:
            pool.submit(Job("bad", fail, ("the task broke",), tmp_path / "bad.log"))
            pool.submit(Job("good", report, ("good",), tmp_path / "good.log"))
            for _ in pool.completed():
                pass


def test_the_cores_are_the_affinity_mask_capped_by_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert jobs.available_cores() == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert jobs.available_cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores + 8))
    assert jobs.available_cores() == cores


def test_jobs_default_to_one_per_core_but_no_more_than_there_are(monkeypatch):
    monkeypatch.setattr(jobs, "available_cores", lambda: 2)
    assert resolve_jobs(0, 6) == 2 and resolve_jobs(0, 1) == 1 and resolve_jobs(3, 1) == 3
    monkeypatch.setattr(jobs, "available_cores", lambda: 16)
    assert resolve_jobs(0, 6) == 6
    with JobPool(6) as pool:
        assert pool.threads == 2
