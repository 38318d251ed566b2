"""Request shapes without Triton: the embedded server's validation (one sentence per rule) and the
client's length buckets. Through real Triton, with the status codes clients see: test_serving.py.
"""
import numpy as np
import pytest

from tribune.services.client import ClientOptions, bucket_length
from tribune.services.contract import REFERENCE, REWARD
from tribune.services.serve import BadRequest, validate

VOCAB, MAX_LEN = 512, 64


def _req(ids, mask=None, temperature=None):
    ids = np.asarray(ids, dtype=np.int64)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids) if mask is None else np.asarray(mask)}
    if temperature is not None:
        inputs["temperature"] = np.asarray(temperature, dtype=np.float32)
    return inputs


@pytest.mark.parametrize("spec, inputs, message", [
    (REWARD, _req([[5, 1_000_000_000]]), "input_ids: id 1000000000 outside the vocabulary of 512"),
    (REWARD, _req([[5, -1]]), "input_ids: id -1 outside the vocabulary of 512"),
    (REWARD, _req([[5, 6]], [[1, 2]]), "attention_mask: value 2 is not 0 or 1"),
    (REWARD, _req([[5, 6], [5, 6]], [[1, 1], [0, 0]]), "attention_mask: row 1 is all 0, so it has no token to score"),
    (REWARD, _req([[5, 6, 7]], [[1, 1]]), "attention_mask: shape [1, 2] differs from input_ids [1, 3]"),
    (REWARD, _req([[5] * 65]), "input_ids: length 65 over the maximum sequence length of 64"),
    (REWARD, _req(np.zeros((1, 0))), "input_ids: empty sequence; a sequence needs at least one token"),
    (REWARD, _req(np.zeros((0, 3))), "input_ids: empty batch; send at least one row"),
    (REWARD, _req([5, 6]), "input_ids: shape [2] is not (batch, sequence)"),
    (REWARD, {"input_ids": np.ones((1, 2), np.int64)}, "attention_mask: required by model reward"),
    (REFERENCE, _req([[5, 6]], temperature=[[0.0]]), "temperature: 0 is not a finite number of at least 0.001"),
    (REFERENCE, _req([[5, 6]], temperature=[[np.nan]]), "temperature: nan is not a finite number of at least 0.001"),
    (REFERENCE, _req([[5, 6]], temperature=[[1e-38]]), "temperature: 1e-38 is not a finite number of at least 0.001"),
    (REFERENCE, _req([[5, 6]], temperature=[[1.0], [1.0]]), "temperature: shape [2, 1] is not (batch, 1) = [1, 1]"),
    (REFERENCE, _req([[5]], temperature=[[1.0]]), "input_ids: length 1; reference log-probs need at least 2 tokens"),
])
def test_each_rule_is_one_sentence_naming_the_input(spec, inputs, message):
    with pytest.raises(BadRequest) as err:
        validate(spec, inputs, VOCAB, MAX_LEN)
    assert str(err.value) == message


def test_valid_requests_pass():
    validate(REWARD, _req([[0, 511, 3]], [[0, 1, 1]]), VOCAB, MAX_LEN)
    validate(REFERENCE, _req([[5] * 64], temperature=[[0.7]]), VOCAB, MAX_LEN)


def test_length_buckets_round_up_within_the_maximum():
    assert [bucket_length(n, 16, 64) for n in (1, 16, 17, 33, 48, 49, 64)] == [16, 16, 32, 48, 48, 64, 64]
    assert bucket_length(60, 16, 60) == 60 and bucket_length(70, 16, 64) == 70   # never past the maximum, never cut
    assert [bucket_length(n, 0, 64) for n in (1, 17, 64)] == [1, 17, 64]           # 0: exact lengths
    with pytest.raises(ValueError, match="length_bucket"):
        ClientOptions(length_bucket=-1)


def test_the_proxy_model_and_the_server_name_the_refusal_output_alike():
    """services/triton_proxy.py runs inside Triton's stub and cannot import services: same constant by hand."""
    import ast
    from pathlib import Path

    import tribune.services.serve as serve

    tree = ast.parse((Path(serve.__file__).parent / "triton_proxy.py").read_text())
    (value,) = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "ERROR_OUTPUT" for t in n.targets)]
    assert value == serve.ERROR_OUTPUT
