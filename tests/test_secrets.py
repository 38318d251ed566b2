"""Tokens come from a flag, a file or the environment, and never reach an output file."""
import pytest

from tribune.services.client import AUTH_TOKEN_ENV, ClientOptions
from tribune.services.common.config import build_config
from tribune.services.common.errors import UserError
from tribune.services.common.secrets import resolve_secret, same_secret
from tribune.services.gateway_core import GATEWAY_TOKEN_ENV, GatewayConfig
from tests.conftest import JUDGE, tribune


def test_a_token_comes_from_the_flag_the_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(AUTH_TOKEN_ENV, raising=False)
    assert ClientOptions().bearer_token() is None
    monkeypatch.setenv(AUTH_TOKEN_ENV, "from-env")
    assert ClientOptions().bearer_token() == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert ClientOptions(auth_token_file=tmp_path / "token").bearer_token() == "from-file"
    assert ClientOptions(auth_token="from-flag").bearer_token() == "from-flag"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        resolve_secret(None, tmp_path / "empty", AUTH_TOKEN_ENV)
    with pytest.raises(UserError, match="cannot read"):
        resolve_secret(None, tmp_path / "missing", AUTH_TOKEN_ENV)
    with pytest.raises(ValueError, match="alternatives"):
        ClientOptions(auth_token="a", auth_token_file=tmp_path / "token")
    monkeypatch.setenv(GATEWAY_TOKEN_ENV, "gateway-secret")
    gw = build_config(GatewayConfig, {"repository": tmp_path, "triton_url": "127.0.0.1:1",
                                      "triton_auth_token_file": tmp_path / "token"})
    assert gw.required_token() == "gateway-secret" and gw.triton.bearer_token() == "from-file"
    assert same_secret("Bearer x", "Bearer x") and not same_secret("Bearer y", "Bearer x")
    assert not same_secret(None, "Bearer x")


@pytest.mark.slow
def test_no_file_of_a_run_holds_the_token(served, sft_dir, rm_dir, task_dir, tmp_path):
    """A token on the command line (the worst case: it is in argv and in the config) and one in
    the environment; every file PPO writes (config, logs, metrics, TensorBoard, checkpoints,
    the models) is searched for both."""
    flag, env = "tok-flag-5f1c9a3e", "tok-env-77b2d04c"
    out = tmp_path / "ppo"
    tribune("ppo", "--policy", sft_dir, "--prompts", task_dir / "prompts_train.jsonl", "--eval-prompts",
            task_dir / "prompts_eval.jsonl", "--reward-url", served.url, "--reference-url", served.url,
            "--output", out, "--value-init", rm_dir, *JUDGE, "--iterations", "2", "--rollout-batch-size", "8",
            "--mini-batch-size", "8", "--gold-every", "2", "--gold-eval-size", "4", "--checkpoint-every", "1",
            "--auth-token", flag, env={AUTH_TOKEN_ENV: env})
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"config.resolved.json", "tribune.log", "metrics.jsonl", "metrics.json"} <= {p.name for p in files}
    assert any("tensorboard" in p.parts for p in files) and any("checkpoints" in p.parts for p in files)
    leaked = [str(p) for p in files for secret in (flag, env) if secret.encode() in p.read_bytes()]
    assert not leaked
