"""Export → `tribune serve` (real Triton via PyTriton, ONNX Runtime) → the client library."""
import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from tribune.services.client import ClientConfig, ScorerRequestError, ScorerUnavailable, TritonScorer
from tribune.services.contract import ContractError
from tribune.services.repository import read_config, sha256_file, tokenizer_fingerprint
from tests.conftest import tribune
from tests.servers import start_serve

pytestmark = pytest.mark.slow


def _fingerprint(repo_dir):
    from tribune.services.common.text import load_tokenizer

    return tokenizer_fingerprint(load_tokenizer(repo_dir / "tokenizer"))


def _batch(task_dir, n, side, seed=0):
    """n mixed-length prompt+response sequences from the task, padded on `side`."""
    from tribune.services.common.text import encode_pair, load_tokenizer
    from tribune.trainer.data import pad_left, pad_right

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
    from tribune.trainer.modeling import load_causal_lm, load_reward_model, score_sequences, sequence_logprobs

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
    from tribune.services.common.text import load_tokenizer

    other = load_tokenizer(repo_dir / "tokenizer")
    other.add_tokens(["zebra"])
    with pytest.raises(ContractError, match="tokenizer mismatch"):
        TritonScorer(ClientConfig(url=served.url), tokenizer_fingerprint(other))


def _infer(client, model="reward", **inputs):
    """One raw tritonclient call: inputs given as name=(array, Triton dtype)."""
    import tritonclient.grpc as g

    feeds = []
    for name, (value, dtype) in inputs.items():
        x = g.InferInput(name, list(value.shape), dtype)
        x.set_data_from_numpy(value)
        feeds.append(x)
    return client.infer(model, feeds, client_timeout=30)


def _i64(rows):
    return np.array(rows, dtype=np.int64), "INT64"


# The twelve malformed requests of issue 13: (model, inputs, what the one-line reason must say)
MALFORMED = {
    "out-of-vocabulary id": ("reward", dict(input_ids=_i64([[5, 1_000_000_000]]), attention_mask=_i64([[1, 1]])),
                             r"^input_ids: id 1000000000 outside the vocabulary of \d+$"),
    "negative id": ("reward", dict(input_ids=_i64([[5, -3]]), attention_mask=_i64([[1, 1]])),
                    r"^input_ids: id -3 outside the vocabulary of \d+$"),
    "mask not 0/1": ("reward", dict(input_ids=_i64([[5, 6]]), attention_mask=_i64([[1, 2]])),
                     r"^attention_mask: value 2 is not 0 or 1$"),
    "all-zero mask": ("reward", dict(input_ids=_i64([[5, 6]]), attention_mask=_i64([[0, 0]])),
                      r"^attention_mask: row 0 is all 0"),
    "mismatched shapes": ("reward", dict(input_ids=_i64([[5, 6, 7]]), attention_mask=_i64([[1, 1]])),
                          r"^attention_mask: shape \[1, 2\] differs from input_ids \[1, 3\]$"),
    "over-long sequence": ("reward", dict(input_ids=_i64([[5] * 65]), attention_mask=_i64([[1] * 65])),
                           r"^input_ids: length 65 over the maximum sequence length of 64$"),
    "empty sequence": ("reward", dict(input_ids=(np.zeros((1, 0), np.int64), "INT64"),
                                      attention_mask=(np.zeros((1, 0), np.int64), "INT64")),
                       r"^input_ids: empty"),
    "batch over the maximum": ("reward", dict(input_ids=_i64([[5, 6]] * 9), attention_mask=_i64([[1, 1]] * 9)),
                               r"batch-size must be <= 8 for 'reward'$"),
    "wrong dtype": ("reward", dict(input_ids=(np.array([[5, 6]], np.float32), "FP32"), attention_mask=_i64([[1, 1]])),
                    r"input 'input_ids' data-type is 'FP32', but model 'reward' expects 'INT64'$"),
    "temperature 0": ("reference", dict(input_ids=_i64([[5, 6, 7]]), attention_mask=_i64([[1, 1, 1]]),
                                        temperature=(np.array([[0.0]], np.float32), "FP32")),
                      r"^temperature: 0 is not a finite number of at least 0.001$"),
    "temperature NaN": ("reference", dict(input_ids=_i64([[5, 6, 7]]), attention_mask=_i64([[1, 1, 1]]),
                                          temperature=(np.array([[np.nan]], np.float32), "FP32")),
                        r"^temperature: nan is not a finite number of at least 0.001$"),
    "missing input": ("reward", dict(input_ids=_i64([[5, 6]])), r"missing required input\(s\) \['attention_mask'\]"),
}


def test_malformed_requests_get_invalid_argument_and_one_line_and_the_server_keeps_serving(served, repo_dir):
    import re
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    client = g.InferenceServerClient(served.url)
    good = dict(input_ids=_i64([[5, 6, 7, 1]]), attention_mask=_i64([[1, 1, 1, 1]]))
    for name, (model, inputs, reason) in MALFORMED.items():
        with pytest.raises(InferenceServerException) as err:
            _infer(client, model, **inputs)
        e = err.value
        message = re.sub(r"^\[request id: [^]]*\] ", "", e.message())
        assert e.status() == "StatusCode.INVALID_ARGUMENT", (name, e.status(), str(e)[:300])
        assert "\n" not in message and "Traceback" not in message and len(message) < 200, (name, message)
        assert re.search(reason, message), (name, message)
        assert _infer(client, **good).as_numpy("rewards").shape == (1, 1), f"server stopped answering after {name}"
    # a refused request does not fail the good ones Triton merged into its batch
    bad = MALFORMED["out-of-vocabulary id"][1]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_infer, client, **(bad if k % 4 == 0 else good)) for k in range(16)]
    outcomes = [f.exception() is None for f in futures]
    assert outcomes == [k % 4 != 0 for k in range(16)]

    with TritonScorer(ClientConfig(url=served.url), _fingerprint(repo_dir)) as scorer:
        with pytest.raises(ScorerRequestError, match=r"^reward: input_ids: id 100000 outside the vocabulary of \d+$"):
            scorer.score(np.array([[5, 100000]]), np.ones((1, 2), np.int64))
        with pytest.raises(ScorerRequestError, match="exceeds"):
            scorer.score(np.full((1, 65), 5), np.ones((1, 65), np.int64))
        with pytest.raises(ScorerRequestError, match="empty batch"):
            scorer.score(np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64))
        assert scorer.score(*(v for v, _ in good.values())).shape == (1,)


def test_triton_runs_with_a_shutdown_bounded_below_a_pods_grace_period(served):
    """Triton's own exit timeout (30 s) plus PyTriton's 30-second wait on it could outlast the
    manifests' grace period; serve passes its own --exit-timeout-s (15) to the real tritonserver."""
    from pathlib import Path

    from tribune.services.serve import ServeConfig

    cmdlines = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"tritonserver") and str(served.grpc_port).encode() in argv:
            cmdlines.append([a.decode() for a in argv])
    assert len(cmdlines) == 1, cmdlines
    argv = cmdlines[0]
    assert argv[argv.index("--exit-timeout-secs") + 1] == "15" == str(ServeConfig(repository=Path(".")).exit_timeout_s)
    with pytest.raises(ValueError, match="exit_timeout_s"):
        ServeConfig(repository=Path("."), exit_timeout_s=30)


def test_serve_is_never_ready_before_its_models(repo_dir):
    """Polls from the first moment: no readiness endpoint says 200 while a model is not loaded."""
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from tribune.services.launcher import free_ports

    grpc_port, http, metrics, gw = free_ports(4)
    proc = subprocess.Popen([sys.executable, "-m", "tribune.trainer", "serve", "--repository", str(repo_dir),
                             "--grpc-port", str(grpc_port), "--http-port", str(http), "--metrics-port", str(metrics),
                             "--intra-op-threads", "1", "--with-gateway", "--gateway-port", str(gw),
                             "--gateway-metrics-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()

    def ok(path):
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=2).status == 200
        except (urllib.error.URLError, OSError):
            return False

    paths = ["/v2/health/ready", "/v2/models/reward/ready", "/v2/models/reference/ready",
             "/v2/models/tribune_manifest/ready"]
    seen = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            health = ok(paths[0])                 # first the server's word, then the models' own
            models = [ok(p) for p in paths[1:]]
            printed = any("tribune serve: ready" in line for line in lines)
            seen.append((health, all(models), printed))
            if printed and health:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "".join(lines)[-3000:]
        assert seen[-1] == (True, True, True), ("".join(lines)[-3000:], seen[-5:])
        assert not seen[0][0], "the first poll came too late to see the server starting"
        # health said ready only where the models already were (polled right after it)
        assert all(models for health, models, _ in seen if health), seen
        # the gateway had bound when serve said ready
        gateway_line = next(i for i, line in enumerate(lines) if "tribune gateway: ready" in line)
        assert gateway_line < next(i for i, line in enumerate(lines) if "tribune serve: ready" in line)
    finally:
        proc.terminate()
        proc.wait(60)


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


def test_what_the_client_retries_and_what_it_raises_at_once():
    """A server that stops (or restarts) with a call in flight answers CANCELLED: retried, like UNAVAILABLE and a
    deadline; a bad request or a server-side error is raised at once (tritonclient's own exception type)."""
    from tritonclient.utils import InferenceServerException

    retried = [InferenceServerException("x", status=f"StatusCode.{c}")
               for c in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")]
    retried.append(InferenceServerException("Request for unknown model: 'reward' is not ready"))   # still loading
    assert all(TritonScorer._retryable(e) for e in retried)
    assert not any(TritonScorer._retryable(InferenceServerException("x", status=f"StatusCode.{c}"))
                   for c in ("INVALID_ARGUMENT", "INTERNAL", "UNAUTHENTICATED"))


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


def test_a_port_in_use_is_refused_clearly_and_picked_ports_are_picked_again(repo_dir, tmp_path):
    import socket
    import sys

    from tribune.services.launcher import PORT_CLASH, PortInUse, free_ports

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        http, metrics = free_ports(2)
        proc = tribune("serve", "--repository", repo_dir, "--grpc-port", str(busy), "--http-port", str(http),
                       "--metrics-port", str(metrics), check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"address already in use: --grpc-port {busy}" in proc.stderr
        with pytest.raises(PortInUse):            # ports given: nothing to pick again
            start_serve(repo_dir, ports=(busy, http, metrics))
    # picked ports: a server that finds one taken or two equal (here, once each: a protocol double) starts
    # again on others
    tries = tmp_path / "tries"
    double = ("import sys, time, pathlib; p = pathlib.Path(sys.argv[1]); "
              "port = sys.argv[sys.argv.index('--grpc-port') + 1]; "
              "p.write_text((p.read_text() if p.exists() else '') + port + ' '); n = len(p.read_text().split()); "
              "print(['', 'x and y are both 1: ' + sys.argv[2], 'address already in use'][n] if n < 3 "
              "else 'tribune serve: ready', flush=True); "
              "n < 3 or time.sleep(60); sys.exit(2)")
    server = start_serve(repo_dir, command=[sys.executable, "-c", double, str(tries), PORT_CLASH])
    try:
        ports_seen = tries.read_text().split()
        assert len(ports_seen) == 3 and len(set(ports_seen)) == 3     # --grpc-port of each try: picked afresh
    finally:
        server.stop()
    # with the gateway: its port is picked with the others (four distinct ones), not by the caller beforehand
    argv = tmp_path / "argv.json"
    record = ("import sys, json, time, pathlib; pathlib.Path(sys.argv[1]).write_text(json.dumps(sys.argv[2:])); "
              "print('tribune serve: ready', flush=True); time.sleep(60)")
    flags = ("--grpc-port", "--http-port", "--metrics-port", "--gateway-port", "--gateway-metrics-port")
    for ports in (None, tuple(free_ports(3))):          # picked, or given by the caller
        with start_serve(repo_dir, ports=ports, gateway=True,
                         command=[sys.executable, "-c", record, str(argv)]) as server:
            args = json.loads(argv.read_text())
            given = {flag: int(args[args.index(flag) + 1]) for flag in flags}
            assert "--with-gateway" in args and len(set(given.values())) == 5 and given["--gateway-metrics-port"] == 0
            assert server.gateway_url == f"127.0.0.1:{given['--gateway-port']}"
            assert ports is None or (server.grpc_port, server.http_port, server.metrics_port) == ports
    with pytest.raises(ValueError, match="leave --gateway-port out"):
        start_serve(repo_dir, "--gateway-port", "50051", gateway=True)


def test_two_endpoints_on_one_port_are_refused_in_one_line_and_picked_ports_are_distinct(tmp_path):
    from tribune.services.launcher import PORT_CLASH, free_ports
    from tribune.services.serve import ServeConfig

    # Triton's own answer is its whole usage text and exit 1 (what a flaky test once showed)
    proc = tribune("serve", "--repository", tmp_path, "--grpc-port", "18001", "--http-port", "18001", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--grpc-port and --http-port are both 18001: {PORT_CLASH}" in proc.stderr
    with pytest.raises(ValueError, match="--gateway-port and --gateway-metrics-port are both 9100"):
        ServeConfig(repository=tmp_path, with_gateway=True, gateway_port=9100, gateway_metrics_port=9100)
    ServeConfig(repository=tmp_path, gateway_port=8001)         # no gateway: its port is not opened
    picked = free_ports(64)
    assert len(set(picked)) == 64


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
