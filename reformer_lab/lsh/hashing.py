"""Angular locality-sensitive hashing as in the Reformer.

A vector x is hashed by a random rotation R of shape (d, b/2):

    h(x) = argmax([x R ; -x R])

so the bucket is the nearest of the b directions {+-R_j}. Vectors at a small
angle land in the same bucket with high probability, vectors far apart rarely.
Several independent rotations (hash rounds) make a near neighbour harder to
miss.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "random_rotations",
    "lsh_hash",
    "sort_by_bucket",
    "unsort",
    "split_into_chunks",
    "look_back",
    "bucket_sizes",
]

# Positions hashed at once are limited so that the projected block
# (batch..., n_hashes, positions, n_buckets / 2) stays below this many elements
# (64 MiB in float32): the full n_hashes x L x n_buckets/2 projection never exists.
_HASH_BLOCK_ELEMENTS = 1 << 24


def _check_n_buckets(n_buckets: int) -> None:
    if not isinstance(n_buckets, int) or isinstance(n_buckets, bool) or n_buckets < 2 or n_buckets % 2:
        raise ValueError(
            f"n_buckets must be an even integer >= 2, because the rotation yields "
            f"n_buckets/2 directions and their negatives; got {n_buckets!r}"
        )


def _check_n_hashes(n_hashes: int) -> None:
    if not isinstance(n_hashes, int) or isinstance(n_hashes, bool) or n_hashes < 1:
        raise ValueError(f"n_hashes must be an integer >= 1, got {n_hashes!r}")


def random_rotations(
    dim: int,
    n_buckets: int,
    n_hashes: int = 1,
    *,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Draw Gaussian random rotations of shape ``(dim, n_hashes, n_buckets // 2)``.

    The numbers are drawn on the generator's device (the CPU unless a CUDA
    generator is given) and then moved to ``device``, so one CPU generator
    seed gives the same rotations, and so the same buckets, on CPU and GPU.
    """
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    _check_n_buckets(n_buckets)
    _check_n_hashes(n_hashes)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    rotations = torch.randn(
        (dim, n_hashes, n_buckets // 2),
        generator=generator,
        device=draw_device,
        dtype=dtype or torch.get_default_dtype(),
    )
    return rotations.to(device) if device is not None else rotations


def lsh_hash(
    x: Tensor,
    n_buckets: int,
    n_hashes: int = 1,
    *,
    rotations: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Hash vectors into buckets by angular LSH: argmax over [x R ; -x R].

    Args:
        x: vectors ``(..., L, d)``.
        n_buckets: even number of buckets b.
        n_hashes: number of independent hash rounds.
        rotations: ``(d, n_hashes, b // 2)``; drawn from ``generator`` when None.
        generator: source of the random rotations.

    Returns:
        Integer buckets ``(..., n_hashes, L)`` with values in ``[0, n_buckets)``.

    The projection is computed a block of positions at a time, so memory stays
    linear in L instead of ``n_hashes x L x b/2``.
    """
    _check_n_buckets(n_buckets)
    _check_n_hashes(n_hashes)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., L, d), got shape {tuple(x.shape)}")
    dim = x.shape[-1]
    expected = (dim, n_hashes, n_buckets // 2)
    if rotations is None:
        rotations = random_rotations(dim, n_buckets, n_hashes, generator=generator, device=x.device, dtype=x.dtype)
    elif tuple(rotations.shape) != expected:
        raise ValueError(
            f"rotations must have shape (d, n_hashes, n_buckets // 2) = {expected}, "
            f"got {tuple(rotations.shape)}"
        )
    rotations = rotations.to(device=x.device, dtype=x.dtype)

    batch_shape = x.shape[:-2]
    length = x.shape[-2]
    buckets = torch.empty(batch_shape + (n_hashes, length), dtype=torch.long, device=x.device)
    batch_elements = max(1, batch_shape.numel())
    block = max(1, _HASH_BLOCK_ELEMENTS // (batch_elements * n_hashes * (n_buckets // 2)))

    with torch.no_grad():
        for start in range(0, length, block):
            end = min(start + block, length)
            projected = torch.einsum("...ld,dhb->...hlb", x[..., start:end, :], rotations)  # (..., h, l, b/2)
            # argmax over [xR ; -xR] without building the concatenation: the
            # largest of xR wins unless the most negative entry is larger in size.
            max_value, max_index = projected.max(dim=-1)
            min_value, min_index = projected.min(dim=-1)
            use_negative = -min_value > max_value
            buckets[..., start:end] = torch.where(use_negative, min_index + n_buckets // 2, max_index)
    return buckets


def sort_by_bucket(buckets: Tensor) -> Tuple[Tensor, Tensor]:
    """Sort positions by (bucket, position) within each hash round.

    Args:
        buckets: ``(..., n_hashes, L)`` integer buckets.

    Returns:
        ``(sorted_positions, undo_sort)``, both ``(..., n_hashes, L)``:
        ``sorted_positions[..., r, i]`` is the original position that comes i-th
        in round r, and ``undo_sort`` gathers sorted values back into the
        original order (see ``unsort``).
    """
    length = buckets.shape[-1]
    positions = torch.arange(length, device=buckets.device)
    keys = buckets * length + positions  # unique, ordered by (bucket, position)
    sorted_positions = keys.argsort(dim=-1)
    undo_sort = sorted_positions.argsort(dim=-1)
    return sorted_positions, undo_sort


def unsort(values: Tensor, undo_sort: Tensor) -> Tensor:
    """Put sorted values ``(..., n_hashes, L, d)`` back in original order."""
    index = undo_sort.unsqueeze(-1).expand(*undo_sort.shape, values.shape[-1])
    return values.gather(-2, index)


def split_into_chunks(values: Tensor, chunk_length: int) -> Tensor:
    """Split ``(..., L, d)`` into ``(..., L // chunk_length, chunk_length, d)``.

    L must be a multiple of ``chunk_length``; pad first otherwise.
    """
    length = values.shape[-2]
    if chunk_length < 1 or length % chunk_length:
        raise ValueError(
            f"length {length} is not a multiple of chunk_length {chunk_length}; pad the sequence first"
        )
    return values.reshape(*values.shape[:-2], length // chunk_length, chunk_length, values.shape[-1])


def look_back(chunks: Tensor) -> Tensor:
    """Concatenate each chunk with the one before it: ``(..., n, c, d) -> (..., n, 2c, d)``.

    The first chunk looks back to the last one (wrapping around), as the
    Reformer does within a hash round.
    """
    previous = torch.roll(chunks, shifts=1, dims=-3)
    return torch.cat([chunks, previous], dim=-2)


def bucket_sizes(buckets: Tensor, n_buckets: int) -> Tensor:
    """Count positions per bucket: ``(..., L)`` -> ``(..., n_buckets)``."""
    _check_n_buckets(n_buckets)
    counts = torch.zeros(buckets.shape[:-1] + (n_buckets,), dtype=torch.long, device=buckets.device)
    return counts.scatter_add_(-1, buckets, torch.ones_like(buckets))
