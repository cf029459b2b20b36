"""LSH attention (Kitaev, Kaiser and Levskaya 2020, "Reformer") and its dense reference.

Queries and keys share one projection ``qk``, and a key is the unit-normalised
``qk``. A query's largest logit would then be with itself, so attention to self
gets a large negative logit instead and happens only when a query has no other
key. The logit of query i and key j is

    s_ij = qk_i . (qk_j / |qk_j|) / sqrt(d)

LSH attention computes, for each hash round r, attention only within the set
P_i^(r) of keys that share query i's chunk, or the chunk before it, after the
positions are sorted by (bucket, position), and mixes the rounds:

    o_i = sum_r exp(z_i^(r) - z_i) o_i^(r),   z_i = log sum_r exp(z_i^(r))

where o_i^(r) is the softmax attention output over P_i^(r) and z_i^(r) is its
log-sum-exp of logits. This equals softmax attention over all the keys that
some round visits, each counted as often as it is visited (once per round).

Masking rules, shared by ``lsh_attention`` and ``full_shared_qk_attention``:

* attention to self gets the logit ``-1e5`` (about ``-3.3e4`` in float16,
  whose range ends at 65504), so a query attends to itself only when no other
  key is admissible. transformers 5.25 uses -1e5 in float32 and
  reformer-pytorch 1.4.4 uses -5e4;
* ``key_padding_mask`` (bool ``(..., L)``, True marks padding) and, with
  ``causal=True``, keys later than the query are never attended;
* a query with no admissible key at all, not even itself, outputs zeros, with
  zero gradients.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .hashing import look_back, lsh_hash, random_rotations, sort_by_bucket

__all__ = [
    "lsh_attention",
    "full_shared_qk_attention",
    "default_n_buckets",
    "factorise_n_buckets",
    "SELF_ATTENTION_LOGIT",
]

# The logit that replaces attention to self: a large negative constant, not
# -inf, so that a query with no other key still attends to itself.
SELF_ATTENTION_LOGIT = -1e5


def default_n_buckets(length: int, chunk_length: int) -> int:
    """Return the bucket count for a sequence: about 2L / chunk_length, rounded up to a power of two.

    Kitaev et al. 2020 choose chunks of m = 2L / n_buckets
    positions, so an average bucket fills half a chunk. The result is at least 2.
    """
    for name, value in (("length", length), ("chunk_length", chunk_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    target = 2 * length / chunk_length
    return max(2, 2 ** math.ceil(math.log2(target))) if target > 1 else 2


def _self_logit(dtype: torch.dtype) -> float:
    return max(SELF_ATTENTION_LOGIT, torch.finfo(dtype).min / 2)


def _check_shared_qk_inputs(qk: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> None:
    if qk.dim() < 2:
        raise ValueError(f"qk must have shape (..., L, d), got shape {tuple(qk.shape)}")
    if v.shape[:-1] != qk.shape[:-1]:
        raise ValueError(
            f"v must have shape (..., L, dv) with the same leading dimensions and L as qk "
            f"{tuple(qk.shape)}, got {tuple(v.shape)}"
        )
    if not qk.is_floating_point():
        raise ValueError(f"qk must be a floating-point tensor, got dtype {qk.dtype}")
    if key_padding_mask is None:
        return
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be a bool tensor (True marks padding), got dtype {key_padding_mask.dtype}"
        )
    length = qk.shape[-2]
    if key_padding_mask.dim() < 1 or key_padding_mask.shape[-1] != length:
        raise ValueError(
            f"key_padding_mask must have shape (..., L) with L={length}, got shape {tuple(key_padding_mask.shape)}"
        )
    try:
        broadcast = torch.broadcast_shapes(key_padding_mask.shape[:-1], qk.shape[:-2])
    except RuntimeError:
        broadcast = None
    if broadcast != qk.shape[:-2]:
        raise ValueError(
            f"key_padding_mask of shape {tuple(key_padding_mask.shape)} does not broadcast against the "
            f"leading dimensions {tuple(qk.shape[:-2])} of qk; for qk of shape (B, H, L, d) pass (B, 1, L)"
        )


def full_shared_qk_attention(
    qk: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Compute dense shared-QK attention with the masking rules of ``lsh_attention``.

    Implements softmax_j(s_ij) v_j with s_ij = qk_i . (qk_j / |qk_j|) / sqrt(d),
    where the diagonal s_ii is replaced by ``SELF_ATTENTION_LOGIT`` and padding
    keys (and future keys when ``causal``) are excluded. This is the reference
    that ``lsh_attention`` equals when one chunk holds the whole sequence.

    Args:
        qk: shared queries and keys ``(..., L, d)``.
        v: values ``(..., L, dv)``.
        causal: query t may use only keys s <= t.
        key_padding_mask: bool ``(..., L)``, True marks a padding key.

    Returns:
        ``(..., L, dv)``; rows with no admissible key are zero.

    Memory: the ``(..., L, L)`` logits, so use it for short sequences only.
    """
    _check_shared_qk_inputs(qk, v, key_padding_mask)
    length, dim = qk.shape[-2], qk.shape[-1]
    keys = F.normalize(qk, p=2.0, dim=-1)
    logits = torch.matmul(qk, keys.transpose(-2, -1)) / math.sqrt(dim)  # (..., L, L)

    # Self only as a last resort, then forbidden pairs.
    positions = torch.arange(length, device=qk.device)
    is_self = positions[:, None] == positions[None, :]  # (L, L)
    logits = logits.masked_fill(is_self, _self_logit(logits.dtype))
    forbidden = torch.zeros((length, length), dtype=torch.bool, device=qk.device)
    if causal:
        forbidden = positions[None, :] > positions[:, None]
    if key_padding_mask is not None:
        forbidden = forbidden | key_padding_mask.unsqueeze(-2)  # (..., L, L)
    logits = logits.masked_fill(forbidden, torch.finfo(logits.dtype).min)

    weights = torch.softmax(logits, dim=-1)  # (..., L, L)
    has_key = ~forbidden.all(dim=-1, keepdim=True)  # (..., L, 1)
    return torch.matmul(weights, v) * has_key  # (..., L, dv)


def _bucket_factors(n_buckets: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    """Validate ``n_buckets`` and return it as a tuple of factors."""
    factors = (n_buckets,) if isinstance(n_buckets, int) and not isinstance(n_buckets, bool) else tuple(n_buckets)
    for factor in factors:
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2 or factor % 2:
            raise ValueError(
                f"n_buckets must be an even integer >= 2, or a sequence of them (bucket factors), "
                f"got {n_buckets!r}"
            )
    if not factors:
        raise ValueError("n_buckets must not be an empty sequence; pass an even integer >= 2")
    return factors


def factorise_n_buckets(n_buckets: int) -> Union[int, Tuple[int, int]]:
    """Split a power-of-two bucket count above 64 into two factors, e.g. 2048 -> (32, 64).

    Hashing into b buckets costs L * d * b/2 multiply-adds, and b grows with L,
    so hashing alone grows as L^2. Two factors b1 * b2 = b cost
    L * d * (b1 + b2)/2 instead. Smaller counts, and counts that are not
    powers of two, are returned unchanged.
    """
    if n_buckets <= 64 or n_buckets & (n_buckets - 1):
        return n_buckets
    power = n_buckets.bit_length() - 1
    return 2 ** (power // 2), 2 ** (power - power // 2)


def _hash_buckets(qk: Tensor, factors: Tuple[int, ...], n_hashes: int, rotations: Tensor) -> Tensor:
    """Hash ``(N, L, d)`` into ``(N, h, L)`` buckets, one angular hash per factor.

    With factors (b1, b2, ...) the bucket is h1 + b1 * h2 + b1 * b2 * h3 + ...,
    where h_k is the angular hash into b_k buckets by its own columns of
    ``rotations``. transformers 5.25 hashes a list of bucket counts the same way.
    """
    buckets = None
    offset, place_value = 0, 1
    for factor in factors:
        columns = rotations[..., offset:offset + factor // 2]  # (d, h, b_k/2)
        part = lsh_hash(qk, factor, n_hashes, rotations=columns)  # (N, h, L)
        buckets = part if buckets is None else buckets + place_value * part
        offset += factor // 2
        place_value *= factor
    return buckets


def _draw_rotations(
    dim: int, n_columns: int, n_hashes: int, generator: Optional[torch.Generator], like: Tensor
) -> Tensor:
    """Draw ``(dim, n_hashes, n_columns)`` rotations from ``generator``, or from torch's default RNG on ``like``'s device."""
    if generator is not None:
        return random_rotations(
            dim, 2 * n_columns, n_hashes, generator=generator, device=like.device, dtype=like.dtype
        )
    return torch.randn((dim, n_hashes, n_columns), device=like.device, dtype=like.dtype)


def _check_lsh_settings(n_hashes: int, chunk_length: int, dropout_p: float) -> None:
    if not isinstance(n_hashes, int) or isinstance(n_hashes, bool) or n_hashes < 1:
        raise ValueError(f"n_hashes must be an integer >= 1, got {n_hashes!r}")
    if not isinstance(chunk_length, int) or isinstance(chunk_length, bool) or chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive integer, got {chunk_length!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def _select_rows(values: Tensor, rows: Tensor) -> Tensor:
    """Gather ``values[n, rows[n, ...]]``: ``(N, Lp, f)`` by ``(N, *S)`` -> ``(N, *S, f)``.

    ``index_select`` on the flattened rows needs one index per row, where
    ``gather`` would need one per element.
    """
    batch, length, features = values.shape
    offsets = torch.arange(batch, device=rows.device).view(-1, *([1] * (rows.dim() - 1))) * length
    flat_rows = (rows + offsets).reshape(-1)
    return values.reshape(batch * length, features).index_select(0, flat_rows).view(*rows.shape, features)


def _duplicate_counts(
    chunk_of: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    n_chunks: int,
    buckets: Optional[Tensor],
) -> Tensor:
    """Count, for each computed (query, key) pair, the rounds in which that pair is computed.

    ``chunk_of`` is ``(N, Lp, h)``: the chunk of each position in each round.
    With ``buckets`` ``(N, Lp, h)`` given, a pair also needs equal buckets in a
    round to count. Returns integer counts ``(N, h, n_chunks, c, w)``, each at least 1.
    """
    query_chunks = _select_rows(chunk_of, query_positions).unsqueeze(-2)  # (N, h, nc, c, 1, h')
    key_chunks = _select_rows(chunk_of, key_positions).unsqueeze(-3)  # (N, h, nc, 1, w, h')
    together = key_chunks == query_chunks  # (N, h, nc, c, w, h')
    if n_chunks > 1:
        together |= key_chunks == (query_chunks - 1) % n_chunks
    if buckets is not None:
        query_all = _select_rows(buckets, query_positions).unsqueeze(-2)  # (N, h, nc, c, 1, h')
        key_all = _select_rows(buckets, key_positions).unsqueeze(-3)  # (N, h, nc, 1, w, h')
        together &= key_all == query_all
    return together.sum(dim=-1)  # (N, h, nc, c, w)


def lsh_attention(
    qk: Tensor,
    v: Tensor,
    *,
    n_buckets: Union[int, Sequence[int]],
    n_hashes: int = 1,
    chunk_length: int = 64,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    rotations: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_buckets: bool = False,
    mask_other_buckets: bool = False,
    correct_duplicates: bool = False,
    dropout_p: float = 0.0,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Compute shared-QK attention over LSH buckets, with ``n_hashes`` rounds.

    Per round: hash ``qk`` into ``n_buckets`` buckets (angular LSH), sort the
    positions by (bucket, position), and split the sorted sequence into chunks
    of ``chunk_length``. Each query attends to the keys of its own chunk and of
    the chunk before it. The first chunk looks back to the last one, and a
    single chunk looks only at itself. Outputs are put back in the original
    order, and the rounds are mixed with weights softmax_r(z_i^(r)), where
    z_i^(r) is the round's log-sum-exp of logits (see the module docstring).

    Any length L works: the sequence is padded to a multiple of
    ``chunk_length``. Padding positions, both these and those marked in
    ``key_padding_mask``, are given an extra bucket that sorts after every real
    one, so they never move a real position to another chunk. The outputs at
    real positions therefore equal those of the sequence with its padding
    removed, provided both have the same number of chunks: the first chunk
    looks back at the last one, which padding can fill.

    Args:
        qk: shared queries and keys ``(..., L, d)``.
        v: values ``(..., L, dv)``.
        n_buckets: even number of hash buckets (``default_n_buckets`` gives the
            usual choice, about 2L / chunk_length), or a sequence of even
            factors whose product is the number of buckets, each hashed with
            its own rotation (see ``factorise_n_buckets``).
        n_hashes: hash rounds; more rounds miss fewer near keys and cost more.
        chunk_length: positions per chunk; each query attends to at most
            2 * chunk_length keys per round.
        causal: query t may use only keys s <= t, compared by original position.
        key_padding_mask: bool ``(..., L)``, True marks a padding key; it
            broadcasts against the leading dimensions of ``qk``.
        rotations: ``(d, n_hashes, n_buckets // 2)``, or with factors
            ``(d, n_hashes, sum(factors) // 2)``; drawn when None, from
            ``generator`` if given, else from torch's default RNG on qk's device.
        generator: source of the rotations when ``rotations`` is None.
        return_buckets: also return the buckets ``(..., n_hashes, L)``.
        mask_other_buckets: exclude keys of other buckets that share the chunk
            window, as Kitaev et al. 2020 describe. reformer-pytorch 1.4.4 has
            it off by default (``attend_across_buckets=True``).
        correct_duplicates: subtract log N_ij from each logit, where N_ij is the
            number of rounds that compute the pair (i, j), so that a key found
            by several rounds counts once: the output is then softmax attention
            over the union of the rounds' key sets (Kitaev et al. 2020,
            "Multi-round LSH attention"). reformer-pytorch 1.4.4 has it off by
            default (``allow_duplicate_attention=True``).
            Costs n_hashes times the memory of the logits.
        dropout_p: dropout probability on the attention weights within each
            round, drawn from torch's default RNG; use 0 outside training.

    Returns:
        The output ``(..., L, dv)``, and the buckets when requested.

    Memory: O(n_hashes * L * chunk_length) for the logits, linear in L; no
    ``(L, L)`` or ``(n_hashes, L, n_buckets)`` tensor exists.
    """
    _check_shared_qk_inputs(qk, v, key_padding_mask)
    factors = _bucket_factors(n_buckets)
    _check_lsh_settings(n_hashes, chunk_length, dropout_p)
    batch_shape, length, dim, value_dim = qk.shape[:-2], qk.shape[-2], qk.shape[-1], v.shape[-1]
    qk = qk.reshape(-1, length, dim)  # (N, L, d)
    v = v.reshape(-1, length, value_dim)  # (N, L, dv)
    batch = qk.shape[0]

    # 1. Hash. Padding positions get one extra bucket, after every real bucket.
    n_columns = sum(factors) // 2
    if rotations is None:
        rotations = _draw_rotations(dim, n_columns, n_hashes, generator, qk)
    elif tuple(rotations.shape) != (dim, n_hashes, n_columns):
        raise ValueError(
            f"rotations must have shape (d, n_hashes, sum of bucket factors // 2) = "
            f"{(dim, n_hashes, n_columns)}, got {tuple(rotations.shape)}"
        )
    buckets = _hash_buckets(qk.detach(), factors, n_hashes, rotations)  # (N, h, L)
    total_buckets = math.prod(factors)
    padded_length = -(-length // chunk_length) * chunk_length
    n_chunks = padded_length // chunk_length
    padding = torch.zeros((batch, padded_length), dtype=torch.bool, device=qk.device)  # (N, Lp)
    padding[:, length:] = True
    if key_padding_mask is not None:
        padding[:, :length] = key_padding_mask.expand(*batch_shape, length).reshape(batch, length)
    buckets = F.pad(buckets, (0, padded_length - length))  # (N, h, Lp)
    buckets = buckets.masked_fill(padding.unsqueeze(1), total_buckets)
    qk = F.pad(qk, (0, 0, 0, padded_length - length))  # (N, Lp, d)
    v = F.pad(v, (0, 0, 0, padded_length - length))  # (N, Lp, dv)

    # 2. Sort each round by (bucket, position) and split into chunks.
    sorted_positions, undo_sort = sort_by_bucket(buckets)  # (N, h, Lp) each
    chunk_shape = (batch, n_hashes, n_chunks, chunk_length)
    query_positions = sorted_positions.view(chunk_shape)  # (N, h, nc, c)

    # 3. Look back: each chunk also attends to the chunk before it. With one chunk
    #    the chunk before is itself, so it is not added twice. The windows are
    #    built from positions, so each vector is gathered once, into its window.
    key_positions = query_positions
    if n_chunks > 1:
        key_positions = look_back(query_positions.unsqueeze(-1)).squeeze(-1)  # (N, h, nc, 2c)
    queries = _select_rows(qk / math.sqrt(dim), query_positions)  # (N, h, nc, c, d)
    keys = _select_rows(F.normalize(qk, p=2.0, dim=-1), key_positions)  # (N, h, nc, w, d)
    values = _select_rows(v, key_positions)  # (N, h, nc, w, dv)

    # 4. Logits within each chunk window. The chunk itself is the first c keys
    #    of its window, so attention to self is the diagonal of the logits.
    logits = torch.matmul(queries, keys.transpose(-2, -1))  # (N, h, nc, c, w)
    if correct_duplicates:
        chunk_of = (undo_sort // chunk_length).transpose(1, 2)  # (N, Lp, h)
        all_buckets = buckets.transpose(1, 2) if mask_other_buckets else None  # (N, Lp, h)
        counts = _duplicate_counts(chunk_of, query_positions, key_positions, n_chunks, all_buckets)
        logits = logits - torch.log(counts.to(logits.dtype))
    logits.diagonal(dim1=-2, dim2=-1).fill_(_self_logit(logits.dtype))
    has_padding = padded_length > length or key_padding_mask is not None
    forbidden = _forbidden_pairs(
        query_positions, key_positions, padding if has_padding else None,
        buckets, sorted_positions, causal, mask_other_buckets, chunk_shape,
    )
    if forbidden is not None:
        logits = logits.masked_fill_(forbidden, torch.finfo(logits.dtype).min)

    # 5. Softmax within the round; keep its log-sum-exp for mixing the rounds.
    weights, round_lse = _SoftmaxWithLogSumExp.apply(logits)  # (N, h, nc, c, w), (N, h, nc, c, 1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    round_output = torch.matmul(weights, values)  # (N, h, nc, c, dv)

    # 6. Unsort: back to the original positions.
    round_rows = undo_sort + torch.arange(n_hashes, device=qk.device).view(1, -1, 1) * padded_length  # (N, h, Lp)
    round_output = _select_rows(round_output.reshape(batch, n_hashes * padded_length, value_dim), round_rows)
    round_lse = _select_rows(round_lse.reshape(batch, n_hashes * padded_length, 1), round_rows).squeeze(-1)
    # round_output (N, h, Lp, dv), round_lse (N, h, Lp)

    # 7. Mix the rounds, weighted by each round's share of the total exp-logit mass.
    round_weights = torch.softmax(round_lse, dim=1)  # (N, h, Lp)
    output = (round_weights.unsqueeze(-1) * round_output).sum(dim=1)  # (N, Lp, dv)
    if has_padding:
        # Only padding can leave a row with no key, because attention to self is
        # allowed otherwise. Such a row has uniform weights over forbidden keys: zero it.
        has_key = ~forbidden.all(dim=-1).reshape(batch, n_hashes * padded_length, 1)  # (N, h*Lp, 1)
        has_key = _select_rows(has_key, round_rows).squeeze(-1)  # (N, h, Lp)
        output = output * has_key.any(dim=1).unsqueeze(-1)

    output = output[:, :length].reshape(*batch_shape, length, value_dim)  # (..., L, dv)
    if not return_buckets:
        return output
    real_buckets = buckets[:, :, :length].reshape(*batch_shape, n_hashes, length)  # (..., h, L)
    return output, real_buckets


def _forbidden_pairs(
    query_positions: Tensor,
    key_positions: Tensor,
    padding: Optional[Tensor],
    buckets: Tensor,
    sorted_positions: Tensor,
    causal: bool,
    mask_other_buckets: bool,
    chunk_shape: Tuple[int, int, int, int],
) -> Optional[Tensor]:
    """Mark the (query, key) pairs never attended: padding keys, future keys, other buckets.

    Returns a bool tensor ``(N, h, nc, c, w)``, True = forbidden, or None when
    no pair is forbidden.
    """
    batch, n_hashes, n_chunks, chunk_length = chunk_shape
    forbidden = None
    if padding is not None:
        key_is_padding = padding.gather(1, key_positions.reshape(batch, -1)).view(key_positions.shape)  # (N, h, nc, w)
        forbidden = key_is_padding.unsqueeze(-2)  # (N, h, nc, 1, w)
    if causal:
        future = key_positions.unsqueeze(-2) > query_positions.unsqueeze(-1)  # (N, h, nc, c, w)
        forbidden = future if forbidden is None else forbidden | future
    if mask_other_buckets:
        sorted_buckets = buckets.gather(-1, sorted_positions).view(chunk_shape)  # (N, h, nc, c)
        key_buckets = sorted_buckets if n_chunks == 1 else look_back(sorted_buckets.unsqueeze(-1)).squeeze(-1)
        other = key_buckets.unsqueeze(-2) != sorted_buckets.unsqueeze(-1)  # (N, h, nc, c, w)
        forbidden = other if forbidden is None else forbidden | other
    if forbidden is None:
        return None
    return forbidden.expand(*query_positions.shape, key_positions.shape[-1])  # (N, h, nc, c, w)


class _SoftmaxWithLogSumExp(torch.autograd.Function):
    """Compute the softmax over the last dimension and its log-sum-exp from one softmax call.

    The log-sum-exp is read off the softmax at the largest logit:
    lse = max_j l_j - log(max_j softmax(l)_j), where the weight is at least 1/w,
    so the logarithm never underflows. Backward uses the saved weights p:
    dl = p * (dp - sum_j p_j dp_j + dlse).
    """

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tuple[Tensor, Tensor]:
        weights = torch.softmax(logits, dim=-1)
        lse = logits.amax(dim=-1, keepdim=True) - torch.log(weights.amax(dim=-1, keepdim=True))
        ctx.save_for_backward(weights)
        return weights, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_weights: Optional[Tensor], grad_lse: Optional[Tensor]) -> Tensor:
        (weights,) = ctx.saved_tensors
        row_term = 0.0
        if grad_weights is not None:
            row_term = -(grad_weights * weights).sum(dim=-1, keepdim=True)
        else:
            grad_weights = torch.zeros_like(weights)
        if grad_lse is not None:
            row_term = row_term + grad_lse
        return weights * (grad_weights + row_term)
