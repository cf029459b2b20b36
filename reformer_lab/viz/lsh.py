"""Experiments and figures for the LSH attention notebook.

Each experiment is a plain function that returns numbers (so a notebook cell or
a test can check them) and has a ``plot_...`` companion that draws them. Every
experiment takes its rotations from a ``seed``, so one set of arguments always
gives the same numbers.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import chunked_attention
from ..lsh.attention import full_shared_qk_attention, lsh_attention
from ..lsh.hashing import attended_pairs, random_rotations
from ..memory import measure_peak_memory

__all__ = [
    "twin_sequence",
    "lsh_attention_weights",
    "plot_lsh_pattern",
    "error_by_rounds",
    "plot_error_by_rounds",
    "bucket_overflow",
    "plot_bucket_overflow",
    "causal_leak",
    "attention_cost",
    "plot_attention_cost",
]


def twin_sequence(
    length: int, dim: int = 32, *, noise: float = 0.5, logit_scale: float = 12.0, seed: int = 0
) -> Tensor:
    """Return shared query-keys ``(length, dim)`` whose second half repeats the first half with noise.

    Position t + length/2 is the first-half vector at t plus ``noise`` times
    an independent random unit vector, renormalised: with ``noise=0.5`` the two
    are at cosine about 0.9. Every vector has norm ``logit_scale * sqrt(dim)``,
    so a query's logit with its twin is about ``0.9 * logit_scale``, while
    unrelated keys give logits of standard deviation about
    ``logit_scale / sqrt(dim)``. A second-half query therefore puts most of its
    full attention on its twin, like the duplication task in Kitaev et al.
    2020 ("Analysis on a synthetic task").
    """
    if length < 2 or length % 2:
        raise ValueError(f"length must be an even integer >= 2, got {length!r}")
    generator = torch.Generator().manual_seed(seed)
    first = F.normalize(torch.randn(length // 2, dim, generator=generator), dim=-1)  # (L/2, d)
    noise_vectors = F.normalize(torch.randn(length // 2, dim, generator=generator), dim=-1)
    second = F.normalize(first + noise * noise_vectors, dim=-1)
    return torch.cat([first, second]) * logit_scale * dim**0.5  # (L, d)


def lsh_attention_weights(qk: Tensor, **lsh_kwargs) -> Tensor:
    """Return the attention weights ``(L, L)`` that ``lsh_attention`` gives ``qk`` ``(L, d)``, rounds mixed.

    LSH attention is linear in the values, so with the identity matrix as
    values, row i of the output is query i's weight on every key.
    """
    identity = torch.eye(qk.shape[-2], dtype=qk.dtype, device=qk.device)
    return lsh_attention(qk, identity, **lsh_kwargs)  # (L, L)


def plot_lsh_pattern(
    qk: Tensor, *, n_buckets: int, n_hashes: int, chunk_length: int, causal: bool = True, seed: int = 0
) -> plt.Figure:
    """Draw full attention, the pairs LSH attention computes, and the LSH weights, for ``qk`` ``(L, d)``."""
    rotations = random_rotations(qk.shape[-1], n_buckets, n_hashes, generator=torch.Generator().manual_seed(seed))
    identity = torch.eye(qk.shape[-2])
    full = full_shared_qk_attention(qk, identity, causal=causal)  # (L, L)
    weights, buckets = lsh_attention(
        qk, identity, n_buckets=n_buckets, n_hashes=n_hashes, chunk_length=chunk_length, causal=causal,
        rotations=rotations, return_buckets=True,
    )
    pairs = attended_pairs(buckets, chunk_length).float()  # (L, L)
    if causal:
        pairs = pairs.tril()

    figure, axes = plt.subplots(1, 3, figsize=(13.0, 4.4))
    # Weights are drawn as their square root, so that small weights show.
    panels = [
        (full.sqrt(), "full attention weights (square root)"),
        (pairs, f"pairs computed: {n_hashes} round(s), chunk {chunk_length}"),
        (weights.clamp_min(0).sqrt(), "LSH attention weights (square root)"),
    ]
    for ax, (image, title) in zip(axes, panels):
        ax.imshow(image.numpy(), cmap="Greys", vmin=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key position")
    axes[0].set_ylabel("query position")
    figure.tight_layout()
    return figure


def _relative_error(output: Tensor, exact: Tensor) -> float:
    return float((output - exact).norm() / exact.norm())


def error_by_rounds(
    qk: Tensor,
    v: Tensor,
    rounds: Sequence[int],
    *,
    n_buckets: int,
    chunk_length: int,
    causal: bool = True,
    seeds: Sequence[int] = (0, 1, 2),
    correct_duplicates: bool = False,
    from_position: int = 0,
) -> List[float]:
    """Return the relative error |o_LSH - o_full| / |o_full| for each number of rounds, averaged over ``seeds``.

    Only the outputs at positions ``from_position`` and later are compared
    (the norms are over those rows).
    """
    exact = full_shared_qk_attention(qk, v, causal=causal)[from_position:]
    errors = []
    for n_hashes in rounds:
        per_seed = []
        for seed in seeds:
            output = lsh_attention(
                qk, v, n_buckets=n_buckets, n_hashes=n_hashes, chunk_length=chunk_length, causal=causal,
                generator=torch.Generator().manual_seed(seed), correct_duplicates=correct_duplicates,
            )
            per_seed.append(_relative_error(output[from_position:], exact))
        errors.append(statistics.fmean(per_seed))
    return errors


def plot_error_by_rounds(rounds: Sequence[int], curves: Dict[str, Sequence[float]]) -> plt.Figure:
    """Draw relative error against the number of hash rounds, one line per entry of ``curves``."""
    figure, axes = plt.subplots(figsize=(6.0, 3.8))
    for label, errors in curves.items():
        axes.plot(list(rounds), list(errors), marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(rounds), [str(r) for r in rounds])
    axes.set_xlabel("hash rounds")
    axes.set_ylabel("relative error against full attention")
    axes.set_ylim(bottom=0)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def bucket_overflow(
    qk: Tensor, *, n_buckets: int, chunk_length: int, seed: int = 0
) -> Dict[str, np.ndarray]:
    """Measure, for each bucket of one causal round, how many of its same-bucket pairs LSH attention computes.

    A bucket larger than a chunk spreads over several chunks, and a query
    attends only to its own chunk and the one before, so it misses the earlier
    keys of its own bucket that lie further back.

    Returns arrays over the non-empty buckets: ``size`` (positions),
    ``computed_share`` (computed causal same-bucket pairs over all of them,
    self excluded), and ``pairs`` (the number of such pairs).
    """
    length = qk.shape[-2]
    rotations = random_rotations(qk.shape[-1], n_buckets, 1, generator=torch.Generator().manual_seed(seed))
    _, buckets = lsh_attention(qk, qk[:, :1], n_buckets=n_buckets, chunk_length=chunk_length, causal=True,
                               rotations=rotations, return_buckets=True)  # (1, L)
    computed = attended_pairs(buckets, chunk_length)  # (L, L)
    earlier = torch.ones(length, length, dtype=torch.bool).tril(-1)
    sizes, shares, pair_counts = [], [], []
    for bucket in buckets[0].unique().tolist():
        members = buckets[0] == bucket  # (L,)
        same_bucket = members[:, None] & members[None, :] & earlier  # (L, L)
        total = int(same_bucket.sum())
        if total == 0:
            continue
        sizes.append(int(members.sum()))
        shares.append(float((same_bucket & computed).sum()) / total)
        pair_counts.append(total)
    return {"size": np.array(sizes), "computed_share": np.array(shares), "pairs": np.array(pair_counts)}


def plot_bucket_overflow(results: Dict[int, Dict[str, np.ndarray]], chunk_length: int) -> plt.Figure:
    """Scatter computed share against bucket size, one colour per bucket count (the keys of ``results``)."""
    figure, axes = plt.subplots(figsize=(6.4, 3.9))
    for n_buckets, result in results.items():
        axes.scatter(result["size"] / chunk_length, result["computed_share"], s=14, alpha=0.7,
                     label=f"{n_buckets} buckets")
    axes.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("bucket size / chunk_length")
    axes.set_ylabel("same-bucket causal pairs computed")
    axes.set_ylim(0, 1.05)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def causal_leak(
    qk: Tensor,
    v: Tensor,
    *,
    split: int,
    n_buckets: int,
    n_hashes: int,
    chunk_length: int,
    n_trials: int = 5,
    seed: int = 0,
    threshold: float = 1e-6,
) -> Dict[str, float]:
    """Measure how far replacing the future (positions >= ``split``) moves causal LSH outputs before ``split``.

    Each trial replaces ``qk`` and ``v`` at positions ``split`` and later by
    fresh random vectors of the same norm, with the rotations fixed, and
    compares the outputs at positions before ``split``. No earlier query can
    attend to a future key, but the future tokens' buckets move chunk
    boundaries, which changes the earlier keys an earlier query is compared
    with.

    Returns ``changed_share`` (share of earlier outputs that move by more
    than ``threshold`` in max norm, over all trials), ``median_change`` and
    ``max_change`` (relative change |o' - o| / |o| among the moved outputs; 0
    when none moves), and, for scale, ``reseed_median_change``: the median
    relative change of the same outputs when the rotations are drawn anew
    and the future is kept.
    """
    generator = torch.Generator().manual_seed(seed)
    rotations = random_rotations(qk.shape[-1], n_buckets, n_hashes, generator=generator)
    settings = dict(n_buckets=n_buckets, n_hashes=n_hashes, chunk_length=chunk_length, causal=True)
    output = lsh_attention(qk, v, rotations=rotations, **settings)[:split]  # (split, dv)

    changes = []
    for _ in range(n_trials):
        future_qk = torch.randn(qk[split:].shape, generator=generator)
        future_qk = future_qk / future_qk.norm(dim=-1, keepdim=True) * qk[split:].norm(dim=-1, keepdim=True)
        changed_qk = torch.cat([qk[:split], future_qk])
        changed_v = torch.cat([v[:split], torch.randn(v[split:].shape, generator=generator)])
        changed = lsh_attention(changed_qk, changed_v, rotations=rotations, **settings)[:split]
        moved = (changed - output).abs().amax(dim=-1) > threshold  # (split,)
        changes.append((moved, _row_change(changed, output)))

    reseeded = lsh_attention(qk, v, generator=generator, **settings)[:split]
    moved = torch.cat([m for m, _ in changes])
    relative = torch.cat([r[m] for m, r in changes])
    return {
        "changed_share": float(moved.float().mean()),
        "median_change": float(relative.median()) if relative.numel() else 0.0,
        "max_change": float(relative.max()) if relative.numel() else 0.0,
        "reseed_median_change": float(_row_change(reseeded, output).median()),
    }


def _row_change(changed: Tensor, original: Tensor) -> Tensor:
    """Relative change of each row: |changed - original| / |original|."""
    return (changed - original).norm(dim=-1) / original.norm(dim=-1).clamp_min(1e-12)


def _attention_methods(n_hashes: int, chunk_length: int) -> Dict[str, Callable[[Tensor, Tensor], Tensor]]:
    from ..lsh.attention import default_n_buckets, factorise_n_buckets

    def lsh(qk: Tensor, v: Tensor) -> Tensor:
        n_buckets = factorise_n_buckets(default_n_buckets(qk.shape[-2], chunk_length))
        return lsh_attention(qk, v, n_buckets=n_buckets, n_hashes=n_hashes, chunk_length=chunk_length, causal=True,
                             generator=torch.Generator().manual_seed(0))

    return {
        f"LSH ({n_hashes} rounds, chunk {chunk_length})": lsh,
        "SDPA (exact)": lambda qk, v: F.scaled_dot_product_attention(qk, qk, v, is_causal=True),
        "chunked (exact)": lambda qk, v: chunked_attention(qk, qk, v, causal=True),
    }


def attention_cost(
    lengths: Sequence[int],
    *,
    dim: int = 64,
    n_hashes: int = 4,
    chunk_length: int = 64,
    repeats: int = 3,
    device: Optional[torch.device] = None,
    chunked_max_length: int = 8192,
) -> Dict[str, Dict[str, List[float]]]:
    """Time and measure one causal forward pass (no gradients) of LSH, SDPA and chunked exact attention.

    Inputs are ``(1, 1, L, dim)``. Time is the median of ``repeats`` calls after
    one warm-up call, in seconds. Memory is ``measure_peak_memory`` of one more
    call, in bytes, measured after all the timings. Returns ``{method: {"seconds": [...], "bytes": [...]}}``
    in the order of ``lengths``. Chunked attention, the slowest, runs only up
    to ``chunked_max_length``, and its lists are shorter then.
    """
    device = device or torch.device("cpu")
    methods = _attention_methods(n_hashes, chunk_length)
    results = {name: {"seconds": [], "bytes": []} for name in methods}
    generator = torch.Generator().manual_seed(0)
    inputs = [
        (torch.randn(1, 1, length, dim, generator=generator).to(device),
         torch.randn(1, 1, length, dim, generator=generator).to(device))
        for length in lengths
    ]

    def selected(name: str, length: int) -> bool:
        return not (name.startswith("chunked") and length > chunked_max_length)

    # All timings first: on the CPU, measure_peak_memory makes large blocks use
    # mmap for the rest of the process, and the page faults slow later calls.
    with torch.no_grad():
        for (qk, v), length in zip(inputs, lengths):
            for name, method in methods.items():
                if selected(name, length):
                    results[name]["seconds"].append(_median_seconds(method, qk, v, repeats, device))
        for (qk, v), length in zip(inputs, lengths):
            for name, method in methods.items():
                if selected(name, length):
                    results[name]["bytes"].append(float(measure_peak_memory(method, qk, v, device=device)))
    return results


def _median_seconds(method: Callable, qk: Tensor, v: Tensor, repeats: int, device: torch.device) -> float:
    """Median time of ``repeats`` calls after one warm-up call, in seconds."""
    method(qk, v)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        method(qk, v)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def plot_attention_cost(lengths: Sequence[int], results: Dict[str, Dict[str, List[float]]]) -> plt.Figure:
    """Draw time and peak memory against sequence length, log-log, one line per method."""
    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(11.0, 3.9))
    for name, result in results.items():
        measured = list(lengths)[: len(result["seconds"])]
        time_axes.plot(measured, result["seconds"], marker="o", label=name)
        memory_axes.plot(measured, np.array(result["bytes"]) / 2**20, marker="o", label=name)
    for axes, label in ((time_axes, "time per forward pass (s)"), (memory_axes, "peak memory added (MiB)")):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("sequence length L")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3, which="both")
    time_axes.legend(fontsize=8)
    figure.tight_layout()
    return figure
