"""LoRA, mixed precision, gradient checkpointing and length defaults on every training command."""
import json

import pytest
import torch

from tests.conftest import JUDGE, last_json, tribune
from tribune.trainer.lengths import fit_generation, fit_lengths


def test_lengths_fit_the_data_and_the_model():
    # everything fits: the longest sequence and the longest prompt, nothing cut
    assert fit_lengths([5, 3], [12, 9], context=64) == (12, 5)
    # longer than the model: the context, and prompts at most 3/4 of it so responses keep room
    assert fit_lengths([100, 3], [130, 9], context=64) == (64, 48)
    # given values are kept
    assert fit_lengths([5], [12], context=64, max_length=40) == (40, 5)
    # a given prompt limit: the longest sequence a prompt of that length makes, so PPO's response
    # room (max_length − max_prompt_length) is the data's, never below one token
    assert fit_lengths([5], [12], context=None, max_prompt_length=2) == (9, 2)
    assert fit_lengths([100, 40], [300, 60], context=1024, max_prompt_length=512) == (712, 512)
    assert fit_lengths([100], [300], context=600, max_prompt_length=512) == (600, 512)
    with pytest.raises(ValueError, match="leaves no room for a response"):
        fit_lengths([100], [300], context=512, max_prompt_length=512)
    # generation: the SFT run's response room, else what the context leaves, at most 256
    assert fit_generation([5, 7], context=64, trained=(64, 48)) == (16, 7)
    assert fit_generation([5, 7], context=64, trained=None) == (57, 7)
    assert fit_generation([5, 7], context=4096, trained=None) == (256, 7)
    assert fit_generation([300], context=256, trained=(64, 48)) == (16, 240)


def test_lora_trains_adapters_and_the_head_then_merges_into_plain_weights(task_dir):
    from tribune.trainer.adapters import MemoryConfig, plain_model, prepare_model, trainable_parameters
    from tribune.trainer.modeling import load_reward_model, reward_head_name, score_sequences

    rm = load_reward_model(task_dir / "base")
    full = trainable_parameters(rm)[1]
    prepare_model(rm, MemoryConfig(lora_r=4, gradient_checkpointing=True), head=reward_head_name(rm))
    trainable, total = trainable_parameters(rm)
    assert trainable < 0.1 * full and total > full
    names = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("score" in n for n in names)
    assert not any("embed_tokens" in n for n in names)
    ids = torch.randint(3, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    rm.train()
    score_sequences(rm, ids, mask).sum().backward()          # through checkpointed layers and frozen inputs
    assert all(p.grad is not None for n, p in rm.named_parameters() if p.requires_grad and "lora_B" in n)
    with torch.no_grad():
        for p in rm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    rm.eval()
    adapted = score_sequences(rm, ids, mask)
    plain = plain_model(rm)
    assert not any("lora" in k or "modules_to_save" in k or "base_layer" in k for k in plain.state_dict())
    torch.testing.assert_close(score_sequences(plain, ids, mask), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast is refused on CPU only")
def test_fp16_on_cpu_is_refused_clearly(task_dir, tmp_path):
    proc = tribune("sft", "--model", task_dir / "base", "--train", task_dir / "sft.jsonl", "--output", tmp_path / "o",
                   "--mixed-precision", "fp16", check=False)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sft_and_train_rm_with_lora_bf16_and_checkpointing_save_plain_models(task_dir, tmp_path):
    from tribune.trainer.modeling import load_causal_lm, load_reward_model

    memory = ("--lora-r", "4", "--lora-alpha", "8", "--mixed-precision", "bf16", "--gradient-checkpointing")
    sft = tmp_path / "sft"
    m = last_json(tribune("sft", "--model", task_dir / "base", "--train", task_dir / "sft.jsonl", "--output", sft,
                          "--max-steps", "3", "--batch-size", "8", *memory).stdout)
    assert m["train_rows"] > 0
    resolved = json.loads((sft / "config.resolved.json").read_text())
    assert resolved["memory"]["lora_r"] == 4 and resolved["memory"]["mixed_precision"] == "bf16"
    assert (resolved["max_length"], resolved["max_prompt_length"]) == (12, 5)    # the data's, not 64/48
    base, tuned = load_causal_lm(task_dir / "base").state_dict(), load_causal_lm(sft).state_dict()
    assert base.keys() == tuned.keys()                                              # plain weights, merged
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    rm = tmp_path / "rm"
    tribune("train-rm", "--model", sft, "--train", task_dir / "prefs_train.jsonl", "--eval",
            task_dir / "prefs_eval.jsonl", "--output", rm, "--max-steps", "2", "--batch-size", "8",
            "--stats-samples", "8", *memory)
    assert not any("lora" in k for k in load_reward_model(rm).state_dict())


@pytest.mark.slow
def test_ppo_with_lora_trains_and_exports(served, sft_dir, rm_dir, task_dir, tmp_path):
    out = tmp_path / "ppo"
    m = last_json(tribune("ppo", "--policy", sft_dir, "--prompts", task_dir / "prompts_train.jsonl",
                          "--reward-url", served.url, "--reference-url", served.url, "--output", out,
                          "--value-init", rm_dir, "--iterations", "2", "--rollout-batch-size", "16",
                          "--mini-batch-size", "8", "--lora-r", "8", "--gold-every", "100", *JUDGE).stdout)
    assert "objective/kl" in m
    from safetensors import safe_open

    for sub in (out, out / "value_model"):
        with safe_open(str(sub / "model.safetensors"), "pt") as f:
            assert f.keys() and not any("lora" in k or "base_layer" in k for k in f.keys())
    tribune("export", "--reward", rm_dir, "--reference", out, "--output", tmp_path / "repo", "--max-batch-size", "4",
            "--no-warmup")
    assert (tmp_path / "repo" / "reference" / "1" / "model.onnx").is_file()


def test_ppo_takes_exactly_one_reward_service_and_the_shared_memory_flags():
    from tribune.services.common.config import build_config
    from tribune.services.common.errors import UserError
    from tribune.trainer.ppo_config import PPOConfig

    base = {"policy": "p", "prompts": "x", "reference_url": "f:1", "output": "o"}
    for extra in ({}, {"reward_url": "r:1", "reward_gateway": "g:1"}):
        with pytest.raises(UserError, match="exactly one of reward_url"):
            build_config(PPOConfig, {**base, **extra})
    cfg = build_config(PPOConfig, {**base, "reward_gateway": "g:1", "lora_r": 8, "lora_target_modules": ["q_proj"],
                                   "mixed_precision": "bf16", "gradient_checkpointing": True})
    assert (cfg.memory.lora_r, cfg.memory.lora_target_modules, cfg.memory.mixed_precision) == (8, ["q_proj"], "bf16")
    assert cfg.max_new_tokens is None and cfg.max_prompt_length is None       # derived at run time
