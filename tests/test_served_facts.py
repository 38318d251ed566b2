"""Which models a repository serves (fast, no server): ``ServedFacts.models`` and its checks."""
import numpy as np
import pytest

from tribune.services.contract import REFERENCE_MODEL, REWARD_MODEL, ContractError, ServedFacts

COMMON = dict(contract_version=1, tokenizer_fingerprint="f", max_sequence_length=64, vocab_size=100,
              max_batch_size=8)
REWARD = dict(reward_mean=0.5, reward_std=2.0, reward_model_id="rm-x", max_length=64, max_prompt_length=48)


def test_a_manifest_from_before_separate_repositories_serves_both():
    facts = ServedFacts.parse({**COMMON, **REWARD})
    assert facts.models == (REWARD_MODEL, REFERENCE_MODEL)
    facts.require(REWARD_MODEL, REFERENCE_MODEL)
    np.testing.assert_allclose(facts.normalise(np.array([2.5])), [1.0])


def test_a_reference_alone_has_no_reward_facts():
    facts = ServedFacts.parse({**COMMON, "models": [REFERENCE_MODEL]})
    assert facts.models == (REFERENCE_MODEL,) and facts.reward_mean is None and facts.max_length is None
    assert ServedFacts.parse(facts.to_dict()) == facts
    with pytest.raises(ContractError, match=r"serves only reference, not reward; export it with `tribune export "
                                            r"--reward DIR`"):
        facts.require(REWARD_MODEL)
    with pytest.raises(ContractError, match="has no reward facts"):
        ServedFacts.parse({**COMMON, **REWARD, "models": [REFERENCE_MODEL]})


def test_a_reward_alone_needs_its_facts_and_the_models_are_contract_models():
    facts = ServedFacts.parse({**COMMON, **REWARD, "models": [REWARD_MODEL]})
    assert facts.models == (REWARD_MODEL,) and facts.reward_std == 2.0
    with pytest.raises(ContractError, match="reference"):
        facts.require(REFERENCE_MODEL)
    with pytest.raises(ContractError, match="needs reward_mean, reward_std"):
        ServedFacts.parse({**COMMON, "models": [REWARD_MODEL]})
    for bad in ([], [REWARD_MODEL, REWARD_MODEL], ["judge"]):
        with pytest.raises(ContractError, match="models must be one or both of"):
            ServedFacts.parse({**COMMON, **REWARD, "models": bad})
