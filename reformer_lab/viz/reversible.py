"""Figures for the reversible-layers notebook: reconstruction error and memory curves."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["plot_reconstruction_error", "plot_memory_curves"]

_MIB = 2**20


def _new_axes(ax: Optional[Axes], figsize=(6, 4)) -> Axes:
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_reconstruction_error(
    depths: Sequence[int],
    errors: Dict[str, Sequence[float]],
    ax: Optional[Axes] = None,
) -> Figure:
    """Plot the max absolute error of inverse(forward(x)) against the number of blocks.

    ``errors`` maps a label (for example ``"float32"``) to one error per depth.
    The y axis is logarithmic, so zero errors are drawn at the bottom of the axis.
    """
    ax = _new_axes(ax)
    for label, values in errors.items():
        ax.plot(depths, [max(value, 1e-300) for value in values], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("number of reversible blocks")
    ax.set_ylabel("max |x - inverse(forward(x))|")
    ax.set_title("Reconstruction error through the stack")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ax.figure


def plot_memory_curves(
    x_values: Sequence[float],
    measured: Dict[str, Sequence[float]],
    formulas: Optional[Dict[str, Sequence[float]]] = None,
    *,
    xlabel: str,
    title: str,
    ax: Optional[Axes] = None,
) -> Figure:
    """Plot measured peak memory (markers) and analytic sizes (dashed lines) in MiB.

    ``measured`` and ``formulas`` map a label to one value in bytes per entry of
    ``x_values``.
    """
    ax = _new_axes(ax)
    for label, values in measured.items():
        ax.plot(x_values, [value / _MIB for value in values], marker="o", label=f"{label} (measured)")
    for label, values in (formulas or {}).items():
        ax.plot(x_values, [value / _MIB for value in values], linestyle="--", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return ax.figure
