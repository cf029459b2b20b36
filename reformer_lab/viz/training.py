"""Figures for training runs: validation bits per character against steps, per variant."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["plot_validation_curves", "plot_results_file_curves"]


def plot_validation_curves(
    histories: Mapping[str, List[Dict[str, float]]],
    *,
    baselines: Optional[Mapping[str, float]] = None,
    metric: str = "valid_bpc",
    x: str = "step",
    title: str = "Validation bits per character",
    ax: Optional[Axes] = None,
) -> Figure:
    """Draw one line per variant of ``metric`` against ``x``, from ``train.train`` histories.

    ``baselines`` maps a label to a constant (for example the unigram model's
    bpc), drawn as a dashed horizontal line. Returns the figure; the caller
    shows it.
    """
    if ax is None:
        figure, ax = plt.subplots(figsize=(7, 4))
    else:
        figure = ax.figure

    for name, history in histories.items():
        if not history:
            raise ValueError(f"history of variant {name!r} is empty; train for at least eval_every steps")
        ax.plot([entry[x] for entry in history], [entry[metric] for entry in history], marker="o", label=name)
    for label, value in (baselines or {}).items():
        ax.axhline(value, linestyle="--", color="gray", linewidth=1)
        ax.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), va="bottom", color="gray")

    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel("bits per character" if metric == "valid_bpc" else metric.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def plot_results_file_curves(results: Mapping, *, ax: Optional[Axes] = None) -> Figure:
    """Plot the validation curves stored in a results file written by ``benchmarks/ablation.py``.

    ``results`` is the parsed JSON: ``{"settings": ..., "baselines": {label:
    bpc}, "runs": {variant: {"history": [...], ...}}}``.
    """
    histories = {name: run["history"] for name, run in results["runs"].items()}
    settings = results["settings"]
    title = (
        f"Validation bpc, {settings['steps']} steps, d_model {settings['d_model']}, "
        f"L {settings['seq_len']}"
    )
    return plot_validation_curves(histories, baselines=results.get("baselines"), title=title, ax=ax)
