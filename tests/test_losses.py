"""The reward-model maths against hand-computed values and slow float64 loops."""
import math

import pytest
import torch

from tribune.trainer.losses import bradley_terry_loss, pairwise_accuracy, ranking_to_pairs
from tribune.trainer.sequences import gather_last, last_token_index, position_ids_from_mask, token_logprobs


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_loss_matches_hand_values():
    chosen = torch.tensor([2.0, 0.5, -1.0])
    rejected = torch.tensor([1.0, 1.5, -3.0])
    expected = sum(-math.log(_sigmoid(c - r)) for c, r in [(2, 1), (0.5, 1.5), (-1, -3)]) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_margin_shifts_the_difference():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    margin = torch.tensor([0.5, 1.0])
    expected = (-math.log(_sigmoid(1 - 0.5)) - math.log(_sigmoid(0 - 1.0))) / 2
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_centering_adds_mean_square_of_sums():
    chosen, rejected = torch.tensor([2.0, 1.0]), torch.tensor([1.0, -3.0])
    base = bradley_terry_loss(chosen, rejected).item()
    centred = bradley_terry_loss(chosen, rejected, center_coef=0.01).item()
    assert centred - base == pytest.approx(0.01 * ((3.0 ** 2 + (-2.0) ** 2) / 2), rel=1e-6)


def test_bradley_terry_weights_equal_groupwise_mean():
    # one 3-way ranking (3 pairs) and one pair: each prompt counts once
    chosen = torch.tensor([1.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    rejected = torch.tensor([0.0, -1.0, -1.0, 2.5], dtype=torch.float64)
    w = torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2], dtype=torch.float64)
    per = [-math.log(_sigmoid(c - r)) for c, r in zip(chosen.tolist(), rejected.tolist())]
    expected = 0.5 * sum(per[:3]) / 3 + 0.5 * per[3]
    assert bradley_terry_loss(chosen, rejected, weights=w).item() == pytest.approx(expected, rel=1e-12)


def test_bradley_terry_gradient_pushes_chosen_up():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_ranking_expands_to_all_pairs_best_first():
    assert ranking_to_pairs(2) == [(0, 1)]
    assert ranking_to_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    pairs4 = ranking_to_pairs(4)
    assert len(pairs4) == math.comb(4, 2) and all(a < b for a, b in pairs4) and len(set(pairs4)) == 6


def test_pairwise_accuracy_counts_strict_wins():
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])).item() == pytest.approx(1 / 3)


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]
    values = torch.arange(20.0).reshape(4, 5)
    assert gather_last(values, mask).tolist() == [2.0, 9.0, 14.0, 16.0]


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_token_logprobs_against_a_float64_loop():
    torch.manual_seed(0)
    B, T, V = 3, 6, 11
    logits = torch.randn(B, T, V, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T))
    temp = 0.7
    got = token_logprobs(logits, ids, temp)
    for b in range(B):
        for t in range(1, T):
            z = logits[b, t - 1] / temp
            ref = z[ids[b, t]] - torch.logsumexp(z, 0)
            assert got[b, t - 1].item() == pytest.approx(ref.item(), abs=1e-6)


def test_last_token_pooling_is_padding_side_invariant(tmp_path):
    """A real (tiny, random) HF reward model scores left- and right-padded batches alike."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tribune.trainer.data import pad_left, pad_right
    from tribune.trainer.modeling import score_sequences

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_labels=1, pad_token_id=0)).eval()
    seqs = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    with torch.no_grad():
        left = score_sequences(model, *pad_left(seqs, 0))
        right = score_sequences(model, *pad_right(seqs, 0))
        alone = torch.cat([score_sequences(model, *pad_right([s], 0)) for s in seqs])
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    assert len(set(alone.tolist())) == 3   # the scores really depend on the sequence
