"""The suite's shared artefacts (tests/conftest.py ``built_once``): built once per run, and a build
that failed is reported to the next test that needs it, not attempted again by every worker."""
import pytest

from tests.conftest import built_once


def test_a_shared_artefact_is_built_once_and_a_failed_build_is_not_retried(tmp_path_factory):
    calls = []

    def build(out):
        calls.append(out)
        out.mkdir()
        (out / "made").write_text("1")

    first = built_once(tmp_path_factory, "helper-ok", build)
    assert built_once(tmp_path_factory, "helper-ok", build) == first and len(calls) == 1
    assert (first / "made").read_text() == "1"

    def broken(out):
        calls.append(out)
        raise ValueError("the tokenizer is missing")

    with pytest.raises(ValueError, match="tokenizer is missing"):
        built_once(tmp_path_factory, "helper-broken", broken)
    with pytest.raises(RuntimeError, match="'helper-broken' failed earlier in this run:\nValueError: the tokenizer"):
        built_once(tmp_path_factory, "helper-broken", broken)
    assert len(calls) == 2                                       # the second call did not build again
