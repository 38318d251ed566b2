"""The reward gateway against a real Triton (`tribune serve`) and real gRPC clients on loopback."""
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tribune.services.launcher import free_ports
from tests.conftest import REPO, copy_source, tribune
from tests.servers import WITHOUT_TORCH, start_serve
from tribune.v1 import reward_pb2 as pb
from tribune.v1 import reward_pb2_grpc

pytestmark = pytest.mark.slow
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING




class Gateway:
    """`tribune gateway` as a child process."""

    def __init__(self, repo, triton_url, *extra, without_torch=False, command=None, env=None):
        self.port, metrics_port = free_ports(2)
        python = command or ([sys.executable, "-c", WITHOUT_TORCH] if without_torch
                             else [sys.executable, "-m", "tribune.trainer"])
        self.proc = subprocess.Popen(
            [*python, "gateway", "--repository", str(repo), "--triton-url", triton_url,
             "--port", str(self.port), "--metrics-port", str(metrics_port), "--health-interval-s", "0.3", *extra],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})
        self.lines = []
        threading.Thread(target=lambda: [self.lines.append(l) for l in self.proc.stdout], daemon=True).start()
        deadline = time.time() + 60
        while not any("tribune gateway: ready" in l for l in self.lines):
            assert self.proc.poll() is None and time.time() < deadline, "".join(self.lines)[-3000:]
            time.sleep(0.1)
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_port = int(next(l for l in self.lines if "ready on" in l).rsplit(":", 1)[1].split()[0])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
        return self.proc.returncode


def wait_health(channel, want, timeout=60):
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        status = stub.Check(health_pb2.HealthCheckRequest(service="tribune.v1.RewardService"), timeout=5).status
        if status == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"health stayed {status}, wanted {want}")


@pytest.fixture(scope="module")
def gateway(served, repo_dir):
    gw = Gateway(repo_dir, served.url)
    with grpc.insecure_channel(gw.target) as ch:
        wait_health(ch, SERVING)
    yield gw
    assert gw.stop() == 0


def _details(error: grpc.RpcError, kind: str):
    """The one google.rpc detail of type ``kind`` (BadRequest, RetryInfo) in an error's trailer."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    assert status is not None and status.code == error.code().value[0], "no grpc-status-details-bin trailer"
    found = []
    for any_ in status.details:
        message = getattr(error_details_pb2, kind)()
        if any_.Unpack(message):
            found.append(message)
    assert len(found) == 1, (kind, status)
    return found[0]


def test_an_empty_response_is_scored_as_prompt_plus_eos_by_every_method(gateway, served, repo_dir):
    """A policy that stops at once answers "": the token path scores prompt + EOS, so does the gateway."""
    from tribune.services.client import ClientConfig, TritonScorer
    from tribune.services.common.text import encode_pair, load_tokenizer
    from tribune.services.repository import tokenizer_fingerprint
    from tribune.trainer.data import pad_left

    tok = load_tokenizer(repo_dir / "tokenizer")
    pairs = [("name two fruits", ""), ("name two fruits", "fig kiwi")]
    with TritonScorer(ClientConfig(url=served.url), tokenizer_fingerprint(tok), models=("reward",)) as scorer:
        seqs = [encode_pair(tok, p, r, 48, 64)[0] for p, r in pairs]
        assert seqs[0][-1] == tok.eos_token_id and seqs[0][:-1] == seqs[1][:len(seqs[0]) - 1]   # prompt + EOS
        direct = scorer.score(*[t.numpy() for t in pad_left(seqs, tok.pad_token_id)])
    with grpc.insecure_channel(gateway.target) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        items = [pb.ScoreItem(prompt=p, response=r) for p, r in pairs]
        np.testing.assert_allclose(stub.Score(pb.ScoreRequest(items=items), timeout=30).rewards, direct, atol=1e-5)
        best = stub.ScoreBestOfN(pb.BestOfNRequest(prompt=pairs[0][0], candidates=[r for _, r in pairs]), timeout=30)
        np.testing.assert_allclose(best.rewards, direct, atol=1e-5)
        streamed = list(stub.ScoreStream(iter([pb.ScoreRequest(items=[i]) for i in items]), timeout=30))
        np.testing.assert_allclose([s.rewards[0] for s in streamed], direct, atol=1e-5)


def _items():
    return [("name two fruits", "fig kiwi"), ("name two fruits", "fig red"), ("count from one to three", "one two three"),
            ("name three animals", "cat dog"), ("name four tools", "saw drill awl vise clamp")]


def test_gateway_rewards_equal_direct_triton_scores(gateway, served, repo_dir):
    from tribune.services.client import ClientConfig, TritonScorer
    from tribune.services.repository import tokenizer_fingerprint
    from tribune.services.common.text import encode_pair, load_tokenizer
    from tribune.trainer.data import pad_left

    tok = load_tokenizer(repo_dir / "tokenizer")
    with TritonScorer(ClientConfig(url=served.url), tokenizer_fingerprint(tok), models=("reward",)) as scorer:
        direct = scorer.score(*[t.numpy() for t in pad_left([encode_pair(tok, p, r, 48, 64)[0] for p, r in _items()],
                                                             tok.pad_token_id)])
        facts = scorer.facts
    with grpc.insecure_channel(gateway.target) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        reply, call = stub.Score.with_call(pb.ScoreRequest(items=[pb.ScoreItem(prompt=p, response=r) for p, r in _items()]),
                                           metadata=(("x-request-id", "req-42"),), timeout=30)
        np.testing.assert_allclose(reply.rewards, direct, atol=1e-5)
        np.testing.assert_allclose(reply.normalized_rewards, (direct - facts.reward_mean) / facts.reward_std,
                                   atol=1e-4)
        assert reply.model_id == facts.reward_model_id and ("x-request-id", "req-42") in call.trailing_metadata()
        assert list(reply.ensemble_spread) == [0.0] * len(_items())        # one reward model: no disagreement
        # the caller's own request_id names the call in the logs and the trailer too
        _, call = stub.Score.with_call(pb.ScoreRequest(items=[pb.ScoreItem(prompt="a", response="b")],
                                                       request_id="caller-7"), timeout=30)
        assert ("x-request-id", "caller-7") in call.trailing_metadata()
        # one that gRPC metadata cannot carry is answered too, under an id of the gateway's own
        reply, call = stub.Score.with_call(pb.ScoreRequest(items=[pb.ScoreItem(prompt="a", response="b")],
                                                           request_id="naïve\nid"), timeout=30)
        trailer = dict(call.trailing_metadata())["x-request-id"]
        assert reply.request_id == "naïve\nid" and trailer.isascii() and trailer.isprintable()
        best = stub.ScoreBestOfN(pb.BestOfNRequest(prompt="name two fruits", candidates=["fig red", "fig kiwi"]))
        assert best.best_index == int(np.argmax(best.rewards)) and sorted(best.ranking) == [0, 1]
        streamed = list(stub.ScoreStream(iter([pb.ScoreRequest(items=[pb.ScoreItem(prompt=p, response=r)])
                                               for p, r in _items()]), timeout=60))
        np.testing.assert_allclose([s.rewards[0] for s in streamed], direct, atol=1e-5)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.tokenizer_fingerprint == facts.tokenizer_fingerprint and info.max_items > 0
        assert info.ensemble_size == 1
        # the height of the raters' favourites travels with the model (train-rm kept its scores of them)
        assert len(info.preferred_rewards) == len(facts.preferred_member_scores) > 0
        np.testing.assert_allclose(info.preferred_rewards, [r[0] for r in facts.preferred_member_scores], atol=1e-5)
        assert list(info.preferred_spread) == [0.0] * len(info.preferred_rewards)     # one reward model


def test_model_info_becomes_served_facts_and_a_malformed_one_is_refused():
    from tribune.services.contract import ContractError
    from tribune.services.reward_client import facts_from_model_info

    fields = dict(model_id="m", contract_version=1, tokenizer_fingerprint="f", reward_mean=0.5, reward_std=2.0,
                  max_sequence_length=64, max_items=8, ensemble_size=3, preferred_rewards=[1.5, -0.5])
    facts = facts_from_model_info(pb.ModelInfo(**fields))
    # the gateway serves the members' mean and spread: K members with the mean's statistics, and
    # a server without preferred_spread (older) reads as members that agree
    assert facts.ensemble_size == 3 and facts.member_reward_mean == (0.5,) * 3 and facts.member_reward_std == (2.0,) * 3
    assert facts.max_prompt_length == 48
    # an ensemble's height from a server without preferred_spread (older) is left out: the penalty
    # would apply to the policy's scores and not to it
    assert facts.preferred_member_scores == ()
    one = facts_from_model_info(pb.ModelInfo(**{**fields, "ensemble_size": 1}))
    assert one.preferred_member_scores == ((1.5,), (-0.5,)) and one.preferred_rewards == (1.5, -0.5)
    spread = facts_from_model_info(pb.ModelInfo(**fields, preferred_spread=[0.5, 0.0]))
    assert spread.preferred_rewards == pytest.approx((1.5, -0.5)) and spread.preferred_spread == pytest.approx((0.5, 0.0))
    assert facts_from_model_info(pb.ModelInfo(**{**fields, "preferred_rewards": []})).preferred_member_scores == ()
    assert facts_from_model_info(pb.ModelInfo(**{**fields, "ensemble_size": 0})).ensemble_size == 1   # pre-ensemble server
    for bad, match in (({"preferred_rewards": [1.0, float("nan")], "preferred_spread": [0.0, 0.0]},
                        "preferred_member_scores"),
                       ({"preferred_spread": [0.5]}, "preferred_spread"),
                       ({"preferred_spread": [0.5, -0.1]}, "preferred_spread"),
                       ({"reward_std": 0.0}, "reward_std")):
        with pytest.raises(ContractError, match=match):
            facts_from_model_info(pb.ModelInfo(**{**fields, **bad}))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_stand_in_members_carry_the_served_mean_and_spread(k):
    """What PPO through a gateway optimises from the served (reward, spread): the members' mean,
    mean − λ·spread and the disagreement equal the served values (float64 references)."""
    import torch

    from tribune.services.reward_client import facts_from_model_info, members_from_spread
    from tribune.trainer.defences import ensemble_reward, member_disagreement

    mean, std = 0.5, 2.0
    facts = facts_from_model_info(pb.ModelInfo(model_id="m", contract_version=1, tokenizer_fingerprint="f",
                                               reward_mean=mean, reward_std=std, max_sequence_length=64,
                                               max_items=8, ensemble_size=k))
    rewards, spread = np.array([1.5, -0.5, 0.5]), np.array([0.7, 0.0, 2.5]) * (k > 1)
    members = members_from_spread(rewards, spread, std, k)                               # (3, K)
    z = torch.from_numpy(facts.standardise_members(members))
    normalised = (rewards - mean) / std
    np.testing.assert_allclose(ensemble_reward(z, "mean").numpy(), normalised, atol=1e-12)
    np.testing.assert_allclose(ensemble_reward(z, "uncertainty", 0.5).numpy(), normalised - 0.5 * spread, atol=1e-12)
    np.testing.assert_allclose(member_disagreement(z).numpy(), spread, atol=1e-12)
    np.testing.assert_allclose(facts.member_spread(members), spread, atol=1e-12)
    if k <= 2:                                              # the minimum is the members' own only for K ≤ 2
        np.testing.assert_allclose(ensemble_reward(z, "worst").numpy(), normalised - spread, atol=1e-12)


def test_a_client_with_only_server_reflection_finds_and_calls_score(gateway):
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(gateway.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "tribune.v1.RewardService" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("tribune.v1.RewardService").methods_by_name["Score"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = json_format.ParseDict({"items": [{"prompt": "name two fruits", "response": "fig kiwi"}]},
                                        request_cls())
        call = ch.unary_unary("/tribune.v1.RewardService/Score", request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=response_cls.FromString)
        reply = json_format.MessageToDict(call(request, timeout=30))
        assert len(reply["rewards"]) == 1 and reply["modelId"].startswith("rm-")


def test_bad_inputs_get_status_codes_naming_the_field_and_fuzz_never_crashes(gateway):
    long_text = "fig " * 5000
    cases = [
        (pb.ScoreRequest(), grpc.StatusCode.INVALID_ARGUMENT, "items"),
        (pb.ScoreRequest(items=[pb.ScoreItem(response="x")]), grpc.StatusCode.INVALID_ARGUMENT, "items[0].prompt"),
        (pb.ScoreRequest(items=[pb.ScoreItem(prompt="a", response="b"), pb.ScoreItem(prompt="a", response=long_text)]),
         grpc.StatusCode.INVALID_ARGUMENT, "items[1].response is longer"),
        (pb.ScoreRequest(items=[pb.ScoreItem(prompt="a", response="b")] * 3 + [pb.ScoreItem(response="b")]),
         grpc.StatusCode.INVALID_ARGUMENT, "items[3].prompt"),
        (pb.ScoreRequest(items=[pb.ScoreItem(prompt=long_text, response="b")]), grpc.StatusCode.INVALID_ARGUMENT,
         "items[0].prompt is longer"),
        (pb.ScoreRequest(items=[pb.ScoreItem(prompt="a", response="b")] * 257), grpc.StatusCode.INVALID_ARGUMENT,
         "limit is 256"),
        (pb.ScoreRequest(items=[pb.ScoreItem(messages=[pb.Message(role="user", content="hi"),
                                                       pb.Message(role="assistant", content="yo")])]),
         grpc.StatusCode.INVALID_ARGUMENT, "chat template"),
    ]
    with grpc.insecure_channel(gateway.target) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        for request, code, text in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(request, timeout=30)
            assert err.value.code() == code and text in err.value.details(), (text, err.value.details())
        # the richer error model: the failing field as a google.rpc.BadRequest field violation
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(cases[3][0], timeout=30)
        (violation,) = _details(err.value, "BadRequest").field_violations
        assert violation.field == "items[3].prompt" and "required" in violation.description
        assert ("x-request-id" in dict(err.value.trailing_metadata()))
        with pytest.raises(grpc.RpcError) as err:
            stub.ScoreBestOfN(pb.BestOfNRequest(prompt="", candidates=["a"]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in err.value.details()
        # invalid UTF-8 cannot be built with the stubs: send raw bytes
        raw = ch.unary_unary("/tribune.v1.RewardService/Score")
        bad_utf8 = b"\x0a\x08\x0a\x02\xff\xfe\x12\x02ok"      # items { prompt: 0xfffe, response: "ok" }
        with pytest.raises(grpc.RpcError) as err:
            raw(bad_utf8, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.value.details()
        # fuzz: random and truncated messages; the server must answer every one and stay up
        rng = random.Random(0)
        good = pb.ScoreRequest(items=[pb.ScoreItem(prompt="name two fruits", response="fig kiwi")]).SerializeToString()
        codes = {}
        for i in range(2000):
            if i % 2:
                payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            else:
                payload = good[:rng.randint(0, len(good))]
            try:
                raw(payload, timeout=30)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as e:
                assert e.code() != grpc.StatusCode.UNAVAILABLE, "the gateway went away"
                codes[e.code().name] = codes.get(e.code().name, 0) + 1
        assert sum(codes.values()) == 2000 and len(codes) >= 2, codes
        assert len(stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(prompt="a", response="b")]), timeout=30).rewards) == 1
    assert gateway.proc.poll() is None


def test_metrics_count_requests_by_code(gateway):
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=10).read().decode()
    assert 'tribune_gateway_requests_total{code="OK",method="Score"}' in text
    assert "tribune_gateway_request_seconds_bucket" in text and "tribune_gateway_batch_items_count" in text
    assert "tribune_gateway_triton_ready 1.0" in text


def test_a_busy_metrics_port_is_a_clear_error_and_stop_frees_it(repo_dir):
    import socket

    from tribune.services.common.config import build_config
    from tribune.services.gateway import GatewayThread
    from tribune.services.gateway_core import GatewayConfig

    port, metrics_port = free_ports(2)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", metrics_port))
        busy.listen()
        proc = tribune("gateway", "--repository", repo_dir, "--triton-url", "127.0.0.1:1", "--port", port,
                       "--metrics-port", metrics_port, check=False, timeout=120)
    assert proc.returncode == 2 and f"cannot serve metrics on 127.0.0.1:{metrics_port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    proc = tribune("gateway", "--repository", repo_dir, "--triton-url", "127.0.0.1:1", "--port", port,
                   "--metrics-port", "0", "--max-prompt-length", "64", check=False, timeout=120)
    assert proc.returncode == 2 and "--max-prompt-length 64 leaves no room" in proc.stderr, proc.stderr
    # in one process (`tribune serve --with-gateway`, tests): a stopped gateway frees its metrics port
    cfg = build_config(GatewayConfig, {"repository": repo_dir, "triton_url": "127.0.0.1:1", "port": port,
                                       "metrics_port": metrics_port, "grace_s": 0.5})
    for _ in range(2):
        gw = GatewayThread(cfg).start()
        gw.stop()
        assert gw.error is None and not gw.thread.is_alive()


def test_health_follows_triton_and_unavailable_when_it_is_gone(repo_dir):
    ports = tuple(free_ports(3))
    gw = Gateway(repo_dir, f"127.0.0.1:{ports[0]}")
    try:
        with grpc.insecure_channel(gw.target) as ch:
            wait_health(ch, NOT_SERVING, timeout=5)
            stub = reward_pb2_grpc.RewardServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(prompt="a", response="b")]), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            server = start_serve(repo_dir, ports=ports)
            try:
                wait_health(ch, SERVING)
                assert len(stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(prompt="a", response="b")])).rewards) == 1
            finally:
                server.stop()
            wait_health(ch, NOT_SERVING)
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(prompt="a", response="b")]), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert gw.stop() == 0


def _self_signed(tmp: Path, name: str, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    key, cert = tmp / f"{name}.key", tmp / f"{name}.crt"
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
    else:
        csr = tmp / f"{name}.csr"
        subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                        "-subj", f"/CN={name}"], check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
                        "-out", cert, "-days", "1"], check=True, capture_output=True)
    return key, cert


def test_auth_tls_and_mutual_tls(served, repo_dir, tmp_path):
    import urllib.request

    from tribune.services.client import AUTH_TOKEN_ENV, ClientConfig
    from tribune.services.reward_client import RewardClient

    request = pb.ScoreRequest(items=[pb.ScoreItem(prompt="name two fruits", response="fig kiwi")])
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    gw = Gateway(repo_dir, served.url, "--auth-token-file", str(token))
    try:
        with grpc.insecure_channel(gw.target) as ch:
            wait_health(ch, SERVING)                # health stays open for probes
            stub = reward_pb2_grpc.RewardServiceStub(ch)
            for md in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Score(request, metadata=md, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert len(stub.Score(request, metadata=(("authorization", "Bearer s3cret"),), timeout=10).rewards) == 1
            with pytest.raises(grpc.RpcError) as err:          # a made-up method: counted under one label
                ch.unary_unary("/made.up/Method1")(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()
        assert 'tribune_gateway_requests_total{code="UNAUTHENTICATED",method="Score"} 2.0' in metrics
        assert 'code="UNAUTHENTICATED",method="unknown"' in metrics and "Method1" not in metrics
        # the Python client sends the token however it is given: a file, or the environment
        for options, env in (({"auth_token_file": token}, None), ({}, "s3cret")):
            with pytest.MonkeyPatch.context() as mp:
                mp.delenv(AUTH_TOKEN_ENV, raising=False)
                if env:
                    mp.setenv(AUTH_TOKEN_ENV, env)
                with RewardClient(ClientConfig(url=gw.target, **options)) as client:
                    assert client.score([("name two fruits", "fig kiwi")]).rewards.shape == (1,)
    finally:
        gw.stop()

    server_key, server_cert = _self_signed(tmp_path, "server")
    gw = Gateway(repo_dir, served.url, "--tls-cert", str(server_cert), "--tls-key", str(server_key))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=server_cert.read_bytes())
        with grpc.secure_channel(f"localhost:{gw.port}", creds) as ch:
            wait_health(ch, SERVING)
            assert len(reward_pb2_grpc.RewardServiceStub(ch).Score(request, timeout=10).rewards) == 1
        with grpc.insecure_channel(gw.target) as ch:        # plaintext to a TLS port fails
            with pytest.raises(grpc.RpcError):
                reward_pb2_grpc.RewardServiceStub(ch).Score(request, timeout=5)
    finally:
        gw.stop()

    ca = _self_signed(tmp_path, "client-ca")
    client_key, client_cert = _self_signed(tmp_path, "client", ca=ca)
    gw = Gateway(repo_dir, served.url, "--tls-cert", str(server_cert), "--tls-key", str(server_key),
                 "--tls-client-ca", str(ca[1]))
    try:
        without = grpc.ssl_channel_credentials(root_certificates=server_cert.read_bytes())
        with grpc.secure_channel(f"localhost:{gw.port}", without) as ch:
            with pytest.raises(grpc.RpcError) as err:
                reward_pb2_grpc.RewardServiceStub(ch).Score(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with_cert = grpc.ssl_channel_credentials(root_certificates=server_cert.read_bytes(),
                                                 private_key=client_key.read_bytes(),
                                                 certificate_chain=client_cert.read_bytes())
        with grpc.secure_channel(f"localhost:{gw.port}", with_cert) as ch:
            wait_health(ch, SERVING)
            assert len(reward_pb2_grpc.RewardServiceStub(ch).Score(request, timeout=10).rewards) == 1
    finally:
        gw.stop()


def test_bounded_queue_answers_resource_exhausted(served, repo_dir):
    from tribune.services.judge import JudgeConfig, load_judge

    gw = Gateway(repo_dir, served.url, "--max-queue-items", "4", "--max-items", "4", "--batch-max-delay-ms", "200")
    try:
        request = pb.ScoreRequest(items=[pb.ScoreItem(prompt="name two fruits", response="fig kiwi")] * 3)
        with grpc.insecure_channel(gw.target) as ch:
            wait_health(ch, SERVING)
            stub = reward_pb2_grpc.RewardServiceStub(ch)
            futures = [stub.Score.future(request, timeout=30) for _ in range(6)]
            codes, retry = [], []
            for f in futures:
                try:
                    f.result()
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        retry.append(_details(e, "RetryInfo").retry_delay.ToTimedelta().total_seconds())
            assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes
            assert retry and all(0 < s <= 5 for s in retry), retry
            assert len(stub.Score(request, timeout=30).rewards) == 3
        # a --judge-url client sends at most the service's own max_items per request
        judge = load_judge(JudgeConfig(judge_url=gw.target), ["name two fruits"])
        assert judge.batch == 4 and len(judge.score(["name two fruits"] * 10, ["fig kiwi"] * 10)) == 10
    finally:
        gw.stop()


def test_a_short_deadline_fails_alone_and_the_gateway_stays_up(gateway):
    request = pb.ScoreRequest(items=[pb.ScoreItem(prompt="name two fruits", response="fig kiwi")] * 4)
    with grpc.insecure_channel(gateway.target) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        hurried = stub.Score.future(request, timeout=0.0005)
        patient = [stub.Score.future(request, timeout=30) for _ in range(4)]
        with pytest.raises(grpc.RpcError) as err:
            hurried.result()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert all(len(f.result().rewards) == 4 for f in patient)
        assert len(stub.Score(request, timeout=30).rewards) == 4     # still ready, no UNAVAILABLE
        wait_health(ch, SERVING, timeout=2)


def test_gateway_runs_without_torch_and_scores_like_the_one_with_it(gateway, served, repo_dir):
    """The gateway image ships no torch: the whole serving path must work without it."""
    _scores_like(Gateway(repo_dir, served.url, without_torch=True), gateway)


def _scores_like(other: Gateway, gateway: Gateway) -> None:
    """``other`` (stopped afterwards) scores the same items as ``gateway``, within 1e-6."""
    items = pb.ScoreRequest(items=[pb.ScoreItem(prompt=p, response=r) for p, r in _items()])
    with grpc.insecure_channel(gateway.target) as ch:
        expected = reward_pb2_grpc.RewardServiceStub(ch).Score(items, timeout=30).rewards
    try:
        with grpc.insecure_channel(other.target) as ch:
            wait_health(ch, SERVING)
            got = reward_pb2_grpc.RewardServiceStub(ch).Score(items, timeout=30).rewards
        np.testing.assert_allclose(got, expected, atol=1e-6)
    finally:
        assert other.stop() == 0, "".join(other.lines)[-3000:]


def test_the_gateway_extra_installs_alone_and_scores_without_torch(gateway, served, repo_dir, tmp_path):
    """`pip install "tribune-rlhf[gateway]"` (constraints.txt's versions) into a fresh virtual
    environment: no torch, no PyTriton, no ONNX Runtime, and its `tribune gateway` scores like the
    development install's."""
    src = copy_source(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile",
                           "-c", "constraints.txt", ".[gateway]"], cwd=src, capture_output=True, text=True,
                          timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for absent in ("torch", "pytriton", "onnxruntime"):
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {absent}"], cwd=tmp_path,
                               capture_output=True, env=env)
        assert probe.returncode != 0, f"{absent} is importable from the [gateway] install"
    _scores_like(Gateway(repo_dir, served.url, command=[str(venv / "bin" / "tribune")], env=env), gateway)


def test_judge_plugins_callable_and_service(gateway):
    """`--judge module:function` and `--judge-url H:P` (a RewardService) give the same kind of scores."""
    from tribune.services.common.errors import UserError
    from tribune.services.judge import JudgeConfig, load_judge
    from tribune.trainer.task.judge import gold_score

    prompts, responses = zip(*_items())
    callable_judge = load_judge(JudgeConfig(judge="tribune.trainer.task.judge:gold_score"))
    assert callable_judge.score(list(prompts), list(responses)) == [gold_score(p, r) for p, r in _items()]
    service = load_judge(JudgeConfig(judge_url=gateway.target))
    with grpc.insecure_channel(gateway.target) as ch:
        direct = reward_pb2_grpc.RewardServiceStub(ch).Score(
            pb.ScoreRequest(items=[pb.ScoreItem(prompt=p, response=r) for p, r in _items()]), timeout=30).rewards
    np.testing.assert_allclose(service.score(list(prompts), list(responses)), direct, atol=1e-6)
    assert load_judge(JudgeConfig()) is None
    with pytest.raises(UserError, match="cannot import"):
        load_judge(JudgeConfig(judge="tribune.trainer.task.judge:no_such_judge"))
    with pytest.raises(UserError, match="cannot import"):
        load_judge(JudgeConfig(judge=":gold_score"))                       # an empty module name
    with pytest.raises(ValueError, match="one of them"):
        JudgeConfig(judge="a:b", judge_url="127.0.0.1:1")
    # another task's judge: refused on the first prompt, when loaded with the data it will judge
    keyword = "tribune.trainer.task.keyword:gold_score"
    with pytest.raises(UserError, match=r"--judge .*keyword:gold_score cannot score the prompt 'name two fruits'"
                                        r".*ValueError: not a keyword-task prompt"):
        load_judge(JudgeConfig(judge=keyword), list(prompts))
    assert load_judge(JudgeConfig(judge=keyword), ["write four words using moon"]) is not None


def test_a_judge_service_needs_only_score():
    """A protocol double of another system's RewardService that implements Score alone (no
    GetModelInfo): a --judge-url judge sends its default batch (the real gateway: above)."""
    from concurrent.futures import ThreadPoolExecutor

    from tribune.services.judge import JudgeConfig, load_judge

    class ScoreOnly(reward_pb2_grpc.RewardServiceServicer):
        def Score(self, request, context):
            return pb.ScoreResponse(rewards=[float(len(i.response)) for i in request.items])

    server = grpc.server(ThreadPoolExecutor(2))
    reward_pb2_grpc.add_RewardServiceServicer_to_server(ScoreOnly(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        judge = load_judge(JudgeConfig(judge_url=f"127.0.0.1:{port}"), ["name two fruits"])
        assert judge.batch == 128 and judge.score(["p"] * 3, ["ab", "abc", ""]) == [2.0, 3.0, 0.0]
    finally:
        server.stop(0)


NODE_CLIENT = REPO / "clients" / "node"


def test_a_node_client_built_from_the_protos_alone_scores_through_the_gateway(gateway, served, repo_dir):
    """Another language, from protos/ alone (@grpc/proto-loader reads the .proto at runtime), an
    empty response included. Skipped only where node is not installed; its two npm packages come
    from `make node-client` (run by `make test`), installed here if missing."""
    import json
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "proto-loader").is_dir():
        proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"`make node-client` (npm ci) failed:\n{proc.stderr[-2000:]}"
    pairs = [("name two fruits", "fig kiwi"), ("name two fruits", ""), ("count from one to three", "one two three")]
    request = {"items": [{"prompt": p, "response": r} for p, r in pairs],
               "best_of_n": {"prompt": "name two fruits", "candidates": ["fig red", "", "fig kiwi"]}}
    proc = subprocess.run([node, str(NODE_CLIENT / "score.js"), gateway.target], input=json.dumps(request),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    with grpc.insecure_channel(gateway.target) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        want = stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(prompt=p, response=r) for p, r in pairs]), timeout=30)
        best = stub.ScoreBestOfN(pb.BestOfNRequest(**request["best_of_n"]), timeout=30)
    np.testing.assert_allclose(got["score"]["rewards"], want.rewards, atol=1e-6)
    np.testing.assert_allclose(got["score"]["normalized_rewards"], want.normalized_rewards, atol=1e-6)
    assert got["score"]["request_id"] == "node-1" and got["score"]["model_id"] == want.model_id
    np.testing.assert_allclose(got["best_of_n"]["rewards"], best.rewards, atol=1e-6)
    assert got["best_of_n"]["best_index"] == best.best_index and got["best_of_n"]["ranking"] == list(best.ranking)
    np.testing.assert_allclose([r["rewards"][0] for r in got["stream"]], want.rewards, atol=1e-6)
    assert got["invalid"]["code"] == "INVALID_ARGUMENT" and "items[0].prompt" in got["invalid"]["details"]
