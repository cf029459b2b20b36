"""``LSHSelfAttention``: multi-head self-attention with shared QK over LSH buckets."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .attention import _bucket_factors, default_n_buckets, factorise_n_buckets, lsh_attention
from .hashing import random_rotations

__all__ = ["LSHSelfAttention"]


class LSHSelfAttention(nn.Module):
    """Multi-head LSH self-attention (Kitaev et al. 2020, "Reformer").

    One linear map gives the shared queries and keys, a second the values, and
    a third mixes the heads back to ``d_model``. Each head runs
    ``lsh_attention`` on its ``d_model // n_heads`` features.

    Args:
        d_model: feature size of the input and output.
        n_heads: number of heads; must divide ``d_model``.
        n_hashes: hash rounds per call.
        chunk_length: positions per chunk.
        n_buckets: bucket count, or a sequence of bucket factors. None picks
            ``default_n_buckets(L, chunk_length)`` on each call (about
            2L / chunk_length, a power of two), split into two factors above 64
            by ``factorise_n_buckets``, so one module serves several lengths.
        causal: position t attends only to positions s <= t.
        dropout: dropout probability on the attention weights in training mode.
        hash_seed: when set, every call draws its rotations from a new CPU
            ``torch.Generator`` seeded with it, so every call (for example a
            reversible layer's recompute) uses the same rotations on any device.
        mask_other_buckets, correct_duplicates: as in ``lsh_attention``.
        bias: whether the three linear maps have a bias.

    Rotations for a call come from, in order: ``hash_seed``; the ``generator``
    passed to ``forward``; torch's default RNG on the input's device (which a
    reversible layer that saves and restores the RNG state replays).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_hashes: int = 4,
        chunk_length: int = 64,
        n_buckets: Optional[Union[int, Sequence[int]]] = None,
        causal: bool = False,
        dropout: float = 0.0,
        hash_seed: Optional[int] = None,
        mask_other_buckets: bool = False,
        correct_duplicates: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(d_model, int) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(
                f"n_heads must be a positive integer that divides d_model, got d_model={d_model!r}, "
                f"n_heads={n_heads!r}"
            )
        if n_buckets is not None:
            _bucket_factors(n_buckets)
        if hash_seed is not None and (not isinstance(hash_seed, int) or isinstance(hash_seed, bool)):
            raise ValueError(f"hash_seed must be an integer or None, got {hash_seed!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_hashes = n_hashes
        self.chunk_length = chunk_length
        self.n_buckets = n_buckets
        self.causal = causal
        self.dropout = dropout
        self.hash_seed = hash_seed
        self.mask_other_buckets = mask_other_buckets
        self.correct_duplicates = correct_duplicates
        self.to_qk = nn.Linear(d_model, d_model, bias=bias)
        self.to_v = nn.Linear(d_model, d_model, bias=bias)
        self.to_out = nn.Linear(d_model, d_model, bias=bias)

    def buckets_for_length(self, length: int) -> Union[int, Sequence[int]]:
        """Return the bucket count (or factors) used for a sequence of ``length`` positions."""
        if self.n_buckets is not None:
            return self.n_buckets
        return factorise_n_buckets(default_n_buckets(length, self.chunk_length))

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Attend ``x`` ``(B, L, d_model)`` to itself; returns ``(B, L, d_model)``.

        ``key_padding_mask`` is bool ``(B, L)``, True marks padding.
        ``generator`` supplies the rotations when ``hash_seed`` is None; passing
        both is an error.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, L, d_model={self.d_model}), got {tuple(x.shape)}")
        if generator is not None and self.hash_seed is not None:
            raise ValueError(
                "pass a generator or set hash_seed, not both: hash_seed already fixes the rotations"
            )
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"key_padding_mask must have shape (B, L) = {tuple(x.shape[:2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        batch, length, _ = x.shape
        head_dim = self.d_model // self.n_heads

        # Project and split the heads.
        qk = self.to_qk(x).view(batch, length, self.n_heads, head_dim).transpose(1, 2)  # (B, H, L, dh)
        v = self.to_v(x).view(batch, length, self.n_heads, head_dim).transpose(1, 2)  # (B, H, L, dh)
        mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(1)  # (B, 1, L)

        # Attend within buckets.
        n_buckets = self.buckets_for_length(length)
        rotations = self._rotations(n_buckets, head_dim, x, generator)
        output = lsh_attention(
            qk, v,
            n_buckets=n_buckets,
            n_hashes=self.n_hashes,
            chunk_length=self.chunk_length,
            causal=self.causal,
            key_padding_mask=mask,
            rotations=rotations,
            mask_other_buckets=self.mask_other_buckets,
            correct_duplicates=self.correct_duplicates,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, L, dh)

        # Merge the heads and mix them.
        output = output.transpose(1, 2).reshape(batch, length, self.d_model)  # (B, L, d_model)
        return self.to_out(output)

    def _rotations(
        self, n_buckets: Union[int, Sequence[int]], head_dim: int, x: Tensor, generator: Optional[torch.Generator]
    ) -> Tensor:
        n_columns = sum(_bucket_factors(n_buckets)) // 2
        if self.hash_seed is not None:
            generator = torch.Generator().manual_seed(self.hash_seed)
        if generator is not None:
            return random_rotations(
                head_dim, 2 * n_columns, self.n_hashes, generator=generator, device=x.device, dtype=x.dtype
            )
        return torch.randn((head_dim, self.n_hashes, n_columns), device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_hashes={self.n_hashes}, "
            f"chunk_length={self.chunk_length}, n_buckets={self.n_buckets}, causal={self.causal}, "
            f"hash_seed={self.hash_seed}"
        )
