"""Dynamic batching with mixed lengths: 16 concurrent batch-1 clients vs the same requests sent one at a time.

    python bench/mixed_lengths.py --output bench/results

Every request is one row whose length is drawn from 16–64 tokens (what PPO ranks and
gateway replicas send). Triton's dynamic batcher merges only requests of equal shape, so
with exact lengths almost every request is its own execution. Measured on `tribune serve`
(the bundled recipe's model, untrained weights: the cost of a forward pass is the same):

* ``sequential``: one client, one request at a time (the client's default length buckets);
* ``concurrent_exact`` / ``concurrent_bucketed``: 16 clients at once (threads of this process),
  lengths sent exactly (``length_bucket`` 0) or padded up to multiples of 16 (the default);
* ``concurrent_bucketed_processes``: the same 16 clients, each its own process (as PPO ranks and
  gateway replicas are): on a machine with few cores their 16 interpreters compete with the
  server for the CPU;
* each of the concurrent runs also against ``--no-ragged-batching``, stock Triton's rule
  (equal shapes only), which is what production serving does.

The modes alternate for ``--rounds`` rounds and the medians are reported (the load of a
shared machine drifts). The server runs ``--instances`` ONNX Runtime sessions per model with
one thread each (a session's own thread pool only spins on a small shared machine).

Executions come from Triton's own metrics (requests / executions = mean batch); padding
overhead is the extra tokens the buckets add, over the real ones; CPU per request counts the
server's processes and the clients together (Linux /proc).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402


def executions(server, model: str) -> tuple[int, int]:
    """(requests, executions) Triton has counted for ``model`` so far, from its Prometheus metrics
    (the statistics API is restricted to PyTriton's own token)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()

    def counter(name: str) -> int:
        return sum(int(float(v)) for v in re.findall(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M))

    return counter("nv_inference_request_success"), counter("nv_inference_exec_count")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and all its descendants, from /proc (Linux): the
    server's Python, tritonserver and the Python-backend stubs."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _client_process(url: str, fp: str, bucket: int, share: list[np.ndarray], barrier, results) -> None:
    """One client in its own process (as PPO ranks and gateway replicas are): connect and warm up,
    wait for the others, score its share one row at a time; report its CPU seconds."""
    from tribune.services.client import ClientConfig, TritonScorer
    from tribune.services.contract import REWARD_MODEL

    s = TritonScorer(ClientConfig(url=url, max_in_flight=1, length_bucket=bucket), fp, models=(REWARD_MODEL,))
    s.score(share[0][None], np.ones((1, share[0].size), np.int64))        # warm the connection (not timed)
    barrier.wait()
    cpu0 = time.process_time()
    for row in share:
        s.score(row[None], np.ones((1, row.size), np.int64))
    results.put(time.process_time() - cpu0)
    s.close()


def run(server, fp: str, rows: list[np.ndarray], clients: int, bucket: int, processes: bool = False) -> dict:
    """Scores every row (batch 1) with ``clients`` concurrent clients (threads of this process, or
    ``processes``: one process each); req/s and Triton's executions."""
    import multiprocessing as mp

    from tribune.services.client import ClientConfig, TritonScorer
    from tribune.services.contract import REWARD_MODEL

    shares = [rows[k::clients] for k in range(clients)]
    if processes:
        ctx = mp.get_context("spawn")                   # never fork a process that holds gRPC channels
        barrier, results = ctx.Barrier(clients + 1), ctx.Queue()
        workers = [ctx.Process(target=_client_process, args=(server.url, fp, bucket, share, barrier, results))
                   for share in shares]
        for w in workers:
            w.start()
    else:
        cfg = ClientConfig(url=server.url, max_in_flight=1, length_bucket=bucket)
        scorers = [TritonScorer(cfg, fp, models=(REWARD_MODEL,)) for _ in range(clients)]
        for s in scorers:                                    # warm every connection (not timed)
            s.score(rows[0][None], np.ones((1, rows[0].size), np.int64))
        barrier = threading.Barrier(clients + 1)

        def client(s, share):
            barrier.wait()
            for row in share:
                s.score(row[None], np.ones((1, row.size), np.int64))

        workers = [threading.Thread(target=client, args=(s, share)) for s, share in zip(scorers, shares)]
        for t in workers:
            t.start()
    before = executions(server, REWARD_MODEL)
    cpu0 = cpu_seconds(server.proc.pid) + time.process_time()
    barrier.wait()
    t0 = time.perf_counter()
    client_cpu = [results.get(timeout=600) for _ in workers] if processes else []
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(server.proc.pid) + time.process_time() - cpu0 + sum(client_cpu)
    after = executions(server, REWARD_MODEL)
    if not processes:
        for s in scorers:
            s.close()
    requests, execs = after[0] - before[0], after[1] - before[1]
    return {"clients": clients, "client_processes": processes, "length_bucket": bucket, "requests": len(rows),
            "seconds": seconds, "req_per_s": len(rows) / seconds, "triton_requests": requests,
            "triton_executions": execs, "mean_batch": requests / max(execs, 1),
            # CPU of server and clients together: on a shared machine whose cores are busy, the
            # steadier figure of what batching saves
            "cpu_ms_per_request": 1000 * cpu / len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", type=Path, default=Path("bench/results"))
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrent-clients", type=int, default=16)
    ap.add_argument("--min-length", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--length-bucket", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="each mode this many times, alternating")
    ap.add_argument("--instances", type=int, default=2, help="ONNX Runtime sessions per model (one thread each: "
                    "one per core of the 2-core development machine; with 1, executions queue behind each other)")
    args = ap.parse_args()

    from tribune.services.client import bucket_length
    from tribune.services.common.text import load_tokenizer
    from tribune.services.launcher import start_serve
    from tribune.services.repository import tokenizer_fingerprint
    from tribune.trainer.export import ExportConfig, run_export
    from tribune.trainer.task.make import TaskConfig, make_task

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_task(TaskConfig(sft_size=10, prefs_train_size=10, prefs_eval_size=10, prompts_train_size=10,
                             prompts_eval_size=10, pretrain_steps=0), tmp / "task")    # speed only
        base = tmp / "task" / "base"
        repo = tmp / "repo"
        run_export(ExportConfig(reward=base, reference=base, output=repo))
        tok = load_tokenizer(base)
        fp = tokenizer_fingerprint(tok)
        rng = np.random.default_rng(0)
        lengths = rng.integers(args.min_length, args.max_length + 1, size=args.requests)
        rows = [rng.integers(3, len(tok), size=int(n), dtype=np.int64) for n in lengths]
        max_len = int(args.max_length)
        padded = sum(bucket_length(int(n), args.length_bucket, max_len) for n in lengths)
        # alternate the modes in rounds (medians reported): the load of a shared machine drifts
        n = args.concurrent_clients
        modes = {"sequential": (1, args.length_bucket, False), "concurrent_exact": (n, 0, False),
                 "concurrent_bucketed": (n, args.length_bucket, False),
                 "concurrent_bucketed_processes": (n, args.length_bucket, True)}
        runs: dict[str, list[dict]] = {}
        serve_args = ("--intra-op-threads", "1", "--instances", str(args.instances))
        with start_serve(repo, *serve_args) as server:
            for _ in range(args.rounds):
                for name, (clients, bucket, procs) in modes.items():
                    runs.setdefault(name, []).append(run(server, fp, rows, clients, bucket, procs))
        with start_serve(repo, *serve_args, "--no-ragged-batching") as server:
            for _ in range(args.rounds):
                for name, (clients, bucket, procs) in list(modes.items())[1:3]:
                    runs.setdefault(f"stock_rule_{name}", []).append(run(server, fp, rows, clients, bucket, procs))

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    seq = median("sequential", "req_per_s")
    result = {
        "command": "python bench/mixed_lengths.py",
        "requests": args.requests, "lengths": [args.min_length, args.max_length], "rounds": args.rounds,
        "length_bucket": args.length_bucket, "server": f"tribune serve {' '.join(serve_args)} (CPU, ONNX Runtime)",
        "padding_overhead": padded / int(lengths.sum()) - 1,      # extra tokens over the real ones
        "median_req_per_s": {name: median(name, "req_per_s") for name in runs},
        "median_mean_batch": {name: median(name, "mean_batch") for name in runs},
        "gain_over_sequential": {name: median(name, "req_per_s") / seq for name in runs if name != "sequential"},
        "median_cpu_ms_per_request": {name: median(name, "cpu_ms_per_request") for name in runs},
        "target": 2.0,
        "runs": runs,
    }
    write_result(args.output, "mixed_lengths", result)


if __name__ == "__main__":
    main()
