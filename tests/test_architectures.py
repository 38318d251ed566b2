"""The architecture matrix: tiny random-weight models of 12 families, each through
export (parity checked) → `tribune serve` → scores equal to PyTorch → one PPO iteration.

Each family gets a reward model and a reference of hidden size 32 and 2 layers on the
bundled task's tokenizer. The repositories are served in two waves of six servers started
at once (a server spends its start-up waiting on Triton, not on the CPU); the PPO
iteration runs in this process against them through the trainer's own connector.
"""
import json

import numpy as np
import pytest
import torch

from tribune.services.client import ClientConfig, TritonScorer
from tribune.services.common.text import load_tokenizer
from tribune.services.contract import REFERENCE_MODEL, REWARD_MODEL
from tribune.services.repository import tokenizer_fingerprint
from tests.remote_ppo import one_iteration, ppo_config
from tests.servers import start_serves, stop_serves

pytestmark = pytest.mark.slow

HIDDEN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64)
GQA = dict(HIDDEN, num_key_value_heads=1, head_dim=16)
# model_type → tiny config overrides; the README's list of supported architectures
ARCHITECTURES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "llama": GQA, "qwen2": GQA, "qwen3": GQA, "mistral": GQA, "gemma2": GQA, "gemma3_text": GQA,
    "phi3": GQA, "olmo2": GQA, "smollm3": GQA,
    "gpt_neox": HIDDEN,
    "opt": dict(HIDDEN, ffn_dim=64, word_embed_proj_dim=32),
}
WAVES = 2


def tiny_models(model_type: str, tok, out):
    """A random-weight causal LM (the reference and policy) and reward model of one family."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    # a wider initialisation than the default 0.02, so the scores and log-probs vary enough to compare
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id or tok.eos_token_id,
                               initializer_range=0.2, **ARCHITECTURES[model_type])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out / "ref")
    cfg.num_labels = 1                                   # the scalar reward head
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(out / "rm")
    for d in ("ref", "rm"):
        tok.save_pretrained(out / d)
    return out / "ref", out / "rm"


@pytest.fixture(scope="module")
def exported(task_dir, tmp_path_factory):
    """{model type: (reference dir, reward dir, repository)}; export raises if parity fails."""
    from tribune.trainer.export import ExportConfig, run_export

    root = tmp_path_factory.mktemp("architectures")
    tok = load_tokenizer(task_dir / "tokenizer")
    out = {}
    for model_type in ARCHITECTURES:
        ref, rm = tiny_models(model_type, tok, root / model_type)
        # the TorchScript exporter keeps the matrix within the suite's time; the dynamo default passed
        # the same matrix once by hand (13 min on the shared machine)
        run_export(ExportConfig(reward=rm, reference=ref, output=root / model_type / "repo", max_batch_size=8,
                                exporter="torchscript", opset=17))
        out[model_type] = (ref, rm, root / model_type / "repo")
    return out


def _batch(task_dir, side):
    from tribune.services.common.text import encode_pair
    from tribune.trainer.data import pad_left, pad_right

    tok = load_tokenizer(task_dir / "tokenizer")
    rows = [json.loads(line) for line in (task_dir / "sft.jsonl").read_text().splitlines()[:10]]
    seqs = [encode_pair(tok, r["prompt"], r["response"], 48, 64)[0] for r in rows]
    return (pad_left if side == "left" else pad_right)(seqs, tok.pad_token_id)


def check_architecture(ref_dir, rm_dir, url, task_dir, out) -> None:
    from tribune.trainer.modeling import load_causal_lm, load_reward_model, score_sequences, sequence_logprobs

    rm, ref = load_reward_model(rm_dir).eval(), load_causal_lm(ref_dir).eval()
    fp = tokenizer_fingerprint(load_tokenizer(ref_dir))
    with TritonScorer(ClientConfig(url=url), fp) as scorer:
        assert scorer.facts.models == (REWARD_MODEL, REFERENCE_MODEL)
        for side in ("left", "right"):
            ids, mask = _batch(task_dir, side)                       # 10 rows > max batch 8: 2 chunks
            with torch.no_grad():
                want_r = score_sequences(rm, ids, mask).numpy()
                want_lp = sequence_logprobs(ref, ids, mask, 0.8).numpy()
            got_r = scorer.score(ids.numpy(), mask.numpy())
            got_lp = scorer.logprobs(ids.numpy(), mask.numpy(), temperature=0.8)
            np.testing.assert_allclose(got_r, want_r, atol=1e-4, rtol=0)
            np.testing.assert_allclose(got_lp, want_lp, atol=1e-4, rtol=0)
            assert want_r.std() > 1e-3 and np.abs(want_lp).max() > 1e-2    # something to compare
    row, moved = one_iteration(ppo_config(ref_dir, task_dir / "prompts_train.jsonl", url, url, out))
    assert moved and all(np.isfinite(v) for v in row.values()), row
    assert abs(row["objective/kl"]) < 1e-3, row          # the served reference is the policy's own start


@pytest.mark.parametrize("wave", range(WAVES))
def test_architectures_export_serve_score_and_train(wave, exported, task_dir, tmp_path):
    names = list(ARCHITECTURES)[wave::WAVES]
    servers = start_serves([exported[n][2] for n in names])
    failures = {}
    try:
        for name, server in zip(names, servers):
            try:
                check_architecture(*exported[name][:2], server.url, task_dir, tmp_path / name)
            except Exception as e:  # every family is checked; the failures are reported together
                failures[name] = f"{type(e).__name__}: {str(e)[:800]}"
    finally:
        codes = stop_serves(servers)
    assert not failures, failures
    assert codes == [0] * len(names), {name: "".join(s.lines)[-2000:] for name, s, code in zip(names, servers, codes)
                                       if code != 0}
