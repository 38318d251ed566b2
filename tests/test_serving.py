"""Export → `tribune serve` (real Triton via PyTriton, ONNX Runtime) → the client library."""
import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from services.client import ClientConfig, ScorerRequestError, ScorerUnavailable, TritonScorer
from services.contract import ContractError
from services.repository import read_config, sha256_file, tokenizer_fingerprint
from tests.conftest import tribune
from tests.servers import start_serve

pytestmark = pytest.mark.slow


def _fingerprint(repo_dir):
    from services.common.text import load_tokenizer

    return tokenizer_fingerprint(load_tokenizer(repo_dir / "tokenizer"))


def _batch(task_dir, n, side, seed=0):
    """n mixed-length prompt+response sequences from the task, padded on `side`."""
    from services.common.text import encode_pair, load_tokenizer
    from trainer.data import pad_left, pad_right

    tok = load_tokenizer(task_dir / "tokenizer")
    rows = [json.loads(l) for l in (task_dir / "sft.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(rows), n, replace=False)
    seqs = [encode_pair(tok, rows[i]["prompt"], rows[i]["response"], 48, 64)[0] for i in pick]
    ids, mask = (pad_left if side == "left" else pad_right)(seqs, tok.pad_token_id)
    return ids, mask, seqs


def test_export_writes_a_repository_stock_triton_loads(repo_dir):
    from tritonclient.grpc import model_config_pb2 as mc

    for name, inputs in (("reward", ["input_ids", "attention_mask"]),
                         ("reference", ["input_ids", "attention_mask", "temperature"])):
        cfg = read_config(repo_dir / name / "config.pbtxt")   # Triton's own ModelConfig schema
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
        assert [i.name for i in cfg.input] == inputs
        assert list(cfg.input[0].dims) == [-1] and cfg.input[0].data_type == mc.TYPE_INT64
        assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
        assert cfg.dynamic_batching.default_queue_policy.max_queue_size > 0
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert len(cfg.model_warmup) == 1
        for w in cfg.model_warmup[0].inputs.values():
            if w.input_data_file:
                assert (repo_dir / name / "warmup" / w.input_data_file).is_file()
        assert (repo_dir / name / "1" / "model.onnx").is_file()
    (out,) = read_config(repo_dir / "reward" / "config.pbtxt").output     # one reward model: no member_rewards
    assert out.name == "rewards" and list(out.dims) == [1] and out.data_type == mc.TYPE_FP32
    manifest = json.loads((repo_dir / "tribune.json").read_text())
    assert manifest["contract_version"] == 1
    served = manifest["served"]
    assert served["ensemble_size"] == 1 and served["member_reward_mean"] == [served["reward_mean"]]
    assert manifest["tokenizer"]["fingerprint"] == _fingerprint(repo_dir)
    assert manifest["served"]["reward_std"] > 0
    assert set(manifest["sources"]) == {"reward", "reference"}
    for rel, digest in manifest["files"].items():
        assert sha256_file(repo_dir / rel) == digest
    assert max(manifest["export"]["parity_max_abs_diff"].values()) <= 1e-4


def test_export_options_render_valid_configs(rm_dir, sft_dir, tmp_path):
    out = tmp_path / "repo"
    # the deprecated TorchScript exporter, still selectable (and faster); fp16 below takes the default
    tribune("export", "--reward", rm_dir, "--reference", sft_dir, "--output", out, "--accelerator", "tensorrt",
            "--instance-count", "2", "--no-warmup", "--max-batch-size", "16", "--exporter", "torchscript")
    cfg = read_config(out / "reference" / "config.pbtxt")
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP32"
    assert cfg.instance_group[0].count == 2 and not cfg.model_warmup
    proc = tribune("export", "--reward", rm_dir, "--reference", sft_dir, "--output", out, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    half = tmp_path / "fp16"
    tribune("export", "--reward", rm_dir, "--reference", sft_dir, "--output", half, "--dtype", "fp16")
    manifest = json.loads((half / "tribune.json").read_text())
    assert manifest["export"]["dtype"] == "fp16"
    assert 0 < max(manifest["export"]["parity_max_abs_diff"].values()) <= 5e-2
    assert (half / "reward" / "1" / "model.onnx").stat().st_size < 0.7 * (out / "reward" / "1" / "model.onnx").stat().st_size


def test_served_scores_equal_pytorch_for_both_padding_sides(served, repo_dir, task_dir, rm_dir, sft_dir):
    from trainer.modeling import load_causal_lm, load_reward_model, score_sequences, sequence_logprobs

    rm, ref = load_reward_model(rm_dir).eval(), load_causal_lm(sft_dir).eval()
    cfg = ClientConfig(url=served.url, max_in_flight=3)
    with TritonScorer(cfg, _fingerprint(repo_dir)) as scorer:
        assert scorer.max_batch == 8
        for side in ("left", "right"):
            ids, mask, _ = _batch(task_dir, 21, side)               # 21 rows > max batch 8: 3 chunks
            with torch.no_grad():
                want_r = score_sequences(rm, ids, mask).numpy()
                want_lp = sequence_logprobs(ref, ids, mask, temperature=0.8).numpy()
            got_r = scorer.score(ids.numpy(), mask.numpy())
            got_lp = scorer.logprobs(ids.numpy(), mask.numpy(), temperature=0.8)
            assert got_r.shape == (21,) and got_lp.shape == (21, ids.shape[1] - 1)
            np.testing.assert_allclose(got_r, want_r, atol=1e-4, rtol=0)
            np.testing.assert_allclose(got_lp, want_lp, atol=1e-4, rtol=0)
            assert np.abs(got_lp).sum() > 0
        # a padded row gives exactly the columns of the same row unpadded
        ids, mask, seqs = _batch(task_dir, 5, "left")
        alone = scorer.logprobs(np.array([seqs[0]]), np.ones((1, len(seqs[0])), dtype=np.int64))
        padded = scorer.logprobs(ids.numpy(), mask.numpy())[0]
        np.testing.assert_allclose(padded[-alone.shape[1]:], alone[0], atol=1e-5)
        np.testing.assert_allclose(scorer.facts.normalise(np.array([scorer.facts.reward_mean])), [0.0])
        # a single reward model is its own only member; the server has no member_rewards output
        np.testing.assert_array_equal(scorer.score_members_async(ids.numpy(), mask.numpy()).result(),
                                      scorer.score(ids.numpy(), mask.numpy())[:, None])
        meta = scorer._client().get_model_metadata("reward", as_json=True)
        assert [o["name"] for o in meta["outputs"]] == ["rewards"]


def test_concurrent_clients_get_their_own_results_in_order(served, repo_dir, task_dir):
    fp = _fingerprint(repo_dir)
    ids, mask, _ = _batch(task_dir, 40, "left", seed=3)
    with TritonScorer(ClientConfig(url=served.url), fp) as scorer:
        expected = scorer.score(ids.numpy(), mask.numpy())
    results, errors = {}, []

    def client(k):
        try:
            order = np.random.default_rng(k).permutation(40)
            with TritonScorer(ClientConfig(url=served.url, max_in_flight=2), fp) as s:
                for _ in range(3):
                    results[k] = (order, s.score(ids.numpy()[order], mask.numpy()[order]))
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(results) == 6
    for order, got in results.values():
        np.testing.assert_allclose(got, expected[order], atol=1e-5)


def test_wrong_tokenizer_is_refused_at_connect(served, repo_dir):
    from services.common.text import load_tokenizer

    other = load_tokenizer(repo_dir / "tokenizer")
    other.add_tokens(["zebra"])
    with pytest.raises(ContractError, match="tokenizer mismatch"):
        TritonScorer(ClientConfig(url=served.url), tokenizer_fingerprint(other))


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(served, repo_dir):
    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    client = g.InferenceServerClient(served.url)

    def infer(ids, mask, dtype="INT64", model="reward"):
        inputs = []
        for name, value in (("input_ids", ids), ("attention_mask", mask)):
            x = g.InferInput(name, list(value.shape), dtype if name == "input_ids" else "INT64")
            x.set_data_from_numpy(value)
            inputs.append(x)
        return client.infer(model, inputs, client_timeout=30)

    good = np.array([[5, 6, 7, 1]], dtype=np.int64)
    ones = np.ones_like(good)
    cases = {
        "wrong dtype": (lambda: infer(good.astype(np.float32), ones, dtype="FP32"), "input_ids"),
        "wrong rank": (lambda: infer(good[None], ones[None]), "unexpected shape"),
        "out-of-vocab ids": (lambda: infer(np.array([[5, 100000]]), np.ones((1, 2), np.int64)), "input_ids must be in"),
        "negative ids": (lambda: infer(np.array([[-1, 5]]), np.ones((1, 2), np.int64)), "input_ids must be in"),
        "empty batch": (lambda: infer(np.zeros((0, 4), np.int64), np.zeros((0, 4), np.int64)), ""),
        "too long": (lambda: infer(np.full((1, 65), 5), np.ones((1, 65), np.int64)), "exceeds the model's maximum"),
        "mask not 0/1": (lambda: infer(good, ones * 2), "attention_mask must be 0 or 1"),
        "all-masked row": (lambda: infer(good, ones * 0), "no token"),
    }
    for name, (call, text) in cases.items():
        with pytest.raises(InferenceServerException) as err:
            call()
        assert text in str(err.value), (name, str(err.value)[:500])
        assert infer(good, ones).as_numpy("rewards").shape == (1, 1), f"server stopped answering after {name}"

    with TritonScorer(ClientConfig(url=served.url), _fingerprint(repo_dir)) as scorer:
        with pytest.raises(ScorerRequestError, match=r"input_ids must be in \[0, \d+\)"):
            scorer.score(np.array([[5, 100000]]), np.ones((1, 2), np.int64))
        with pytest.raises(ScorerRequestError, match="exceeds"):
            scorer.score(np.full((1, 65), 5), np.ones((1, 65), np.int64))
        with pytest.raises(ScorerRequestError, match="empty batch"):
            scorer.score(np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64))
        assert scorer.score(good, ones).shape == (1,)


def test_a_restart_during_a_call_is_retried_and_a_dead_server_fails_clearly(repo_dir, task_dir):
    server = start_serve(repo_dir)
    ports = (server.grpc_port, server.http_port, server.metrics_port)
    fp = _fingerprint(repo_dir)
    ids, mask, _ = _batch(task_dir, 24, "left", seed=5)
    try:
        with TritonScorer(ClientConfig(url=server.url, retry_budget_s=120, timeout_s=20), fp) as scorer:
            expected = scorer.score(ids.numpy(), mask.numpy())
            assert server.stop() == 0
            result = {}
            call = threading.Thread(target=lambda: result.setdefault("r", scorer.score(ids.numpy(), mask.numpy())))
            call.start()
            time.sleep(1.0)
            assert call.is_alive(), "the call should be retrying while the server is down"
            server = start_serve(repo_dir, ports=ports)
            call.join(180)
            np.testing.assert_allclose(result["r"], expected, atol=1e-5)
        with TritonScorer(ClientConfig(url=server.url, retry_budget_s=2, initial_backoff_s=0.2), fp) as scorer:
            assert server.stop() == 0
            t0 = time.time()
            with pytest.raises(ScorerUnavailable, match="retry budget"):
                scorer.score(ids.numpy(), mask.numpy())
            assert time.time() - t0 < 30
    finally:
        server.stop()


def test_tampered_repository_is_refused(repo_dir, tmp_path):
    bad = tmp_path / "repo"
    shutil.copytree(repo_dir, bad)
    onnx = bad / "reward" / "1" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-10] ^= 0xFF
    onnx.write_bytes(bytes(data))
    proc = tribune("serve", "--repository", bad, "--grpc-port", "1", check=False)
    assert proc.returncode == 2
    assert "reward/1/model.onnx: modified" in proc.stderr and "Traceback" not in proc.stderr


def test_score_command_writes_raw_and_normalised_rewards(served, repo_dir, tmp_path):
    rows = [{"prompt": "name two fruits", "response": "fig kiwi", "id": 1},
            {"prompt": "name two fruits", "response": "fig red", "id": 2},
            {"prompt": "count from one to three", "response": "one two three", "id": 3},
            {"response": "orphan", "id": 4}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the contract's form: no tokenizer given, the server ships the one its models use
    summary = json.loads(tribune("score", "--url", served.url, "--input", inp, "--output", out).stdout)
    assert summary["scored"] == 3 and summary["errors"] == 1
    got = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in got] == [1, 2, 3, 4] and "error" in got[3]
    facts = json.loads((repo_dir / "tribune.json").read_text())["served"]
    for r in got[:3]:
        assert r["reward_normalized"] == pytest.approx((r["reward"] - facts["reward_mean"]) / facts["reward_std"], abs=1e-5)
    assert got[0]["reward"] > got[1]["reward"]     # a colour is not a fruit
    again = tmp_path / "again.jsonl"
    tribune("score", "--url", served.url, "--input", inp, "--output", again, "--tokenizer", repo_dir / "tokenizer")
    assert [json.loads(l).get("reward") for l in again.read_text().splitlines()] == [r.get("reward") for r in got]
