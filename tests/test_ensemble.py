"""Reward-model ensembles: one ONNX graph of K members → `tribune serve` → client → gateway.

The ensemble is made from the session's reward model in train-rm --ensemble's layout
(``conftest.make_ensemble``); a single reward model's repository is checked to stay exactly
contract v1 in test_serving.py and test_gateway.py.
"""
import json
import shutil

import grpc
import numpy as np
import pytest
import torch

from tribune.services.client import ClientConfig, TritonScorer
from tribune.services.contract import REWARD, ContractError, ServedFacts, check_metadata
from tribune.services.repository import read_config, verify_repository, write_config, write_manifest
from tests.conftest import tribune
from tests.servers import start_serve
from tests.test_serving import _batch, _fingerprint
from tribune.v1 import reward_pb2 as pb
from tribune.v1 import reward_pb2_grpc

K = 3
FACTS = dict(contract_version=1, tokenizer_fingerprint="f", reward_mean=0.5, reward_std=2.0, max_sequence_length=64,
             vocab_size=100, max_batch_size=8, reward_model_id="rm-x", max_length=64, max_prompt_length=48)


def _members(ensemble_rm_dir):
    from tribune.trainer.modeling import load_reward_model

    names = json.loads((ensemble_rm_dir / "ensemble.json").read_text())["members"]
    return [load_reward_model(ensemble_rm_dir / n).eval() for n in names]


@pytest.fixture(scope="module")
def ensemble_repo(ensemble_rm_dir, sft_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble-repo") / "repo"
    tribune("export", "--reward", ensemble_rm_dir, "--reference", sft_dir, "--output", out, "--max-batch-size", "8")
    return out


# ---------------------------------------------------------------- facts (fast, no server)

def test_served_facts_standardise_each_member_with_its_own_statistics():
    old = ServedFacts.parse(FACTS)                       # a repository from before ensembles
    assert old.ensemble_size == 1 and old.member_reward_mean == (0.5,) and old.member_reward_std == (2.0,)
    np.testing.assert_allclose(old.member_spread(np.array([[3.0], [-1.0]])), [0.0, 0.0])
    facts = ServedFacts.parse(json.dumps({**FACTS, "ensemble_size": 3, "member_reward_mean": [0.0, 1.0, -2.0],
                                          "member_reward_std": [1.0, 2.0, 4.0]}))
    scores = np.array([[1.0, 3.0, 2.0], [0.0, 1.0, -2.0]])          # (B, K) raw
    z = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])               # each member: (s − mean_k) / std_k
    np.testing.assert_allclose(facts.standardise_members(scores), z)
    np.testing.assert_allclose(facts.member_spread(scores), [0.0, 0.0])    # raw scores differ, opinions agree
    raw = np.array([[0.0, 1.0 + 2.0, -2.0 - 4.0]])                 # z = (0, 1, −1)
    np.testing.assert_allclose(facts.member_spread(raw), [np.std([0.0, 1.0, -1.0])])
    np.testing.assert_allclose(facts.member_spread(torch.tensor(raw)).numpy(), facts.member_spread(raw))
    assert ServedFacts.parse(facts.to_dict()) == facts
    with pytest.raises(ContractError, match="ensemble_size = 3"):
        ServedFacts.parse({**FACTS, "ensemble_size": 3, "member_reward_mean": [0.0], "member_reward_std": [1.0]})
    with pytest.raises(ContractError, match="columns"):
        facts.member_spread(np.zeros((2, 2)))
    # the reward model's scores of its raters' favourites: rows of K finite numbers, or none
    assert facts.preferred_member_scores == () and old.preferred_member_scores == ()
    rows = [[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]]
    kept = ServedFacts.parse({**facts.to_dict(), "preferred_member_scores": rows})
    assert kept.preferred_member_scores == ((1.0, 2.0, 3.0), (0.5, 0.0, -1.0)) and ServedFacts.parse(kept.to_dict()) == kept
    assert kept.preferred_rewards == pytest.approx((2.0, -1 / 6)) and facts.preferred_rewards == ()   # the served mean
    for bad in ([[1.0, 2.0]], [[1.0, 2.0, float("nan")]], [1.0, 2.0, 3.0]):
        with pytest.raises(ContractError, match="preferred_member_scores"):
            ServedFacts.parse({**facts.to_dict(), "preferred_member_scores": bad})


# ---------------------------------------------------------------- export

def test_a_malformed_ensemble_directory_is_refused_naming_the_problem(tmp_path):
    from tribune.services.common.errors import UserError
    from tribune.trainer.export import reward_members

    for i in range(2):
        (tmp_path / f"member-{i}").mkdir()
        (tmp_path / f"member-{i}" / "config.json").write_text("{}")
    cases = [({"ensemble_size": 3, "members": ["member-0", "member-1"]}, "ensemble_size is 3, but 2 members"),
             ({"ensemble_size": 1, "members": ["../elsewhere"]}, "inside"),
             ({"ensemble_size": 2, "members": ["member-0", "member-0"]}, "distinct"),
             ({"ensemble_size": 0, "members": []}, "non-empty list"),
             ({"ensemble_size": 2, "members": ["member-0", "member-9"]}, "member-9 is not a Hugging Face model")]
    for spec, text in cases:
        (tmp_path / "ensemble.json").write_text(json.dumps(spec))
        with pytest.raises(UserError, match=text):
            reward_members(tmp_path)
    (tmp_path / "ensemble.json").write_text(json.dumps({"ensemble_size": 2, "members": ["member-0", "member-1"]}))
    assert reward_members(tmp_path) == [tmp_path / "member-0", tmp_path / "member-1"]


@pytest.mark.slow
def test_ensemble_export_is_one_graph_with_per_member_parity(ensemble_repo, ensemble_rm_dir, task_dir, tmp_path):
    import onnx
    import onnxruntime as ort
    from tritonclient.grpc import model_config_pb2 as mc

    from tribune.trainer.modeling import score_sequences

    cfg = read_config(ensemble_repo / "reward" / "config.pbtxt")      # Triton's own ModelConfig schema
    assert [(o.name, list(o.dims), o.data_type) for o in cfg.output] == [
        ("rewards", [1], mc.TYPE_FP32), ("member_rewards", [K], mc.TYPE_FP32)]
    assert cfg.platform == "onnxruntime_onnx" and len(cfg.model_warmup) == 1
    manifest = json.loads((ensemble_repo / "tribune.json").read_text())
    served = manifest["served"]
    member_stats = [json.loads((ensemble_rm_dir / f"member-{k}" / "reward_stats.json").read_text()) for k in range(K)]
    assert served["ensemble_size"] == K
    assert served["member_reward_mean"] == [s["mean"] for s in member_stats]
    assert served["member_reward_std"] == [s["std"] for s in member_stats]
    assert served["reward_mean"] == pytest.approx(np.mean(served["member_reward_mean"]))   # derived, and says so
    assert "derived" in manifest["reward_statistics_source"]["source"]
    assert served["preferred_member_scores"] == []      # derived statistics: no scores of all members on one set
    assert [m["name"] for m in manifest["sources"]["reward"]["members"]] == [f"member-{k}" for k in range(K)]
    parity = manifest["export"]["parity_max_abs_diff"]
    assert set(parity) == {"reward", "reference", *(f"reward.member-{k}" for k in range(K))}
    assert max(parity.values()) <= 1e-4

    # the graph itself, independently of the export's own check: standard ops, one file
    path = ensemble_repo / "reward" / "1" / "model.onnx"
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    members = _members(ensemble_rm_dir)
    for side in ("left", "right"):
        ids, mask, _ = _batch(task_dir, 7, side, seed=1)
        rewards, scores = session.run(["rewards", "member_rewards"], {"input_ids": ids.numpy(),
                                                                       "attention_mask": mask.numpy()})
        with torch.no_grad():
            want = np.stack([score_sequences(m, ids, mask).numpy() for m in members], -1)     # (B, K)
        np.testing.assert_allclose(scores, want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(rewards[:, 0], want.mean(-1), atol=1e-4, rtol=0)
        assert np.abs(want[:, 1] - want[:, 0]).max() > 1e-2, "the members should differ"

    # a config whose member_rewards disagrees with the manifest's K is refused before serving
    bad = tmp_path / "repo"
    shutil.copytree(ensemble_repo, bad)
    cfg.output[1].dims[:] = [K - 1]
    write_config(bad / "reward" / "config.pbtxt", cfg)
    write_manifest(bad, {k: v for k, v in manifest.items() if k != "files"})
    with pytest.raises(ContractError, match=f"ensemble_size {K}"):
        verify_repository(bad)


# ---------------------------------------------------------------- served: client and gateway

@pytest.fixture(scope="module")
def served_ensemble(ensemble_repo):
    """`tribune serve --with-gateway` on the ensemble repository (one process for both)."""
    from tests.test_gateway import SERVING, wait_health

    server = start_serve(ensemble_repo, gateway=True)
    server.gateway = server.gateway_url
    with grpc.insecure_channel(server.gateway) as ch:
        grpc.channel_ready_future(ch).result(timeout=60)    # "ready" is printed before the gateway binds
        wait_health(ch, SERVING)
    yield server
    assert server.stop() == 0, "".join(server.lines)[-3000:]


@pytest.mark.slow
def test_served_members_equal_pytorch_and_rewards_are_their_mean(served_ensemble, ensemble_repo, ensemble_rm_dir,
                                                                 task_dir):
    import tritonclient.grpc as g

    from tribune.trainer.modeling import score_sequences

    members = _members(ensemble_rm_dir)
    with TritonScorer(ClientConfig(url=served_ensemble.url, max_in_flight=3), _fingerprint(ensemble_repo)) as scorer:
        assert scorer.facts.ensemble_size == K
        for side in ("left", "right"):
            ids, mask, _ = _batch(task_dir, 19, side)       # 19 rows > max batch 8: 3 chunks
            with torch.no_grad():
                want = np.stack([score_sequences(m, ids, mask).numpy() for m in members], -1)    # (B, K)
            rewards, scores = scorer.score_with_members_async(ids.numpy(), mask.numpy()).result()
            assert rewards.shape == (19,) and scores.shape == (19, K)
            np.testing.assert_allclose(scores, want, atol=1e-4, rtol=0)
            np.testing.assert_allclose(rewards, scores.mean(-1), atol=1e-5, rtol=0)
            np.testing.assert_array_equal(scorer.score(ids.numpy(), mask.numpy()), rewards)
            np.testing.assert_array_equal(scorer.score_members_async(ids.numpy(), mask.numpy()).result(), scores)
    # a v1 client, which knows only `rewards`, still finds its contract and gets its tensor
    client = g.InferenceServerClient(served_ensemble.url)
    meta = client.get_model_metadata("reward", as_json=True)
    check_metadata(REWARD, meta)
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["member_rewards"] == ["-1", str(K)]
    inputs = [g.InferInput(n, [1, 4], "INT64") for n in ("input_ids", "attention_mask")]
    inputs[0].set_data_from_numpy(np.array([[5, 6, 7, 1]], dtype=np.int64))
    inputs[1].set_data_from_numpy(np.ones((1, 4), dtype=np.int64))
    assert client.infer("reward", inputs, client_timeout=30).as_numpy("rewards").shape == (1, 1)


@pytest.mark.slow
def test_gateway_returns_the_spread_of_standardised_members(served_ensemble, ensemble_repo):
    from tribune.services.common.text import encode_pair, load_tokenizer
    from tests.test_gateway import _items
    from tribune.trainer.data import pad_left

    tok = load_tokenizer(ensemble_repo / "tokenizer")
    seqs = [encode_pair(tok, p, r, 48, 64)[0] for p, r in _items()]
    with TritonScorer(ClientConfig(url=served_ensemble.url), _fingerprint(ensemble_repo), models=("reward",)) as s:
        rewards, members = s.score_with_members_async(*[t.numpy() for t in pad_left(seqs, tok.pad_token_id)]).result()
    served = json.loads((ensemble_repo / "tribune.json").read_text())["served"]
    z = (members - np.array(served["member_reward_mean"])) / np.array(served["member_reward_std"])
    want = z.std(-1)                                                         # population std over members
    assert np.abs(want - members.std(-1)).max() > 1e-2, "standardising should matter for these members"
    with grpc.insecure_channel(served_ensemble.gateway) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        reply = stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(prompt=p, response=r) for p, r in _items()]),
                           timeout=30)
        np.testing.assert_allclose(reply.rewards, rewards, atol=1e-5)
        np.testing.assert_allclose(reply.ensemble_spread, want, atol=1e-4)
        np.testing.assert_allclose(reply.normalized_rewards,
                                   (rewards - served["reward_mean"]) / served["reward_std"], atol=1e-4)
        prompt, responses = _items()[0][0], [r for _, r in _items()[:2]]
        best = stub.ScoreBestOfN(pb.BestOfNRequest(prompt=prompt, candidates=responses), timeout=30)
        np.testing.assert_allclose(best.ensemble_spread, want[:2], atol=1e-4)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert info.ensemble_size == K and info.reward_mean == pytest.approx(served["reward_mean"])
        assert list(info.preferred_rewards) == []       # derived statistics: no height served, here either


@pytest.mark.slow
def test_ppo_through_the_gateway_penalises_the_served_spread(served_ensemble, ensemble_repo, tmp_path):
    """`tribune ppo --reward-gateway` against an ensemble: the uncertainty penalty and the
    disagreement it optimises and monitors are the served ones (real Triton, gateway and
    reference); the members' minimum, which needs each member, is refused at connect."""
    from tribune.services.common.config import build_config
    from tribune.services.common.errors import UserError
    from tribune.services.common.text import load_tokenizer
    from tests.test_gateway import _items
    from tribune.trainer.ppo_config import PPOConfig
    from tribune.trainer.ppo_monitor import generated_from_text
    from tribune.trainer.ppo_step import optimised_score
    from tribune.trainer.scorers import connect

    tok = load_tokenizer(ensemble_repo / "tokenizer")
    common = {"policy": ensemble_repo, "prompts": tmp_path / "p.jsonl", "output": tmp_path / "out",
              "reward_gateway": served_ensemble.gateway, "reference_url": served_ensemble.url}
    cfg = build_config(PPOConfig, common)
    scorers = connect(cfg, tok, _fingerprint(ensemble_repo))
    try:
        assert scorers.facts.ensemble_size == K
        g = generated_from_text(tok, [p for p, _ in _items()], [r for _, r in _items()], max_prompt_length=48,
                                max_new_tokens=16)
        served = scorers.reward.score(scorers._items(g))                      # what the gateway says
        assert served.spread.max() > 1e-2, "the members should disagree on some item"
        members = torch.from_numpy(scorers.score_members_async(g).result())   # (B, K) stand-ins
        optimised, disagreement = optimised_score(cfg, scorers.facts, members)
        np.testing.assert_allclose(disagreement.numpy(), served.spread, atol=1e-4)
        np.testing.assert_allclose(optimised.numpy(), served.normalized - cfg.uncertainty_coef * served.spread,
                                   atol=1e-4)
    finally:
        scorers.close()
    with pytest.raises(UserError, match="worst needs each member's score"):
        connect(build_config(PPOConfig, {**common, "ensemble_reward": "worst"}), tok, _fingerprint(ensemble_repo))
