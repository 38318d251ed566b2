"""Reward and reference in two repositories, served at two URLs; external data; fp16/bf16 exports.

Three repositories, each exported through the real CLI and served by its own `tribune serve`:
the reward model alone (fp16), the reference alone (weights forced into ONNX external data),
and a pair whose tokenizer has one more token (a family the policy does not speak).
"""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tribune.services.client import ClientConfig, TritonScorer
from tribune.services.common.errors import UserError
from tribune.services.common.text import load_tokenizer
from tribune.services.contract import REFERENCE_MODEL, REWARD_MODEL, ContractError, ServedFacts
from tribune.services.repository import read_config, sha256_file, tokenizer_fingerprint, verify_repository
from tests.conftest import tribune, with_other_token_ids
from tests.remote_ppo import one_iteration, ppo_config
from tests.servers import start_serves, stop_serves

pytestmark = pytest.mark.slow


def _other_tokenizer(model_dir, out):
    """A copy of a model directory whose tokenizer has one more token: another fingerprint."""
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    tok = load_tokenizer(out)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def split(rm_dir, sft_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    root.chmod(0o755)                   # pytest's are owner-only; a repository takes its parent's mode
    tribune("export", "--reward", rm_dir, "--output", root / "rm", "--dtype", "fp16", "--max-batch-size", "8")
    tribune("export", "--reference", sft_dir, "--output", root / "ref", env={"TRIBUNE_EXPORT_EXTERNAL_DATA": "1"})
    tribune("export", "--reward", _other_tokenizer(rm_dir, root / "other-rm"),
            "--reference", _other_tokenizer(sft_dir, root / "other-sft"), "--output", root / "other")
    servers = start_serves([root / "rm", root / "ref", root / "other"])
    yield root, dict(zip(("rm", "ref", "other"), servers))
    assert stop_serves(servers) == [0, 0, 0]


def _manifest(repo):
    return json.loads((repo / "tribune.json").read_text())


def test_each_repository_has_its_models_tokenizer_and_facts(split):
    root, _ = split
    rm, ref = _manifest(root / "rm"), _manifest(root / "ref")
    assert rm["served"]["models"] == [REWARD_MODEL] and set(rm["sources"]) == {REWARD_MODEL}
    assert ref["served"]["models"] == [REFERENCE_MODEL] and set(ref["sources"]) == {REFERENCE_MODEL}
    assert (root / "rm" / "reward").is_dir() and not (root / "rm" / "reference").exists()
    assert (root / "ref" / "reference").is_dir() and not (root / "ref" / "reward").exists()
    facts = ServedFacts.parse(ref["served"])
    assert facts.reward_mean is None and facts.reward_model_id is None and facts.reference_model_source
    with pytest.raises(ContractError, match="serves only reference"):
        facts.normalise(np.zeros(2))
    assert ServedFacts.parse(rm["served"]).reward_std > 0 and rm["export"]["dtype"] == "fp16"
    for repo in (root / "rm", root / "ref", root / "other"):
        own = tokenizer_fingerprint(load_tokenizer(repo / "tokenizer"))
        assert _manifest(repo)["served"]["tokenizer_fingerprint"] == own
        verify_repository(repo)
    assert _manifest(root / "other")["served"]["tokenizer_fingerprint"] != ref["served"]["tokenizer_fingerprint"]


def test_external_data_sits_in_the_version_folder_and_is_hashed(split, tmp_path):
    root, _ = split
    manifest = _manifest(root / "ref")
    assert manifest["export"]["external_data"] == {REFERENCE_MODEL: True}
    assert _manifest(root / "rm")["export"]["external_data"] == {REWARD_MODEL: False}
    version = root / "ref" / "reference" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.onnx.data"]
    # the weights are in the data file; the dynamo graph keeps its small constant nodes (rotary
    # tables, masks) inline, whose size depends on the context length, not on the parameter count
    assert (version / "model.onnx").stat().st_size < (version / "model.onnx.data").stat().st_size / 4
    for name in ("model.onnx", "model.onnx.data"):
        assert manifest["files"][f"reference/1/{name}"] == sha256_file(version / name)
        assert (version / name).stat().st_mode & 0o044 == 0o044, name     # readable by Triton's own user
    assert (root / "ref").stat().st_mode & 0o777 == 0o755
    # stock Triton's layout: the default model file name, its data beside it (opened by path)
    cfg = read_config(root / "ref" / "reference" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and not cfg.default_model_filename
    assert manifest["export"]["parity_max_abs_diff"][REFERENCE_MODEL] <= 1e-4
    bad = tmp_path / "ref"
    shutil.copytree(root / "ref", bad)
    data = bytearray((bad / "reference" / "1" / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (bad / "reference" / "1" / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ContractError, match=r"reference/1/model.onnx.data: modified"):
        verify_repository(bad)


def _padded_batch(task_dir):
    from tribune.services.common.text import encode_pair
    from tribune.trainer.data import pad_left

    tok = load_tokenizer(task_dir / "tokenizer")
    rows = [json.loads(line) for line in (task_dir / "sft.jsonl").read_text().splitlines()[:7]]
    return pad_left([encode_pair(tok, r["prompt"], r["response"], 48, 64)[0] for r in rows], tok.pad_token_id)


def test_two_urls_serve_their_own_models_and_ppo_runs_across_them(split, task_dir, rm_dir, sft_dir, tmp_path):
    from tribune.trainer.modeling import load_causal_lm, load_reward_model, score_sequences, sequence_logprobs

    root, servers = split
    fp = tokenizer_fingerprint(load_tokenizer(sft_dir))
    ids, mask = _padded_batch(task_dir)
    with torch.no_grad():
        want_r = score_sequences(load_reward_model(rm_dir).eval(), ids, mask).numpy()
        want_lp = sequence_logprobs(load_causal_lm(sft_dir).eval(), ids, mask, 0.9).numpy()
    with TritonScorer(ClientConfig(url=servers["rm"].url), fp, models=(REWARD_MODEL,)) as rm:
        got_r = rm.score(ids.numpy(), mask.numpy())
        assert rm.facts.models == (REWARD_MODEL,)
    with TritonScorer(ClientConfig(url=servers["ref"].url), fp, models=(REFERENCE_MODEL,)) as ref:
        got_lp = ref.logprobs(ids.numpy(), mask.numpy(), temperature=0.9)
    assert got_r.dtype == np.float32 and got_lp.dtype == np.float32       # fp16 inside, FP32 on the wire
    np.testing.assert_allclose(got_r, want_r, atol=5e-2, rtol=0)
    np.testing.assert_allclose(got_lp, want_lp, atol=1e-4, rtol=0)     # the external-data graph, served
    with pytest.raises(ContractError, match="serves only reference, not reward; export it with"):
        TritonScorer(ClientConfig(url=servers["ref"].url, connect_timeout_s=5), fp, models=(REWARD_MODEL,))
    cfg = ppo_config(sft_dir, task_dir / "prompts_train.jsonl", servers["rm"].url, servers["ref"].url, tmp_path)
    row, moved = one_iteration(cfg)
    assert moved and all(np.isfinite(v) for v in row.values())
    assert abs(row["objective/kl"]) < 1e-3, row      # the served reference is the policy's own start


def test_the_token_path_refuses_a_model_with_another_tokenizer(split, task_dir, sft_dir, tmp_path):
    from tribune.trainer.scorers import connect

    root, servers = split
    fp = tokenizer_fingerprint(load_tokenizer(sft_dir))
    prompts = task_dir / "prompts_train.jsonl"
    for role, urls in (("reward", (servers["other"].url, servers["ref"].url)),
                       ("reference", (servers["rm"].url, servers["other"].url))):
        with pytest.raises(UserError, match=f"tokenizer mismatch: the {role} at {urls[role == 'reference']}"):
            connect(ppo_config(sft_dir, prompts, *urls, tmp_path / role), load_tokenizer(sft_dir), fp)
    # the same refusal through the command line: one short sentence, no traceback
    proc = tribune("ppo", "--policy", sft_dir, "--prompts", prompts, "--reward-url", servers["rm"].url,
                   "--reference-url", servers["other"].url, "--output", tmp_path / "cli", check=False)
    assert proc.returncode == 2 and "tokenizer mismatch: the reference" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bf16_exports_where_onnx_runtime_has_the_kernels_else_refuses(task_dir, tmp_path):
    import onnxruntime as ort

    from tribune.trainer.export import ExportConfig, run_export

    cfg = ExportConfig(reference=task_dir / "base", output=tmp_path / "bf16", dtype="bf16", warmup=False)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        result = run_export(cfg)
        assert result["dtype"] == "bf16" and _manifest(tmp_path / "bf16")["export"]["dtype"] == "bf16"
    else:
        with pytest.raises(UserError, match=r"--dtype bf16: ONNX Runtime \(CPUExecutionProvider\) has no bf16 kernel "
                                            r"for \w+\(\d+\); export with --dtype fp32"):
            run_export(cfg)
        assert not (tmp_path / "bf16").exists() and not list(tmp_path.glob(".export-*"))


def test_parity_tolerance_grows_with_the_values_compared():
    """Absolute plus relative to the largest |value|: a reference's log-probs reach −40, where fp32's
    rounding alone passes a fixed 1e-4 (a held-out task's export failed at 1.09e-4 with values to 19.6)."""
    from tribune.trainer.export import ExportConfig, Parity

    cfg = ExportConfig(reference=Path("r"), output=Path("o"))
    assert cfg.allowed(0.0) == 1e-4 and cfg.allowed(19.6) == pytest.approx(1e-4 + 1e-5 * 19.6)
    assert ExportConfig(reference=Path("r"), output=Path("o"), dtype="fp16").allowed(10.0) == pytest.approx(5e-2 + 2e-2)
    strict = ExportConfig(reference=Path("r"), output=Path("o"), parity_tolerance=1e-6, parity_rtol=0.0)
    assert strict.allowed(40.0) == 1e-6
    with pytest.raises(ValueError, match="parity_tolerance and parity_rtol must be >= 0"):
        ExportConfig(reference=Path("r"), output=Path("o"), parity_rtol=-1e-5)
    p = Parity.of(np.array([-19.6, -1.0], np.float32), np.array([-19.6001, -1.0], np.float32))
    assert p.diff == pytest.approx(1e-4, rel=0.05) and p.scale == pytest.approx(19.6001)
    assert p.worst(Parity(5e-5, 30.0)) == Parity(p.diff, 30.0) and p.worst(None) is p


def test_an_export_past_its_parity_tolerance_writes_nothing(task_dir, tmp_path):
    from tribune.trainer.export import ExportConfig, run_export

    cfg = ExportConfig(reference=task_dir / "base", output=tmp_path / "repo", parity_tolerance=1e-12,
                       parity_rtol=0.0, warmup=False, exporter="torchscript")
    with pytest.raises(UserError, match=r"reference: ONNX Runtime differs from PyTorch by \S+ > 1e-12 \(1e-12 \+ "
                                        r"0e\+00 × \S+, the largest \|value\|; --parity-tolerance / --parity-rtol\); "
                                        r"nothing was written"):
        run_export(cfg)
    assert not (tmp_path / "repo").exists() and not list(tmp_path.glob(".export-*"))


def test_an_export_of_a_reward_model_with_another_tokenizer_than_the_reference_is_refused(rm_dir, sft_dir, tmp_path):
    from tribune.trainer.export import ExportConfig, run_export

    other = with_other_token_ids(rm_dir, tmp_path / "rm")
    cfg = ExportConfig(reward=other, reference=sft_dir, output=tmp_path / "repo", warmup=False, exporter="torchscript")
    with pytest.raises(UserError, match=re.escape(f"the tokenizers of {other} and {sft_dir} differ; a repository "
                                                  "has one tokenizer")):
        run_export(cfg)
    assert not (tmp_path / "repo").exists()


def test_export_needs_a_reward_model_or_a_reference(tmp_path):
    from tribune.services.common.config import build_config
    from tribune.trainer.export import ExportConfig

    with pytest.raises(UserError, match="reward and reference: give either or both"):
        build_config(ExportConfig, {"output": tmp_path / "repo"})
