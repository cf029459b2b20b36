"""Figures for the hash-bucket notebook: buckets on the circle, collision curves, sort and chunk, recall.

Every function takes a ``seed`` and draws its own rotations from a fresh
``torch.Generator``, so one set of arguments always gives the same figure.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from torch import Tensor

from ..lsh.hashing import (
    attended_pairs,
    bucket_sizes,
    collision_probability,
    estimate_collision_probability,
    lsh_hash,
    random_rotations,
    share_found,
    sort_by_bucket,
    top_k_keys,
)

__all__ = [
    "text_excerpt",
    "embed_text",
    "bucket_colors",
    "plot_circle_buckets",
    "plot_collision_curves",
    "plot_collision_at_angle",
    "plot_sort_and_chunk",
    "plot_text_buckets",
    "recall_by_rounds",
    "plot_recall_by_rounds",
    "plot_text_recall",
]


def text_excerpt(length: int, start: int = 0) -> str:
    """Return ``length`` characters of the default corpus (Python's reference documentation) from ``start``."""
    from ..data import default_corpus

    text = default_corpus()
    if length < 1 or start < 0 or start + length > len(text):
        raise ValueError(
            f"start={start} and length={length} must select a non-empty range of the "
            f"{len(text)}-character corpus"
        )
    return text[start : start + length]


def embed_text(text: str, dim: int = 32, *, context: int = 4, decay: float = 0.5, seed: int = 0) -> Tensor:
    """Embed each character of ``text`` with its context: unit vectors ``(L, dim)``.

    Each distinct character gets a fixed Gaussian vector e(c), drawn in sorted
    character order from ``seed``. Position t gets

        x_t = sum_{j < context} decay^j * e(text[t - j])

    normalised to unit length, so two positions point the same way when they
    end with the same few characters. The vectors stand in for the shared
    query-keys of a trained model.
    """
    if not text:
        raise ValueError("text must contain at least one character")
    if context < 1:
        raise ValueError(f"context must be a positive integer, got {context!r}")
    generator = torch.Generator().manual_seed(seed)
    alphabet = sorted(set(text))
    table = torch.randn(len(alphabet), dim, generator=generator)  # (V, dim)
    index = {character: i for i, character in enumerate(alphabet)}
    ids = torch.tensor([index[character] for character in text])  # (L,)

    vectors = torch.zeros(len(text), dim)
    for lag in range(min(context, len(text))):
        vectors[lag:] += decay**lag * table[ids[: len(text) - lag]]
    return vectors / vectors.norm(dim=-1, keepdim=True)


def bucket_colors(n_buckets: int) -> ListedColormap:
    """Return one distinct colour per bucket (tab20 up to 20 buckets, then evenly spaced turbo)."""
    if n_buckets <= 20:
        return ListedColormap(plt.get_cmap("tab20").colors[:n_buckets])
    return ListedColormap(plt.get_cmap("turbo")(np.linspace(0, 1, n_buckets)))


def plot_circle_buckets(n_buckets: int = 4, seed: int = 0, n_points: int = 240) -> plt.Figure:
    """Draw ``n_points`` unit vectors in the plane, coloured by their bucket under one random rotation.

    The arrows are the b directions +R_j and -R_j, labelled with their bucket.
    An arrow's length is |R_j|, so a longer arrow wins a wider arc.
    """
    generator = torch.Generator().manual_seed(seed)
    rotations = random_rotations(2, n_buckets, 1, generator=generator, dtype=torch.float64)  # (2, 1, b/2)
    theta = torch.linspace(0, 2 * math.pi, n_points + 1, dtype=torch.float64)[:-1]
    points = torch.stack([theta.cos(), theta.sin()], dim=-1)  # (n, 2)
    buckets = lsh_hash(points, n_buckets, rotations=rotations)[0]  # (n,)

    directions = torch.cat([rotations[:, 0, :], -rotations[:, 0, :]], dim=-1).T  # (b, 2)
    directions = 1.5 * directions / directions.norm(dim=-1).max()
    colors = bucket_colors(n_buckets)

    figure, axes = plt.subplots(figsize=(5.0, 5.0))
    axes.scatter(points[:, 0].numpy(), points[:, 1].numpy(), c=buckets.numpy(), cmap=colors, vmin=-0.5, vmax=n_buckets - 0.5, s=18)
    for bucket, (dx, dy) in enumerate(directions.tolist()):
        color = colors(bucket)
        axes.annotate("", xy=(dx, dy), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color=color, linewidth=1.5))
        axes.text(1.1 * dx, 1.1 * dy, str(bucket), color=color, ha="center", va="center", fontsize=9)
    axes.set_xlim(-1.8, 1.8)
    axes.set_ylim(-1.8, 1.8)
    axes.set_aspect("equal")
    axes.set_title(f"{n_buckets} buckets: argmax over [xR ; -xR], seed {seed}")
    figure.tight_layout()
    return figure


def plot_collision_curves(
    bucket_counts: Sequence[int] = (2, 8, 32),
    round_counts: Sequence[int] = (1, 4),
    *,
    n_samples: int = 2000,
    seed: int = 0,
    angle_degrees: Optional[float] = None,
) -> plt.Figure:
    """Plot P(same bucket in some round) against the angle, exact (lines) and sampled (markers, +-2 SE).

    There is one curve for each pair of ``bucket_counts`` and ``round_counts``,
    with markers every 15 degrees. ``angle_degrees`` adds a vertical line there.
    """
    fine = torch.linspace(0, math.pi, 37, dtype=torch.float64)  # every 5 degrees
    coarse = torch.linspace(0, math.pi, 13, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)

    single_round = {n_buckets: collision_probability(fine, n_buckets) for n_buckets in bucket_counts}

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for index, (n_buckets, n_hashes) in enumerate((b, h) for b in bucket_counts for h in round_counts):
        color = plt.get_cmap("tab10")(index % 10)
        exact = 1 - (1 - single_round[n_buckets]) ** n_hashes
        estimate = estimate_collision_probability(coarse, n_buckets, n_hashes, n_samples=n_samples, generator=generator)
        error = 2 * torch.sqrt(estimate * (1 - estimate) / n_samples)
        rounds = "round" if n_hashes == 1 else "rounds"
        axes.plot(fine.rad2deg().numpy(), exact.numpy(), color=color, label=f"{n_buckets} buckets, {n_hashes} {rounds}")
        axes.errorbar(
            coarse.rad2deg().numpy(), estimate.numpy(), yerr=error.numpy(), fmt="o", color=color, markersize=3, capsize=2
        )
    if angle_degrees is not None:
        axes.axvline(angle_degrees, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("angle between the two vectors (degrees)")
    axes.set_ylabel("P(same bucket in some round)")
    axes.set_xlim(0, 180)
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(f"lines: exact; markers: {n_samples} samples each")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_collision_at_angle(
    n_buckets: int = 8, n_hashes: int = 4, angle_degrees: float = 60.0, *, n_samples: int = 2000, seed: int = 0
) -> plt.Figure:
    """Plot the exact curves for 1 and ``n_hashes`` rounds, marking the exact and sampled values at one angle."""
    angle = math.radians(angle_degrees)
    round_counts = sorted({1, n_hashes})
    figure = plot_collision_curves((n_buckets,), round_counts, n_samples=n_samples, seed=seed, angle_degrees=angle_degrees)
    axes = figure.axes[0]

    generator = torch.Generator().manual_seed(seed + 1)
    exact = collision_probability(angle, n_buckets, n_hashes).item()
    estimate = estimate_collision_probability(angle, n_buckets, n_hashes, n_samples=n_samples, generator=generator).item()
    axes.plot([angle_degrees], [exact], marker="*", markersize=14, color="black", linestyle="none")
    rounds = "round" if n_hashes == 1 else "rounds"
    axes.set_title(
        f"{n_buckets} buckets, {n_hashes} {rounds}, {angle_degrees:g} degrees: "
        f"exact {exact:.3f}, sampled {estimate:.3f}"
    )
    return figure


def _causal_pattern_image(pairs: Tensor) -> np.ndarray:
    """Colour an (L, L) pair mask: compared causal pairs dark, skipped causal pairs light, future white."""
    length = pairs.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    image = np.ones((length, length, 3))
    image[causal.numpy()] = (0.85, 0.85, 0.85)
    image[(causal & pairs.cpu()).numpy()] = (0.12, 0.35, 0.65)
    return image


def plot_sort_and_chunk(
    vectors: Tensor,
    n_buckets: int = 8,
    chunk_length: int = 16,
    *,
    n_hashes: int = 1,
    seed: int = 0,
) -> plt.Figure:
    """Show one hash round of ``vectors`` ``(L, d)``: bucket sizes, the order after sorting, and the pairs compared.

    Left: positions per bucket in the first round. Middle: original position
    against rank after sorting by (bucket, position), with chunk borders.
    Right: the causal (query, key) pairs, dark where some round puts the key
    in the query's chunk or the chunk before.
    """
    generator = torch.Generator().manual_seed(seed)
    buckets = lsh_hash(vectors, n_buckets, n_hashes, generator=generator)  # (h, L)
    sorted_positions, _ = sort_by_bucket(buckets)  # (h, L)
    pairs = attended_pairs(buckets, chunk_length)  # (L, L)
    length = vectors.shape[-2]
    colors = bucket_colors(n_buckets)

    figure, (sizes_axes, order_axes, pattern_axes) = plt.subplots(1, 3, figsize=(13.5, 4.2))
    sizes = bucket_sizes(buckets[0], n_buckets).cpu().numpy()
    sizes_axes.bar(range(n_buckets), sizes, color=[colors(b) for b in range(n_buckets)])
    sizes_axes.axhline(length / n_buckets, color="grey", linestyle="--", linewidth=0.8)
    sizes_axes.set_xlabel("bucket")
    sizes_axes.set_ylabel("positions")
    sizes_axes.set_title("bucket sizes (round 1; dashed: L / b)")

    order = sorted_positions[0].cpu()
    order_colors = buckets[0].cpu()[order].numpy()
    order_axes.scatter(np.arange(length), order.numpy(), c=order_colors, cmap=colors, vmin=-0.5, vmax=n_buckets - 0.5, s=8)
    for border in range(chunk_length, length, chunk_length):
        order_axes.axvline(border - 0.5, color="grey", linewidth=0.5)
    order_axes.set_xlabel("rank after sorting by (bucket, position)")
    order_axes.set_ylabel("original position")
    order_axes.set_title(f"sorted order, chunks of {chunk_length}")

    causal = torch.ones(length, length, dtype=torch.bool, device=pairs.device).tril()
    share = float((pairs & causal).sum()) / float(causal.sum())
    pattern_axes.imshow(_causal_pattern_image(pairs), interpolation="nearest")
    pattern_axes.set_xlabel("key position")
    pattern_axes.set_ylabel("query position")
    rounds = "round" if n_hashes == 1 else "rounds"
    pattern_axes.set_title(f"{n_hashes} {rounds}: {share:.0%} of causal pairs compared")
    figure.tight_layout()
    return figure


def recall_by_rounds(
    vectors: Tensor,
    n_buckets: int,
    chunk_length: int,
    max_rounds: int = 8,
    *,
    top_k: int = 8,
    seed: int = 0,
) -> Tuple[List[float], List[float]]:
    """Measure, for 1 to ``max_rounds`` rounds, how many top-k keys LSH finds and how many pairs it compares.

    The rounds are nested: r rounds use the first r of ``max_rounds``
    rotations, so both lists never decrease. The attention is causal and
    shared-QK (see ``top_k_keys``).

    Returns:
        ``(recall, compared)``: per round count, the mean share of each
        query's top-k earlier keys that share a chunk with it or sit in the
        chunk before, and the share of all causal pairs compared.
    """
    generator = torch.Generator().manual_seed(seed)
    buckets = lsh_hash(vectors, n_buckets, max_rounds, generator=generator)  # (..., R, L)
    best_keys, counted = top_k_keys(vectors, vectors, top_k, causal=True)  # (..., L, k), (L,)
    length = vectors.shape[-2]
    causal = torch.ones(length, length, dtype=torch.bool, device=vectors.device).tril()

    recall, compared = [], []
    pairs = torch.zeros(vectors.shape[:-2] + (length, length), dtype=torch.bool, device=vectors.device)
    for round_index in range(max_rounds):
        pairs |= attended_pairs(buckets[..., round_index : round_index + 1, :], chunk_length)  # (..., L, L)
        recall.append(share_found(pairs, best_keys, counted))
        compared.append(float((pairs & causal).sum()) / float(causal.sum() * (pairs.numel() // length**2)))
    return recall, compared


def plot_recall_by_rounds(
    vectors: Tensor,
    n_buckets: int = 32,
    chunk_length: int = 32,
    max_rounds: int = 8,
    *,
    top_k: int = 8,
    seed: int = 0,
) -> plt.Figure:
    """Plot ``recall_by_rounds``: the share of top-k keys found, and the share of causal pairs compared."""
    recall, compared = recall_by_rounds(vectors, n_buckets, chunk_length, max_rounds, top_k=top_k, seed=seed)
    rounds = range(1, max_rounds + 1)

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    axes.plot(rounds, recall, marker="o", label=f"top-{top_k} keys found")
    axes.plot(rounds, compared, marker="s", linestyle="--", label="causal pairs compared")
    axes.set_xlabel("hash rounds")
    axes.set_ylabel("share")
    axes.set_ylim(0, 1.02)
    axes.set_title(f"L = {vectors.shape[-2]}, {n_buckets} buckets, chunks of {chunk_length}")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_text_buckets(
    sequence_length: int = 128,
    n_buckets: int = 8,
    n_hashes: int = 1,
    seed: int = 0,
    *,
    chunk_length: int = 16,
) -> plt.Figure:
    """Run ``plot_sort_and_chunk`` on the first ``sequence_length`` characters of the corpus, embedded by ``embed_text``."""
    vectors = embed_text(text_excerpt(sequence_length))
    return plot_sort_and_chunk(vectors, n_buckets, chunk_length, n_hashes=n_hashes, seed=seed)


def plot_text_recall(
    sequence_length: int = 1024,
    n_buckets: int = 32,
    seed: int = 0,
    *,
    chunk_length: int = 32,
    max_rounds: int = 8,
    top_k: int = 8,
) -> plt.Figure:
    """Run ``plot_recall_by_rounds`` on the first ``sequence_length`` characters of the corpus, embedded by ``embed_text``."""
    vectors = embed_text(text_excerpt(sequence_length))
    return plot_recall_by_rounds(vectors, n_buckets, chunk_length, max_rounds, top_k=top_k, seed=seed)
