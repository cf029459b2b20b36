"""Perplexity and bits per character from logits and aligned targets.

For N predicted tokens with model probabilities p_1 .. p_N of the true tokens,

    NLL        = -(1/N) sum_i ln p_i                  (nats per token)
    perplexity = exp(NLL) = (prod_i 1/p_i)^(1/N)      (geometric mean of 1/p)
    bpc        = NLL / ln 2                           (bits per character)

Targets equal to ``ignore_index`` (padding) are left out of both the sum and
the count N. The caller aligns logits and targets: for a language model the
logits at position t score the token at t + 1, so pass ``logits[:, :-1]`` with
``tokens[:, 1:]``.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "negative_log_likelihood",
    "perplexity",
    "bits_per_character",
    "NLLAccumulator",
    "unigram_log_probs",
]


def negative_log_likelihood(logits: Tensor, targets: Tensor, *, ignore_index: int = -100) -> Tuple[float, int]:
    """Return the summed NLL in nats over the scored targets, and their count.

    ``logits`` is ``(..., V)`` and ``targets`` ``(...)`` with ids in
    ``[0, V)`` or ``ignore_index``. The sum is accumulated in float64.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits (..., V) and targets (...) must have the same leading shape, got logits "
            f"{tuple(logits.shape)} and targets {tuple(targets.shape)}; for a language model "
            f"pass logits[:, :-1] with tokens[:, 1:]"
        )
    if targets.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")

    flat_logits = logits.reshape(-1, logits.shape[-1]).double()  # (N, V)
    flat_targets = targets.reshape(-1)  # (N,)
    scored = flat_targets != ignore_index
    count = int(scored.sum())
    if count == 0:
        return 0.0, 0
    nll_sum = F.cross_entropy(flat_logits[scored], flat_targets[scored], reduction="sum")
    return float(nll_sum), count


def _mean_nll(logits: Tensor, targets: Tensor, ignore_index: int) -> float:
    nll_sum, count = negative_log_likelihood(logits, targets, ignore_index=ignore_index)
    if count == 0:
        raise ValueError(f"every target equals ignore_index={ignore_index}, so there is nothing to score")
    return nll_sum / count


def perplexity(logits: Tensor, targets: Tensor, *, ignore_index: int = -100) -> float:
    """Return exp of the mean negative log-likelihood per scored target.

    ``logits`` ``(..., V)``, ``targets`` ``(...)``, already aligned. A model that
    is uniform over V symbols has perplexity V.
    """
    return math.exp(_mean_nll(logits, targets, ignore_index))


def bits_per_character(logits: Tensor, targets: Tensor, *, ignore_index: int = -100) -> float:
    """Return the mean negative log-likelihood per scored target in bits (nats / ln 2).

    ``logits`` ``(..., V)``, ``targets`` ``(...)``, already aligned. A model that
    is uniform over V symbols scores log2(V) bits per character.
    """
    return _mean_nll(logits, targets, ignore_index) / math.log(2.0)


class NLLAccumulator:
    """Running sum of NLL and count of scored targets over many batches or windows.

    Adding each window's ``(sum, count)`` and dividing once at the end gives the
    mean per target over the whole text. Averaging per-window means instead
    would over-weight a short (padded) last window.
    """

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index
        self.nll_sum = 0.0
        self.count = 0

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add one batch of aligned ``logits (..., V)`` and ``targets (...)``."""
        nll_sum, count = negative_log_likelihood(logits, targets, ignore_index=self.ignore_index)
        self.nll_sum += nll_sum
        self.count += count

    @property
    def mean_nll(self) -> float:
        """Mean NLL in nats per scored target."""
        if self.count == 0:
            raise ValueError("no target has been scored yet; call update() first")
        return self.nll_sum / self.count

    @property
    def perplexity(self) -> float:
        """exp of the mean NLL."""
        return math.exp(self.mean_nll)

    @property
    def bits_per_character(self) -> float:
        """Mean NLL in bits."""
        return self.mean_nll / math.log(2.0)


def unigram_log_probs(tokens: Tensor, vocab_size: int, *, smoothing: float = 1.0) -> Tensor:
    """Return the unigram model's log-probabilities ``(vocab_size,)`` estimated from ``tokens``.

    p(c) = (count(c) + smoothing) / (N + smoothing * V), add-k (Laplace) smoothing,
    so a symbol unseen in ``tokens`` still has a finite loss. Used as logits,
    the vector scores every position the same, whatever came before: the
    baseline any model with context must beat.
    """
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    counts = torch.bincount(tokens.reshape(-1), minlength=vocab_size).double()  # (V,)
    if counts.numel() != vocab_size:
        raise ValueError(f"tokens contain ids >= vocab_size={vocab_size}; max id is {int(tokens.max())}")
    probabilities = (counts + smoothing) / (counts.sum() + smoothing * vocab_size)
    return probabilities.log()  # (V,)
