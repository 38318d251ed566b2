"""Independent jobs in worker processes that share the machine's cores.

`tribune evaluate` runs its suite tasks this way. On the suite's tiny models a second core
speeds one process up by only about 1.3× (torch's intra-op threads have little to split),
while two single-threaded processes on two cores each run at full speed: two jobs at once
take about two thirds of the time of one after the other (measured: 150 reward-model steps,
23 s with 2 threads; 30 s with 1 thread, alone or two at once).

Each job gets an equal share of the cores: torch's threads in the worker, and, through
``OMP_NUM_THREADS``, the `tribune serve` it starts (ONNX Runtime's threads). Its console output
(records, progress bars, the services' lines) goes to its own log file, since several jobs'
lines would interleave on one terminal. Workers are spawned, not forked: torch's thread
pools and gRPC's threads do not survive a fork.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("tribune")


def available_cores() -> int:
    """The cores this process may use: its affinity mask (e.g. a container's CPU set), capped by
    ``$OMP_NUM_THREADS`` when that is set (a thread budget given from outside, e.g. by a test runner)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:          # not on Linux
        cores = os.cpu_count() or 1
    budget = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(budget))) if budget.isdigit() and int(budget) > 0 else cores


def resolve_jobs(requested: int, pending: int) -> int:
    """How many jobs run at once: ``requested``, or with 0 one per core but no more than ``pending``.
    1 means in the calling process, one after the other; more, in ``min(jobs, pending)`` workers."""
    return requested or max(1, min(available_cores(), pending))


@dataclass(frozen=True)
class Job:
    """One call ``fn(*args)`` in a worker; ``fn`` must be importable (a module-level function)."""
    name: str
    fn: Callable[..., Any]
    args: tuple
    log: Path           # the job's console output


def _run_job(job: Job, threads: int, verbose: bool) -> Any:
    """In the worker: take the core share, send the console to the job's log, run it."""
    import torch

    from tribune.services.common.console import setup_console

    os.environ["OMP_NUM_THREADS"] = str(threads)       # inherited by the services the job starts
    torch.set_num_threads(threads)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with job.log.open("a", encoding="utf-8") as f:      # file descriptors, so child processes write there too
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    setup_console(verbose)
    return job.fn(*job.args)


class JobPool:
    """At most ``workers`` jobs at once, each in a spawned process with ``cores // workers`` threads.

    ``submit`` starts a job when a worker is free and otherwise queues it; ``completed`` yields
    (job, result) as each finishes, including jobs submitted while iterating (a job that needs
    another's output is submitted once that one is done). A finished job's worker goes to the
    jobs submitted while its result is handled first, then to the queue: ``submit(job,
    first=True)`` puts a job ahead of the queued ones (the longest job, once it can start, so
    that it does not end the run alone). A job that raises re-raises here, after the queued
    jobs are dropped and the running ones have ended.
    """

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.threads = max(1, available_cores() // self.workers)
        self._verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        self._running: dict[Future, Job] = {}
        self._order: dict[Future, int] = {}   # start order
        self._started: dict[Future, float] = {}
        self._queued: list[Job] = []          # submitted while every worker was busy, in the order they start

    def __enter__(self) -> "JobPool":
        return self

    def __exit__(self, *exc) -> None:
        self._queued.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: Job, first: bool = False) -> None:
        if len(self._running) < self.workers:
            self._start(job)
            return
        self._queued.insert(0, job) if first else self._queued.append(job)
        log.info("%s: queued until a worker is free; its output will be in %s", job.name, job.log)

    def _start(self, job: Job) -> None:
        future = self._pool.submit(_run_job, job, self.threads, self._verbose)
        self._running[future] = job
        self._order[future] = len(self._order)
        self._started[future] = time.perf_counter()
        log.info("%s: started in a worker process (%d thread%s); its output: %s", job.name, self.threads,
                 "s" if self.threads > 1 else "", job.log)

    def completed(self) -> Iterator[tuple[Job, Any]]:
        while self._running:
            done, _ = wait(list(self._running), return_when=FIRST_COMPLETED)
            # in the order they started: two that end between two looks come back in that order
            for future in sorted(done, key=self._order.__getitem__):
                job = self._running.pop(future)
                seconds = time.perf_counter() - self._started.pop(future)
                try:
                    result = future.result()
                except BaseException:
                    log.error("%s: failed; its output: %s", job.name, job.log)
                    self._queued.clear()
                    raise
                log.info("%s: done in %.0f s", job.name, seconds)
                yield job, result           # what the caller submits now takes the free worker
                while self._queued and len(self._running) < self.workers:
                    self._start(self._queued.pop(0))
