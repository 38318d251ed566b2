"""Serving benchmark: the same model and batches, measured in one run.

    python bench/serving.py --output bench/results

(a) reward-model throughput at batch 32 × 128 tokens: served through Triton (`tribune
    serve`, gRPC, our client) vs ONNX Runtime in-process, the physical limit here;
(b) 16 concurrent batch-1 clients vs sequential batch-1 requests (dynamic batching gain);
(c) ONNX Runtime vs PyTorch eager for the same scoring.

The model is the bundled recipe at a larger size (so compute, not Python overhead, is
measured); its weights are untrained, which does not change the cost of a forward pass.
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


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", type=Path, default=Path("bench/results"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--concurrent-clients", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=20)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from tribune.services.client import ClientConfig, TritonScorer
    from tribune.services.common.text import load_tokenizer
    from tribune.services.contract import ATTENTION_MASK, INPUT_IDS, REWARD_MODEL
    from tribune.services.launcher import start_serve
    from tribune.services.repository import tokenizer_fingerprint
    from tribune.trainer.export import ExportConfig, run_export
    from tribune.trainer.modeling import load_reward_model, score_sequences
    from tribune.trainer.task.make import TaskConfig, make_task

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_task(TaskConfig(hidden_size=args.hidden_size, num_layers=args.layers, max_positions=2 * args.length,
                             sft_size=10, prefs_train_size=10, prefs_eval_size=10, prompts_train_size=10,
                             prompts_eval_size=10, pretrain_steps=0), tmp / "task")    # speed only
        base = tmp / "task" / "base"
        repo = tmp / "repo"
        run_export(ExportConfig(reward=base, reference=base, output=repo, max_batch_size=64, queue_delay_us=2000))
        tok = load_tokenizer(base)
        rng = np.random.default_rng(0)
        ids = rng.integers(3, len(tok), size=(args.batch, args.length), dtype=np.int64)
        mask = np.ones_like(ids)
        n_params = sum(p.numel() for p in load_reward_model(base).parameters())

        # (c) + in-process reference point for (a)
        sess = ort.InferenceSession(str(repo / REWARD_MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        ort_times = timed(lambda: sess.run(None, {INPUT_IDS.name: ids, ATTENTION_MASK.name: mask}), args.repeats)
        rm = load_reward_model(base).eval()
        tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
        with torch.no_grad():
            torch_times = timed(lambda: score_sequences(rm, tids, tmask), args.repeats)

        with start_serve(repo) as server:
            fp = tokenizer_fingerprint(tok)
            with TritonScorer(ClientConfig(url=server.url, max_in_flight=2, chunk_size=args.batch // 2), fp,
                              models=(REWARD_MODEL,)) as split:
                # two half-batches in flight: serialisation of one overlaps inference of the other
                split_times = timed(lambda: split.score(ids, mask), args.repeats)
            with TritonScorer(ClientConfig(url=server.url, max_in_flight=1), fp, models=(REWARD_MODEL,)) as scorer:
                served_times = timed(lambda: scorer.score(ids, mask), args.repeats)
                one_ids, one_mask = ids[:1], mask[:1]
                n_seq = args.concurrent_clients * args.requests_per_client
                t0 = time.perf_counter()
                for _ in range(n_seq):
                    scorer.score(one_ids, one_mask)
                sequential_s = time.perf_counter() - t0
            # (b) concurrent batch-1 clients, each with its own connection
            scorers = [TritonScorer(ClientConfig(url=server.url, max_in_flight=1), fp, models=(REWARD_MODEL,))
                       for _ in range(args.concurrent_clients)]
            barrier = threading.Barrier(args.concurrent_clients + 1)

            def client(s):
                barrier.wait()
                for _ in range(args.requests_per_client):
                    s.score(one_ids, one_mask)

            threads = [threading.Thread(target=client, args=(s,)) for s in scorers]
            for t in threads:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            concurrent_s = time.perf_counter() - t0
            for s in scorers:
                s.close()

    med = statistics.median
    tokens = args.batch * args.length
    result = {
        "command": "python bench/serving.py",
        "model": {"parameters": n_params, "hidden_size": args.hidden_size, "layers": args.layers},
        "batch": args.batch, "length": args.length, "repeats": args.repeats,
        "a_served_vs_in_process": {
            "ort_in_process_median_s": med(ort_times), "served_median_s": med(served_times),
            "ort_in_process_tokens_per_s": tokens / med(ort_times), "served_tokens_per_s": tokens / med(served_times),
            "throughput_ratio_served_over_in_process": med(ort_times) / med(served_times),
            "served_two_halves_in_flight_median_s": med(split_times),
            "throughput_ratio_two_halves_in_flight": med(ort_times) / med(split_times), "target": 0.95},
        "b_dynamic_batching": {
            "requests": n_seq, "sequential_batch1_req_per_s": n_seq / sequential_s,
            "concurrent_clients": args.concurrent_clients, "concurrent_batch1_req_per_s": n_seq / concurrent_s,
            "gain": sequential_s / concurrent_s, "target": 2.0},
        "c_ort_vs_pytorch_eager": {
            "ort_median_s": med(ort_times), "pytorch_eager_median_s": med(torch_times),
            "speedup_ort_over_pytorch": med(torch_times) / med(ort_times)},
    }
    write_result(args.output, "serving", result)


if __name__ == "__main__":
    main()
