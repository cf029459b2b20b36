"""Tests for angular LSH, collision probabilities and the sort / chunk helpers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reformer_lab.lsh.hashing as hashing
from reformer_lab.lsh import (
    attended_pairs,
    bucket_sizes,
    collision_probability,
    estimate_collision_probability,
    look_back,
    lsh_hash,
    random_rotations,
    sort_by_bucket,
    split_into_chunks,
    top_k_recall,
    unsort,
)

FAST = settings(deadline=None, max_examples=25)
even_buckets = st.integers(1, 16).map(lambda half: 2 * half)


def reference_hash(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Hash by building [xR ; -xR] and taking its argmax: (..., L, d) -> (..., h, L)."""
    projected = torch.einsum("...ld,dhb->...hlb", x, rotations)
    return torch.cat([projected, -projected], dim=-1).argmax(dim=-1)


def orthogonal_matrix(dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q


def sampled_collision_rate(x: torch.Tensor, y: torch.Tensor, n_buckets: int, n_samples: int, seed: int) -> float:
    """Share of fresh rotations that put the vectors x and y (each (d,)) in one bucket."""
    generator = torch.Generator().manual_seed(seed)
    rotations = random_rotations(x.shape[-1], n_buckets, n_samples, generator=generator, dtype=x.dtype)
    buckets = lsh_hash(torch.stack([x, y]), n_buckets, n_samples, rotations=rotations)  # (n_samples, 2)
    return float((buckets[:, 0] == buckets[:, 1]).double().mean())


def standard_error(probability: float, n_samples: int) -> float:
    return math.sqrt(max(probability * (1 - probability), 1e-4) / n_samples)


# --- random_rotations and lsh_hash ------------------------------------------


def test_random_rotations_shape_and_dtype():
    rotations = random_rotations(5, 8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    assert rotations.shape == (5, 3, 4)
    assert rotations.dtype == torch.float64


@FAST
@given(
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    length=st.integers(1, 40),
    dim=st.integers(1, 9),
    n_buckets=even_buckets,
    n_hashes=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_lsh_hash_shape_and_range(batch, length, dim, n_buckets, n_hashes, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, length, dim, generator=generator)

    buckets = lsh_hash(x, n_buckets, n_hashes, generator=generator)

    assert buckets.shape == (*batch, n_hashes, length)
    assert buckets.dtype == torch.long
    assert int(buckets.min()) >= 0
    assert int(buckets.max()) < n_buckets


@FAST
@given(
    length=st.integers(1, 30),
    dim=st.integers(1, 8),
    n_buckets=even_buckets,
    n_hashes=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_lsh_hash_matches_concatenated_argmax(length, dim, n_buckets, n_hashes, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, dim, generator=generator, dtype=torch.float64)
    rotations = random_rotations(dim, n_buckets, n_hashes, generator=generator, dtype=torch.float64)

    assert torch.equal(lsh_hash(x, n_buckets, n_hashes, rotations=rotations), reference_hash(x, rotations))


def test_lsh_hash_blocks_match_one_pass(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 50, 16, generator=generator)
    rotations = random_rotations(16, 8, 4, generator=generator)
    expected = reference_hash(x, rotations)

    # 2 * 3 * 4 * 4 = 96 elements per position, so a limit of 300 gives blocks of 3 positions.
    monkeypatch.setattr(hashing, "_HASH_BLOCK_ELEMENTS", 300)

    assert torch.equal(lsh_hash(x, 8, 4, rotations=rotations), expected)


def test_lsh_hash_same_seed_same_buckets():
    x = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(0))

    first = lsh_hash(x, 16, 4, generator=torch.Generator().manual_seed(7))
    second = lsh_hash(x, 16, 4, generator=torch.Generator().manual_seed(7))
    other_seed = lsh_hash(x, 16, 4, generator=torch.Generator().manual_seed(8))

    assert torch.equal(first, second)
    assert not torch.equal(first, other_seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lsh_hash_same_buckets_on_cpu_and_cuda():
    x = torch.randn(2, 256, 32, generator=torch.Generator().manual_seed(0))

    on_cpu = lsh_hash(x, 16, 4, generator=torch.Generator().manual_seed(3))
    on_cuda = lsh_hash(x.cuda(), 16, 4, generator=torch.Generator().manual_seed(3))

    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cpu, on_cuda.cpu())


@FAST
@given(dim=st.integers(2, 8), n_buckets=even_buckets, n_hashes=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_lsh_hash_invariant_under_rotating_vectors_and_rotation(dim, n_buckets, n_hashes, seed):
    # Hashing xQ with Q^T R projects exactly like hashing x with R, for any orthogonal Q.
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(20, dim, generator=generator, dtype=torch.float64)
    rotations = random_rotations(dim, n_buckets, n_hashes, generator=generator, dtype=torch.float64)
    q = orthogonal_matrix(dim, seed + 1)
    rotated_rotations = torch.einsum("ed,dhb->ehb", q.T, rotations)

    original = lsh_hash(x, n_buckets, n_hashes, rotations=rotations)
    rotated = lsh_hash(x @ q, n_buckets, n_hashes, rotations=rotated_rotations)

    assert torch.equal(original, rotated)


@FAST
@given(
    scale=st.floats(1e-3, 1e3),
    n_buckets=even_buckets,
    seed=st.integers(0, 2**16),
)
def test_lsh_hash_depends_on_direction_only(scale, n_buckets, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    rotations = random_rotations(6, n_buckets, 2, generator=generator, dtype=torch.float64)

    buckets = lsh_hash(x, n_buckets, 2, rotations=rotations)
    scaled = lsh_hash(scale * x, n_buckets, 2, rotations=rotations)
    negated = lsh_hash(-x, n_buckets, 2, rotations=rotations)

    assert torch.equal(buckets, scaled)
    assert torch.equal(negated, (buckets + n_buckets // 2) % n_buckets)


@pytest.mark.parametrize("angle", [0.4, 1.2, 2.2])
def test_collision_rate_same_for_any_orientation(angle):
    # Two pairs at one angle in R^8, oriented at random, collide at the rate
    # the exact curve gives, because the probability depends on the angle only.
    n_buckets, n_samples = 8, 20_000
    expected = float(collision_probability(angle, n_buckets))
    for seed in (0, 1):
        basis = orthogonal_matrix(8, seed)
        x = basis[0]
        y = math.cos(angle) * basis[0] + math.sin(angle) * basis[1]

        rate = sampled_collision_rate(x, y, n_buckets, n_samples, seed=10 + seed)

        assert abs(rate - expected) < 5 * standard_error(expected, n_samples)


def test_lsh_hash_rejects_invalid_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="n_buckets must be an even integer >= 2.*got 5"):
        lsh_hash(x, 5)
    with pytest.raises(ValueError, match="n_buckets must be an even integer >= 2.*got 0"):
        lsh_hash(x, 0)
    with pytest.raises(ValueError, match="n_buckets must be an even integer >= 2.*got -4"):
        lsh_hash(x, -4)
    with pytest.raises(ValueError, match="n_hashes must be an integer >= 1, got 0"):
        lsh_hash(x, 4, 0)
    with pytest.raises(ValueError, match=r"rotations must have shape .* = \(3, 2, 2\), got \(3, 1, 2\)"):
        lsh_hash(x, 4, 2, rotations=torch.randn(3, 1, 2))
    with pytest.raises(ValueError, match="x must have shape"):
        lsh_hash(torch.randn(3), 4)
    with pytest.raises(ValueError, match="floating-point"):
        lsh_hash(torch.ones(4, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="dim must be a positive integer, got 0"):
        random_rotations(0, 4)


def test_lsh_hash_empty_sequence():
    buckets = lsh_hash(torch.randn(2, 0, 5), 4, 3)

    assert buckets.shape == (2, 3, 0)


# --- collision probability --------------------------------------------------


@pytest.mark.parametrize("angle", [0.1, 0.8, math.pi / 2, 2.5])
def test_two_bucket_collision_rate(angle):
    n_samples = 20_000
    expected = 1 - angle / math.pi

    estimate = float(
        estimate_collision_probability(angle, 2, n_samples=n_samples, generator=torch.Generator().manual_seed(0))
    )

    assert float(collision_probability(angle, 2)) == pytest.approx(expected, abs=1e-12)
    assert abs(estimate - expected) < 5 * standard_error(expected, n_samples)


def test_quadrature_at_two_buckets_matches_closed_form():
    angles = torch.linspace(0.05, math.pi - 0.05, 13, dtype=torch.float64)

    quadrature = hashing._single_round_quadrature(angles, 2)

    assert torch.allclose(quadrature, 1 - angles / math.pi, atol=1e-6)


@pytest.mark.parametrize("n_buckets", [4, 8, 32])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_estimate_matches_exact_curve(n_buckets, n_hashes):
    n_samples = 10_000
    angles = torch.tensor([0.2, 0.7, 1.3, 2.0])

    exact = collision_probability(angles, n_buckets, n_hashes)
    estimate = estimate_collision_probability(
        angles, n_buckets, n_hashes, n_samples=n_samples, generator=torch.Generator().manual_seed(n_buckets)
    )

    for p, p_hat in zip(exact.tolist(), estimate.tolist()):
        assert abs(p_hat - p) < 5 * standard_error(p, n_samples)


def test_estimate_independent_of_dimension():
    n_samples = 20_000
    angles = [0.5, 1.5]
    low = estimate_collision_probability(angles, 8, dim=2, n_samples=n_samples, generator=torch.Generator().manual_seed(0))
    high = estimate_collision_probability(angles, 8, dim=16, n_samples=n_samples, generator=torch.Generator().manual_seed(1))

    for a, b in zip(low.tolist(), high.tolist()):
        assert abs(a - b) < 5 * math.sqrt(2) * standard_error(a, n_samples)


def test_estimate_of_one_angle_ignores_other_angles():
    alone = estimate_collision_probability(0.9, 8, 2, n_samples=3000, generator=torch.Generator().manual_seed(5))
    together = estimate_collision_probability(
        [0.1, 0.9, 2.0], 8, 2, n_samples=3000, generator=torch.Generator().manual_seed(5)
    )

    assert float(alone) == float(together[1])


def test_more_rounds_raise_collision_probability():
    angles = torch.tensor([0.3, 0.8, 1.3])
    n_samples = 10_000
    previous_exact = collision_probability(angles, 16, 1)
    previous_estimate = estimate_collision_probability(
        angles, 16, 1, n_samples=n_samples, generator=torch.Generator().manual_seed(0)
    )
    for n_hashes in (2, 4, 8):
        exact = collision_probability(angles, 16, n_hashes)
        estimate = estimate_collision_probability(
            angles, 16, n_hashes, n_samples=n_samples, generator=torch.Generator().manual_seed(n_hashes)
        )

        assert bool((exact > previous_exact).all())
        # The smallest gap, 0.006 at angle 0.3 from 4 to 8 rounds, is about eight
        # standard errors of the difference.
        assert bool((estimate > previous_estimate).all())
        previous_exact, previous_estimate = exact, estimate


@pytest.mark.parametrize("n_buckets", [2, 4, 16, 64])
def test_exact_curve_endpoints_and_monotone(n_buckets):
    angles = torch.linspace(0, math.pi, 25, dtype=torch.float64)

    curve = collision_probability(angles, n_buckets)

    assert float(curve[0]) == 1.0
    assert float(curve[-1]) == 0.0
    assert bool((curve[1:] <= curve[:-1] + 1e-9).all())


def test_exact_curve_falls_with_more_buckets():
    angles = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)

    curves = [collision_probability(angles, n_buckets) for n_buckets in (2, 4, 8, 16, 32)]

    for fewer, more in zip(curves, curves[1:]):
        assert bool((more < fewer).all())


def test_exact_curve_quadrature_converged(monkeypatch):
    angles = torch.tensor([1e-3, 0.3, 1.0, 2.5], dtype=torch.float64)
    default = {n_buckets: hashing._single_round_quadrature(angles, n_buckets) for n_buckets in (4, 16, 128)}

    monkeypatch.setattr(hashing, "_RADIUS_NODES", 128)
    monkeypatch.setattr(hashing, "_ANGLE_NODES", 128)
    monkeypatch.setattr(hashing, "_EDGE_NODES", 64)

    for n_buckets, values in default.items():
        finer = hashing._single_round_quadrature(angles, n_buckets)
        assert float((values - finer).abs().max()) < 1e-5, n_buckets


def test_exact_curve_keeps_angle_shape():
    angles = torch.full((2, 3), 0.5)

    assert collision_probability(angles, 8).shape == (2, 3)
    assert collision_probability(0.5, 8).shape == ()


def test_collision_probability_rejects_invalid_arguments():
    with pytest.raises(ValueError, match=r"angle must be in radians within \[0, pi\]"):
        collision_probability(-0.1, 4)
    with pytest.raises(ValueError, match=r"angle must be in radians within \[0, pi\]"):
        estimate_collision_probability([0.5, 4.0], 4)
    with pytest.raises(ValueError, match=r"angle must be in radians within \[0, pi\]"):
        collision_probability(float("nan"), 4)
    with pytest.raises(ValueError, match="n_buckets must be an even integer"):
        collision_probability(0.5, 3)
    with pytest.raises(ValueError, match="n_hashes must be an integer >= 1"):
        estimate_collision_probability(0.5, 4, 0)
    with pytest.raises(ValueError, match="dim must be an integer >= 2, got 1"):
        estimate_collision_probability(0.5, 4, dim=1)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1, got 0"):
        estimate_collision_probability(0.5, 4, n_samples=0)


# --- sort, chunk, look back, bucket sizes -------------------------------------


@FAST
@given(
    length=st.integers(1, 40),
    n_buckets=even_buckets,
    n_hashes=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_sort_by_bucket_orders_by_bucket_then_position(length, n_buckets, n_hashes, seed):
    generator = torch.Generator().manual_seed(seed)
    buckets = torch.randint(0, n_buckets, (2, n_hashes, length), generator=generator)

    sorted_positions, undo_sort = sort_by_bucket(buckets)

    for batch in range(2):
        for round_index in range(n_hashes):
            row = buckets[batch, round_index].tolist()
            expected = sorted(range(length), key=lambda position: (row[position], position))
            assert sorted_positions[batch, round_index].tolist() == expected
    positions = torch.arange(length).expand_as(buckets)
    assert torch.equal(sorted_positions.gather(-1, undo_sort), positions)


def test_unsort_restores_original_order():
    generator = torch.Generator().manual_seed(0)
    buckets = torch.randint(0, 8, (2, 3, 24), generator=generator)
    values = torch.randn(2, 1, 24, 5, generator=generator).expand(2, 3, 24, 5)
    sorted_positions, undo_sort = sort_by_bucket(buckets)
    sorted_values = values.gather(-2, sorted_positions.unsqueeze(-1).expand(2, 3, 24, 5))

    assert torch.equal(unsort(sorted_values, undo_sort), values)


def test_split_into_chunks_and_look_back():
    values = torch.arange(12.0).reshape(1, 6, 2)

    chunks = split_into_chunks(values, 2)
    with_previous = look_back(chunks)

    assert chunks.shape == (1, 3, 2, 2)
    assert torch.equal(chunks[0, 1], values[0, 2:4])
    assert with_previous.shape == (1, 3, 4, 2)
    assert torch.equal(with_previous[0, 1], torch.cat([values[0, 2:4], values[0, 0:2]]))
    assert torch.equal(with_previous[0, 0], torch.cat([values[0, 0:2], values[0, 4:6]]))


def test_split_into_chunks_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="length 6 is not a multiple of chunk_length 4"):
        split_into_chunks(torch.zeros(6, 2), 4)
    with pytest.raises(ValueError, match="chunk_length must be a positive integer, got 0"):
        split_into_chunks(torch.zeros(6, 2), 0)
    with pytest.raises(ValueError, match="values must have shape"):
        split_into_chunks(torch.zeros(6), 2)


@FAST
@given(length=st.integers(0, 50), n_buckets=even_buckets, seed=st.integers(0, 2**16))
def test_bucket_sizes_matches_bincount(length, n_buckets, seed):
    buckets = torch.randint(0, n_buckets, (3, length), generator=torch.Generator().manual_seed(seed))

    sizes = bucket_sizes(buckets, n_buckets)

    assert sizes.shape == (3, n_buckets)
    for row in range(3):
        assert torch.equal(sizes[row], torch.bincount(buckets[row], minlength=n_buckets))


def test_bucket_sizes_rejects_out_of_range_buckets():
    with pytest.raises(ValueError, match=r"buckets must lie in \[0, 4\), got values from 0 to 5"):
        bucket_sizes(torch.tensor([0, 5, 1]), 4)


# --- attended pairs and recall ------------------------------------------------


def reference_attended_pairs(buckets: torch.Tensor, chunk_length: int) -> torch.Tensor:
    """Build the pair mask for (n_hashes, L) buckets from split_into_chunks and look_back."""
    length = buckets.shape[-1]
    pairs = torch.zeros(length, length, dtype=torch.bool)
    sorted_positions, _ = sort_by_bucket(buckets)
    for order in sorted_positions:
        chunks = split_into_chunks(order.unsqueeze(-1), chunk_length)  # (n, c, 1)
        keys = look_back(chunks)  # (n, 2c, 1)
        for query_chunk, key_chunk in zip(chunks[..., 0].tolist(), keys[..., 0].tolist()):
            for query in query_chunk:
                pairs[query, key_chunk] = True
    return pairs


@FAST
@given(
    n_chunks=st.integers(1, 6),
    chunk_length=st.integers(1, 5),
    n_buckets=even_buckets,
    n_hashes=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_attended_pairs_matches_chunks_and_look_back(n_chunks, chunk_length, n_buckets, n_hashes, seed):
    length = n_chunks * chunk_length
    buckets = torch.randint(0, n_buckets, (n_hashes, length), generator=torch.Generator().manual_seed(seed))

    pairs = attended_pairs(buckets, chunk_length)

    assert pairs.shape == (length, length)
    assert torch.equal(pairs, reference_attended_pairs(buckets, chunk_length))


def test_attended_pairs_batched_and_diagonal():
    buckets = torch.randint(0, 4, (2, 3, 2, 12), generator=torch.Generator().manual_seed(0))

    pairs = attended_pairs(buckets, 4)

    assert pairs.shape == (2, 3, 12, 12)
    assert bool(pairs.diagonal(dim1=-2, dim2=-1).all())
    assert torch.equal(pairs[1, 2], attended_pairs(buckets[1, 2], 4))


def test_attended_pairs_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="length 10 is not a multiple of chunk_length 4"):
        attended_pairs(torch.zeros(1, 10, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="chunk_length must be an integer >= 1, got 0"):
        attended_pairs(torch.zeros(1, 8, dtype=torch.long), 0)


def reference_recall(vectors: torch.Tensor, pairs: torch.Tensor, top_k: int, causal: bool) -> float:
    scores = (vectors @ vectors.T).tolist()
    length = len(scores)
    shares = []
    for query in range(length):
        candidates = [key for key in range(length) if key != query and (key < query or not causal)]
        if len(candidates) < top_k:
            continue
        best = sorted(candidates, key=lambda key: -scores[query][key])[:top_k]
        shares.append(sum(bool(pairs[query, key]) for key in best) / top_k)
    return sum(shares) / len(shares)


@FAST
@given(length=st.integers(4, 20), top_k=st.integers(1, 3), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_top_k_recall_matches_brute_force(length, top_k, causal, seed):
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(length, 5, generator=generator, dtype=torch.float64)
    pairs = torch.rand(length, length, generator=generator) < 0.5

    recall = top_k_recall(vectors, vectors, pairs, top_k, causal=causal)

    assert recall == pytest.approx(reference_recall(vectors, pairs, top_k, causal))


def test_top_k_recall_bounds():
    vectors = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0))
    everything = torch.ones(16, 16, dtype=torch.bool)
    nothing = torch.zeros(16, 16, dtype=torch.bool)

    assert top_k_recall(vectors, vectors, everything, 4) == 1.0
    assert top_k_recall(vectors, vectors, nothing, 4) == 0.0


def test_top_k_recall_rejects_invalid_arguments():
    vectors = torch.randn(8, 4)
    with pytest.raises(ValueError, match="top_k must be smaller than the sequence length 8, got 8"):
        top_k_recall(vectors, vectors, torch.ones(8, 8, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        top_k_recall(vectors, vectors, torch.ones(8, 8, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match=r"pairs must have shape \(\.\.\., 8, 8\)"):
        top_k_recall(vectors, vectors, torch.ones(8, 7, dtype=torch.bool), 2)
