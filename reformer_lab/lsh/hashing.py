"""Angular locality-sensitive hashing as in the Reformer.

A vector x is hashed by a random rotation R of shape (d, b/2):

    h(x) = argmax([x R ; -x R])

so the bucket is the nearest of the b directions {+-R_j}. Vectors at a small
angle land in the same bucket with high probability, vectors far apart rarely.
Several independent rotations (hash rounds) make a near neighbour harder to
miss.

The module also gives the probability that two vectors at angle theta share a
bucket, exactly (``collision_probability``) and by sampling
(``estimate_collision_probability``), and the helpers LSH attention uses to
sort positions by bucket and cut the sorted order into chunks.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
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
    "collision_probability",
    "estimate_collision_probability",
    "attended_pairs",
    "top_k_keys",
    "top_k_recall",
    "share_found",
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
    linear in L instead of ``n_hashes x L x b/2``. The bucket depends only on
    the direction of x: scaling x by a positive number leaves it unchanged.

    NOTE: CPU and GPU round the projection differently. A vector whose two
    largest projections agree to within float rounding can therefore land in
    different buckets on the two devices, though for Gaussian rotations such
    near-ties are rare.
    """
    _check_n_buckets(n_buckets)
    _check_n_hashes(n_hashes)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., L, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")
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
    if not isinstance(chunk_length, int) or isinstance(chunk_length, bool) or chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive integer, got {chunk_length!r}")
    if values.dim() < 2:
        raise ValueError(f"values must have shape (..., L, d), got shape {tuple(values.shape)}")
    length = values.shape[-2]
    if length % chunk_length:
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
    if buckets.numel() and (int(buckets.min()) < 0 or int(buckets.max()) >= n_buckets):
        raise ValueError(
            f"buckets must lie in [0, {n_buckets}), got values from {int(buckets.min())} "
            f"to {int(buckets.max())}; pass the n_buckets the buckets were hashed with"
        )
    counts = torch.zeros(buckets.shape[:-1] + (n_buckets,), dtype=torch.long, device=buckets.device)
    return counts.scatter_add_(-1, buckets, torch.ones_like(buckets))


# --- Collision probability -------------------------------------------------

# Gauss-Legendre nodes for the exact single-round probability: over the radius
# and the angle of the winning direction, and along each edge of the
# parallelogram in the inner probability. Against counts of 128 / 128 / 64,
# the result differs by less than 1e-5 for 4 to 128 buckets (checked in
# tests/test_hashing.py); 4 buckets converge slowest.
_RADIUS_NODES = 48
_ANGLE_NODES = 48
_EDGE_NODES = 24
# A standard normal vector in the plane lies beyond radius 10 with probability exp(-50).
_RADIUS_LIMIT = 10.0
# Samples hashed at once by estimate_collision_probability; fixed, so the
# random draws do not depend on how many angles are passed.
_SAMPLE_BATCH = 1024
_ANGLE_TOLERANCE = 1e-6

AngleLike = Union[float, Sequence[float], Tensor]


def _as_angles(angle: AngleLike) -> Tensor:
    """Convert angles in radians to a float64 tensor, checking they lie in [0, pi]."""
    angles = torch.as_tensor(angle, dtype=torch.float64)
    if angles.numel() == 0:
        return angles
    low, high = float(angles.min()), float(angles.max())
    if not math.isfinite(low) or not math.isfinite(high) or low < 0 or high > math.pi + _ANGLE_TOLERANCE:
        raise ValueError(f"angle must be in radians within [0, pi], got values from {low} to {high}")
    return angles.clamp(max=math.pi)


@functools.lru_cache(maxsize=None)
def _unit_gauss_legendre(n_nodes: int) -> Tuple[Tensor, Tensor]:
    unit_nodes, unit_weights = np.polynomial.legendre.leggauss(n_nodes)
    return torch.from_numpy(unit_nodes), torch.from_numpy(unit_weights)


def _gauss_legendre(n_nodes: int, low: Tensor, high: Tensor) -> Tuple[Tensor, Tensor]:
    """Return Gauss-Legendre nodes and weights on [low, high], each of shape ``low.shape + (n_nodes,)``."""
    unit_nodes, unit_weights = _unit_gauss_legendre(n_nodes)
    half = ((high - low) / 2).unsqueeze(-1)
    middle = ((high + low) / 2).unsqueeze(-1)
    return middle + half * unit_nodes, half * unit_weights


def _edge_integral(distance: Tensor, tan_low: Tensor, tan_high: Tensor) -> Tensor:
    """Integrate 1 - exp(-distance^2 / (2 cos^2 psi)) over psi in [atan(tan_low), atan(tan_high)].

    Divided by 2 pi, this is the standard normal measure of the triangle
    between the origin and an edge at ``distance`` from it, whose ends are seen
    at angles ``psi`` from the edge's normal.
    """
    psi, weights = _gauss_legendre(_EDGE_NODES, torch.atan(tan_low), torch.atan(tan_high))  # (..., n)
    radius_squared = distance.unsqueeze(-1) ** 2 / torch.cos(psi) ** 2
    return ((1 - torch.exp(-radius_squared / 2)) * weights).sum(dim=-1)


def _parallelogram_probability(a: Tensor, c: Tensor, angle: Tensor) -> Tensor:
    """Compute P(|<g, x>| < a and |<g, y>| < c) for g ~ N(0, I_2) and unit x, y at ``angle``.

    The region is a parallelogram with vertices +-v, +-w, where <v, x> = a,
    <v, y> = c and <w, x> = a, <w, y> = -c. Its measure is twice the sum of the
    two triangles from the origin to the edge <g, x> = a and to the edge <g, y> = c.
    All arguments broadcast against each other.
    """
    sin, cos = torch.sin(angle), torch.cos(angle)
    x_edge = _edge_integral(a, (-c - a * cos) / (a * sin), (c - a * cos) / (a * sin))
    y_edge = _edge_integral(c, (c * cos - a) / (c * sin), (c * cos + a) / (c * sin))
    return (x_edge + y_edge) / math.pi


def _single_round_quadrature(angles: Tensor, n_buckets: int) -> Tensor:
    """Compute by quadrature the probability that vectors at ``angles`` (1-D, float64) share a bucket in one round.

    See ``collision_probability`` for the formula.
    """
    inside = angles.clamp(_ANGLE_TOLERANCE, math.pi - _ANGLE_TOLERANCE).reshape(-1, 1, 1)  # (A, 1, 1)
    zero = torch.zeros((), dtype=torch.float64)
    radius, radius_weights = _gauss_legendre(_RADIUS_NODES, zero, zero + _RADIUS_LIMIT)  # (n_r,)
    phi, phi_weights = _gauss_legendre(_ANGLE_NODES, inside - math.pi / 2, zero + math.pi / 2)  # (A, 1, 1, n_phi)

    # The winning direction g in polar coordinates (radius, phi), over the arc
    # where both projections A = <g, x> and B = <g, y> are positive.
    radius = radius.reshape(1, -1, 1)  # (1, n_r, 1)
    phi, phi_weights = phi.reshape(len(angles), 1, -1), phi_weights.reshape(len(angles), 1, -1)  # (A, 1, n_phi)
    a = radius * torch.cos(phi)  # (A, n_r, n_phi)
    c = radius * torch.cos(phi - inside)  # (A, n_r, n_phi)
    others_smaller = _parallelogram_probability(a, c, inside) ** (n_buckets // 2 - 1)

    density = radius * torch.exp(-radius**2 / 2) / (2 * math.pi)  # standard normal in polar coordinates
    weights = radius_weights.reshape(1, -1, 1) * phi_weights  # (A, n_r, n_phi)
    probability = n_buckets * (density * others_smaller * weights).sum(dim=(-2, -1))  # (A,)

    # At angle 0 the vectors coincide and at pi they are opposite, so the
    # bucket of -x is the bucket of x shifted by b/2.
    probability = torch.where(angles <= 0.0, torch.ones_like(probability), probability)
    return torch.where(angles >= math.pi, torch.zeros_like(probability), probability)


def collision_probability(angle: AngleLike, n_buckets: int, n_hashes: int = 1) -> Tensor:
    """Compute the probability that two vectors at ``angle`` share a bucket in at least one of ``n_hashes`` rounds.

    Only the plane of the two unit vectors x, y matters. In it the b/2 columns
    r_j of a Gaussian rotation give independent pairs (A_j, B_j) = (<x, r_j>,
    <y, r_j>) of standard normals with correlation cos(theta). The vectors
    share a bucket when one j has both the largest |A_j| and the largest
    |B_j|, with A_j and B_j of the same sign, so for one round

        p_1(theta) = b * E[1{A > 0, B > 0} * P(|A'| < A, |B'| < B | A, B)^(b/2 - 1)]

    with (A, B) and (A', B') two independent such pairs. For b = 2 the hash is
    the sign of one projection and p_1 = 1 - theta / pi in closed form. For
    larger b no closed form is used: the expectation is computed by
    Gauss-Legendre quadrature, accurate to about 1e-5. Independent rounds give

        p(theta) = 1 - (1 - p_1(theta))^n_hashes

    Args:
        angle: angle between the vectors in radians, within [0, pi]; a float,
            a sequence or a tensor.
        n_buckets: even number of buckets b.
        n_hashes: number of independent hash rounds.

    Returns:
        float64 probabilities with the shape of ``angle``, on the CPU.
    """
    _check_n_buckets(n_buckets)
    _check_n_hashes(n_hashes)
    angles = _as_angles(angle).cpu()
    if n_buckets == 2:
        single_round = 1.0 - angles / math.pi
    else:
        single_round = _single_round_quadrature(angles.reshape(-1), n_buckets).reshape(angles.shape)
    return 1 - (1 - single_round.clamp(0.0, 1.0)) ** n_hashes


def _check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def estimate_collision_probability(
    angle: AngleLike,
    n_buckets: int,
    n_hashes: int = 1,
    *,
    dim: int = 2,
    n_samples: int = 10_000,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """Estimate by sampling the probability that two vectors at ``angle`` share a bucket in any of ``n_hashes`` rounds.

    Each sample draws ``n_hashes`` fresh rotations with ``random_rotations`` and
    hashes x = e_1 and y = cos(theta) e_1 + sin(theta) e_2 with ``lsh_hash``;
    the estimate is the share of samples in which some round puts both in one
    bucket. Its standard error is sqrt(p (1 - p) / n_samples). The same
    rotations serve every angle, so the estimate for one angle does not depend
    on the other angles passed with it. The rotations are Gaussian, so the
    probability does not depend on ``dim`` (for dim >= 2); the argument is there
    to check that.

    Args:
        angle: angle between the vectors in radians, within [0, pi]; a float,
            a sequence or a tensor.
        n_buckets: even number of buckets b.
        n_hashes: number of independent hash rounds.
        dim: dimension of the vectors, at least 2.
        n_samples: number of independent samples.
        generator: source of the random rotations.
        device: where to hash; the CPU when None.

    Returns:
        float64 estimates with the shape of ``angle``, on the CPU.
    """
    _check_n_buckets(n_buckets)
    _check_n_hashes(n_hashes)
    _check_positive_int("dim", dim, minimum=2)
    _check_positive_int("n_samples", n_samples)
    angles = _as_angles(angle)
    flat_angles = angles.reshape(-1).to(device or "cpu")  # (A,)

    # The pair (x, y) for each angle: (A, 2, dim).
    pairs = torch.zeros(flat_angles.shape[0], 2, dim, dtype=torch.float32, device=flat_angles.device)
    pairs[:, 0, 0] = 1.0
    pairs[:, 1, 0] = torch.cos(flat_angles).float()
    pairs[:, 1, 1] = torch.sin(flat_angles).float()

    angles_per_block = max(1, (1 << 22) // (_SAMPLE_BATCH * n_hashes * (n_buckets // 2)))
    collisions = torch.zeros(flat_angles.shape[0], dtype=torch.float64, device=flat_angles.device)
    for start in range(0, n_samples, _SAMPLE_BATCH):
        batch = min(_SAMPLE_BATCH, n_samples - start)
        rotations = random_rotations(dim, n_buckets, batch * n_hashes, generator=generator, device=pairs.device)
        for first in range(0, pairs.shape[0], angles_per_block):
            block = pairs[first : first + angles_per_block]
            buckets = lsh_hash(block, n_buckets, batch * n_hashes, rotations=rotations)  # (a, batch * h, 2)
            shared = buckets[..., 0] == buckets[..., 1]  # (a, batch * h)
            any_round = shared.reshape(-1, batch, n_hashes).any(dim=-1)  # (a, batch)
            collisions[first : first + angles_per_block] += any_round.sum(dim=-1)
    return (collisions / n_samples).cpu().reshape(angles.shape)


# --- Which (query, key) pairs LSH attention compares -----------------------


def attended_pairs(buckets: Tensor, chunk_length: int) -> Tensor:
    """Mark the (query, key) pairs where, in some round, the key is in the query's chunk or the chunk before it.

    Within each round, positions are sorted by (bucket, position) and the
    sorted order is cut into chunks of ``chunk_length``. A query is compared
    with the keys of its own chunk and of the chunk before it, and the first
    chunk looks back to the last one, as ``split_into_chunks`` and
    ``look_back`` do. No causal or self mask is applied.

    Args:
        buckets: ``(..., n_hashes, L)`` integer buckets; L a multiple of ``chunk_length``.
        chunk_length: positions per chunk.

    Returns:
        Boolean ``(..., L, L)``: entry ``[..., t, s]`` is True when query t is
        compared with key s in at least one round. The mask is dense, so it is
        meant for inspecting sequences of a few thousand positions.
    """
    _check_positive_int("chunk_length", chunk_length)
    if buckets.dim() < 2:
        raise ValueError(f"buckets must have shape (..., n_hashes, L), got shape {tuple(buckets.shape)}")
    length = buckets.shape[-1]
    if length % chunk_length:
        raise ValueError(
            f"length {length} is not a multiple of chunk_length {chunk_length}; pad the sequence first"
        )
    n_chunks = length // chunk_length

    # Rank of each position in the sorted order, then the chunk it falls in.
    _, undo_sort = sort_by_bucket(buckets)
    chunk_index = undo_sort // chunk_length  # (..., h, L)

    pairs = torch.zeros(buckets.shape[:-2] + (length, length), dtype=torch.bool, device=buckets.device)
    for round_chunks in chunk_index.unbind(dim=-2):
        query_chunk = round_chunks.unsqueeze(-1)  # (..., L, 1)
        key_chunk = round_chunks.unsqueeze(-2)  # (..., 1, L)
        pairs |= (key_chunk == query_chunk) | (key_chunk == (query_chunk - 1) % n_chunks)  # (..., L, L)
    return pairs


def top_k_keys(queries: Tensor, keys: Tensor, top_k: int, *, causal: bool = True) -> Tuple[Tensor, Tensor]:
    """Find each query's ``top_k`` keys by dot product, leaving out the key at its own position.

    For query t the candidates are the keys s != t, and s < t when
    ``causal``. The key at the query's own position is left out because
    shared-QK attention masks it.

    Args:
        queries: ``(..., L, d)``.
        keys: ``(..., L, d)``.
        top_k: number of best keys per query, below L.
        causal: whether a query may only use earlier keys.

    Returns:
        ``(best_keys, counted)``: key positions ``(..., L, top_k)``, best
        first, and a boolean ``(L,)`` that is False for the queries with fewer
        than ``top_k`` candidates, whose rows of ``best_keys`` are not meaningful.
    """
    length = keys.shape[-2]
    _check_positive_int("top_k", top_k)
    if top_k >= length:
        raise ValueError(f"top_k must be smaller than the sequence length {length}, got {top_k}")
    scores = queries @ keys.transpose(-1, -2)  # (..., L, L)

    positions = torch.arange(length, device=keys.device)
    candidates = positions.unsqueeze(0) != positions.unsqueeze(1)  # (L, L), [t, s]
    if causal:
        candidates &= positions.unsqueeze(0) < positions.unsqueeze(1)
    scores = scores.masked_fill(~candidates, float("-inf"))
    best_keys = scores.topk(top_k, dim=-1).indices  # (..., L, k)
    return best_keys, candidates.sum(dim=-1) >= top_k


def top_k_recall(
    queries: Tensor, keys: Tensor, pairs: Tensor, top_k: int, *, causal: bool = True
) -> float:
    """Return the share of each query's top-k keys by dot product that ``pairs`` marks as compared.

    The top-k keys come from ``top_k_keys``, so the own position is left out.
    Queries with fewer than ``top_k`` candidates are skipped. The recall is
    averaged over the remaining queries and all leading dimensions.

    Args:
        queries: ``(..., L, d)``.
        keys: ``(..., L, d)``.
        pairs: boolean ``(..., L, L)``, for example from ``attended_pairs``.
        top_k: number of best keys per query.
        causal: whether a query may only use earlier keys.
    """
    length = keys.shape[-2]
    if pairs.shape[-2:] != (length, length):
        raise ValueError(f"pairs must have shape (..., {length}, {length}), got {tuple(pairs.shape)}")
    best_keys, counted = top_k_keys(queries, keys, top_k, causal=causal)
    return share_found(pairs, best_keys, counted)


def share_found(pairs: Tensor, best_keys: Tensor, counted: Tensor) -> float:
    """Return the mean share of ``best_keys`` ``(..., L, k)`` that ``pairs`` ``(..., L, L)`` marks, over counted queries."""
    found = pairs.expand(best_keys.shape[:-1] + pairs.shape[-1:]).gather(-1, best_keys)  # (..., L, k)
    return float(found[..., counted, :].float().mean())
