"""The command line: typed configs from YAML and flags, --help, and clean user errors."""
import json
from pathlib import Path

import pytest

from tests.conftest import tribune
from tribune.services.common.config import build_config, config_from_args, flat_fields, load_yaml
from tribune.services.common.errors import UserError
from tribune.trainer.demo import DemoConfig
from tribune.trainer.reward import RewardConfig
from tribune.trainer.sft import SFTConfig


def test_help_documents_every_field():
    for command, cls in [("sft", SFTConfig), ("train-rm", RewardConfig)]:
        text = tribune(command, "--help").stdout
        for f in flat_fields(cls):      # groups (optimiser, judge) are flattened into flags
            flag = "--" + f.name.replace("_", "-")
            assert flag in text, (command, flag)
            assert f.help.split()[0] in text


def test_yaml_then_flags(tmp_path):
    from tribune.trainer.cli import build_parser

    yml = tmp_path / "c.yaml"
    yml.write_text("model: m\ntrain: t.jsonl\noutput: o\nlearning_rate: 0.01\nbatch_size: 8\n")
    args = build_parser().parse_args(["sft", "--config", str(yml), "--batch-size", "16"])
    cfg = config_from_args(SFTConfig, args)
    assert cfg.optim.learning_rate == 0.01 and cfg.batch_size == 16 and str(cfg.model) == "m"


def test_validation_raises_naming_the_field():
    with pytest.raises(UserError, match="max_prompt_length"):
        build_config(SFTConfig, {"model": "m", "train": "t", "output": "o", "max_length": 64, "max_prompt_length": 80})
    with pytest.raises(UserError, match="unknown SFTConfig field"):
        build_config(SFTConfig, {"model": "m", "train": "t", "output": "o", "lr": 1})
    with pytest.raises(UserError, match="--train"):
        build_config(SFTConfig, {"model": "m", "output": "o"})


def test_yaml_and_key_value_options_are_typed_like_the_flags():
    """`--sft early_stopping_patience=none` clears the option, as `--early-stopping-patience none` does;
    a value of the wrong type is a user error naming the field, not a TypeError inside a stage."""
    base = {"model": "m", "train": "t", "output": "o"}
    assert build_config(SFTConfig, {**base, "early_stopping_patience": "none"}).early_stopping_patience is None
    cfg = build_config(SFTConfig, {**base, "learning_rate": "1e-3", "seed": "7", "epochs": 3})
    assert cfg.optim.learning_rate == 1e-3 and cfg.seed == 7 and cfg.epochs == 3.0   # PyYAML reads 1e-3 as text
    cfg = build_config(SFTConfig, {**base, "mixed_precision": False, "lora_target_modules": "q_proj"})
    assert cfg.memory.mixed_precision == "no" and cfg.memory.lora_target_modules == ["q_proj"]  # YAML's `no`
    rm = build_config(RewardConfig, {**base, "eval": "e", "ensemble": 2, "member_train": ["a.jsonl", "b.jsonl"]})
    assert rm.member_train == [Path("a.jsonl"), Path("b.jsonl")]          # items typed as the flag types them
    for key, value, expected in [("early_stopping_patience", "abc", "a whole number"), ("seed", 2.5, "a whole number"),
                                 ("keep_best", "yes", "true or false"), ("learning_rate", [1], "a number"),
                                 ("mixed_precision", "fp8", "one of no, bf16, fp16"), ("epochs", None, "needs a value"),
                                 ("lora_target_modules", [["q"]], "text")]:
        with pytest.raises(UserError, match=f"{key}: .*{expected}"):
            build_config(SFTConfig, {**base, key: value})


def test_user_errors_print_one_line_without_traceback(tmp_path, task_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "name two fruits", "response": "fig kiwi"}\n{"prompt": oops}\n')
    proc = tribune("sft", "--model", task_dir / "base", "--train", bad, "--output", tmp_path / "o", check=False)
    assert proc.returncode == 2
    assert f"{bad}:2: malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = tribune("sft", "--model", tmp_path / "nowhere", "--train", bad, "--output", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "not a Hugging Face model directory" in proc.stderr
    assert "Traceback" not in proc.stderr

    yml = tmp_path / "c.yaml"
    yml.write_text("learning_rate: [1\n")
    proc = tribune("sft", "--config", yml, check=False)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr

    # bytes that are not UTF-8 name their line; a byte-order mark some editors write is fine
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "name two fruits", "response": "fig kiwi"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + latin.read_bytes().splitlines(keepends=True)[0])
    from tribune.services.common.jsonl import read_jsonl
    assert [obj["prompt"] for _, obj in read_jsonl(bom)] == ["name two fruits"]
    old_mac = tmp_path / "cr.jsonl"                     # any line ending, as text mode reads them
    old_mac.write_bytes(b'{"prompt": "a"}\r{"prompt": "b"}\r\n{"prompt": "c"}')
    assert [obj["prompt"] for _, obj in read_jsonl(old_mac)] == ["a", "b", "c"]
    for args, message in ((("sft", "--model", task_dir / "base", "--train", latin, "--output", tmp_path / "o"),
                           f"{latin}:2: not UTF-8 text (byte 0xe9 at column 16)"),
                          (("sft", "--config", tmp_path), "cannot read the config file"),
                          (("demo", "--output", tmp_path / "d", "--sft", "epochs"),
                           "sft: expected KEY=VALUE words, got 'epochs'"),
                          (("task", "make", latin), "exists and is not a directory")):
        proc = tribune(*args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    yml.write_text("sft: 3\n")
    with pytest.raises(UserError, match="sft: expected a mapping"):
        build_config(DemoConfig, load_yaml(yml))


def test_skipped_rows_are_counted_and_logged(tmp_path, sft_dir):
    rows = [
        {"prompt": "name two fruits", "chosen": "fig kiwi", "rejected": "fig fig"},
        {"prompt": "name two fruits", "chosen": "fig kiwi", "rejected": "fig kiwi"},    # chosen == rejected
        {"prompt": "name two fruits", "chosen": "fig kiwi"},                             # missing rejected
        {"chosen": "a", "rejected": "b"},                                                # missing prompt
        {"prompt": "name three fruits", "ranking": ["fig kiwi lime", "fig kiwi", "fig"]},
    ]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = tribune("train-rm", "--model", sft_dir, "--train", data, "--eval", data, "--output", tmp_path / "rm",
                   "--max-steps", "2", "--batch-size", "2", "--stats-samples", "4")
    assert "1 chosen == rejected" in proc.stderr and "1 missing chosen/rejected" in proc.stderr
    assert "1 missing prompt" in proc.stderr
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["train_rows"] == 2 and metrics["train_pairs"] == 1 + 3 and metrics["skipped_rows"] == 6


def test_client_options_are_one_group_with_full_tls_for_ppo_and_the_gateway(tmp_path):
    """PPO (flat flags) and the gateway (--triton-…) take the same client group, mutual TLS included."""
    from tribune.services.gateway_core import GatewayConfig
    from tribune.trainer.cli import build_parser
    from tribune.trainer.ppo_config import PPOConfig

    key, cert, ca = tmp_path / "k.pem", tmp_path / "c.pem", tmp_path / "ca.pem"
    ppo = config_from_args(PPOConfig, build_parser(["ppo"]).parse_args([
        "ppo", "--policy", "p", "--prompts", "x.jsonl", "--reward-url", "r:1", "--reference-url", "f:1", "--output",
        "o", "--ssl", "--root-certificates", str(ca), "--private-key", str(key), "--certificate-chain", str(cert),
        "--retry-budget-s", "5"]))
    conn = ppo.client.at(ppo.reward_url)
    assert (conn.url, conn.ssl, conn.private_key, conn.certificate_chain, conn.retry_budget_s) == ("r:1", True, key,
                                                                                                   cert, 5.0)
    gw = config_from_args(GatewayConfig, build_parser(["gateway"]).parse_args([
        "gateway", "--repository", "r", "--triton-url", "t:1", "--triton-ssl", "--triton-private-key", str(key),
        "--triton-certificate-chain", str(cert), "--triton-root-certificates", str(ca)]))
    triton = gw.triton.at(gw.triton_url)
    assert triton.ssl and triton.private_key == key and triton.root_certificates == ca
    assert triton.retry_budget_s == 0 and triton.timeout_s == 30.0        # the gateway's own defaults
    with pytest.raises(UserError, match="mutual TLS"):
        build_config(PPOConfig, {"policy": "p", "prompts": "x", "reward_url": "r:1", "reference_url": "f:1",
                                 "output": "o", "private_key": str(key)})


def test_the_demo_runs_the_data_step_on_half_the_prompts_and_fewer_ppo_iterations_unless_told_otherwise(tmp_path):
    from tribune.trainer.demo import DEMO_DATA_PROMPTS, DEMO_PPO_ITERATIONS, DemoConfig
    from tribune.trainer.pipeline import StageOptions, sft_collection_configs, stage_configs

    cfg = DemoConfig(output=tmp_path / "demo")
    stages = stage_configs(cfg.output, 0, None, cfg.stages)
    c = sft_collection_configs(stages, cfg.stages).collect
    assert c.max_prompts == DEMO_DATA_PROMPTS and c.rows_per_prompt == 4
    assert stages.ppo.iterations == DEMO_PPO_ITERATIONS and stages.ppo.gold_every == DEMO_PPO_ITERATIONS // 6
    told = DemoConfig(output=tmp_path / "demo", stages=StageOptions(collect={"max_prompts": 24, "k": 3},
                                                                    ppo={"iterations": 7}))
    assert told.stages.collect == {"max_prompts": 24, "k": 3} and told.stages.ppo == {"iterations": 7}
