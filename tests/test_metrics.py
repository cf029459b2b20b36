"""Tests for perplexity, bits per character and the unigram baseline."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reformer_lab.data import evaluation_windows
from reformer_lab.metrics import (
    NLLAccumulator,
    bits_per_character,
    negative_log_likelihood,
    perplexity,
    unigram_log_probs,
)


def test_uniform_over_four_symbols():
    logits = torch.zeros(3, 5, 4)
    targets = torch.randint(0, 4, (3, 5), generator=torch.Generator().manual_seed(0))

    assert bits_per_character(logits, targets) == pytest.approx(2.0, abs=1e-12)
    assert perplexity(logits, targets) == pytest.approx(4.0, abs=1e-12)


def test_perplexity_is_geometric_mean_of_inverse_probability():
    probabilities = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    expected = (1 / 0.5 * 1 / 0.3) ** 0.5

    assert perplexity(probabilities.log(), targets) == pytest.approx(expected, rel=1e-12)
    assert bits_per_character(probabilities.log(), targets) == pytest.approx(math.log2(expected), rel=1e-12)


def test_padding_does_not_change_result():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 7, generator=generator)
    targets = torch.randint(0, 7, (2, 6), generator=generator)
    padded_logits = torch.cat([logits, torch.randn(2, 3, 7, generator=generator)], dim=1)
    padded_targets = torch.cat([targets, torch.full((2, 3), -100)], dim=1)

    assert perplexity(padded_logits, padded_targets) == pytest.approx(perplexity(logits, targets), rel=1e-12)
    assert bits_per_character(padded_logits, padded_targets) == pytest.approx(
        bits_per_character(logits, targets), rel=1e-12
    )


def test_custom_ignore_index():
    logits = torch.zeros(4, 2)
    logits[3, 0] = 50.0
    targets = torch.tensor([0, 1, 0, 1])

    assert perplexity(logits[:3], targets[:3], ignore_index=1) == pytest.approx(2.0)
    assert perplexity(logits, torch.tensor([0, 1, 0, 7]), ignore_index=7) == pytest.approx(2.0)


@settings(deadline=None, max_examples=25)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 8),
    vocab=st.integers(2, 9),
    seed=st.integers(0, 2**16),
)
def test_matches_cross_entropy_reference(batch, length, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (batch, length), generator=generator)
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))

    assert perplexity(logits, targets) == pytest.approx(math.exp(reference), rel=1e-9)
    assert bits_per_character(logits, targets) == pytest.approx(float(reference) / math.log(2), rel=1e-9)


def test_window_evaluation_scores_each_target_once():
    generator = torch.Generator().manual_seed(2)
    vocab = 5
    tokens = torch.randint(0, vocab, (23,), generator=generator)
    # A context-free "model": the logits depend only on the input token, so the
    # score of each prediction is the same whatever window it falls in.
    table = torch.randn(vocab, vocab, generator=generator, dtype=torch.float64)
    reference = bits_per_character(table[tokens[:-1]], tokens[1:])

    for seq_len in (1, 4, 7, 22, 30):
        inputs, targets = evaluation_windows(tokens, seq_len)
        accumulator = NLLAccumulator()
        for window in range(len(inputs)):
            accumulator.update(table[inputs[window]], targets[window])

        assert accumulator.count == len(tokens) - 1
        assert accumulator.bits_per_character == pytest.approx(reference, rel=1e-12)


def test_accumulator_equals_single_call():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, 6, generator=generator)
    targets = torch.randint(0, 6, (5, 4), generator=generator)
    accumulator = NLLAccumulator()
    for row in range(5):
        accumulator.update(logits[row], targets[row])

    assert accumulator.perplexity == pytest.approx(perplexity(logits, targets), rel=1e-12)


def test_negative_log_likelihood_sum_and_count():
    logits = torch.zeros(2, 3, 8)
    targets = torch.tensor([[1, 2, -100], [3, -100, -100]])

    nll_sum, count = negative_log_likelihood(logits, targets)

    assert count == 3
    assert nll_sum == pytest.approx(3 * math.log(8))


def test_all_padding_raises():
    with pytest.raises(ValueError, match="nothing to score"):
        perplexity(torch.zeros(2, 3), torch.full((2,), -100))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same leading shape"):
        bits_per_character(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))


def test_float_targets_raise():
    with pytest.raises(ValueError, match="integer token ids"):
        perplexity(torch.zeros(2, 3), torch.zeros(2))


def test_empty_accumulator_raises():
    with pytest.raises(ValueError, match="update"):
        NLLAccumulator().mean_nll


def test_unigram_log_probs_counts():
    tokens = torch.tensor([0, 0, 1, 2])

    log_probs = unigram_log_probs(tokens, vocab_size=4, smoothing=0.0)

    assert torch.allclose(log_probs.exp(), torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64))
    smoothed = unigram_log_probs(tokens, vocab_size=4, smoothing=1.0).exp()
    assert torch.allclose(smoothed, torch.tensor([3, 2, 2, 1], dtype=torch.float64) / 8)


def test_unigram_log_probs_rejects_large_ids():
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_log_probs(torch.tensor([0, 5]), vocab_size=3)
