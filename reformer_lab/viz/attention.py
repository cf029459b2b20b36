"""Figures for the exact-attention notebooks: memory and time against length, masks."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["plot_memory_against_length", "plot_time_against_length", "plot_attention_pattern"]

_MIB = 1024 * 1024


def _finish_log_log(figure: plt.Figure, axes: plt.Axes, ylabel: str, title: str) -> plt.Figure:
    """Label a log-log plot against sequence length and lay the figure out."""
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("sequence length L")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_memory_against_length(
    lengths: Sequence[int],
    measured: Dict[str, Sequence[Optional[int]]],
    predicted: Optional[Dict[str, Sequence[int]]] = None,
    *,
    budget_bytes: Optional[int] = None,
    title: str = "Peak memory of one attention call",
) -> plt.Figure:
    """Plot measured peak bytes (markers) and analytic sizes (dashed) against L, log-log.

    ``measured`` maps a label to one value per length; None marks a length that
    was not run.
    """
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for label, values in measured.items():
        points = [(L, v / _MIB) for L, v in zip(lengths, values) if v is not None]
        axes.plot(*zip(*points), marker="o", label=f"{label} (measured)")
    for label, values in (predicted or {}).items():
        axes.plot(lengths, np.asarray(values) / _MIB, linestyle="--", label=label)
    if budget_bytes is not None:
        axes.axhline(budget_bytes / _MIB, color="grey", linewidth=0.8)
        axes.annotate("budget", (lengths[0], budget_bytes / _MIB), va="bottom", color="grey")
    return _finish_log_log(figure, axes, "MiB", title)


def plot_time_against_length(
    lengths: Sequence[int],
    seconds: Dict[str, Sequence[Optional[float]]],
    *,
    title: str = "Time of one attention call",
) -> plt.Figure:
    """Plot seconds per call against L, log-log, one line per method."""
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for label, values in seconds.items():
        points = [(L, s) for L, s in zip(lengths, values) if s is not None]
        axes.plot(*zip(*points), marker="o", label=label)
    return _finish_log_log(figure, axes, "seconds", title)


def plot_attention_pattern(
    allowed: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    title: str = "Which keys each query may use",
) -> plt.Figure:
    """Show a boolean ``(Lq, Lk)`` pattern, and beside it the attention weights if given."""
    panels = 1 if weights is None else 2
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4), squeeze=False)
    axes[0, 0].imshow(allowed.numpy(), cmap="Greys", vmin=0, vmax=1)
    axes[0, 0].set_title(title)
    if weights is not None:
        image = axes[0, 1].imshow(weights.detach().numpy(), cmap="viridis")
        axes[0, 1].set_title("attention weights")
        figure.colorbar(image, ax=axes[0, 1], fraction=0.046)
    for axis in axes[0]:
        axis.set_xlabel("key position s")
        axis.set_ylabel("query position t")
    figure.tight_layout()
    return figure
