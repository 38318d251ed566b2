"""PPO with a reward model whose tokenizer differs from the policy's, through the text gateway.

Two repositories, two `tribune serve`s: the session's (the policy's tokenizer: `reference`) and
one whose reward model has another word-level tokenizer (other ids, a larger vocabulary, a
chat template), behind `tribune gateway`. That reward model is the session's reward model
with its embedding rows moved to the new ids, so it scores text exactly as the session's
scores the same words as token ids: the text path must give the token path's rewards.
"""
import json
import shutil

import numpy as np
import pytest

from tribune.services.client import ClientOptions, TritonScorer
from tribune.services.common.text import encode_pair, load_tokenizer, pad
from tribune.services.repository import tokenizer_fingerprint
from tribune.services.reward_client import RewardClient
from tests.conftest import JUDGE, last_json, tribune
from tests.servers import start_serve
from tests.test_gateway import SERVING, Gateway, wait_health

pytestmark = pytest.mark.slow

# renders a conversation as its contents, so chat prompts are the words the models were trained on
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
EXTRA_WORDS = ["zebra", "quartz", "violin", "meadow", "copper", "lantern", "harbor"]


def retokenized(src, dst, seed=0, causal=False):
    """``src``'s model with a new tokenizer: its words shuffled to other ids plus extra words,
    embedding rows moved along (output rows too when untied), a chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tribune.trainer.task.make import build_tokenizer

    old = load_tokenizer(src)
    specials = set(old.all_special_tokens)
    words = [w for w, _ in sorted(old.get_vocab().items(), key=lambda kv: kv[1]) if w not in specials]
    rng = np.random.default_rng(seed)
    shuffled = [words[i] for i in rng.permutation(len(words))] + EXTRA_WORDS
    new = build_tokenizer(dst, shuffled)
    new.chat_template = TEMPLATE
    new.save_pretrained(dst)
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = cls.from_pretrained(src, dtype=torch.float32)
    rows = [old.get_vocab()[t] for t, _ in sorted(new.get_vocab().items(), key=lambda kv: kv[1])
            if t in old.get_vocab()]
    emb_in = model.get_input_embeddings().weight.detach().clone()
    out_layer = model.get_output_embeddings() if causal else None
    tied = out_layer is not None and out_layer.weight is model.get_input_embeddings().weight
    emb_out = out_layer.weight.detach().clone() if out_layer is not None and not tied else None
    model.resize_token_embeddings(len(new), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[:len(rows)] = emb_in[rows]
        if emb_out is not None:
            model.get_output_embeddings().weight[:len(rows)] = emb_out[rows]
    model.config.pad_token_id, model.config.eos_token_id = new.pad_token_id, new.eos_token_id
    model.save_pretrained(dst)
    for f in ("reward_stats.json", "config.resolved.json"):
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    return dst


@pytest.fixture(scope="module")
def other_family(rm_dir, sft_dir, tmp_path_factory):
    """A repository whose models use another tokenizer; its server and a gateway in front of it."""
    tmp = tmp_path_factory.mktemp("other")
    repo = tmp / "repo"
    tribune("export", "--reward", retokenized(rm_dir, tmp / "rm"), "--reference",
            retokenized(sft_dir, tmp / "ref", causal=True), "--output", repo, "--max-batch-size", "8")
    server = start_serve(repo)
    gw = Gateway(repo, server.url)
    try:
        import grpc

        with grpc.insecure_channel(gw.target) as ch:
            wait_health(ch, SERVING)
        yield repo, server, gw
    finally:
        gw.stop()
        server.stop()


@pytest.fixture(scope="module")
def chat_policy(sft_dir, tmp_path_factory):
    """The session's SFT policy with a chat template (the same ids, so the same reference)."""
    out = tmp_path_factory.mktemp("chat") / "policy"
    shutil.copytree(sft_dir, out, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    tok = load_tokenizer(out)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    return out


def _chat_prompts(src, dst):
    rows = [json.loads(l) for l in src.read_text().splitlines() if l.strip()]
    dst.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]}]}) + "\n"
                           for r in rows))
    return dst


def test_text_scores_equal_token_scores_across_tokenizers(other_family, served, repo_dir, task_dir):
    repo, _, gw = other_family
    mine, theirs = load_tokenizer(repo_dir / "tokenizer"), load_tokenizer(repo / "tokenizer")
    assert tokenizer_fingerprint(mine) != tokenizer_fingerprint(theirs)
    assert mine("fig kiwi")["input_ids"] != theirs("fig kiwi")["input_ids"]
    pairs = [(json.loads(l)["prompt"], json.loads(l)["chosen"])
             for l in (task_dir / "prefs_eval.jsonl").read_text().splitlines()[:20] if "chosen" in l]
    pairs.append((pairs[0][0], ""))      # a policy that stops at once: scored as prompt + EOS
    with TritonScorer(ClientOptions().at(served.url), tokenizer_fingerprint(mine), models=("reward",)) as tokens:
        ids = [encode_pair(mine, p, r, tokens.facts.max_prompt_length, tokens.facts.max_length)[0] for p, r in pairs]
        expected = tokens.score(*pad(ids, mine.pad_token_id, left=True))
    with RewardClient(ClientOptions(chunk_size=8).at(gw.target)) as client:
        client.wait_for_ready()
        text = client.score(pairs)
        chat = client.score([{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
                             for p, r in pairs])
        candidates = [r for _, r in pairs[:4]]
        best = client.best_of_n(pairs[0][0], candidates)
        same_prompt = client.score([(pairs[0][0], r) for r in candidates]).rewards
        info = client.model_info()
    np.testing.assert_allclose(text.rewards, expected, atol=1e-4)
    np.testing.assert_allclose(chat.rewards, expected, atol=1e-4)
    assert best.best_index == int(np.argmax(same_prompt))
    np.testing.assert_allclose(best.rewards, same_prompt, atol=1e-6)
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(theirs)


def test_ppo_through_the_gateway_with_chat_prompts_raises_its_reward(other_family, served, chat_policy, rm_dir,
                                                                     task_dir, tmp_path):
    _, _, gw = other_family
    out = tmp_path / "ppo"
    prompts = _chat_prompts(task_dir / "prompts_train.jsonl", tmp_path / "chat_prompts.jsonl")
    held_out = _chat_prompts(task_dir / "prompts_eval.jsonl", tmp_path / "chat_eval.jsonl")
    metrics = last_json(tribune(
        "ppo", "--policy", chat_policy, "--prompts", prompts, "--eval-prompts", held_out, "--reward-gateway",
        gw.target, "--reference-url", served.url, "--output", out, "--value-init", rm_dir, "--iterations", "10",
        "--rollout-batch-size", "32", "--mini-batch-size", "8", "--learning-rate", "3e-4", "--gold-every", "100",
        "--gold-eval-size", "128", *JUDGE).stdout)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    scores = [r["objective/scores"] for r in rows if "objective/scores" in r]
    assert len(scores) == 10
    # the reward it optimises, through the gateway, on the same held-out prompts before and after
    assert metrics["gold/proxy_score"] > metrics["sft/proxy_score"] + 0.1, (metrics, scores)
    assert np.mean(scores[-3:]) > np.mean(scores[:3]), scores
    assert metrics["objective/kl"] < 8.0
    resolved = json.loads((out / "config.resolved.json").read_text())
    assert resolved["max_new_tokens"] == 16 and resolved["reward_gateway"] == gw.target
    # no --preferred-eval: the monitor's height came through GetModelInfo, in the proxy's units
    stats = json.loads((rm_dir / "reward_stats.json").read_text())
    preferred = np.asarray(stats["preferred_member_scores"])[:, 0]                   # (rows,) one member
    assert metrics["monitor/preferred_score"] == pytest.approx((preferred.mean() - stats["mean"]) / stats["std"],
                                                               abs=1e-4)
    assert "preferred held-out responses, served with it (" in (out / "tribune.log").read_text()


def test_reference_with_another_tokenizer_is_refused(other_family, sft_dir, task_dir, tmp_path):
    _, server, gw = other_family
    proc = tribune("ppo", "--policy", sft_dir, "--prompts", task_dir / "prompts_train.jsonl", "--reward-gateway",
                   gw.target, "--reference-url", server.url, "--output", tmp_path / "o", "--iterations", "1",
                   *JUDGE, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "reference" in proc.stderr and "tokenizer mismatch" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_score_takes_chat_rows(served, tmp_path):
    rows = [{"prompt": "name two fruits", "response": "fig kiwi"},
            {"messages": [{"role": "user", "content": "name two fruits"}, {"role": "assistant", "content": "fig kiwi"}]},
            {"messages": [{"role": "user", "content": "name two fruits"}]}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tribune("score", "--url", served.url, "--input", src, "--output", dst)
    out = [json.loads(l) for l in dst.read_text().splitlines()]
    # no chat template on the served tokenizer: the turns joined, i.e. the same text as the plain row
    assert out[1]["reward"] == pytest.approx(out[0]["reward"], abs=1e-5)
    assert "error" in out[2] and "reward" not in out[2]
