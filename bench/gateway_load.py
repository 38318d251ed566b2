"""Gateway load test: 16 concurrent clients in a second process, 8 items per request.

    python bench/gateway_load.py --output bench/results [--requests 300]

Serves the bundled task's repository with `tribune serve` and `tribune gateway` (separate
processes, as deployed), then from a
separate load-generator process measures, in one run: (1) Score calls through the gateway
(text in, tokenised by the gateway), (2) the same items sent straight to Triton as token
ids through the client library. Reports throughput, p50/p99 latency, errors, and the
gateway's overhead (latency and throughput vs direct).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ITEMS = [("name three fruits", "apple pear plum"), ("name two animals", "cat dog"),
         ("count from one to four", "one two three four"), ("name four tools", "saw drill awl vise"),
         ("name three colours", "red blue red"), ("count from two to three", "two three"),
         ("name five fruits", "fig kiwi lime plum pear"), ("name two colours", "red cat")]


def _run_clients(call, clients: int, requests: int) -> dict:
    latencies, errors = [], []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker():
        mine, errs = [], 0
        barrier.wait()
        for _ in range(requests):
            t0 = time.perf_counter()
            try:
                call()
            except Exception:  # counted, the load goes on
                errs += 1
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)
            errors.append(errs)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    n = clients * requests
    return {"requests": n, "items_per_request": len(ITEMS), "errors": int(sum(errors)), "seconds": wall,
            "requests_per_s": n / wall, "items_per_s": n * len(ITEMS) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def load_generator(gateway: str, triton: str, tokenizer: Path, clients: int, requests: int) -> dict:
    import grpc

    from tribune.services.client import ClientConfig, TritonScorer
    from tribune.services.common.text import encode_pair, load_tokenizer
    from tribune.services.contract import REWARD_MODEL
    from tribune.services.repository import tokenizer_fingerprint
    from tribune.trainer.data import pad_left
    from tribune.v1 import reward_pb2 as pb
    from tribune.v1 import reward_pb2_grpc

    request = pb.ScoreRequest(items=[pb.ScoreItem(prompt=p, response=r) for p, r in ITEMS])
    channels = [grpc.insecure_channel(gateway) for _ in range(clients)]
    stubs = iter([reward_pb2_grpc.RewardServiceStub(c) for c in channels])   # one connection per client
    local = threading.local()

    def via_gateway():
        if not hasattr(local, "stub"):
            local.stub = next(stubs)
        local.stub.Score(request, timeout=30)

    tok = load_tokenizer(tokenizer)
    ids, mask = pad_left([encode_pair(tok, p, r, 48, 64)[0] for p, r in ITEMS], tok.pad_token_id)
    ids, mask = ids.numpy(), mask.numpy()
    fp = tokenizer_fingerprint(tok)
    scorers = iter([TritonScorer(ClientConfig(url=triton, max_in_flight=1), fp, models=(REWARD_MODEL,))
                    for _ in range(clients)])
    local_direct = threading.local()

    def direct():
        if not hasattr(local_direct, "scorer"):
            local_direct.scorer = next(scorers)
        local_direct.scorer.score(ids, mask)

    reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(gateway)).Score(request, timeout=30)   # warm-up
    gw = _run_clients(via_gateway, clients, requests)
    dr = _run_clients(direct, clients, requests)
    return {"gateway": gw, "direct_triton": dr,
            "overhead_p50_ms": gw["p50_ms"] - dr["p50_ms"],
            "throughput_ratio_gateway_over_direct": gw["requests_per_s"] / dr["requests_per_s"]}


def wait_serving(target: str, timeout: float = 120) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.time() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"gateway at {target} not SERVING after {timeout}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", type=Path, default=Path("bench/results"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=300, help="requests per client")
    ap.add_argument("--load-generator", nargs=3, metavar=("GATEWAY", "TRITON", "TOKENIZER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_generator:
        gw, triton, tok = args.load_generator
        print(json.dumps(load_generator(gw, triton, Path(tok), args.clients, args.requests)))
        return

    from bench.common import write_result
    from tribune.services.launcher import free_port, start_serve
    from tribune.trainer.export import ExportConfig, run_export
    from tribune.trainer.task.make import TaskConfig, make_task

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_task(TaskConfig(sft_size=10, prefs_train_size=10, prefs_eval_size=10, prompts_train_size=10,
                             prompts_eval_size=10, pretrain_steps=0), tmp / "task")    # speed only
        run_export(ExportConfig(reward=tmp / "task" / "base", reference=tmp / "task" / "base", output=tmp / "repo"))
        with start_serve(tmp / "repo") as server:
            gw_port = free_port()          # picked while Triton holds its own ports: never one of them
            # the gateway in its own process, as deployed (k8s/): it shares no GIL with Triton's side
            gateway = subprocess.Popen([sys.executable, "-m", "tribune.trainer", "gateway", "--repository", str(tmp / "repo"),
                                        "--triton-url", server.url, "--port", str(gw_port), "--metrics-port", "0"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_serving(f"127.0.0.1:{gw_port}")
            proc = subprocess.run([sys.executable, __file__, "--clients", str(args.clients), "--requests",
                                   str(args.requests), "--load-generator", f"127.0.0.1:{gw_port}", server.url,
                                   str(tmp / "repo" / "tokenizer")], capture_output=True, text=True, timeout=1800)
            gateway.terminate()
            gateway.wait(60)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            result = json.loads(proc.stdout.strip().splitlines()[-1])
    write_result(args.output, "gateway_load", {"command": f"python bench/gateway_load.py --requests {args.requests}",
                                                "clients": args.clients, **result})


if __name__ == "__main__":
    main()
