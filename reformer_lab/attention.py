"""Exact scaled dot-product attention, two ways.

Both functions compute

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

for tensors shaped ``(..., L, d)``, where ``...`` is any number of batch or
head dimensions.

* ``naive_attention`` materialises the whole ``(..., Lq, Lk)`` score matrix,
  which is what makes long sequences run out of memory.
* ``chunked_attention`` visits the keys one block at a time with an online
  (running max, running sum) softmax, so only a ``(query_chunk_size,
  key_chunk_size)`` block of scores exists at once. Its backward pass
  recomputes those blocks instead of storing them, so training memory is also
  linear in the sequence length.

Masking rules, shared by both:

* ``key_padding_mask`` is boolean ``(..., Lk)`` and ``True`` marks a padding
  key that takes no part, as in ``torch.nn.MultiheadAttention``. Its leading
  dimensions broadcast against the leading dimensions of ``q`` aligned from the
  right, so for ``q`` of shape ``(B, H, L, d)`` pass a mask of shape
  ``(B, 1, L)``.
* ``causal=True`` lets query ``t`` use the keys ``s <= t`` only.
* A query row with no key left returns zeros, in the output and in every
  gradient, never NaN.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["naive_attention", "chunked_attention", "attention_mask"]


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Optional[Tensor]
) -> torch.Size:
    """Validate shapes and return the broadcast leading (batch) shape."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() < 2:
            raise ValueError(
                f"{name} must have shape (..., L, d) with at least 2 dimensions, "
                f"got shape {tuple(tensor.shape)}"
            )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same feature size d, got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same length Lk, got k {tuple(k.shape)} and "
            f"v {tuple(v.shape)}"
        )
    try:
        batch_shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the leading (batch, head) dimensions of q {tuple(q.shape)}, "
            f"k {tuple(k.shape)} and v {tuple(v.shape)} do not broadcast"
        ) from None
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"causal=True needs as many queries as keys, because query t may use "
            f"keys s <= t of the same sequence; got Lq={q.shape[-2]} and "
            f"Lk={k.shape[-2]}. Pass causal=False, or build the mask yourself."
        )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be a bool tensor (True marks padding), "
                f"got dtype {key_padding_mask.dtype}"
            )
        if key_padding_mask.dim() < 1 or key_padding_mask.shape[-1] != k.shape[-2]:
            raise ValueError(
                f"key_padding_mask must have shape (..., Lk) with Lk={k.shape[-2]}, "
                f"got shape {tuple(key_padding_mask.shape)}"
            )
        try:
            batch_shape = torch.broadcast_shapes(batch_shape, key_padding_mask.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"key_padding_mask of shape {tuple(key_padding_mask.shape)} does not "
                f"broadcast against the leading dimensions {tuple(batch_shape)} of "
                f"q, k, v; for q of shape (B, H, L, d) pass a mask of shape (B, 1, L)"
            ) from None
    return batch_shape


def attention_mask(
    query_positions: Tensor,
    key_positions: Tensor,
    *,
    causal: bool,
    key_padding_mask: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """Build the boolean mask of forbidden (query, key) pairs, True = masked.

    ``query_positions`` ``(Lq,)`` and ``key_positions`` ``(Lk,)`` are positions
    in the sequence; ``key_padding_mask`` is ``(..., Lk)`` for those keys.
    Returns a mask broadcastable to ``(..., Lq, Lk)``, or None when nothing is
    masked.
    """
    mask = None
    if causal:
        mask = key_positions[None, :] > query_positions[:, None]  # (Lq, Lk)
    if key_padding_mask is not None:
        padding = key_padding_mask.unsqueeze(-2)  # (..., 1, Lk)
        mask = padding if mask is None else mask | padding
    return mask


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    return_weights: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Compute softmax(q k^T / sqrt(d)) v with the whole score matrix in memory.

    Args:
        q: queries ``(..., Lq, d)``.
        k: keys ``(..., Lk, d)``.
        v: values ``(..., Lk, dv)``.
        causal: query ``t`` may use only keys ``s <= t`` (needs ``Lq == Lk``).
        key_padding_mask: bool ``(..., Lk)``, True marks a padding key.
        return_weights: also return the attention weights ``(..., Lq, Lk)``.

    Returns:
        The output ``(..., Lq, dv)``, and the weights when requested. Rows whose
        keys are all masked have zero output and zero weights.

    Memory: the ``(..., Lq, Lk)`` scores and weights, which is what grows as L^2.
    """
    _check_inputs(q, k, v, causal, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1])

    # 1. All scores at once.
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (..., Lq, Lk)

    # 2. Mask forbidden pairs. A row with no key left gets finite scores, so the
    #    softmax stays finite, and is zeroed afterwards.
    positions_q = torch.arange(q.shape[-2], device=q.device)
    positions_k = torch.arange(k.shape[-2], device=q.device)
    mask = attention_mask(positions_q, positions_k, causal=causal, key_padding_mask=key_padding_mask)
    if mask is not None:
        row_has_key = ~mask.all(dim=-1, keepdim=True)  # (..., Lq, 1)
        scores = scores.masked_fill(mask, float("-inf"))
        scores = torch.where(row_has_key, scores, torch.zeros_like(scores))

    # 3. Normalise and mix the values.
    weights = torch.softmax(scores, dim=-1)  # (..., Lq, Lk)
    if mask is not None:
        weights = weights * row_has_key
    output = torch.matmul(weights, v)  # (..., Lq, dv)
    return (output, weights) if return_weights else output


def _block_scores(
    q_block: Tensor,
    k_block: Tensor,
    q_start: int,
    k_start: int,
    causal: bool,
    padding_block: Optional[Tensor],
) -> Tensor:
    """Scores of one (query block, key block) pair, scaled, with -inf where masked.

    ``q_block`` must already be multiplied by 1/sqrt(d).
    """
    scores = torch.matmul(q_block, k_block.transpose(-2, -1))  # (..., qc, kc)
    positions_q = torch.arange(q_start, q_start + q_block.shape[-2], device=q_block.device)
    positions_k = torch.arange(k_start, k_start + k_block.shape[-2], device=q_block.device)
    block_causal = causal and k_start + k_block.shape[-2] - 1 > q_start
    mask = attention_mask(positions_q, positions_k, causal=block_causal, key_padding_mask=padding_block)
    if mask is not None:
        scores.masked_fill_(mask, float("-inf"))
    return scores


def _key_blocks(q_start: int, q_len: int, num_keys: int, key_chunk_size: int, causal: bool):
    """Yield (start, end) of the key blocks a query block can see."""
    last_key = min(num_keys, q_start + q_len) if causal else num_keys
    for k_start in range(0, last_key, key_chunk_size):
        yield k_start, min(k_start + key_chunk_size, last_key)


class _ChunkedAttention(torch.autograd.Function):
    """Online-softmax attention that stores only q, k, v, the output and the
    per-row log-sum-exp, and recomputes score blocks in backward."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, query_chunk_size, key_chunk_size):
        scale = 1.0 / math.sqrt(q.shape[-1])
        batch_shape = torch.broadcast_shapes(
            q.shape[:-2], k.shape[:-2], v.shape[:-2],
            key_padding_mask.shape[:-1] if key_padding_mask is not None else (),
        )
        num_queries, num_keys = q.shape[-2], k.shape[-2]
        output = q.new_zeros(batch_shape + (num_queries, v.shape[-1]))
        logsumexp = q.new_full(batch_shape + (num_queries,), float("inf"))

        for q_start in range(0, num_queries, query_chunk_size):
            q_end = min(q_start + query_chunk_size, num_queries)
            q_block = q[..., q_start:q_end, :] * scale  # (..., qc, d)
            row_max = q.new_full(batch_shape + (q_end - q_start, 1), float("-inf"))
            row_sum = q.new_zeros(batch_shape + (q_end - q_start, 1))
            accumulator = q.new_zeros(batch_shape + (q_end - q_start, v.shape[-1]))

            for k_start, k_end in _key_blocks(q_start, q_end - q_start, num_keys, key_chunk_size, causal):
                padding_block = None if key_padding_mask is None else key_padding_mask[..., k_start:k_end]
                scores = _block_scores(q_block, k[..., k_start:k_end, :], q_start, k_start, causal, padding_block)

                # Online softmax: rescale what was summed so far to the new max.
                new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))  # (..., qc, 1)
                safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                probabilities = scores.sub_(safe_max).exp_()  # (..., qc, kc), in place
                correction = torch.exp(row_max - safe_max)  # (..., qc, 1)
                row_sum = row_sum * correction + probabilities.sum(dim=-1, keepdim=True)
                accumulator = accumulator * correction + torch.matmul(probabilities, v[..., k_start:k_end, :])
                row_max = new_max

            # Rows that saw no key keep row_sum == 0: output 0, logsumexp +inf.
            has_key = row_sum > 0
            output[..., q_start:q_end, :] = torch.where(has_key, accumulator / row_sum.clamp_min(1e-38), 0.0)
            block_lse = torch.where(has_key, row_max + torch.log(row_sum.clamp_min(1e-38)), float("inf"))
            logsumexp[..., q_start:q_end] = block_lse.squeeze(-1)

        ctx.save_for_backward(q, k, v, output, logsumexp, key_padding_mask)
        ctx.settings = (causal, query_chunk_size, key_chunk_size, scale, batch_shape)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        q, k, v, output, logsumexp, key_padding_mask = ctx.saved_tensors
        causal, query_chunk_size, key_chunk_size, scale, batch_shape = ctx.settings
        num_queries, num_keys = q.shape[-2], k.shape[-2]
        grad_q = torch.zeros(batch_shape + q.shape[-2:], dtype=q.dtype, device=q.device)
        grad_k = torch.zeros(batch_shape + k.shape[-2:], dtype=k.dtype, device=k.device)
        grad_v = torch.zeros(batch_shape + v.shape[-2:], dtype=v.dtype, device=v.device)
        # D_i = sum_j dO_ij O_ij, the softmax Jacobian's row term.
        row_dot = (grad_output * output).sum(dim=-1, keepdim=True)  # (..., Lq, 1)

        for q_start in range(0, num_queries, query_chunk_size):
            q_end = min(q_start + query_chunk_size, num_queries)
            q_block = q[..., q_start:q_end, :] * scale
            grad_out_block = grad_output[..., q_start:q_end, :]
            lse_block = logsumexp[..., q_start:q_end].unsqueeze(-1)  # (..., qc, 1)

            for k_start, k_end in _key_blocks(q_start, q_end - q_start, num_keys, key_chunk_size, causal):
                padding_block = None if key_padding_mask is None else key_padding_mask[..., k_start:k_end]
                k_block = k[..., k_start:k_end, :]
                v_block = v[..., k_start:k_end, :]
                scores = _block_scores(q_block, k_block, q_start, k_start, causal, padding_block)
                probabilities = scores.sub_(lse_block).exp_()  # (..., qc, kc); 0 where masked

                grad_v[..., k_start:k_end, :] += torch.matmul(probabilities.transpose(-2, -1), grad_out_block)
                grad_probabilities = torch.matmul(grad_out_block, v_block.transpose(-2, -1))
                grad_scores = probabilities * (grad_probabilities - row_dot[..., q_start:q_end, :])
                grad_q[..., q_start:q_end, :] += torch.matmul(grad_scores, k_block) * scale
                grad_k[..., k_start:k_end, :] += torch.matmul(grad_scores.transpose(-2, -1), q_block)

        return (
            _sum_to_shape(grad_q, q.shape),
            _sum_to_shape(grad_k, k.shape),
            _sum_to_shape(grad_v, v.shape),
            None, None, None, None,
        )


def _sum_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a gradient over the dimensions that were broadcast."""
    return grad.sum_to_size(shape) if grad.shape != shape else grad


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    query_chunk_size: int = 1024,
    key_chunk_size: int = 1024,
) -> Tensor:
    """Compute softmax(q k^T / sqrt(d)) v one block of queries and keys at a time.

    For each block of queries, the keys are visited block by block while three
    running quantities are kept per query row i:

        m_i   = max_j s_ij                       (running max)
        l_i   = sum_j exp(s_ij - m_i)            (running sum)
        acc_i = sum_j exp(s_ij - m_i) v_j        (running numerator)

    When a new key block raises the max to m_i', the old sums are multiplied by
    exp(m_i - m_i'). The output is acc_i / l_i. ``query_chunk_size=1`` is the
    one-query-at-a-time loop. With ``causal=True``, key blocks that lie wholly
    in a query block's future are skipped.

    Args:
        q, k, v, causal, key_padding_mask: as in ``naive_attention``.
        query_chunk_size: queries per block (>= 1).
        key_chunk_size: keys per block (>= 1).

    Returns:
        The output ``(..., Lq, dv)``; rows with no key left are zero.

    Memory: about ``query_chunk_size x key_chunk_size`` scores per batch entry,
    in forward and backward. The backward pass recomputes the blocks from q, k,
    v and the saved per-row log-sum-exp, so it supports one derivative
    (double backward is not implemented).
    """
    _check_inputs(q, k, v, causal, key_padding_mask)
    for name, size in (("query_chunk_size", query_chunk_size), ("key_chunk_size", key_chunk_size)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    return _ChunkedAttention.apply(q, k, v, key_padding_mask, causal, query_chunk_size, key_chunk_size)
